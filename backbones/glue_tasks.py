"""The GLUE task table: how each task is laid out on disk and on the hub, and how it is scored."""

from __future__ import annotations

import re
from dataclasses import dataclass

from dyntie_cli.errors import UsageError


@dataclass(frozen=True)
class GlueTask:
    """How one GLUE task is laid out on disk and on the hub, and how it is scored."""

    name: str
    #: folder name in the download_glue_data.py layout
    folder: str
    #: text columns in the TSV: header names, or positions for a file without a header (CoLA)
    text_columns: tuple[str | int, ...]
    label_column: str | int
    #: label strings of the TSV in the hub's order (index = class id); empty for regression (STS-B)
    labels: tuple[str, ...]
    #: task metrics besides loss/ppl: accuracy, mcc, f1, pearson, spearman
    metrics: tuple[str, ...]
    hub_text_columns: tuple[str, ...]
    dev_file: str = "dev.tsv"
    hub_dev_split: str = "validation"
    header: bool = True

    @property
    def regression(self) -> bool:
        return not self.labels

    @property
    def num_labels(self) -> int:
        return len(self.labels) or 1


_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

TASKS: dict[str, GlueTask] = {
    t.name: t
    for t in [
        # CoLA's train/dev files have no header: source, label, original judgement, sentence
        GlueTask("cola", "CoLA", (3,), 1, _BINARY, ("accuracy", "mcc"), ("sentence",), header=False),
        GlueTask("sst2", "SST-2", ("sentence",), "label", _BINARY, ("accuracy",), ("sentence",)),
        GlueTask(
            "mrpc",
            "MRPC",
            ("#1 String", "#2 String"),
            "Quality",
            _BINARY,
            ("accuracy", "f1"),
            ("sentence1", "sentence2"),
        ),
        GlueTask(
            "qqp",
            "QQP",
            ("question1", "question2"),
            "is_duplicate",
            _BINARY,
            ("accuracy", "f1"),
            ("question1", "question2"),
        ),
        GlueTask(
            "stsb",
            "STS-B",
            ("sentence1", "sentence2"),
            "score",
            (),
            ("pearson", "spearman"),
            ("sentence1", "sentence2"),
        ),
        GlueTask(
            "mnli",
            "MNLI",
            ("sentence1", "sentence2"),
            "gold_label",
            ("entailment", "neutral", "contradiction"),
            ("accuracy",),
            ("premise", "hypothesis"),
            dev_file="dev_matched.tsv",
            hub_dev_split="validation_matched",
        ),
        GlueTask(
            "qnli", "QNLI", ("question", "sentence"), "label", _NLI2, ("accuracy",), ("question", "sentence")
        ),
        GlueTask(
            "rte",
            "RTE",
            ("sentence1", "sentence2"),
            "label",
            _NLI2,
            ("accuracy",),
            ("sentence1", "sentence2"),
        ),
        GlueTask(
            "wnli",
            "WNLI",
            ("sentence1", "sentence2"),
            "label",
            _BINARY,
            ("accuracy",),
            ("sentence1", "sentence2"),
        ),
    ]
}


def get_task(name: str) -> GlueTask:
    task = TASKS.get(fold_task_name(name))
    if task is None:
        raise UsageError(f"Unknown GLUE task {name!r}: use --task with one of {', '.join(TASKS)}.")
    return task


def fold_task_name(name: str) -> str:
    """'SST-2', 'sst_2' and 'sst2' all name one task (and one folder)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())
