"""The dyntie command line: one Typer app, its command groups, and the one error boundary."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from . import __version__
from .errors import DyntieError


class DyntieGroup(TyperGroup):
    """Turns dyntie's own errors into one line on stderr and a non-zero exit; DYNTIE_DEBUG=1 re-raises."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DyntieError as e:
            if os.environ.get("DYNTIE_DEBUG"):
                raise
            typer.echo(f"Error: {e}", err=True)
            sys.exit(e.exit_code)


app = typer.Typer(
    cls=DyntieGroup,
    help="Train transformers with dynamic layer tying (David-Hay & Wolf, ICLR 2024).",
    epilog="Examples:  dyntie train gpt2   |   dyntie report --table paper   |   dyntie backbones",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dyntie {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Train transformers with dynamic layer tying: a Q-learning agent decides, every k steps, which
    transformer blocks own their weights and which reuse an earlier block's.

    Results go to a DuckDB registry (--db, or DYNTIE_DB, default ./dyntie.duckdb); `dyntie report` reads it.
    Set DYNTIE_DEBUG=1 to see tracebacks.
    """


def _register() -> None:
    from .commands import ablate, backbones, bench, config, finetune, merge, plan, report, study, train

    for module in (train, finetune, ablate, study, report, merge, bench, backbones, config, plan):
        module.register(app)


_register()


def main() -> None:
    app()
