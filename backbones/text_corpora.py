"""Text corpora for language modelling: each dataset read as text per split, and where it came from.

``load_corpus`` reads the embedded WikiText-2 (always available offline), WikiText-103, LAMBADA and the 1B
Word Benchmark from local files or the Hugging Face hub, and ``text:PATH`` for any plain text. A split that a
source lacks is carved from one it has, deterministically and without overlap, and ``source`` says exactly how.
"""

from __future__ import annotations

import json
import lzma
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from dyntie_cli.errors import DyntieError, UsageError

from .common import carve, hub_reachable, require_data_dir

SPLITS = ("train", "validation", "test")
#: the document separator: GPT-2's end-of-text token, which separates passages in the text itself
EOS_TOKEN = "<|endoftext|>"

#: share of train's units (lines or passages) carved off for each missing evaluation split
TRAIN_CARVE_FRACTION = 0.05
#: share of an evaluation-sized split that stays for evaluation when train has to be carved out of it;
#: larger than TRAIN_CARVE_FRACTION because 5% of a held-out file is too little text for a stable perplexity
DONOR_KEEP_FRACTION = 0.10

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
    require_data_dir(data_dir, f"with the {name} files")
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
    head, roles = carve(len(units), [(split, size) for split in tail], too_few=(
        f"The {name} {donor} split has only {len(units)} {unit}, too few to carve {', '.join(missing)} "
        f"from: supply those splits as files or use more text."))
    ranges = {"train": (0, len(head))} | {split: (int(idx[0]), int(idx[-1]) + 1) for split, idx in roles.items()}
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

