"""`dyntie export RUN --out DIR`: a run's last checkpoint (or its best model) as a plain transformers/timm folder, or
compact; and `dyntie export-metrics RUN --to tensorboard|mlflow`: a recorded run's figures sent to the trackers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .options import Db


def export(
    run: Annotated[str, typer.Argument(help="The run (its id, or a unique prefix).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write (new, empty, or with "
                                                          "--overwrite).")],
    fmt: Annotated[str, typer.Option("--format", "-f", help="full: a plain library folder, tied blocks as copies "
                                                            "of their root; compact: each independent block once "
                                                            "and the tie map (dyntie_cli.load_tied reads it).")]
    = "full",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out folder (only once the "
                                                                "new export has passed its round trip).")] = False,
    best: Annotated[bool, typer.Option("--best", help="Export the model of the run's best validation figure (its "
                                                      "best/ folder, the model its test score is of) instead of its "
                                                      "last checkpoint.")] = False,
    db: Db = None,
) -> None:
    """Export RUN's last checkpoint (finished, killed or still running), or with --best the model of its best
    validation figure, and check the round trip: the folder,
    loaded back by the library (full) or by dyntie_cli.load_tied (compact), must give the run's outputs on a
    fixed validation batch to 1e-5, else nothing is written.
    """
    from ..export import export_run
    from ..results.db import resolve_db_path

    r = export_run(resolve_db_path(db), run, out, fmt=fmt, overwrite=overwrite, best=best)
    mib = 2**20
    which = "best validation" if best else "last checkpoint"
    at = f" of step {r.step}" if r.step is not None else ""
    typer.echo(f"exported: {r.run_id} -> {r.folder} ({r.format}; the model{at}, its {which})")
    typer.echo(f"round trip: max abs difference {r.difference:.3g} (limit 1e-05)")
    typer.echo(f"independent blocks: {r.independent} of {r.blocks}; trainable fraction {r.trainable_fraction:.3f}")
    if r.format == "compact":
        typer.echo(f"weights: {r.weights_bytes / mib:.2f} MiB compact, {r.full_bytes / mib:.2f} MiB full "
                   f"({r.weights_bytes / r.full_bytes:.3f} of full)")
    else:
        typer.echo(f"weights: {r.weights_bytes / mib:.2f} MiB")


def export_metrics(
    run: Annotated[str, typer.Argument(help="The run (its id, or a unique prefix).")],
    to: Annotated[str, typer.Option("--to", help="tensorboard, mlflow, or both joined by a comma.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Where the trackers write: TensorBoard under "
                                                                 "OUT/tensorboard, MLflow's store OUT/mlruns unless "
                                                                 "MLFLOW_TRACKING_URI is set (default: where the "
                                                                 "run's own trackers would have written).")] = None,
    db: Db = None,
) -> None:
    """Send a recorded run to TensorBoard or MLflow as if it had trained with --set train.report_to=...: its
    settings, every metric, memory, tie and decision row, its tie states as a picture and its status (a run still
    training goes as far as the registry holds it; a run sent again replaces what was sent before).
    """
    from ..errors import UsageError
    from ..results.db import resolve_db_path
    from ..results.trackers import send_recorded, tracker_names

    names = tracker_names(to)
    if not names:
        raise UsageError("--to none sends nothing: use --to tensorboard, --to mlflow or --to tensorboard,mlflow.")
    run_id, count, folder = send_recorded(resolve_db_path(db), run, names, out)
    typer.echo(f"sent: {run_id} ({count:,} rows) to {' and '.join(names)} under {folder}")


def register(app: typer.Typer) -> None:
    app.command("export", epilog="Examples: dyntie export RUN --out gpt2-out | dyntie export RUN --out tied "
                "--format compact | dyntie export RUN --best --out best-out")(export)
    app.command("export-metrics", epilog="Examples: dyntie export-metrics RUN --to tensorboard | dyntie "
                "export-metrics RUN --to mlflow --out tracked")(export_metrics)
