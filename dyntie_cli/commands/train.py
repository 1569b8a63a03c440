"""`dyntie train BACKBONE`: train a model with dynamic layer tying (or a baseline variant)."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import Resume, TrainingOptions, examples, training_options


@training_options()
def train(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone to train (gpt2, vit, ...).")] = "gpt2",
    resume: Resume = None,
) -> None:
    """Train BACKBONE with dynamic layer tying and record the run in the registry.

    With no options, `dyntie train gpt2` trains the gpt2-cpu preset (12 x 128) on the embedded WikiText-2
    copy: offline, on a CPU, in minutes.
    """
    from ..core.loop import Job
    from ..runner.jobs import run_job
    from ..runner.settings_source import new_settings

    if resume is not None:
        resume_run(opts, resume)
        return
    bb, settings = new_settings(backbone, opts.sources(), expect="train")
    run_job(bb, Job(settings, "train"), opts.launch())


def resume_run(opts: TrainingOptions, run_id: str) -> None:
    """Continue killed run ``run_id`` from its last checkpoint with its recorded settings (``--max-steps`` may
    extend it): `dyntie train`, `finetune` and `ablate` take ``--resume RUN``, and each continues any run."""
    from ..runner.jobs import resume_recorded

    opts.check_resume(run_id)
    launch = opts.launch()
    resume_recorded(launch.db, run_id, max_steps=opts.max_steps, quiet=launch.quiet, force=launch.force,
                    threads=launch.threads)


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        epilog=examples("dyntie train gpt2", "dyntie train gpt2 --dataset wikitext-103 --data-dir DIR",
                        "dyntie train gpt2 --preset gpt2-deep-cpu --variant no-tying",
                        "dyntie train vit --dataset digits"),
    )(train)
