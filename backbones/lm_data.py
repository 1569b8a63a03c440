"""Language-modelling data: corpora, tokenizers and the token batches a causal LM trains on.

``load_lm_data`` is the one entry point the GPT-2 backbone calls. It reads a corpus as text per split
(``load_corpus``), builds or loads a tokenizer (``get_tokenizer``), tokenizes every split once (cached as
``.npy`` under the dyntie cache) and wraps the token arrays in ``LMData``, which serves nanoGPT-style random
training windows and contiguous evaluation windows that score every token exactly once.

Corpora: the embedded WikiText-2 (always available offline), WikiText-103, LAMBADA and the 1B Word Benchmark
from local files or the Hugging Face hub, and ``text:PATH`` for any plain text. A split that a source lacks is
carved from one it has, deterministically and without overlap, and ``source`` says exactly how.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
import re
import socket
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dyntie_cli.errors import DyntieError, UsageError

from .base import Batch

SPLITS = ("train", "validation", "test")
EOS_TOKEN = "<|endoftext|>"

#: share of train's units (lines or passages) carved off for each missing evaluation split
TRAIN_CARVE_FRACTION = 0.05
#: share of an evaluation-sized split that stays for evaluation when train has to be carved out of it;
#: larger than TRAIN_CARVE_FRACTION because 5% of a held-out file is too little text for a stable perplexity
DONOR_KEEP_FRACTION = 0.10

#: BPE training reads at most this many characters of train: all of WikiText-2 (10.8 M), a slice of larger corpora
DEFAULT_BPE_TRAIN_CHARS = 20_000_000
#: bump when the BPE recipe changes, so stale cached tokenizers are not reused
_BPE_RECIPE = "byte-level-bpe-v1"
#: text is tokenized in chunks of about this many characters, in parallel (see ``_chunks``)
_CHUNK_CHARS = 4096

Log = Callable[[str], None]


# -- corpora -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    """Raw text per split ("train", "validation", "test") and a human-readable account of where it came from."""

    splits: dict[str, str]
    source: str


_WIKITEXT_FILES = {
    "train": ("wiki.train.tokens",),
    "validation": ("wiki.valid.tokens",),
    "test": ("wiki.test.tokens",),
}
_LM1B_FILES = {
    "train": ("1b_benchmark.train.tokens",),
    "validation": ("1b_benchmark.dev.tokens", "1b_benchmark.valid.tokens"),
    "test": ("1b_benchmark.test.tokens",),
}
_LAMBADA_FILES = {
    "train": ("lambada_train.jsonl",),
    "validation": ("lambada_validation.jsonl", "lambada_dev.jsonl"),
    "test": ("lambada_test.jsonl",),
}
_TEXT_FOLDER_FILES = {
    "train": ("train.txt",),
    "validation": ("valid.txt", "validation.txt", "val.txt", "dev.txt"),
    "test": ("test.txt",),
}


def load_corpus(dataset: str, data_dir: str | os.PathLike[str] | None = None) -> Corpus:
    """Text per split for ``dataset`` (a name from ``KNOWN_DATASETS`` or ``text:PATH``)."""
    name = dataset.strip()
    if name.lower().startswith("text:"):
        return _load_text_path(name[len("text:") :])
    loader = _LOADERS.get(name.lower())
    if loader is None:
        raise UsageError(f"Unknown dataset {dataset!r}: use one of {', '.join(KNOWN_DATASETS)}.")
    return loader(Path(data_dir).expanduser() if data_dir else None)


def _load_wikitext2(data_dir: Path | None) -> Corpus:
    if data_dir is not None:
        return _local_corpus("wikitext-2", data_dir, _WIKITEXT_FILES, _read_lines, "lines")
    parts = {split: _lines(_embedded_wikitext2(names[0])) for split, names in _WIKITEXT_FILES.items()}
    return _assemble(
        "wikitext-2", parts, "embedded copy of the official wiki.{train,valid,test}.tokens", "lines"
    )


def _load_wikitext103(data_dir: Path | None) -> Corpus:
    if data_dir is not None:
        return _local_corpus("wikitext-103", data_dir, _WIKITEXT_FILES, _read_lines, "lines")
    if not hub_reachable():
        raise DyntieError(
            "WikiText-103 is not available offline: pass --data-dir DIR holding "
            "wiki.train.tokens/wiki.valid.tokens/wiki.test.tokens, or connect to the internet."
        )
    return _hub_corpus("wikitext-103", "Salesforce/wikitext", "wikitext-103-raw-v1", _with_newline, "lines")


def _load_lambada(data_dir: Path | None) -> Corpus:
    if data_dir is not None:
        return _local_corpus("lambada", data_dir, _LAMBADA_FILES, _read_jsonl_passages, "passages")
    if not hub_reachable():
        raise DyntieError(
            "LAMBADA is not available offline: pass --data-dir DIR holding lambada_test.jsonl, "
            "or connect to the internet."
        )
    return _hub_corpus("lambada", "EleutherAI/lambada_openai", "en", _passage, "passages")


def _load_lm1b(data_dir: Path | None) -> Corpus:
    # The 1B Word Benchmark on the hub is a loading script, which current `datasets` no longer runs.
    if data_dir is None:
        raise DyntieError(
            "The 1B Word Benchmark is not bundled: pass --data-dir DIR holding "
            "1b_benchmark.train.tokens/1b_benchmark.dev.tokens/1b_benchmark.test.tokens."
        )
    return _local_corpus("lm1b", data_dir, _LM1B_FILES, _read_lines, "lines")


def _load_text_path(raw_path: str) -> Corpus:
    if not raw_path.strip():
        raise UsageError("The dataset 'text:' names no path: use text:FILE.txt or text:FOLDER.")
    path = Path(raw_path.strip()).expanduser()
    if path.is_file():
        return _assemble("text", {"train": _read_lines(path)}, f"local file {path}", "lines")
    if not path.is_dir():
        raise DyntieError(
            f"{path} does not exist: pass text:PATH with a .txt file or a folder of .txt files."
        )
    if any(_find_file(path, names) for names in _TEXT_FOLDER_FILES.values()):
        return _local_corpus("text", path, _TEXT_FOLDER_FILES, _read_lines, "lines")
    files = sorted(p for p in path.glob("*.txt") if p.is_file())
    if not files:
        raise DyntieError(
            f"{path} holds no .txt files: put plain-text .txt files there or pass text:FILE.txt."
        )
    lines = [line for file in files for line in _read_lines(file)]
    origin = f"local folder {path}: {len(files)} .txt file(s) concatenated in name order"
    return _assemble("text", {"train": lines}, origin, "lines")


_LOADERS: dict[str, Callable[[Path | None], Corpus]] = {
    "wikitext-2": _load_wikitext2,
    "wikitext-103": _load_wikitext103,
    "lambada": _load_lambada,
    "lm1b": _load_lm1b,
    "1-billion": _load_lm1b,
}
KNOWN_DATASETS = (*_LOADERS, "text:PATH")


def _local_corpus(
    name: str,
    data_dir: Path,
    files: Mapping[str, tuple[str, ...]],
    reader: Callable[[Path], list[str]],
    unit: str,
) -> Corpus:
    if not data_dir.is_dir():
        raise DyntieError(
            f"Data folder {data_dir} does not exist: pass --data-dir DIR with the {name} files."
        )
    found = {split: path for split, names in files.items() if (path := _find_file(data_dir, names))}
    if not found:
        expected = "/".join(names[0] for names in files.values())
        raise DyntieError(f"{data_dir} holds no {name} files: put {expected} there (optionally .xz).")
    parts = {split: reader(path) for split, path in found.items()}
    origin = f"local {data_dir}: {', '.join(path.name for path in found.values())}"
    return _assemble(name, parts, origin, unit, {split: path.name for split, path in found.items()})


def _hub_corpus(name: str, repo: str, config: str, to_unit: Callable[[str], str], unit: str) -> Corpus:
    # Imported here: `datasets` takes about a second to import and only the online path needs it.
    from datasets import load_dataset

    try:
        dataset = load_dataset(repo, config)
    except Exception as exc:  # any hub or network failure becomes one actionable line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DyntieError(
            f"Could not load {name} from the Hugging Face hub ({reason}): pass --data-dir DIR with local files."
        ) from exc
    parts = {
        split: [to_unit(text) for text in dataset[split]["text"]] for split in SPLITS if split in dataset
    }
    return _assemble(name, parts, f"Hugging Face hub: {repo} {config}", unit)


def _assemble(
    name: str, parts: dict[str, list[str]], origin: str, unit: str, files: Mapping[str, str] | None = None
) -> Corpus:
    complete, carving = _carve(name, parts, unit, files or {})
    source = f"{name} ({origin}{'; ' + carving if carving else ''})"
    return Corpus({split: "".join(complete[split]) for split in SPLITS}, source)


def _carve(
    name: str, parts: Mapping[str, list[str]], unit: str, files: Mapping[str, str]
) -> tuple[dict[str, list[str]], str]:
    """Fill missing splits from contiguous slices of one present split; returns the splits and a note.

    With train present, each missing evaluation split is a ~5% slice off train's end. Without train, the donor
    is validation if present, else test: train is its head and the evaluation splits it must supply are ~10%
    slices of its tail, so train never overlaps an evaluation split. Validation is preferred as the donor so
    that an official test split stays whole and its scores stay comparable.
    """
    present = [split for split in SPLITS if parts.get(split)]
    missing = [split for split in SPLITS if split not in present]
    out = {split: list(parts[split]) for split in present}
    if not missing:
        return out, ""
    if not present:
        raise DyntieError(f"The {name} files hold no text: check that they are the right, non-empty files.")
    if "train" in present:
        donor, fraction = "train", TRAIN_CARVE_FRACTION
        tail = missing
    else:
        donor = "validation" if "validation" in present else "test"
        fraction = DONOR_KEEP_FRACTION
        tail = [split for split in ("validation", "test") if split in missing or split == donor]
    units = out[donor]
    size = max(1, round(len(units) * fraction))
    head = len(units) - size * len(tail)
    if head < 1:
        raise DyntieError(
            f"The {name} {donor} split has only {len(units)} {unit}, too few to carve {', '.join(missing)} "
            f"from: supply those splits as files or use more text."
        )
    ranges = {"train": (0, head)} | {
        split: (head + i * size, head + (i + 1) * size) for i, split in enumerate(tail)
    }
    for split, (start, stop) in ranges.items():
        out[split] = units[start:stop]
    spans = ", ".join(f"{split}: {unit} {start + 1:,}-{stop:,}" for split, (start, stop) in ranges.items())
    donor_label = f"{donor} file {files[donor]}" if donor in files else donor
    note = f"{' and '.join(missing)} carved from {donor_label} ({spans} of {len(units):,})"
    note += f": no {' or '.join(missing)} file"
    return out, note


# -- reading files ------------------------------------------------------------------------------------


def _lines(text: str) -> list[str]:
    """Lines with their newline kept, so that joining them gives the text back byte for byte."""
    lines = text.split("\n")
    last = lines.pop()
    return [line + "\n" for line in lines] + ([last] if last else [])


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def _passage(text: str) -> str:
    # Passages are independent documents: the end-of-text token marks each boundary, as in GPT-2's training data.
    return text + EOS_TOKEN


def _find_file(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / f"{name}.xz"):
            if candidate.is_file():
                return candidate
    return None


def _read_text(path: Path) -> str:
    try:
        raw = lzma.decompress(path.read_bytes()) if path.suffix == ".xz" else path.read_bytes()
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DyntieError(f"{path} is not UTF-8 text: convert it to UTF-8 and try again.") from exc
    except lzma.LZMAError as exc:
        raise DyntieError(f"{path} is not a valid .xz file: decompress it or replace it.") from exc
    except OSError as exc:
        raise DyntieError(
            f"Cannot read {path} ({exc.strerror}): check the path and its permissions."
        ) from exc


def _read_lines(path: Path) -> list[str]:
    # Files from Windows tools end lines in CRLF; the models should see one newline convention.
    text = _read_text(path).replace("\r\n", "\n")
    return _lines(_with_newline(text)) if text else []


def _read_jsonl_passages(path: Path) -> list[str]:
    passages = []
    # split on "\n" only: JSON strings may hold a raw U+2028, which str.splitlines would cut at
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DyntieError(
                f'{path} line {number} is not a JSON object with a "text" field: fix or remove it.'
            )
        passages.append(_passage(row["text"]))
    return passages


def _embedded_wikitext2(filename: str) -> str:
    # Read through importlib.resources so it works from a wheel or a zipped install, not only a source tree.
    resource = (
        resources.files(__package__ or "dyntie_cli.backbones") / "data" / "wikitext-2" / f"{filename}.xz"
    )
    return lzma.decompress(resource.read_bytes()).decode("utf-8")


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub can be reached: False at once when an offline variable is set."""
    for variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() not in ("", "0", "false", "no", "off"):
            return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        with socket.create_connection((endpoint.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


# -- tokenizers ---------------------------------------------------------------------------------------


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


def default_cache_dir() -> Path:
    """Where tokenizers and token arrays are cached: ``$DYNTIE_CACHE``, else ``~/.cache/dyntie``."""
    return Path(os.environ.get("DYNTIE_CACHE") or Path.home() / ".cache" / "dyntie").expanduser()


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
    if not _HUB_ID.fullmatch(spec):
        raise DyntieError(f"Tokenizer folder {spec} does not exist: pass --set data.tokenizer=PATH or bpe:N.")
    return _hub_tokenizer(spec)


#: "gpt2" or "owner/name": what the hub accepts; anything else that does not exist is a mistyped path
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _bpe_tokenizer(
    spec: str, train_text: str, cache: Path, max_chars: int | None, log: Log | None
) -> LMTokenizer:
    size_text = spec.split(":", 1)[1].strip()
    if not size_text.isdigit() or int(size_text) <= 257:
        raise UsageError(f"Bad tokenizer {spec!r}: use bpe:N with N above 257 (256 bytes + <|endoftext|>).")
    vocab_size = int(size_text)
    text = train_text[:max_chars] if max_chars else train_text
    key = _sha256(f"{_BPE_RECIPE}|{vocab_size}|".encode(), text.encode("utf-8"))
    path = cache / "tokenizers" / f"bpe{vocab_size}-{key[:16]}.json"
    description = f"bpe:{vocab_size} (byte-level BPE trained on {len(text):,} characters of train)"
    tokenizer = _load_cached_tokenizer(path)
    if tokenizer is None:
        if log:
            log(f"Training a {vocab_size}-token byte-level BPE on {len(text):,} characters ...")
        tokenizer = _train_bpe(text, vocab_size)
        _atomic_write(path, lambda tmp: tokenizer.save(str(tmp)))
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
    fingerprint = _sha256(tokenizer.to_str().encode("utf-8"))
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
    key = _sha256(tokenizer.fingerprint.encode(), text.encode("utf-8"))
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
    _atomic_write(path, lambda tmp: np.save(tmp, ids, allow_pickle=False))
    return ids


def _atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    # Write then rename, so a concurrent run or a killed one never leaves a half-written cache entry.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=path.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


# -- batches ------------------------------------------------------------------------------------------


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
    ) -> None:
        for name, value in (
            ("seq_len", seq_len),
            ("batch_size", batch_size),
            ("eval_batch_size", eval_batch_size),
        ):
            if value < 1:
                raise UsageError(f"{name} must be at least 1, not {value}: set a positive value.")
        self.tokens = {split: np.asarray(ids) for split, ids in tokens.items()}
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

    def items_per_batch(self) -> int:
        return self.batch_size * self.seq_len

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
) -> LMData:
    """Corpus -> tokenizer -> cached token arrays -> ``LMData``: the entry point of the GPT-2 backbone."""
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
    return LMData(
        tokens,
        seq_len=seq_len,
        batch_size=batch_size,
        eval_batch_size=eval_batch_size,
        vocab_size=lm_tokenizer.vocab_size,
        source=source,
        tokenizer=lm_tokenizer,
    )
