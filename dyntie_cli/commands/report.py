"""`dyntie report`: named tables (and plots) over the registry, while runs are training too."""

from __future__ import annotations

from typing import Annotated

import typer

from ..report.tables import FORMATS
from ..results.queries import REPORT_TABLES
from .options import Db, Format, examples

#: how the speed rows of --compare are measured, under the table people read
COMPARE_NOTE = ("step_time_s: the median training step. tokens_per_s: tokens (examples) per step / step_time_s, "
                "so its ratio is the reciprocal of step_time_s's. Both leave out setup, evaluations and "
                "checkpoints; wall_s is the whole run.")


def terminal_width() -> int | None:
    """The width of the terminal stdout is, or None when it is a pipe or a file."""
    from rich.console import Console

    console = Console()
    return console.width if console.is_terminal else None


def report(
    table: Annotated[str | None, typer.Option("--table", help=f"One of: {', '.join(REPORT_TABLES)}.")] = None,
    run: Annotated[list[str] | None, typer.Option("--run", help="Run id or unique prefix (repeatable); "
                                                     "default: all runs.")] = None,
    compare: Annotated[list[str] | None, typer.Argument(help="With --compare: runs to set side by side.",
                                                           show_default=False)] = None,
    compare_flag: Annotated[bool, typer.Option("--compare", help="Side-by-side metrics of the runs given, "
                                               "with ratios to the first.")] = False,
    study: Annotated[str | None, typer.Option("--study", help="The runs of this study (`dyntie study` records "
                                              "its name), for any table or plot.")] = None,
    plot: Annotated[str | None, typer.Option("--plot", help="ties, layers, memory, params, metrics or study "
                                             "(a study's validation curves per variant).")] = None,
    out: Annotated[str | None, typer.Option("--out", help="PNG file for --plot.")] = None,
    fmt: Format = "table",
    wide: Annotated[bool, typer.Option("--wide", help="Every column, however wide the terminal (a pipe or a "
                                       "file always gets every column).")] = False,
    db: Db = None,
) -> None:
    """Show a named table from the registry. Data goes to stdout, so `--format csv > runs.csv` works.

    On a terminal a table fits its width: long column names wrap, each table's headline columns stay (the memory
    table's process_peak_bytes, the bench's ratios), and the other columns that do not fit are named below it
    (--wide shows them all).

    Examples: dyntie report --table runs | dyntie report --table paper --run R1 --run R2 --format markdown |
    dyntie report --compare R1 R2 | dyntie report --plot ties --run R --out ties.png | dyntie report --table study
    --study NAME | dyntie report --plot study --study NAME --out study.png
    """
    from ..errors import UsageError
    from ..report.tables import render
    from ..results.bench import bench_title
    from ..results.db import resolve_db_path
    from ..results.queries import run_query
    from ..results.study import study_run_ids, study_title

    if fmt not in FORMATS:
        raise UsageError(f"Unknown format {fmt!r}; use {', '.join(FORMATS)}.")
    path = resolve_db_path(db)
    if study is not None or plot == "study":
        if run or compare:
            raise UsageError("--study chooses the runs; drop --run and the run ids (or drop --study).")
        run = study_run_ids(path, study)
    width = terminal_width() if fmt == "table" and not wide else None
    if plot:
        from ..report.plots import make_plot

        written, chosen = make_plot(plot, path, run or list(compare or []), out)
        if chosen:
            typer.echo(f"{plot} plot of {chosen} (--run R draws another)", err=True)
        typer.echo(str(written))
        return
    if compare_flag:
        ids = list(run or []) + list(compare or [])
        if len(ids) < 2:
            raise UsageError("--compare needs at least two runs: dyntie report --compare R1 R2.")
        typer.echo(render(run_query("compare", path, ids), fmt, title="compare", width=width))
        if fmt in ("table", "markdown"):
            import textwrap

            typer.echo(textwrap.fill(COMPARE_NOTE, width=(width or 110) - 1))
        return
    if compare:
        raise UsageError("Run ids as arguments go with --compare; otherwise use --run R.")
    name = table or "runs"
    if name not in REPORT_TABLES:
        raise UsageError(f"No report table '{name}'; choose one of: {', '.join(REPORT_TABLES)}.")
    title = {"bench": bench_title(), "study": study_title()}.get(name, name)
    table = run_query(name, path, run or None)
    chosen = table.attrs.get("chosen")
    if chosen:
        more = f" and the {len(chosen) - 1} run{'s' if len(chosen) > 2 else ''} trained from it" \
            if len(chosen) > 1 else ""
        typer.echo(f"{name}: {chosen[0]}, the newest finished dynamic run{more} (--run R picks others)", err=True)
    typer.echo(render(table, fmt, title=title, width=width))


def register(app: typer.Typer) -> None:
    app.command("report", epilog=examples(
        "dyntie report --table runs", "dyntie report --table memory",
        "dyntie report --table paper --run R1 --run R2 --format markdown", "dyntie report --compare R1 R2",
        "dyntie report --plot ties --run R --out ties.png"))(report)
