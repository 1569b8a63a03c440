"""`dyntie finetune glue --task T`: fine-tune (or train from scratch) a classifier with dynamic tying."""

from __future__ import annotations

from typing import Annotated

import typer

from .options import TrainingOptions, examples, training_options


@training_options(exclude=("dataset",))
def finetune(
    opts: TrainingOptions,
    benchmark: Annotated[str, typer.Argument(help="Backbone / benchmark (glue).")] = "glue",
    task: Annotated[str | None, typer.Option("--task", "-t", help="GLUE task: rte, mrpc, cola, sst2, qnli, "
                                                "wnli, stsb, mnli, qqp.")] = None,
) -> None:
    """Train a GLUE classifier with dynamic layer tying; the final score is on the dev split (GLUE's test
    labels are hidden; the report names the split).

    RTE, the default task, ships with dyntie and runs offline. Other tasks read --data-dir DIR (the folders
    download_glue_data.py writes: DIR/MRPC/train.tsv, DIR/MRPC/dev.tsv) or, online, the Hugging Face hub.
    """
    from ..runner import Job, Launch, new_settings, run_job

    if task is not None:
        opts.extra.append(("dataset", task))
    bb, settings = new_settings(benchmark, opts, expect="finetune")
    run_job(bb, Job(settings, "finetune"), Launch.from_options(opts))


def register(app: typer.Typer) -> None:
    app.command("finetune", epilog=examples(
        "dyntie finetune glue --task rte",
        "dyntie finetune glue --task mrpc --preset bert-tiny --data-dir tests/fixtures/glue   (in a clone)"))(finetune)
