"""`dyntie bench`: conventional training and the other variants side by side, each in a process of its own (a clean
peak memory), training in turns (or one at a time), the set repeated when asked; the runs are recorded with
command 'bench'."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..core.loop import Job
from ..core.threads import plan_threads
from ..errors import DyntieError, UsageError
from ..runner.children import run_in_child, run_in_turns
from ..runner.jobs import Launch
from ..runner.settings_source import SettingsSource, new_settings
from ..variants import BASELINE, METHOD, RERUN, spec, with_savers
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
              in_turns: bool = True, say: Callable[[str], None] = lambda text: None) -> Bench:
    """Train every variant of ``names`` (``bench_variants``) with the settings of ``source``, ``repeat`` times, each
    run in a child process. ``in_turns`` (the default): a round's variants start at once and train in turns, one
    loop iteration of each at a time (core/turns.py), so a machine whose speed drifts slows them alike; the variants
    that need a source run then train in turns beside a rerun of the dynamic run (``RERUN``), through which their
    speed is compared. One at a time: every other round runs the set in reverse (no-tying, dynamic, dynamic,
    no-tying, ...), so a slow patch of the machine falls on both sides of a comparison, and a variant that needs a
    source run is trained after the others from its round's dynamic run."""
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
    # see the previous child's load and time the variants at different thread counts (in turns one trains at a time)
    threads = launch.threads or plan_threads(None).threads
    child_launch = {"db": str(launch.db), "out": str(launch.out), "force": launch.force, "threads": threads}
    out = Bench()
    for r in range(repeat):
        order = trained if in_turns or r % 2 == 0 else trained[::-1]
        rounds = {"group": group, "round": r + 1, "rounds": repeat}
        where = f" (round {r + 1} of {repeat})" if repeat > 1 else ""
        jobs = [(v, Job(settings[v], "bench", labels=_labels(rounds, v, 1 if in_turns else None))) for v in order]
        run_ids = _train_set(jobs, child_launch, in_turns, where, say, out)
        if not sourced or METHOD not in run_ids:
            continue
        turns = 2 if in_turns else None
        jobs = [(v, ablation_job(launch.db, run_ids[METHOD], v, [], command="bench",
                                 labels=_labels(rounds, v, turns))[1]) for v in sourced]
        if in_turns:
            jobs.append((RERUN, Job(settings[METHOD], "bench", labels=_labels(rounds, RERUN, turns))))
        _train_set(jobs, child_launch, in_turns, where, say, out)
    return out


def _labels(rounds: dict[str, Any], v: str, turns: int | None) -> dict[str, Any]:
    """What a bench run's config records of the bench: its group and round, its name where that is not its variant
    (a variant with savers, the rerun of the dynamic run), and in turns which set of turns it trained in (1, or 2:
    the variants made from the dynamic run, beside its rerun)."""
    named = {"variant": v} if "+" in v or v == RERUN else {}
    return {"bench": rounds | named | ({"turns": turns} if turns else {})}


def _train_set(jobs: list[tuple[str, Job]], child_launch: dict[str, Any], in_turns: bool, where: str,
               say: Callable[[str], None], out: Bench) -> dict[str, str]:
    """Train ``jobs`` (variant, job) in child processes, in turns or one at a time; their run ids by variant (a
    variant the memory plan refused is kept in ``out.refused``). A failed run fails the bench once the set ends."""
    payloads = [({"job": job.to_dict(), **child_launch}, f"bench: {v}{where}") for v, job in jobs]
    if in_turns and len(jobs) > 1:
        say(f"bench: {', '.join(v for v, _ in jobs)}{where}, in turns")
        results = run_in_turns(payloads)
    else:
        results = []
        for payload, label in payloads:
            say(label)
            results.append(run_in_child(payload, label))
    run_ids: dict[str, str] = {}
    for (v, _), result in zip(jobs, results):
        if isinstance(result, DyntieError):
            raise result
        if "refused" in result:
            out.refused[v] = result
            continue
        run_ids[v] = result["run_id"]
    out.run_ids += run_ids.values()
    return run_ids
