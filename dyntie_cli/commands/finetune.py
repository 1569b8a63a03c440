"""`dyntie finetune glue --task T`: fine-tune (or train from scratch) a classifier with dynamic tying."""

from __future__ import annotations

from typing import Annotated

import typer

from . import options as o


def finetune(
    benchmark: Annotated[str, typer.Argument(help="Backbone / benchmark (glue).")] = "glue",
    task: Annotated[str | None, typer.Option("--task", "-t", help="GLUE task: rte, mrpc, cola, sst2, qnli, "
                                                "wnli, stsb, mnli, qqp.")] = None,
    init: Annotated[str | None, typer.Option("--init", help="A local pretrained model folder to start "
                                                "from (default: from scratch, as in the paper).")] = None,
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
    quiet: o.Quiet = False,
) -> None:
    """Train a GLUE classifier with dynamic layer tying; the final score is on the test split when it has
    labels, else on the dev split (the report names the split)."""
    from ..runner import RunOptions, run_training

    sets = list(set_ or [])
    if init:
        sets.append(f"model.init={init}")
    opts = RunOptions(backbone=benchmark, dataset=task, preset=preset, recipe=recipe, sets=sets, db=db, out=out,
                      seed=seed, device=device, max_steps=max_steps, decide_every=decide_every, variant=variant,
                      agent=agent, reward=reward, max_independent=max_independent,
                      param_penalty=param_penalty, tied_grad=tied_grad, data_dir=data_dir, quiet=quiet)
    run_training(opts, record_as="finetune", expect="finetune")


def register(app: typer.Typer) -> None:
    app.command("finetune", epilog="Example: dyntie finetune glue --task rte --preset bert-tiny "
                "--data-dir ../shared/data/glue")(finetune)
