"""`dyntie ablate --variant V [--from-run R]`: the paper's ablations and the baselines a reviewer asks for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from ..errors import DyntieError, UsageError
from . import options as o

if TYPE_CHECKING:
    from ..config import RunConfig

NEEDS_SOURCE = ("final-arch", "replay")
STATIC = ("static-all", "static-sequence", "static-cycle", "static-cycle-rev")
VARIANTS = ("final-arch", "replay", "no-tying", "random", *STATIC)
# Static schemes whose state depends on a number of independent blocks (all-shared has exactly one).
MATCHED = tuple(v for v in STATIC if v != "static-all")
# Seeds tried when looking for a replay permutation that really moves the schedule; for any state other than
# all-tied or all-independent a quarter or more of all permutations do, so a few tries are enough.
PERM_SEED_TRIES = 1000


def ablate(
    variant: Annotated[str, typer.Option("--variant", help="final-arch, replay, no-tying, random, static-all, "
                                         "static-sequence, static-cycle, static-cycle-rev.")],
    from_run: Annotated[str | None, typer.Option("--from-run", help="The dynamic run to ablate: its "
                                                    "data, seed, steps and hyperparameters are reused.")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", help="Backbone, when there is no "
                                                    "--from-run.")] = None,
    # Parentheses, not brackets: the help is Rich markup, where "[default: ...]" would vanish as a tag.
    independent: Annotated[int | None, typer.Option("--independent", help="Static schemes: number of "
                                                       "independent blocks (default: the source run's mean, "
                                                       "rounded half up; else L/4).")] = None,
    dataset: o.Dataset = None,
    preset: o.Preset = None,
    set_: o.Sets = None,
    db: o.Db = None,
    out: o.Out = None,
    seed: o.Seed = None,
    device: o.Device = None,
    max_steps: o.MaxSteps = None,
    decide_every: o.DecideEvery = None,
    data_dir: o.DataDir = None,
    quiet: o.Quiet = False,
    as_command: Annotated[str, typer.Option("--as-command", hidden=True)] = "ablate",
    bench_round: Annotated[str | None, typer.Option("--bench-round", hidden=True)] = None,
) -> None:
    """Run variant V as a new run linked to its source run (parent_run_id), with the same data, seed, steps
    and hyperparameters unless overridden, so `dyntie report --table paper` can set them side by side.

    What a variant resolves from the source is written into the new run's config: the number of independent
    blocks of a static scheme (ties.independent) and the replay permutation's seed (ties.perm_seed).
    """
    from ..registry.db import resolve_db_path
    from ..registry.lineage import load_source_run
    from ..runner import RunOptions, run_training

    _check_arguments(variant, from_run, backbone, independent)
    opts = RunOptions(backbone=backbone or "", dataset=dataset, preset=preset, sets=list(set_ or []), db=db,
                      out=out, seed=seed, device=device, max_steps=max_steps, decide_every=decide_every,
                      variant=variant, data_dir=data_dir, quiet=quiet)
    if not from_run:
        if independent is not None:
            opts.sets.append(f"ties.independent={independent}")
        run_training(opts, record_as=as_command, bench_round=bench_round)
        return
    if preset:
        raise UsageError("--preset cannot change with --from-run: an ablation keeps its source run's model.")
    source = load_source_run(resolve_db_path(db), from_run)
    _check_source(variant, source, independent is not None or _sets_key(opts.sets, "independent"))
    overrides = {"dataset": dataset, "seed": seed, "device": device, "data_dir": data_dir,
                 "train.max_steps": max_steps, "ties.decide_every": decide_every,
                 "ties.independent": independent}
    cfg, bb = _source_config(source, variant, overrides, opts.sets, backbone)
    if variant in MATCHED:
        _match_independent(cfg, source)
    if variant == "replay" and not _sets_key(opts.sets, "perm_seed"):
        _choose_moving_permutation(cfg, source, quiet)
    run_training(opts, record_as=as_command, source=source, parent_run_id=source["run_id"],
                 cfg_override=cfg, backbone=bb, bench_round=bench_round)


def _check_arguments(variant: str, from_run: str | None, backbone: str | None,
                     independent: int | None) -> None:
    """Combinations that cannot make sense, refused before anything is loaded."""
    if variant not in VARIANTS:
        raise UsageError(f"Unknown ablation variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    if variant in NEEDS_SOURCE and not from_run:
        raise UsageError(f"--variant {variant} needs --from-run RUN (the dynamic run whose ties it uses).")
    if not from_run and not backbone:
        raise UsageError("Pass --from-run RUN, or --backbone NAME for a variant without a source run.")
    if independent is not None and variant not in STATIC:
        raise UsageError(f"--independent applies to the static-* variants only; drop it for {variant}.")
    if independent is not None and independent < 1:
        raise UsageError("--independent must be at least 1 (block 0 always owns its weights).")


def _check_source(variant: str, source: dict[str, Any], independent_given: bool) -> None:
    """The source must have the tie history the variant reads, and that history must be complete."""
    reads_history = variant in NEEDS_SOURCE or (variant in MATCHED and not independent_given)
    if not reads_history:
        return
    run_id = source["run_id"]
    if source["status"] == "running":
        raise DyntieError(f"Run {run_id} is still training; ablate it once it has finished.")
    if source["final_state"] is None:
        raise DyntieError(f"Run {run_id} has no tie history; pass --from-run with a run that made tie "
                          "decisions.")


def _source_config(source: dict[str, Any], variant: str, overrides: dict[str, Any], sets: list[str],
                   backbone: str | None) -> tuple[RunConfig, Any]:
    """The source run's resolved config with the variant and the user's overrides applied."""
    from ..backbones.registry import get_backbone
    from ..config import RunConfig, apply_set, parse_sets
    from ..runner import validate_config

    cfg = RunConfig.from_dict(source["config"])
    if backbone and backbone != cfg.backbone:
        raise UsageError(f"--backbone {backbone} differs from the source run's {cfg.backbone}; "
                         "drop --backbone.")
    cfg.variant = variant
    for key, value in overrides.items():
        if value is not None:
            apply_set(cfg, key, value)
    for key, value in parse_sets(sets):
        apply_set(cfg, key, value)
    cfg.agent.seed = cfg.seed
    bb = get_backbone(cfg.backbone)
    validate_config(cfg, bb)
    return cfg, bb


def _match_independent(cfg: RunConfig, source: dict[str, Any]) -> None:
    """Static schemes default to the source run's mean number of independent blocks, written into the config
    so the run records the number it used."""
    if cfg.ties.independent:
        return
    blocks = len(source["final_state"])
    # Round half up: 2.5 independent blocks on average is matched by 3, not by Python's banker's 2.
    cfg.ties.independent = min(blocks, max(1, int(source["mean_independent"] + 0.5)))


def _sets_key(sets: list[str], name: str) -> bool:
    from ..config import parse_sets

    return any(key.rsplit(".", 1)[-1] == name for key, _ in parse_sets(sets))


def _choose_moving_permutation(cfg: RunConfig, source: dict[str, Any], quiet: bool) -> None:
    """Pick the first permutation seed (from the configured one on) that moves at least one replayed state.

    A permutation that maps every state of the schedule onto itself would replay the source on the same layers
    and measure nothing; on few blocks that happens often (with 4 blocks a quarter of all permutations fix
    [0, 1, 0, 0]). The chosen seed is written into the config, so the run stays reproducible.
    """
    from ..core.policies import random_permutation
    from ..core.ties import permute_state

    schedule = source["schedule"]
    blocks = len(source["final_state"])
    for seed in range(cfg.ties.perm_seed, cfg.ties.perm_seed + PERM_SEED_TRIES):
        perm = random_permutation(blocks, seed)
        if any(permute_state(state, perm) != state for state in schedule):
            cfg.ties.perm_seed = seed
            return
    if not quiet:
        typer.echo(f"Note: no permutation moves the tie schedule of {source['run_id']} (every state is "
                   "all-tied or all-independent), so the replay repeats it on the same layers.", err=True)


def register(app: typer.Typer) -> None:
    app.command("ablate", epilog="Examples: dyntie ablate --variant final-arch --from-run RUN | dyntie ablate "
                "--variant no-tying --from-run RUN | dyntie ablate --variant static-cycle --backbone gpt2 "
                "--independent 4")(ablate)
