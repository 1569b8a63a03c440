"""`dyntie train BACKBONE`: train a model with dynamic layer tying (or a baseline variant)."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import TrainingOptions, examples, training_options


@training_options()
def train(
    opts: TrainingOptions,
    backbone: Annotated[str, typer.Argument(help="Backbone to train (gpt2, vit, ...).")] = "gpt2",
    resume: Annotated[str | None, typer.Option("--resume", help="Resume a killed run from its last checkpoint, "
                                                  "with the settings it was recorded with (it takes --max-steps, "
                                                  "--threads, --quiet, --db and --force; a finished run is "
                                                  "refused).")] = None,
) -> None:
    """Train BACKBONE with dynamic layer tying and record the run in the registry.

    With no options, `dyntie train gpt2` trains the gpt2-cpu preset (12 x 128) on the embedded WikiText-2
    copy: offline, on a CPU, in minutes.
    """
    from ..core.loop import Job
    from ..runner.jobs import resume_recorded, run_job
    from ..runner.settings_source import new_settings

    if resume is not None:
        opts.check_resume(resume)
    launch = opts.launch()
    if resume is not None:
        resume_recorded(launch.db, resume, max_steps=opts.max_steps, quiet=launch.quiet, force=launch.force,
                        threads=launch.threads)
        return
    bb, settings = new_settings(backbone, opts.sources(), expect="train")
    run_job(bb, Job(settings, "train"), launch)


def register(app: typer.Typer) -> None:
    app.command(
        "train",
        epilog=examples("dyntie train gpt2", "dyntie train gpt2 --dataset wikitext-103 --data-dir DIR",
                        "dyntie train gpt2 --preset gpt2-deep-cpu --variant no-tying",
                        "dyntie train vit --dataset digits"),
    )(train)
