"""`dyntie finetune glue --task T`: fine-tune (or train from scratch) a classifier with dynamic tying."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import Resume, TrainingOptions, examples, training_options
from .train import resume_run


@training_options(exclude=("dataset",))
def finetune(
    opts: TrainingOptions,
    benchmark: Annotated[str, typer.Argument(help="Backbone / benchmark (glue).")] = "glue",
    task: Annotated[str | None, typer.Option("--task", "-t", help="GLUE task: rte, mrpc, cola, sst2, qnli, "
                                                "wnli, stsb, mnli, qqp.")] = None,
    resume: Resume = None,
) -> None:
    """Train a GLUE classifier with dynamic layer tying; the final score is on the dev split (GLUE's test
    labels are hidden; the report names the split).

    RTE, the default task, ships with dyntie and runs offline. Other tasks read --data-dir DIR (the folders
    download_glue_data.py writes: DIR/MRPC/train.tsv, DIR/MRPC/dev.tsv) or, online, the Hugging Face hub.
    """
    from ..core.loop import Job
    from ..runner.jobs import run_job
    from ..runner.settings_source import new_settings

    if resume is not None:
        resume_run(opts, resume)
        return
    extra = [("dataset", task)] if task is not None else []
    bb, settings = new_settings(benchmark, opts.sources(*extra), expect="finetune")
    run_job(bb, Job(settings, "finetune"), opts.launch())


def register(app: typer.Typer) -> None:
    app.command("finetune", epilog=examples(
        "dyntie finetune glue --task rte",
        "dyntie finetune glue --task mrpc --preset bert-tiny --data-dir tests/fixtures/glue   (in a clone)"))(finetune)
