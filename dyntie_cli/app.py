"""The dyntie command line: one Typer app, its command groups, and the one error boundary."""

from __future__ import annotations

import inspect
import os
import sys
from typing import Annotated

import typer
from typer.core import TyperGroup

from . import __version__
from .commands.options import examples
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
    epilog=examples("dyntie train gpt2", "dyntie finetune glue --task rte", "dyntie report --table memory",
                    "dyntie ablate --variant final-arch", "dyntie backbones"),
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


def reflow(text: str | None) -> str | None:
    """Help text as paragraphs: the lines of a docstring paragraph joined into one (Typer's rich mode keeps a
    docstring's line breaks after its first paragraph, which breaks sentences in the middle on any terminal
    narrower or wider than the source)."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines() if line.strip()) for p in paragraphs)


def _reflow_help(typer_app: typer.Typer) -> None:
    """Reflow the help of every command and command group of ``typer_app`` (and of the groups in it)."""
    typer_app.info.help = reflow(typer_app.info.help)
    for command in typer_app.registered_commands:
        command.help = reflow(command.help or (command.callback.__doc__ if command.callback else None))
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            _reflow_help(group.typer_instance)


def _register() -> None:
    from .commands import (
        ablate,
        backbones,
        bench,
        config,
        export,
        finetune,
        generate,
        job,
        merge,
        plan,
        report,
        study,
        train,
    )

    for module in (train, finetune, ablate, study, report, merge, bench, job, export, generate, backbones, config,
                   plan):
        module.register(app)
    _reflow_help(app)


_register()


def main() -> None:
    app()
