"""`dyntie ablate --variant V [--from-run R]`: the paper's ablations and the baselines a reviewer asks for."""

from __future__ import annotations

from typing import Annotated

import typer

from ..errors import UsageError
from . import options as o

NEEDS_SOURCE = ("final-arch", "replay")
VARIANTS = ("final-arch", "replay", "no-tying", "random", "static-all", "static-sequence", "static-cycle",
            "static-cycle-rev")


def ablate(
    variant: Annotated[str, typer.Option("--variant", help="final-arch, replay, no-tying, random, static-all, "
                                         "static-sequence, static-cycle, static-cycle-rev.")],
    from_run: Annotated[str | None, typer.Option("--from-run", help="The dynamic run to ablate: its "
                                                    "data, seed, steps and hyperparameters are reused.")] = None,
    backbone: Annotated[str | None, typer.Option("--backbone", help="Backbone, when there is no "
                                                    "--from-run.")] = None,
    independent: Annotated[int | None, typer.Option("--independent", help="Static schemes: number of "
                                                       "independent blocks [default: the source run's mean, "
                                                       "else L/4].")] = None,
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
) -> None:
    """Run variant V as a new run linked to its source run (parent_run_id), with the same data, seed, steps
    and hyperparameters unless overridden, so `dyntie report --table paper` can set them side by side."""
    from ..backbones.registry import get_backbone
    from ..config import RunConfig, apply_set, parse_sets
    from ..registry.db import resolve_db_path
    from ..registry.lineage import load_source_run
    from ..runner import RunOptions, run_training, validate_config

    if variant not in VARIANTS:
        raise UsageError(f"Unknown ablation variant {variant!r}; choose one of {', '.join(VARIANTS)}.")
    if variant in NEEDS_SOURCE and not from_run:
        raise UsageError(f"--variant {variant} needs --from-run RUN (the dynamic run whose ties it uses).")
    opts = RunOptions(backbone=backbone or "", dataset=dataset, preset=preset, sets=set_ or [], db=db, out=out,
                      seed=seed, device=device, max_steps=max_steps, decide_every=decide_every, variant=variant,
                      data_dir=data_dir, quiet=quiet)
    if not from_run:
        if not backbone:
            raise UsageError("Pass --from-run RUN, or --backbone NAME for a variant without a source run.")
        if independent is not None:
            opts.sets.append(f"ties.independent={independent}")
        run_training(opts, record_as=as_command)
        return
    source = load_source_run(resolve_db_path(db), from_run)
    cfg = RunConfig.from_dict(source["config"])
    bb = get_backbone(cfg.backbone)
    cfg.variant = variant
    overrides = {"dataset": dataset, "seed": seed, "device": device, "data_dir": data_dir,
                 "train.max_steps": max_steps, "ties.decide_every": decide_every, "ties.independent": independent}
    if preset:
        raise UsageError("--preset cannot change with --from-run: an ablation keeps its source run's model.")
    for k, v in overrides.items():
        if v is not None:
            apply_set(cfg, k, v)
    for k, v in parse_sets(opts.sets):
        apply_set(cfg, k, v)
    cfg.agent.seed = cfg.seed
    validate_config(cfg, bb)
    run_training(opts, record_as=as_command, source=source, parent_run_id=source["run_id"],
                 cfg_override=cfg, backbone=bb)


def register(app: typer.Typer) -> None:
    app.command("ablate", epilog="Examples: dyntie ablate --variant final-arch --from-run RUN | dyntie ablate "
                "--variant no-tying --from-run RUN | dyntie ablate --variant static-cycle --backbone gpt2 "
                "--independent 4")(ablate)
