"""`dyntie job FILE`: hidden; trains one job file in a process of its own (runner/children.py starts it)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def job(
    job_file: Annotated[Path, typer.Argument(help="A job file written by dyntie.")],
    result: Annotated[Path, typer.Option("--result", help="Where to write the run's result (JSON).")],
) -> None:
    """Train one job file (how `dyntie bench` and `dyntie study --jobs N` start each run in its own process), or
    continue the killed run it names."""
    from ..runner.children import train_job_file

    train_job_file(job_file, result)


def register(app: typer.Typer) -> None:
    app.command("job", hidden=True)(job)
