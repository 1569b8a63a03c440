"""`dyntie study BACKBONE`: variants x seeds at equal steps, one study in the registry, and its table."""

from __future__ import annotations

from typing import Annotated

import typer

from ..variants import DEFAULT_STUDY
from .options import Format, TrainingOptions, training_options


@training_options(exclude=("variant", "seed"))
def study(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone to study.")] = "gpt2",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds; every variant runs on each.")]
    = "0,1,2",
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated variants: dynamic, no-tying, "
                                          "final-arch, replay, random, grow, q-off, static-*. final-arch, replay "
                                          "and grow (without --independent) are trained from the seed's dynamic "
                                          "run.")] = ",".join(DEFAULT_STUDY),
    name: Annotated[str | None, typer.Option("--name", help="The study's name in the registry \\[default: "
                                             "PRESET-STEPS-HASH of the shared settings]: run the same command "
                                             "again to continue it.")] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="Runs trained at once, each in its own process (1: one "
                                      "after another in this process).")] = 1,
    executor: Annotated[str, typer.Option("--executor", help="Where the runs train: local (this machine, as --jobs "
                                          "says) or ray (each run a task of a Ray cluster with a registry of its "
                                          "own, merged into --db as runs finish; RAY_ADDRESS names a running "
                                          "cluster, else a local one starts).")] = "local",
    fmt: Format = "table",
) -> None:
    """Train every variant on every seed with the same settings and steps, record them in the registry as one
    study (runs.config gets {"study": {"name": NAME}}), and print the study table: per variant the validation
    metric over seeds (mean, sample std, min, max), the mean ratio to no-tying, independent blocks, and the paired
    difference to dynamic per seed with a sign count.

    A study stopped by Ctrl-C or SIGTERM (or with a run killed) continues when the same command runs again: finished
    runs are kept, a killed run resumes from its checkpoint, nothing finished is trained twice. `dyntie report
    --table study --study NAME` prints the table again; `dyntie report --plot study` draws its validation curves.

    Example: dyntie study gpt2 --preset gpt2-deep-cpu --max-steps 300 --seeds 0,1,2 --set train.eval_every=50
    """
    from ..core.distributed import Group
    from ..errors import DyntieError, UsageError
    from ..experiments.study import Study, echo_to_stderr, parse_seeds, parse_variants, summary
    from ..report.tables import FORMATS, render
    from ..results.queries import run_query
    from ..results.study import study_run_ids, study_title

    if fmt not in FORMATS:
        raise UsageError(f"Unknown format {fmt!r}; use {', '.join(FORMATS)}.")
    if Group.from_env().active:
        raise UsageError("Run `dyntie study` as one process, without torchrun.")
    independent_given = opts.given("independent") or any(k in ("ties.independent", "independent")
                                                          for k, _ in opts.set_pairs())
    one = Study(backbone, opts.sources(), opts.launch(), independent_given=independent_given,
                variants=parse_variants(variants), seeds=parse_seeds(seeds), name=name, jobs=jobs,
                say=echo_to_stderr(bool(opts.quiet)), executor=executor)
    tasks = one.run()
    left = summary(one, tasks)
    if left:
        raise DyntieError(left, exit_code=128 + one.stop if one.stop is not None else 1)
    table = run_query("study", one.launch.db, study_run_ids(one.launch.db, one.name))
    typer.echo(render(table, fmt, title=f"{one.name}: {study_title()}"))


def register(app: typer.Typer) -> None:
    app.command("study", epilog="Examples: dyntie study gpt2 --preset gpt2-cpu --max-steps 300 | dyntie study gpt2 "
                "--preset gpt2-deep-cpu --max-steps 300 --variants dynamic,q-off,grow --jobs 2 | dyntie study gpt2 "
                "--preset gpt2-cpu --agent lean --name lean-cpu")(study)
