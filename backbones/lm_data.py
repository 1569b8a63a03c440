"""Language-modelling batches: the token arrays a causal LM trains on, and the causal LM backbones' data entry
point.

``load_lm_data`` reads a corpus (``text_corpora``), builds or loads a tokenizer and tokenizes every split once
(``text_tokenizers``), and wraps the token arrays in ``LMData``, which serves nanoGPT-style random training
windows and contiguous evaluation windows that score every token exactly once -- and, when asked, the windows of
a held-out slice carved from the end of train, which training never samples (the held-out reward's tokens).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from dyntie_cli.backbone import Batch
from dyntie_cli.errors import DyntieError, UsageError

from .common import default_cache_dir
from .text_corpora import load_corpus
from .text_tokenizers import DEFAULT_BPE_TRAIN_CHARS, LMTokenizer, Log, encode_cached, get_tokenizer


class LMData:
    """Token arrays per split served as causal-LM batches (implements ``TaskData``).

    ``labels`` are the next tokens, already shifted: position t of ``labels`` is the token after position t of
    ``input_ids``, so the loss is a plain cross-entropy of logits against labels (no shift inside the model).
    """

    test_split = "test"

    def __init__(
        self,
        tokens: Mapping[str, np.ndarray],
        *,
        seq_len: int,
        batch_size: int,
        eval_batch_size: int,
        vocab_size: int,
        source: str = "",
        tokenizer: LMTokenizer | None = None,
        heldout_tokens: int = 0,
    ) -> None:
        for name, value in (
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, not {value}: set a positive value.")
        self.tokens = {split: np.asarray(ids) for split, ids in tokens.items()}
        if heldout_tokens and "train" in self.tokens:
            self._hold_out(heldout_tokens, seq_len)
        train = self.tokens.get("train")
        if train is None or len(train) < seq_len + 1:
            have = 0 if train is None else len(train)
            raise DyntieError(
                f"The training split has {have:,} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
                "use a shorter sequence length or more training text."
            )
        self.seq_len, self.batch_size, self.eval_batch_size = seq_len, batch_size, eval_batch_size
        self.vocab_size = vocab_size
        self.source = source
        self.tokenizer = tokenizer
        self.num_tokens = {split: len(ids) for split, ids in self.tokens.items()}

    def _hold_out(self, count: int, seq_len: int) -> None:
        """The last ``count`` tokens of train become the held-out slice, and leave what training samples."""
        train = self.tokens["train"]
        if len(train) - count < seq_len + 1 or count < 2:
            raise DyntieError(
                f"data.heldout_tokens={count:,} cannot be carved from {len(train):,} training tokens (at least 2, "
                f"leaving seq_len + 1 = {seq_len + 1} to train on): set a smaller data.heldout_tokens."
            )
        self.tokens["heldout"] = train[len(train) - count:]
        self.tokens["train"] = train[: len(train) - count]

    def items_per_batch(self) -> int:
        return self.batch_size * self.seq_len

    def heldout_batches(self) -> Iterator[Batch]:
        """The held-out slice (the end of train, never trained on: not validation, not test) as contiguous windows,
        every token but the first scored once: the same batches every time they are asked for."""
        if "heldout" not in self.tokens:
            raise DyntieError("This data holds no held-out slice: load it with heldout_tokens > 0.")
        return self.eval_batches("heldout")

    def train_batch(self, generator: torch.Generator) -> Batch:
        """``batch_size`` windows of ``seq_len + 1`` tokens at uniformly random offsets of train (nanoGPT)."""
        train = self.tokens["train"]
        high = len(train) - self.seq_len  # exclusive: the last window ends on the last token
        starts = torch.randint(high, (self.batch_size,), generator=generator, device=generator.device)
        starts = starts.cpu().numpy()
        windows = train[starts[:, None] + np.arange(self.seq_len + 1)]
        return _causal_batch(windows)

    def eval_batches(self, split: str, max_items: int | None = None) -> Iterator[Batch]:
        """Contiguous, non-overlapping windows over ``split`` in order, scoring each token once.

        Every token but the first is a label exactly once, up to ``max_items`` labels. Full windows come in
        batches of ``eval_batch_size``; a final shorter window comes alone, so no padding has to be masked.
        """
        if split not in self.tokens:
            raise KeyError(f"no split {split!r}; have {', '.join(self.tokens)}")
        ids = self.tokens[split]
        targets = max(len(ids) - 1, 0)
        if max_items is not None:
            targets = min(targets, max(max_items, 0))
        full = targets // self.seq_len
        if full:
            windows = ids[: full * self.seq_len + 1]
            inputs = windows[:-1].reshape(full, self.seq_len)
            labels = windows[1:].reshape(full, self.seq_len)
            for start in range(0, full, self.eval_batch_size):
                stop = start + self.eval_batch_size
                yield {"input_ids": _long(inputs[start:stop]), "labels": _long(labels[start:stop])}
        rest = targets - full * self.seq_len
        if rest:
            yield _causal_batch(ids[full * self.seq_len : full * self.seq_len + rest + 1][None, :])


def _causal_batch(windows: np.ndarray) -> Batch:
    return {"input_ids": _long(windows[:, :-1]), "labels": _long(windows[:, 1:])}


def _long(ids: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))


def load_lm_data(
    dataset: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    tokenizer: str,
    seq_len: int,
    batch_size: int,
    eval_batch_size: int,
    max_train_tokens: int | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    bpe_train_chars: int | None = DEFAULT_BPE_TRAIN_CHARS,
    log: Log | None = None,
    heldout_tokens: int = 0,
) -> LMData:
    """Corpus -> tokenizer -> cached token arrays -> ``LMData``: the entry point of the causal LM backbones."""
    corpus = load_corpus(dataset, data_dir)
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    lm_tokenizer = get_tokenizer(
        tokenizer, corpus.splits["train"], cache, bpe_train_chars=bpe_train_chars, log=log
    )
    tokens = {
        split: encode_cached(lm_tokenizer, text, cache, log=log) for split, text in corpus.splits.items()
    }
    source = f"{corpus.source}; tokenizer {lm_tokenizer.description}"
    if max_train_tokens is not None and max_train_tokens < len(tokens["train"]):
        tokens["train"] = tokens["train"][:max_train_tokens]
        source += f"; train truncated to its first {max_train_tokens:,} tokens"
    if heldout_tokens:
        source += f"; its last {heldout_tokens:,} held out for the reward"
    return LMData(
        tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        vocab_size=lm_tokenizer.vocab_size,
        source=source,
        tokenizer=lm_tokenizer,
        heldout_tokens=heldout_tokens,
    )
