"""Tokenizers for language modelling, and the cache of tokenized text.

``get_tokenizer`` trains (or loads from the cache) a byte-level BPE on the training text (``bpe:N``), loads a
local folder (``tokenizer.json``, or GPT-2's ``vocab.json`` + ``merges.txt``), or a hub tokenizer.
``encode_cached`` tokenizes a split once and keeps the ids as ``.npy`` under the dyntie cache.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dyntie_cli.errors import DyntieError, UsageError

from .common import HUB_ID, atomic_write, default_cache_dir, hub_reachable, sha256
from .text_corpora import EOS_TOKEN

#: BPE training reads at most this many characters of train: all of WikiText-2 (10.8 M), a slice of larger corpora
DEFAULT_BPE_TRAIN_CHARS = 20_000_000
#: bump when the BPE recipe changes, so stale cached tokenizers are not reused
_BPE_RECIPE = "byte-level-bpe-v1"
#: text is tokenized in chunks of about this many characters, in parallel (see ``_chunks``)
_CHUNK_CHARS = 4096

Log = Callable[[str], None]

@dataclass(frozen=True)
class LMTokenizer:
    """A `tokenizers.Tokenizer` with what the data pipeline needs to know about it."""

    tokenizer: Tokenizer
    #: human-readable origin, logged as part of the run's data source
    description: str
    #: sha256 of the tokenizer's JSON: the cache key of every token array it produced
    fingerprint: str
    #: one more than the largest token id (the embedding size a model needs)
    vocab_size: int

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.token_to_id(EOS_TOKEN)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint16 if self.vocab_size <= 2**16 else np.int32)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text``: the same ids as encoding it whole, computed in parallel chunks."""
        encode_batch = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        # No special tokens: a tokenizer with a post-processor (BERT's [CLS]/[SEP]) would add them per chunk.
        encodings = encode_batch(_chunks(text), add_special_tokens=False)
        arrays = [np.asarray(encoding.ids, dtype=self.dtype) for encoding in encodings]
        return np.concatenate(arrays) if arrays else np.zeros(0, dtype=self.dtype)

    def decode(self, ids: list[int] | np.ndarray | torch.Tensor) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


# A space between two ASCII letters ends every pre-tokenizer's word and starts the next one identically,
# whether the text is encoded whole or cut there (GPT-2's byte-level regex, whitespace and metaspace splits).
_SAFE_CUT = re.compile(r"(?<=[A-Za-z]) (?=[A-Za-z])")


def _chunks(text: str, size: int = _CHUNK_CHARS) -> list[str]:
    """``text`` cut at safe points about every ``size`` characters, so that chunks can be encoded in parallel."""
    chunks, start = [], 0
    while start < len(text):
        match = _SAFE_CUT.search(text, start + size) if start + size < len(text) else None
        stop = match.start() if match else len(text)
        chunks.append(text[start:stop])
        start = stop
    return chunks


def get_tokenizer(
    spec: str,
    train_text: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    bpe_train_chars: int | None = DEFAULT_BPE_TRAIN_CHARS,
    log: Log | None = None,
) -> LMTokenizer:
    """The tokenizer named by ``spec``.

    ``bpe:N`` trains (or loads from the cache) a byte-level BPE of N tokens on the first ``bpe_train_chars``
    characters of ``train_text``; a path loads a folder holding ``tokenizer.json`` or GPT-2's ``vocab.json`` +
    ``merges.txt`` (or a ``tokenizer.json`` file); ``gpt2`` (or another hub id) loads from the hub.
    """
    spec = spec.strip()
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    if spec.lower().startswith("bpe:"):
        return _bpe_tokenizer(spec, train_text, cache, bpe_train_chars, log)
    path = Path(spec).expanduser()
    if path.exists():
        return _local_tokenizer(path)
    if not HUB_ID.fullmatch(spec):
        raise DyntieError(f"Tokenizer folder {spec} does not exist: pass --set data.tokenizer=PATH or bpe:N.")
    return _hub_tokenizer(spec)


def _bpe_tokenizer(
    spec: str, train_text: str, cache: Path, max_chars: int | None, log: Log | None
) -> LMTokenizer:
    size_text = spec.split(":", 1)[1].strip()
    if not size_text.isdigit() or int(size_text) <= 257:
        raise UsageError(f"Bad tokenizer {spec!r}: use bpe:N with N above 257 (256 bytes + <|endoftext|>).")
    vocab_size = int(size_text)
    text = train_text[:max_chars] if max_chars else train_text
    key = sha256(f"{_BPE_RECIPE}|{vocab_size}|".encode(), text.encode("utf-8"))
    path = cache / "tokenizers" / f"bpe{vocab_size}-{key[:16]}.json"
    description = f"bpe:{vocab_size} (byte-level BPE trained on {len(text):,} characters of train)"
    tokenizer = _load_cached_tokenizer(path)
    if tokenizer is None:
        if log:
            log(f"Training a {vocab_size}-token byte-level BPE on {len(text):,} characters ...")
        tokenizer = _train_bpe(text, vocab_size)
        atomic_write(path, lambda tmp: tokenizer.save(str(tmp)))
    return _wrap(tokenizer, description)


def _train_bpe(text: str, vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        # every byte in the alphabet, so that any text encodes without an unknown token
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Document separators are special tokens, not text: keep "<|endoftext|>" from being learned as merges.
    pieces = (piece for chunk in _chunks(text, 1 << 16) for piece in chunk.split(EOS_TOKEN) if piece)
    tokenizer.train_from_iterator(pieces, trainer)
    return tokenizer


def _load_cached_tokenizer(path: Path) -> Tokenizer | None:
    if not path.is_file():
        return None
    try:
        return Tokenizer.from_file(str(path))
    # tokenizers raises a bare Exception for any unreadable file; a truncated or foreign one is retrained
    except Exception:  # noqa: BLE001
        return None


def _local_tokenizer(path: Path) -> LMTokenizer:
    if path.is_file():
        tokenizer_json, folder = path, path.parent
    else:
        tokenizer_json, folder = path / "tokenizer.json", path
    if tokenizer_json.is_file() and tokenizer_json.suffix == ".json":
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            raise DyntieError(f"{tokenizer_json} is not a tokenizers JSON file: pass a valid one.") from exc
        return _wrap(tokenizer, f"local {tokenizer_json}")
    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    if not (vocab.is_file() and merges.is_file()):
        raise DyntieError(
            f"{path} holds no tokenizer.json or vocab.json+merges.txt: point --set data.tokenizer at GPT-2's files."
        )
    return _wrap(
        _gpt2_from_vocab_merges(vocab, merges), f"GPT-2 BPE from local {folder} (vocab.json + merges.txt)"
    )


def _gpt2_from_vocab_merges(vocab: Path, merges: Path) -> Tokenizer:
    try:
        model = models.BPE.from_file(str(vocab), str(merges))
    except Exception as exc:
        raise DyntieError(
            f"{vocab.parent} has unreadable vocab.json/merges.txt: replace them with GPT-2's."
        ) from exc
    tokenizer = Tokenizer(model)
    # GPT-2's own settings: bytes mapped to printable characters, no space added before the first word.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _hub_tokenizer(name: str) -> LMTokenizer:
    if not hub_reachable():
        raise DyntieError(
            f"Tokenizer {name!r} is no local folder and the Hugging Face hub is not reachable: pass "
            "--set data.tokenizer=PATH to a folder with GPT-2's vocab.json and merges.txt (or use bpe:8192)."
        )
    try:
        tokenizer = Tokenizer.from_pretrained(name)
    except Exception as exc:
        raise DyntieError(
            f"Could not load tokenizer {name!r} from the Hugging Face hub: pass --set data.tokenizer=PATH or bpe:N."
        ) from exc
    return _wrap(tokenizer, f"{name} (Hugging Face hub)")


def _wrap(tokenizer: Tokenizer, description: str) -> LMTokenizer:
    # Saved tokenizer.json files may carry truncation or padding (the GPT-2 copy in the shared data
    # truncates at 50 tokens), which would silently cut every chunk of the corpus.
    tokenizer.no_truncation()
    tokenizer.no_padding()
    # Registers <|endoftext|> as special (a new id only if the vocabulary lacks it; GPT-2's vocab.json holds it
    # as an ordinary entry), so that its text form between documents maps to the one token.
    tokenizer.add_special_tokens([EOS_TOKEN])
    vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
    fingerprint = sha256(tokenizer.to_str().encode("utf-8"))
    return LMTokenizer(tokenizer, description, fingerprint, vocab_size)


# -- token caching ------------------------------------------------------------------------------------


def encode_cached(
    tokenizer: LMTokenizer,
    text: str,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    log: Log | None = None,
) -> np.ndarray:
    """``tokenizer.encode(text)``, stored as ``.npy`` keyed on the text and the tokenizer so reruns start fast."""
    cache = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    key = sha256(tokenizer.fingerprint.encode(), text.encode("utf-8"))
    path = cache / "tokens" / f"{key[:32]}.npy"
    if path.is_file():
        try:
            # memory-mapped: a large corpus (WikiText-103 is ~120 M tokens) starts at once and is paged in lazily
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
            if ids.dtype == tokenizer.dtype and ids.ndim == 1:
                return ids
        except (OSError, ValueError):  # a truncated file from an interrupted run: encode again
            pass
    if log:
        log(f"Tokenizing {len(text):,} characters with {tokenizer.description} ...")
    ids = tokenizer.encode(text)
    atomic_write(path, lambda tmp: np.save(tmp, ids, allow_pickle=False))
    return ids

