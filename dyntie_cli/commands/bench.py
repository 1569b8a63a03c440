"""`dyntie bench`: conventional training and dynamic tying side by side, each variant in its own process."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Annotated

import typer

from .options import Format, TrainingOptions, examples, training_options

# final-arch: the dynamic run's final state fixed from step 0, its twin at equal steps; dynamic / final-arch shows
# what the tie machinery itself costs per step
DEFAULT_VARIANTS = "no-tying,dynamic,final-arch"


@training_options(exclude=("variant",))
def bench(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone to benchmark.")] = "gpt2",
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated: no-tying, dynamic, final-arch, "
                                          "random, static-*. no-tying is the baseline of the ratios; final-arch, "
                                          "the dynamic run's final state from step 0, its twin.")]
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
    from ..errors import UsageError
    from ..report.tables import render
    from ..results.bench import bench_title
    from ..results.queries import run_query
    from ..runner import Job, Launch, new_settings, run_in_child
    from .report import terminal_width

    if repeat < 1:
        raise UsageError("--repeat must be at least 1 (the number of times the set of variants runs).")
    if Group.from_env().active:
        raise UsageError("Run `dyntie bench` as one process, without torchrun: it starts one process per variant.")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    if "no-tying" not in names:
        names.insert(0, "no-tying")
    if "final-arch" in names and "dynamic" not in names:
        raise UsageError("--variants final-arch needs dynamic in the list (its final state is the source).")
    launch = Launch.from_options(opts)
    # every variant's settings are resolved (and refused if wrong) before the first process starts
    jobs = {}
    for v in names:
        if v != "final-arch":
            opts.extra[:] = [("variant", v)]
            jobs[v] = new_settings(backbone, opts)[1]
    trained = [v for v in names if v != "final-arch"]
    group = uuid.uuid4().hex[:8]  # recorded in each run's config, so `report --table bench` pools the rounds too
    rounds: list[dict[str, str]] = []
    child_launch = {"db": str(launch.db), "out": str(launch.out), "force": launch.force, "threads": launch.threads}
    refused: dict[str, dict] = {}
    for r in range(repeat):
        # every other round in reverse: a slow patch of the machine falls on both sides of a comparison
        order = (trained if r % 2 == 0 else trained[::-1]) + [v for v in names if v == "final-arch"]
        labels = {"bench": {"group": group, "round": r + 1, "rounds": repeat}} if repeat > 1 else {}
        run_ids: dict[str, str] = {}
        for v in order:
            if v == "final-arch":  # its source is this round's dynamic run
                if "dynamic" not in run_ids:
                    continue
                _, job = ablation_job(launch.db, run_ids["dynamic"], "final-arch", [], command="bench",
                                      labels=labels)
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


def job(
    job_file: Annotated[Path, typer.Argument(help="A job file written by dyntie.")],
    result: Annotated[Path, typer.Option("--result", help="Where to write the run's result (JSON).")],
) -> None:
    """Train one job file (how `dyntie bench` and `dyntie study --jobs N` start each run in its own process), or
    continue the killed run it names."""
    from dataclasses import asdict

    from ..core.plan import DoesNotFit
    from ..runner import Job, Launch, resume_recorded, run_job

    data = json.loads(job_file.read_text())
    force, threads = bool(data.get("force")), data.get("threads")
    try:
        if "resume" in data:
            run = resume_recorded(Path(data["db"]), data["resume"], quiet=True, print_summary=False, force=force,
                                  threads=threads)
        else:
            backbone, one = Job.from_dict(data["job"])
            launch = Launch(Path(data["db"]), Path(data["out"]), quiet=True, force=force, threads=threads)
            run = run_job(backbone, one, launch, print_summary=False)
    except DoesNotFit as refused:  # not an error of the bench: a finding, reported as such
        result.write_text(json.dumps({"refused": str(refused), "plan": refused.plan.to_dict()}))
        return
    result.write_text(json.dumps(asdict(run)))


def register(app: typer.Typer) -> None:
    app.command("bench", epilog=examples("dyntie bench gpt2 --preset gpt2-deep-cpu --max-steps 300 --repeat 2"))(bench)
    app.command("job", hidden=True)(job)
