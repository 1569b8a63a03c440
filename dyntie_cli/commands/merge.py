"""`dyntie merge SOURCE... --db TARGET`: copy the runs of several registry files into one."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import Db


def merge(
    sources: Annotated[list[Path], typer.Argument(help="Registry files to copy from.", show_default=False)],
    db: Db = None,
) -> None:
    """Copy every run of the SOURCE registries, with all its rows, into the registry --db (created if needed):
    for runs trained in parallel processes that each wrote their own file. A run already in the target is skipped,
    so merging twice changes nothing; a run id the target holds for another run is refused, nothing written.

    Example: dyntie merge seed0.duckdb seed1.duckdb seed2.duckdb --db study.duckdb
    """
    from ..results.db import resolve_db_path
    from ..results.merge import merge_registries

    target = resolve_db_path(db)
    report = merge_registries(list(sources), target)
    typer.echo(f"merged into {target}: {len(report.copied)} runs copied ({report.rows:,} rows), "
               f"{len(report.skipped)} already there")


def register(app: typer.Typer) -> None:
    app.command("merge")(merge)
