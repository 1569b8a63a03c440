"""What a variant takes from its source run: the source's settings, tie history and mean independent blocks.

``ablation_job`` turns a recorded dynamic run and a variant into a ``Job`` that trains the variant with the
source's data, seed, steps and hyperparameters (unless overridden), linked to it by ``parent_run_id``. Used by
``dyntie ablate``, ``dyntie bench`` (final-arch) and ``dyntie study`` (final-arch, replay and grow of each seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..core.loop import Job
from ..core.policies import random_permutation
from ..core.ties import permute_state
from ..errors import DyntieError, UsageError
from ..results.lineage import load_source_run, newest_finished_run
from ..runner.settings_source import recorded_settings
from ..settings import RunSettings, revised
from ..variants import ABLATIONS, METHOD, NAMES, named, spec

#: seeds tried when looking for a replay permutation that really moves the schedule; for any state other than
#: all-tied or all-independent a quarter or more of all permutations do, so a few tries are enough
PERM_SEED_TRIES = 1000


def check_source(variant: str, source: dict[str, Any], independent_given: bool) -> None:
    """The source must have the tie history the variant reads, and that history must be complete."""
    if not spec(variant).reads_source(independent_given):
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
    (flag and ``--set`` pairs) on top. What the variant resolves from the source is recorded in the job's
    settings: the number of independent blocks of a static scheme or of grow (``ties.independent``) and the
    replay permutation's seed (``ties.perm_seed``). ``notes`` collects what a person should be told (a replay that
    cannot move)."""
    source = load_source_run(db, from_run)
    given = {key.rsplit(".", 1)[-1] for pairs in sources for key, _ in pairs}
    check_source(variant, source, "independent" in given)
    backbone, settings = recorded_settings(source["config"], [[("variant", variant)], *sources])
    resolved = []
    count = spec(variant).count_from_source
    if count is not None and not settings.ties.independent:
        resolved.append(("ties.independent", count(source)))
    if variant == "replay" and "perm_seed" not in given:
        seed, note = choose_moving_permutation(settings, source)
        resolved.append(("ties.perm_seed", seed))
        if note and notes is not None:
            notes.append(note)
    if resolved:
        settings = revised(settings, resolved)
    return backbone, Job(settings, command, parent_run_id=source["run_id"], source=source, labels=labels or {})


def choose_moving_permutation(settings: RunSettings, source: dict[str, Any]) -> tuple[int, str | None]:
    """The first permutation seed (from the configured one on) that moves at least one replayed state, and a
    note when none does (the seed is then the configured one).

    A permutation that maps every state of the schedule onto itself would replay the source on the same layers
    and measure nothing; on few blocks that happens often (with 4 blocks a quarter of all permutations fix
    [0, 1, 0, 0]). The chosen seed is recorded in the settings, so the run stays reproducible.
    """
    schedule = source["schedule"]
    blocks = len(source["final_state"])
    first = settings.ties.perm_seed
    for seed in range(first, first + PERM_SEED_TRIES):
        perm = random_permutation(blocks, seed)
        if any(permute_state(state, perm) != state for state in schedule):
            return seed, None
    return first, (f"Note: no permutation moves the tie schedule of {source['run_id']} (every state is all-tied "
                   "or all-independent), so the replay repeats it on the same layers.")


def check_ablation_arguments(variant: str, independent: int | None) -> None:
    """Combinations that cannot make sense, refused before anything is loaded."""
    if variant not in ABLATIONS:
        raise UsageError(f"Unknown ablation variant {variant!r}; choose one of {', '.join(ABLATIONS)}.")
    if independent is not None and not spec(variant).takes_independent:
        takers = named(n for n in NAMES if spec(n).takes_independent)
        raise UsageError(f"--independent applies to {takers} only; drop it for {variant}.")
    if independent is not None and independent < 1:
        raise UsageError("--independent must be at least 1 (block 0 always owns its weights).")


def choose_source(db: Path, variant: str, from_run: str | None, backbone: str | None) -> str | None:
    """The run an ablation starts from: ``--from-run``; else the newest finished dynamic run in the registry
    (of ``--backbone``, when given) for a variant that needs a source or when no ``--backbone`` is given;
    None for a variant trained fresh from ``--backbone``'s preset."""
    if from_run:
        return from_run
    needs_source = spec(variant).needs_source
    if backbone and not needs_source:
        return None
    found = newest_finished_run(db, METHOD, backbone)
    if found is None:
        from ..plugins import get_backbone

        name = backbone or "gpt2"
        train = f"dyntie {get_backbone(name).command} {name}"
        of = f" {backbone}" if backbone else ""
        fresh = "" if needs_source else ", or --backbone NAME to train it from a preset instead"
        raise DyntieError(f"--variant {variant} starts from a finished dynamic{of} run and {db} has none: train "
                          f"one first (`{train}`), or pass --from-run RUN (`dyntie report --table runs` lists "
                          f"the runs){fresh}.")
    return found
