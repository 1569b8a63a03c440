"""`dyntie bench`: conventional training and dynamic tying side by side, each variant in its own process."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Annotated

import typer

from ..errors import DyntieError, UsageError
from . import options as o

DEFAULT_VARIANTS = "no-tying,dynamic"


def _run_variant(args: list[str], variant: str, quiet: bool) -> str:
    """One variant in a fresh interpreter, so its peak RSS is its own; returns its run id."""
    cmd = [sys.executable, "-m", "dyntie_cli", *args]
    if not quiet:
        typer.echo(f"bench: {variant}: {' '.join(args)}", err=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy(), check=False)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise DyntieError(f"bench: variant {variant} failed: {last}")
    for line in proc.stdout.splitlines():
        if line.startswith("run_id: "):
            return line.split(": ", 1)[1].strip()
    raise DyntieError(f"bench: variant {variant} printed no run id.")


def bench(
    backbone: Annotated[str, typer.Argument(help="Backbone to benchmark.")] = "gpt2",
    variants: Annotated[str, typer.Option("--variants", help="Comma-separated: no-tying, dynamic, final-arch, "
                                          "random, static-*. no-tying is the baseline of the ratios.")]
    = DEFAULT_VARIANTS,
    preset: o.Preset = None,
    dataset: o.Dataset = None,
    set_: o.Sets = None,
    db: o.Db = None,
    out: o.Out = None,
    seed: o.Seed = None,
    device: o.Device = None,
    max_steps: o.MaxSteps = None,
    decide_every: o.DecideEvery = None,
    agent: o.Agent = None,
    data_dir: o.DataDir = None,
    repeat: Annotated[int, typer.Option("--repeat", help="Run the set N times, the order reversed every other "
                                        "round (no-tying, dynamic, dynamic, no-tying, ...), and report medians: "
                                        "for speed on a machine whose load drifts.")] = 1,
    fmt: Annotated[str, typer.Option("--format", "-f", help="table, csv, json or markdown.")] = "table",
    quiet: o.Quiet = False,
) -> None:
    """Train each variant on the same data, seed and steps, one process each (clean peak memory), record
    them as runs (command 'bench'), and print ratios against no-tying: peak memory, parameter / gradient /
    optimizer bytes, trainable parameters, tokens/s, median step time, validation perplexity, agent share.

    Example: dyntie bench gpt2 --preset gpt2-deep-cpu --max-steps 300 --repeat 2
    """
    from ..core.distributed import Group
    from ..registry.bench_queries import bench_title
    from ..registry.db import resolve_db_path
    from ..registry.queries import run_query
    from ..report.tables import render

    if repeat < 1:
        raise UsageError("--repeat must be at least 1 (the number of times the set of variants runs).")
    if Group.from_env().active:
        raise UsageError("Run `dyntie bench` as one process, without torchrun: it starts one process per variant.")
    names = [v.strip() for v in variants.split(",") if v.strip()]
    if "no-tying" not in names:
        names.insert(0, "no-tying")
    if "final-arch" in names and "dynamic" not in names:
        raise UsageError("--variants final-arch needs dynamic in the list (its final state is the source).")
    db_path = str(resolve_db_path(db))
    common = ["--db", db_path, "--quiet"]
    for flag, value in (("--preset", preset), ("--dataset", dataset), ("--out", out), ("--seed", seed),
                        ("--device", device), ("--max-steps", max_steps), ("--decide-every", decide_every),
                        ("--data-dir", data_dir)):
        if value is not None:
            common += [flag, str(value)]
    for s in set_ or []:
        common += ["--set", s]
    trained = [v for v in names if v != "final-arch"]
    after = [v for v in names if v == "final-arch"]  # final-arch needs its source, this round's dynamic run
    rounds: list[dict[str, str]] = []
    group = uuid.uuid4().hex[:8]  # recorded in each run's config, so `report --table bench` pools the rounds too
    for r in range(repeat):
        # every other round in reverse: a slow patch of the machine falls on both sides of a comparison
        order = (trained if r % 2 == 0 else trained[::-1]) + after
        run_ids: dict[str, str] = {}
        label = ["--bench-round", f"{group}:{r + 1}:{repeat}"] if repeat > 1 else []
        for v in order:
            if v == "final-arch":
                args = ["ablate", "--variant", "final-arch", "--from-run", run_ids["dynamic"], "--as-command",
                        "bench", *label, "--db", db_path, "--quiet"]
                args += [a for flag in ("--out", "--device") for a in _flag(common, flag)]
            else:
                args = ["train", backbone, "--variant", v, "--as-command", "bench", *label, *common]
                if agent and v == "dynamic":
                    args += ["--agent", agent]
            run_ids[v] = _run_variant(args, v if repeat == 1 else f"{v} (round {r + 1} of {repeat})", quiet)
        rounds.append({v: run_ids[v] for v in names})
    table = run_query("bench", db_path, [rid for r in rounds for rid in r.values()])
    typer.echo(render(table, fmt, title=bench_title(repeat)))


def _flag(args: list[str], flag: str) -> list[str]:
    return args[args.index(flag): args.index(flag) + 2] if flag in args else []


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
