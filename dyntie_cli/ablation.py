"""What a variant takes from its source run: the source's settings, tie history and mean independent blocks.

``ablation_job`` turns a recorded dynamic run and a variant into a ``Job`` that trains the variant with the
source's data, seed, steps and hyperparameters (unless overridden), linked to it by ``parent_run_id``. Used by
``dyntie ablate``, ``dyntie bench`` (final-arch) and ``dyntie study`` (final-arch, replay and grow of each seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .core.policies import random_permutation
from .core.ties import independent_count, permute_state
from .errors import DyntieError, UsageError
from .results.lineage import load_source_run, newest_finished_run
from .runner import Job, recorded_settings
from .settings import NEEDS_SOURCE, STATIC_SCHEMES, RunSettings

#: what `dyntie ablate --variant` accepts
ABLATIONS = ("final-arch", "replay", "no-tying", "random", *STATIC_SCHEMES, "grow", "q-off")
#: static schemes whose state depends on a number of independent blocks (all-shared has exactly one)
MATCHED = tuple(v for v in STATIC_SCHEMES if v != "static-all")
#: variants that take their number of independent blocks from the source run unless --independent gives it
COUNTED = (*MATCHED, "grow")
#: seeds tried when looking for a replay permutation that really moves the schedule; for any state other than
#: all-tied or all-independent a quarter or more of all permutations do, so a few tries are enough
PERM_SEED_TRIES = 1000


def check_source(variant: str, source: dict[str, Any], independent_given: bool) -> None:
    """The source must have the tie history the variant reads, and that history must be complete."""
    reads_history = variant in NEEDS_SOURCE or (variant in COUNTED and not independent_given)
    if not reads_history:
        return
    run_id = source["run_id"]
    if source["status"] == "running":
        raise DyntieError(f"Run {run_id} is still training; ablate it once it has finished.")
    if source["final_state"] is None:
        raise DyntieError(f"Run {run_id} has no tie history; pass --from-run with a run that made tie "
                          "decisions.")


def ablation_job(db: Path, from_run: str, variant: str, sources: list[list[tuple[str, Any]]], *,
                 command: str = "ablate", labels: dict[str, Any] | None = None,
                 notes: list[str] | None = None) -> tuple[Any, Job]:
    """The backbone and the job of ``variant`` trained from run ``from_run``'s settings, with ``sources``
    (flag and ``--set`` pairs) on top. What the variant resolves from the source is written into the job's
    settings: a static scheme's number of independent blocks (``ties.independent``) and the replay permutation's
    seed (``ties.perm_seed``). ``notes`` collects what a person should be told (a replay that cannot move)."""
    source = load_source_run(db, from_run)
    given = {key.rsplit(".", 1)[-1] for pairs in sources for key, _ in pairs}
    check_source(variant, source, "independent" in given)
    backbone, settings = recorded_settings(source["config"], [[("variant", variant)], *sources])
    if variant in MATCHED:
        match_independent(settings, source)
    if variant == "grow" and not settings.ties.independent:  # grow to the count the source ended with
        settings.ties.independent = independent_count(source["final_state"])
    if variant == "replay" and "perm_seed" not in given:
        note = choose_moving_permutation(settings, source)
        if note and notes is not None:
            notes.append(note)
    return backbone, Job(settings, command, parent_run_id=source["run_id"], source=source, labels=labels or {})


def match_independent(settings: RunSettings, source: dict[str, Any]) -> None:
    """Static schemes default to the source run's mean number of independent blocks, written into the
    settings so the run records the number it used."""
    if settings.ties.independent:
        return
    blocks = len(source["final_state"])
    # Round half up: 2.5 independent blocks on average is matched by 3, not by Python's banker's 2.
    settings.ties.independent = min(blocks, max(1, int(source["mean_independent"] + 0.5)))


def choose_moving_permutation(settings: RunSettings, source: dict[str, Any]) -> str | None:
    """Pick the first permutation seed (from the configured one on) that moves at least one replayed state;
    returns a note when none does.

    A permutation that maps every state of the schedule onto itself would replay the source on the same layers
    and measure nothing; on few blocks that happens often (with 4 blocks a quarter of all permutations fix
    [0, 1, 0, 0]). The chosen seed is written into the settings, so the run stays reproducible.
    """
    schedule = source["schedule"]
    blocks = len(source["final_state"])
    for seed in range(settings.ties.perm_seed, settings.ties.perm_seed + PERM_SEED_TRIES):
        perm = random_permutation(blocks, seed)
        if any(permute_state(state, perm) != state for state in schedule):
            settings.ties.perm_seed = seed
            return None
    return (f"Note: no permutation moves the tie schedule of {source['run_id']} (every state is all-tied or "
            "all-independent), so the replay repeats it on the same layers.")


def check_ablation_arguments(variant: str, independent: int | None) -> None:
    """Combinations that cannot make sense, refused before anything is loaded."""
    if variant not in ABLATIONS:
        raise UsageError(f"Unknown ablation variant {variant!r}; choose one of {', '.join(ABLATIONS)}.")
    if independent is not None and variant not in (*STATIC_SCHEMES, "grow"):
        raise UsageError(f"--independent applies to the static-* variants and grow only; drop it for {variant}.")
    if independent is not None and independent < 1:
        raise UsageError("--independent must be at least 1 (block 0 always owns its weights).")


def choose_source(db: Path, variant: str, from_run: str | None, backbone: str | None) -> str | None:
    """The run an ablation starts from: ``--from-run``; else the newest finished dynamic run in the registry
    (of ``--backbone``, when given) for a variant that needs a source or when no ``--backbone`` is given;
    None for a variant trained fresh from ``--backbone``'s preset."""
    if from_run:
        return from_run
    if backbone and variant not in NEEDS_SOURCE:
        return None
    found = newest_finished_run(db, "dynamic", backbone)
    if found is None:
        from .plugins import get_backbone

        name = backbone or "gpt2"
        train = f"dyntie {get_backbone(name).command} {name}"
        of = f" {backbone}" if backbone else ""
        fresh = "" if variant in NEEDS_SOURCE else ", or --backbone NAME to train it from a preset instead"
        raise DyntieError(f"--variant {variant} starts from a finished dynamic{of} run and {db} has none: train "
                          f"one first (`{train}`), or pass --from-run RUN (`dyntie report --table runs` lists "
                          f"the runs){fresh}.")
    return found
