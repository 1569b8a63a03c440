"""`dyntie bench`: conventional training and dynamic tying side by side, each variant in its own process."""

from __future__ import annotations

import uuid
from typing import Annotated

import typer

from .options import Format, TrainingOptions, examples, training_options

DEFAULT_VARIANTS = "no-tying,dynamic"


@training_options(exclude=("variant",))
def bench(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone to benchmark.")] = "gpt2",
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated: no-tying, dynamic, final-arch, "
                                          "random, static-*. no-tying is the baseline of the ratios.")]
    = DEFAULT_VARIANTS,
    repeat: Annotated[int, typer.Option("--repeat", help="Run the set N times, the order reversed every other "
                                        "round (no-tying, dynamic, dynamic, no-tying, ...), and report medians: "
                                        "for speed on a machine whose load drifts.")] = 1,
    fmt: Format = "table",
) -> None:
    """Train variants side by side and print their speed and memory as ratios to no-tying.

    Each variant trains on the same data, seed and steps, in a process of its own (a clean peak memory), and is
    recorded as a run (command 'bench'). The ratios: peak memory, parameter / gradient / optimizer bytes,
    trainable parameters, tokens/s, median step time, validation perplexity, agent share.
    """
    from ..ablation import ablation_job
    from ..core.distributed import Group
    from ..core.loop import Job
    from ..errors import UsageError
    from ..report.tables import render
    from ..results.bench import bench_title
    from ..results.queries import run_query
    from ..runner.children import run_in_child
    from ..runner.settings_source import new_settings
    from ..variants import BASELINE, METHOD, spec
    from .report import terminal_width

    if repeat < 1:
        raise UsageError("--repeat must be at least 1 (the number of times the set of variants runs).")
    if Group.from_env().active:
        raise UsageError("Run `dyntie bench` as one process, without torchrun: it starts one process per variant.")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    if BASELINE not in names:
        names.insert(0, BASELINE)
    # a variant that needs a source run is trained from the dynamic run of its round, after the others
    sourced = [v for v in names if spec(v).needs_source]
    if sourced and METHOD not in names:
        raise UsageError(f"--variants {sourced[0]} needs {METHOD} in the list (its tie states are the source).")
    launch = opts.launch()
    trained = [v for v in names if v not in sourced]
    # every variant's settings are resolved (and refused if wrong) before the first process starts
    jobs = {}
    for v in trained:
        jobs[v] = new_settings(backbone, opts.sources(("variant", v)))[1]
    group = uuid.uuid4().hex[:8]  # recorded in each run's config, so `report --table bench` pools the rounds too
    rounds: list[dict[str, str]] = []
    child_launch = {"db": str(launch.db), "out": str(launch.out), "force": launch.force, "threads": launch.threads}
    refused: dict[str, dict] = {}
    for r in range(repeat):
        # every other round in reverse: a slow patch of the machine falls on both sides of a comparison
        order = (trained if r % 2 == 0 else trained[::-1]) + sourced
        labels = {"bench": {"group": group, "round": r + 1, "rounds": repeat}} if repeat > 1 else {}
        run_ids: dict[str, str] = {}
        for v in order:
            if v in sourced:
                if METHOD not in run_ids:
                    continue
                _, job = ablation_job(launch.db, run_ids[METHOD], v, [], command="bench", labels=labels)
            else:
                job = Job(jobs[v], "bench", labels=labels)
            label = v if repeat == 1 else f"{v} (round {r + 1} of {repeat})"
            if not opts.quiet:
                typer.echo(f"bench: {label}", err=True)
            result = run_in_child({"job": job.to_dict(), **child_launch}, f"bench: {label}")
            if "refused" in result:
                refused[v] = result
                continue
            run_ids[v] = result["run_id"]
        rounds.append(run_ids)
    for v, result in refused.items():
        plan = result["plan"]
        typer.echo(f"{v}: does not fit: predicted {plan['peak_bytes'] / 2**30:.1f} GiB > "
                   f"{(plan['available_bytes'] or 0) / 2**30:.1f} GiB available (not trained; `dyntie plan` shows the "
                   "parts)")
    ran = [rid for r in rounds for rid in r.values()]
    if ran:
        table = run_query("bench", launch.db, ran)
        width = terminal_width() if fmt == "table" else None
        typer.echo(render(table, fmt, title=bench_title(repeat), width=width))


def register(app: typer.Typer) -> None:
    app.command("bench", epilog=examples("dyntie bench gpt2 --preset gpt2-deep-cpu --max-steps 300 --repeat 2"))(bench)
