"""`dyntie train BACKBONE`: train a model with dynamic layer tying (or a baseline variant)."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import TrainingOptions, examples, training_options


@training_options()
def train(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone to train (gpt2, vit, ...).")] = "gpt2",
    resume: Annotated[str | None, typer.Option("--resume", help="Resume a killed run from its last "
                                                  "checkpoint.")] = None,
) -> None:
    """Train BACKBONE with dynamic layer tying and record the run in the registry.

    With no options, `dyntie train gpt2` trains the gpt2-cpu preset (12 x 128) on the embedded WikiText-2
    copy: offline, on a CPU, in minutes.
    """
    from ..runner import Job, Launch, new_settings, resume_run, run_job

    if resume:
        resume_run(resume, opts)
        return
    bb, settings = new_settings(backbone, opts, expect="train")
    run_job(bb, Job(settings, "train"), Launch.from_options(opts))


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        epilog=examples("dyntie train gpt2", "dyntie train gpt2 --dataset wikitext-103 --data-dir DIR",
                        "dyntie train gpt2 --preset gpt2-deep-cpu --variant no-tying",
                        "dyntie train vit --dataset digits"),
    )(train)
