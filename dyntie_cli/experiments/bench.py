"""`dyntie bench`: conventional training and the other variants side by side, each in a process of its own (a clean
peak memory), the set repeated in alternating order when asked; the runs are recorded with command 'bench'."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.loop import Job
from ..core.threads import plan_threads
from ..errors import UsageError
from ..runner.children import run_in_child
from ..runner.jobs import Launch
from ..runner.settings_source import SettingsSource, new_settings
from ..variants import BASELINE, METHOD, spec, with_savers
from .ablation import ablation_job


@dataclass
class Bench:
    """What a bench trained: the run ids of every round, and the variants the memory plan refused (not trained),
    each with the child's finding (``refused``: the sentence, ``plan``: the prediction)."""

    run_ids: list[str] = field(default_factory=list)
    refused: dict[str, dict[str, Any]] = field(default_factory=dict)


def bench_variants(names: list[str]) -> list[str]:
    """The variants to train: ``names`` with the baseline of the ratios first when it is missing; a variant that
    needs a source run needs the dynamic run in the list (its source, trained in the same round). A name may add
    memory savers to its variant (``dynamic+checkpointing+adamw8bit``: variants.SAVERS)."""
    for name in names:
        try:
            with_savers(name)
        except ValueError as e:
            raise UsageError(str(e)) from None
    if BASELINE not in names:
        names.insert(0, BASELINE)
    sourced = [v for v in names if spec(v).needs_source]
    if sourced and METHOD not in names:
        raise UsageError(f"--variants {sourced[0]} needs {METHOD} in the list (the {METHOD} run of its round is its "
                         "source).")
    return names


def run_bench(backbone: str, source: SettingsSource, launch: Launch, names: list[str], *, repeat: int = 1,
              say: Callable[[str], None] = lambda text: None) -> Bench:
    """Train every variant of ``names`` (``bench_variants``) with the settings of ``source``, ``repeat`` times, each
    run in a child process; every other round runs the set in reverse (no-tying, dynamic, dynamic, no-tying, ...),
    so a slow patch of the machine falls on both sides of a comparison. A variant that needs a source run is trained
    after the others from its round's dynamic run."""
    names = bench_variants(names)
    sourced = [v for v in names if spec(v).needs_source]
    trained = [v for v in names if v not in sourced]
    # every variant's settings are resolved (and refused if wrong) before the first process starts
    settings = {}
    for v in trained:
        variant, savers = with_savers(v)
        # the savers before the command's own flags and --set pairs, which may still override them
        settings[v] = new_settings(backbone, SettingsSource(source.preset, source.recipe,
                                                            (*savers, *source.flags, ("variant", variant)),
                                                            source.sets))[1]
    group = uuid.uuid4().hex[:8]  # recorded in each run's config, so `report --table bench` pools the rounds too
    # one thread count for every run, chosen before the first: a child choosing its own from the load average would
    # see the previous child's load and time the variants at different thread counts
    threads = launch.threads or plan_threads(None).threads
    child_launch = {"db": str(launch.db), "out": str(launch.out), "force": launch.force, "threads": threads}
    out = Bench()
    for r in range(repeat):
        order = (trained if r % 2 == 0 else trained[::-1]) + sourced
        rounds = {"group": group, "round": r + 1, "rounds": repeat} if repeat > 1 else {}
        run_ids: dict[str, str] = {}
        for v in order:
            # a variant with savers is recorded under its own name (runs.config bench.variant) for the bench table
            labels = {"bench": rounds | ({"variant": v} if "+" in v else {})} if rounds or "+" in v else {}
            if v in sourced:
                if METHOD not in run_ids:
                    continue
                _, job = ablation_job(launch.db, run_ids[METHOD], v, [], command="bench", labels=labels)
            else:
                job = Job(settings[v], "bench", labels=labels)
            label = v if repeat == 1 else f"{v} (round {r + 1} of {repeat})"
            say(f"bench: {label}")
            result = run_in_child({"job": job.to_dict(), **child_launch}, f"bench: {label}")
            if "refused" in result:
                out.refused[v] = result
                continue
            run_ids[v] = result["run_id"]
        out.run_ids += run_ids.values()
    return out
