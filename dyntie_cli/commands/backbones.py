"""`dyntie backbones [PATTERN]`: the registered backbones, built-ins and plugins alike."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UsageError


def backbones(
    pattern: Annotated[str, typer.Argument(help="Shell-style pattern, e.g. 'gpt2*'.")] = "*",
) -> None:
    """List backbones: name, providing package, command, presets and datasets."""
    from ..plugins import list_backbones

    found = list_backbones(pattern)
    if not found:
        raise UsageError(f"No backbone matches {pattern!r}; run `dyntie backbones` to see them all.")
    table = Table(title="dyntie backbones")
    for col in ("name", "package", "command", "presets", "datasets / tasks"):
        table.add_column(col)
    for r in found:
        b = r.cls
        if b is None:
            table.add_row(r.name, r.source, "-", f"[red]failed to load: {r.error}[/]", "-")
            continue
        table.add_row(r.name, r.source, f"dyntie {b.command} {r.name}",
                      ", ".join(f"{p}*" if p == b.default_preset else p for p in b.presets),
                      ", ".join(b.datasets))
    console = Console()
    # a terminal's width wraps the cells; a pipe or a file keeps every row on one line
    (console if console.is_terminal else Console(width=200)).print(table)


def register(app: typer.Typer) -> None:
    app.command("backbones")(backbones)
