"""GLUE batches: tokenized splits served as the padded batches BERT trains on, and the GLUE backbone's data
entry point.

``load_glue_data`` is the one entry point the GLUE backbone calls. It looks the task up (``glue_tasks``), reads
its train and dev splits (``glue_splits``: local TSVs from ``--data-dir``, the copy of RTE dyntie ships, or
``nyu-mll/glue`` on the hub), builds the tokenizer (``wordpiece``), tokenizes once, and wraps it all in
``GlueData``.

Splits. GLUE's test labels are hidden, so the final score is computed on the **dev** split
(``test_split = "validation"``: the registry records that the reported score is GLUE's validation split).
Validation *during* training therefore cannot be dev: it is a seeded hold-out carved from train (10% by
default, the same rows for every run seed), so model selection never sees the split the final score is
computed on. Inside ``GlueData`` the three roles are "train" (train minus the hold-out), "validation" (the
hold-out) and "test" (GLUE dev).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dyntie_cli.backbone import Batch
from dyntie_cli.errors import DyntieError, UsageError

from .glue_splits import SPLIT_SEED, Examples, hold_out, load_glue_splits
from .glue_tasks import GlueTask, get_task
from .wordpiece import WordPiece, get_wordpiece


@dataclass
class Encoded:
    """One split, tokenized: variable-length token and segment ids, and labels."""

    ids: list[np.ndarray]
    type_ids: list[np.ndarray]
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.ids)


def encode(tokenizer: WordPiece, examples: Examples, max_seq_len: int, regression: bool) -> Encoded:
    tok = tokenizer.tokenizer
    # longest_first trims the longer segment first, so a long premise cannot squeeze out the hypothesis
    tok.enable_truncation(max_length=max_seq_len, strategy="longest_first")
    try:
        inputs = [t if len(t) == 2 else t[0] for t in examples.texts]
        encodings = tok.encode_batch(inputs) if inputs else []
    finally:
        tok.no_truncation()
    dtype = torch.float32 if regression else torch.long
    return Encoded(
        [np.asarray(e.ids, dtype=np.int64) for e in encodings],
        [np.asarray(e.type_ids, dtype=np.int64) for e in encodings],
        torch.tensor(examples.labels, dtype=dtype),
    )


class GlueData:
    """Tokenized GLUE splits served as padded batches (implements ``TaskData``).

    Roles: "train" (GLUE train minus the hold-out), "validation" (the hold-out) and "test" (GLUE dev,
    which the final score uses because GLUE's test labels are hidden; hence ``test_split = "validation"``).
    """

    test_split = "validation"

    def __init__(
        self,
        task: GlueTask,
        splits: dict[str, Encoded],
        *,
        batch_size: int,
        eval_batch_size: int,
        tokenizer: WordPiece,
        source: str,
    ) -> None:
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size)):
            if value < 1:
                raise UsageError(f"data.{name} must be at least 1, not {value}: set a positive value.")
        if not len(splits["train"]):
            raise DyntieError(
                f"GLUE {task.name} has no training rows left: use a larger data.max_train_samples."
            )
        self.task = task
        self.splits = splits
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.source = source

    def items_per_batch(self) -> int:
        return self.batch_size

    def train_batch(self, generator: torch.Generator) -> Batch:
        """``batch_size`` training examples drawn uniformly (with replacement) with ``generator``."""
        train = self.splits["train"]
        index = torch.randint(len(train), (self.batch_size,), generator=generator, device=generator.device)
        return self._collate(train, index.cpu().tolist())

    def eval_batches(self, split: str, max_items: int | None = None) -> Iterator[Batch]:
        """The first ``max_items`` examples of ``split`` in order ("validation": hold-out, "test": dev)."""
        if split not in ("validation", "test"):
            raise KeyError(f"no evaluation split {split!r}; have validation and test")
        data = self.splits[split]
        n = len(data) if max_items is None else min(len(data), max(max_items, 0))
        for start in range(0, n, self.eval_batch_size):
            yield self._collate(data, range(start, min(start + self.eval_batch_size, n)))

    def _collate(self, data: Encoded, index: Sequence[int]) -> Batch:
        """Pad to the batch's longest sequence (not max_seq_len): short GLUE sentences train much faster."""
        index = list(index)
        width = max(len(data.ids[i]) for i in index)
        ids = np.full((len(index), width), self.tokenizer.pad_id, dtype=np.int64)
        types = np.zeros((len(index), width), dtype=np.int64)
        mask = np.zeros((len(index), width), dtype=np.int64)
        for row, i in enumerate(index):
            n = len(data.ids[i])
            ids[row, :n], types[row, :n], mask[row, :n] = data.ids[i], data.type_ids[i], 1
        return {
            "input_ids": torch.from_numpy(ids),
            "token_type_ids": torch.from_numpy(types),
            "attention_mask": torch.from_numpy(mask),
            "labels": data.labels[index],
        }


def load_glue_data(
    task_name: str,
    *,
    data_dir: str | Path | None,
    tokenizer: str,
    max_seq_len: int,
    batch_size: int,
    eval_batch_size: int,
    max_train_samples: int = 0,
    val_fraction: float = 0.1,
    init: str = "",
) -> GlueData:
    """Task files -> hold-out -> tokenizer -> ``GlueData``: the entry point of the GLUE backbone."""
    task = get_task(task_name)
    if max_seq_len < 8:
        raise UsageError(f"data.max_seq_len must be at least 8, not {max_seq_len}: use for example 128.")
    raw, origin = load_glue_splits(task, data_dir)
    train_idx, val_idx = hold_out(len(raw["train"]), val_fraction)
    held = f"{len(val_idx):,} rows, seed {SPLIT_SEED}"
    dev = f"{len(raw['dev']):,} rows; test labels are hidden"
    notes = [
        f"validation = seeded {val_fraction:.0%} hold-out of train ({held})",
        f"final score on the GLUE dev split {task.dev_file} ({dev})",
    ]
    if max_train_samples and max_train_samples < len(train_idx):
        # train_idx is already a seeded shuffle, so its head is a random subset of train
        train_idx = train_idx[:max_train_samples]
        notes.append(f"train limited to {max_train_samples:,} random rows")
    wordpiece = get_wordpiece(tokenizer, init)
    parts = {
        "train": raw["train"].subset(train_idx),
        "validation": raw["train"].subset(val_idx),
        "test": raw["dev"],
    }
    encoded = {role: encode(wordpiece, ex, max_seq_len, task.regression) for role, ex in parts.items()}
    source = f"GLUE {task.name} ({origin}); {'; '.join(notes)}; tokenizer {wordpiece.description}"
    return GlueData(
        task,
        encoded,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        tokenizer=wordpiece,
        source=source,
    )
