"""`dyntie train BACKBONE`: train a model with dynamic layer tying (or a baseline variant)."""

from __future__ import annotations

from typing import Annotated

import typer

from . import options as o


def train(
    backbone: Annotated[str, typer.Argument(help="Backbone to train (gpt2, vit, ...).")] = "gpt2",
    dataset: o.Dataset = None,
    preset: o.Preset = None,
    recipe: o.Recipe = None,
    set_: o.Sets = None,
    db: o.Db = None,
    out: o.Out = None,
    seed: o.Seed = None,
    device: o.Device = None,
    max_steps: o.MaxSteps = None,
    decide_every: o.DecideEvery = None,
    variant: o.Variant = None,
    agent: o.Agent = None,
    reward: o.Reward = None,
    max_independent: o.MaxIndependent = None,
    param_penalty: o.ParamPenalty = None,
    tied_grad: o.TiedGrad = None,
    data_dir: o.DataDir = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Resume a killed run from its last "
                                                  "checkpoint.")] = None,
    quiet: o.Quiet = False,
    as_command: Annotated[str, typer.Option("--as-command", hidden=True)] = "train",
    bench_round: Annotated[str | None, typer.Option("--bench-round", hidden=True)] = None,
) -> None:
    """Train BACKBONE with dynamic layer tying and record the run in the registry.

    With no options, `dyntie train gpt2` trains the gpt2-cpu preset (12 x 128) on the embedded WikiText-2
    copy: offline, on a CPU, in minutes.
    """
    from ..runner import RunOptions, resume_training, run_training

    opts = RunOptions(backbone=backbone, dataset=dataset, preset=preset, recipe=recipe, sets=set_ or [], db=db,
                      out=out, seed=seed, device=device, max_steps=max_steps, decide_every=decide_every,
                      variant=variant, agent=agent, reward=reward, max_independent=max_independent,
                      param_penalty=param_penalty, tied_grad=tied_grad, data_dir=data_dir, quiet=quiet)
    if resume:
        resume_training(resume, opts)
    else:
        run_training(opts, record_as=as_command, expect="train" if as_command == "train" else None,
                     bench_round=bench_round)


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        epilog="Examples: dyntie train gpt2 | dyntie train gpt2 --dataset wikitext-103 --data-dir DIR | "
        "dyntie train gpt2 --preset gpt2-deep-cpu --variant no-tying | dyntie train vit --dataset digits",
    )(train)
