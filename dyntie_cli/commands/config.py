"""`dyntie config show`: the resolved settings of a command line, before anything runs."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from .options import TrainingOptions, examples, training_options

config_app = typer.Typer(help="The settings a command line resolves to.", no_args_is_help=True)


@config_app.command("show", epilog=examples("dyntie config show gpt2 --preset gpt2-deep-cpu --set agent.keep_bias=0.9"))
@training_options()
def show(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone (gpt2, glue, vit, ...).")] = "gpt2",
    fmt: Annotated[str, typer.Option("--format", "-f", help="toml or json.")] = "toml",
) -> None:
    """Print every setting of a run as these options would resolve them (schema defaults < preset < recipe <
    flags < --set), validated as training would validate them, without loading data or building a model."""
    from ..errors import UsageError
    from ..runner.settings_source import new_settings

    if fmt not in ("toml", "json"):
        raise UsageError(f"Unknown format {fmt!r}; use toml or json.")
    _, settings = new_settings(backbone, opts.sources())
    tree = settings.to_dict()
    typer.echo(json.dumps(tree, indent=2) if fmt == "json" else to_toml(tree), nl=fmt == "json")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(tree: dict[str, Any]) -> str:
    """Settings as TOML (top-level keys, then one table per section); a recipe file can start from it.
    A null value (no data folder) is left out, as TOML has none."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict) and v is not None]
    for section, values in tree.items():
        if isinstance(values, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
