"""GLUE data: the task table, the TSV reader, the WordPiece tokenizer, and the batches BERT trains on.

``load_glue_data`` is the one entry point the GLUE backbone calls. It reads a task's train and dev splits
from local TSVs (``--data-dir``, the layout ``download_glue_data.py`` writes: ``DIR/RTE/{train,dev}.tsv``);
without ``--data-dir``, from the copy dyntie ships (RTE, xz-compressed in ``data/glue``, so the default task
runs offline) or, for the other tasks when the hub is reachable, from ``nyu-mll/glue``; builds the tokenizer;
tokenizes once; and wraps it all in ``GlueData``.

Splits. GLUE's test labels are hidden, so the final score is computed on the **dev** split
(``test_split = "validation"``: the registry records that the reported score is GLUE's validation split).
Validation *during* training therefore cannot be dev: it is a seeded hold-out carved from train (10% by
default, the same rows for every run seed), so model selection never sees the split the final score is
computed on. Inside ``GlueData`` the three roles are "train" (train minus the hold-out), "validation" (the
hold-out) and "test" (GLUE dev).
"""

from __future__ import annotations

import csv
import io
import json
import lzma
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from dyntie_cli.backbone import Batch
from dyntie_cli.errors import DyntieError, UsageError

from .common import carve, hub_reachable

#: the hold-out is the same rows whatever the run's --seed, so validation numbers compare across seeds
SPLIT_SEED = 0
#: a file with more unreadable rows than this share is the wrong file (or was read with the wrong quoting)
MAX_BAD_ROW_SHARE = 0.01
HUB_REPO = "nyu-mll/glue"


# -- the task table ------------------------------------------------------------------------------------


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
    task = TASKS.get(_fold(name))
    if task is None:
        raise UsageError(f"Unknown GLUE task {name!r}: use --task with one of {', '.join(TASKS)}.")
    return task


def _fold(name: str) -> str:
    """'SST-2', 'sst_2' and 'sst2' all name one task (and one folder)."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


# -- reading the splits ---------------------------------------------------------------------------------


@dataclass
class Examples:
    """Text tuples (one or two segments) and their labels (class ids, or floats for regression)."""

    texts: list[tuple[str, ...]]
    labels: list[float]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: Sequence[int]) -> Examples:
        return Examples([self.texts[i] for i in index], [self.labels[i] for i in index])


def read_glue_tsv(path: Path, task: GlueTask) -> tuple[Examples, int]:
    """A GLUE TSV as examples, and the number of unreadable rows skipped.

    ``utf-8-sig`` drops the byte-order mark MRPC's files start with (it would otherwise be part of the first
    header name).
    """
    try:
        with path.open(encoding="utf-8-sig", newline="") as f:
            return parse_glue_tsv(f, task, str(path))
    except UnicodeDecodeError as exc:
        raise DyntieError(f"{path} is not UTF-8 text: use the GLUE files as downloaded.") from exc
    except OSError as exc:
        raise DyntieError(
            f"Cannot read {path} ({exc.strerror}): check the path and its permissions."
        ) from exc


def parse_glue_tsv(lines: Iterable[str], task: GlueTask, where: str) -> tuple[Examples, int]:
    """GLUE TSV text (``where`` names it in errors) as examples, and the number of unreadable rows skipped.

    Quoting is off: GLUE sentences contain unbalanced double quotes that a CSV reader would join across lines.
    """
    rows = [row for row in csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE) if row]
    if task.header:
        if not rows:
            raise DyntieError(f"{where} is empty: replace it with the GLUE {task.folder} file.")
        header, rows = rows[0], rows[1:]
        text_idx = [_column(header, c, where, task) for c in task.text_columns]
        label_idx = _column(header, task.label_column, where, task)
    else:
        text_idx = [int(c) for c in task.text_columns]
        label_idx = int(task.label_column)
    examples, bad = Examples([], []), 0
    width = max(*text_idx, label_idx) + 1
    for row in rows:
        label = _parse_label(row[label_idx], task) if len(row) >= width else None
        if label is None:
            bad += 1
            continue
        examples.texts.append(tuple(row[i] for i in text_idx))
        examples.labels.append(label)
    if bad > MAX_BAD_ROW_SHARE * max(len(rows), 1):
        raise DyntieError(
            f"{where}: {bad} of {len(rows)} rows have too few columns or an unknown label; "
            f"use the GLUE {task.folder} file as written by download_glue_data.py "
            "(tab-separated, no quoting)."
        )
    return examples, bad


def _column(header: list[str], name: str | int, where: str, task: GlueTask) -> int:
    if isinstance(name, int):
        return name
    if name not in header:
        raise DyntieError(
            f"{where} has no {name!r} column (header: {', '.join(header[:8])}): "
            f"pass the GLUE {task.folder} folder."
        )
    return header.index(name)


def _parse_label(raw: str, task: GlueTask) -> float | None:
    raw = raw.strip()
    if task.regression:
        try:
            return float(raw)
        except ValueError:
            return None
    return float(task.labels.index(raw)) if raw in task.labels else None


def find_task_folder(data_dir: Path, task: GlueTask) -> Path:
    """``DIR/RTE`` (any spelling: rte, SST2, sst-2), or ``DIR`` itself when it holds the task's files."""
    if not data_dir.is_dir():
        raise DyntieError(
            f"Data folder {data_dir} does not exist: pass --data-dir DIR holding {task.folder}/."
        )
    for child in sorted(data_dir.iterdir()):
        if child.is_dir() and _fold(child.name) == task.name:
            return child
    if (data_dir / task.dev_file).is_file() or (data_dir / "train.tsv").is_file():
        return data_dir
    raise DyntieError(
        f"{data_dir} holds no {task.folder} folder: pass --data-dir DIR with {task.folder}/train.tsv and "
        f"{task.folder}/{task.dev_file} (the layout download_glue_data.py writes)."
    )


def _local_splits(data_dir: Path, task: GlueTask) -> tuple[dict[str, Examples], str]:
    folder = find_task_folder(data_dir, task)
    files = {"train": folder / "train.tsv", "dev": folder / task.dev_file}
    for role, path in files.items():
        if not path.is_file():
            raise DyntieError(
                f"{folder} has no {path.name}: GLUE {task.folder} needs its {role} split there "
                "(download_glue_data.py writes it), or run online without --data-dir to use the hub."
            )
    splits, notes = {}, []
    for role, path in files.items():
        examples, bad = read_glue_tsv(path, task)
        splits[role] = examples
        skipped = f", {bad} unreadable rows skipped" if bad else ""
        notes.append(f"{path.name} {len(examples):,} rows{skipped}")
    return splits, f"local {folder}: {', '.join(notes)}"


def _hub_splits(task: GlueTask) -> tuple[dict[str, Examples], str]:
    # Imported here: `datasets` is slow to import and only the online path needs it.
    from datasets import load_dataset

    try:
        dataset = load_dataset(HUB_REPO, task.name)
    except Exception as exc:  # any hub or network failure becomes one actionable line
        raise DyntieError(
            f"Could not load GLUE {task.name} from the Hugging Face hub ({type(exc).__name__}): "
            "pass --data-dir DIR with the GLUE TSV folders."
        ) from exc
    splits = {}
    for role, split in (("train", "train"), ("dev", task.hub_dev_split)):
        part = dataset[split]
        texts = list(zip(*(part[c] for c in task.hub_text_columns), strict=True))
        splits[role] = Examples([tuple(t) for t in texts], [float(v) for v in part["label"]])
    return splits, f"Hugging Face hub {HUB_REPO} {task.name}"


def _embedded_folder(task: GlueTask):
    """The copy of ``task``'s train and dev splits dyntie ships (RTE), or None."""
    folder = resources.files(__package__ or "dyntie_cli.backbones") / "data" / "glue" / task.folder
    files = [folder / f"{name}.xz" for name in ("train.tsv", task.dev_file)]
    return folder if all(f.is_file() for f in files) else None


def _embedded_splits(task: GlueTask, folder) -> tuple[dict[str, Examples], str]:
    splits, notes = {}, []
    for role, name in (("train", "train.tsv"), ("dev", task.dev_file)):
        # read through importlib.resources: works from a wheel or a zipped install, not only a source tree
        text = lzma.decompress((folder / f"{name}.xz").read_bytes()).decode("utf-8-sig")
        examples, _ = parse_glue_tsv(io.StringIO(text, newline=""), task, f"the embedded {task.folder}/{name}")
        splits[role] = examples
        notes.append(f"{name} {len(examples):,} rows")
    return splits, f"embedded copy of GLUE {task.folder}: {', '.join(notes)}"


def load_glue_splits(task: GlueTask, data_dir: str | Path | None) -> tuple[dict[str, Examples], str]:
    """GLUE train and dev examples of ``task`` and where they came from: local files (``--data-dir``), else
    the copy dyntie ships (RTE), else the hub."""
    if data_dir:
        return _local_splits(Path(data_dir).expanduser(), task)
    embedded = _embedded_folder(task)
    if embedded is not None:
        return _embedded_splits(task, embedded)
    if not hub_reachable():
        shipped = ", ".join(t.name for t in TASKS.values() if _embedded_folder(t) is not None)
        raise DyntieError(
            f"GLUE {task.name} is not available offline: pass --data-dir DIR holding {task.folder}/train.tsv "
            f"and {task.folder}/{task.dev_file}, connect to the internet, or use a task dyntie ships "
            f"(--task {shipped})."
        )
    return _hub_splits(task)


def hold_out(n: int, fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Indices of train and of a seeded random hold-out of ``fraction`` of ``n`` rows (disjoint)."""
    if not 0 < fraction < 1:
        raise UsageError(f"data.val_fraction must be between 0 and 1, not {fraction}: use for example 0.1.")
    rest, roles = carve(n, [("validation", max(1, round(n * fraction)))], seed=seed,
                        too_few=f"The training split has only {n} rows, too few to hold out validation from.")
    return rest, roles["validation"]


# -- the tokenizer -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WordPiece:
    tokenizer: Tokenizer
    description: str
    pad_id: int

    @property
    def vocab_size(self) -> int:
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values()) + 1


DEFAULT_TOKENIZER = "bert-base-uncased"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def get_wordpiece(spec: str, init: str = "") -> WordPiece:
    """The tokenizer named by ``spec`` (``data.tokenizer``).

    ``auto``: the tokenizer of the ``model.init`` folder when it has one (a pretrained model must keep its
    vocabulary), else ``bert-base-uncased``. ``bert-base-uncased`` is built from the vocabulary dyntie ships
    (the same 30,522 entries as the hub's), so it works offline. A path loads a folder or file holding
    ``tokenizer.json`` or BERT's ``vocab.txt``; another name loads from the hub when it is reachable.
    """
    spec = spec.strip() or "auto"
    if spec == "auto":
        spec = init if init and _tokenizer_file(Path(init).expanduser()) else DEFAULT_TOKENIZER
    if spec == DEFAULT_TOKENIZER:
        vocab = (
            resources.files(__package__ or "dyntie_cli.backbones")
            / "data"
            / "bert-base-uncased"
            / "vocab.txt"
        )
        with resources.as_file(vocab) as path:
            return _wrap(
                _from_vocab(path, lowercase=True), f"{DEFAULT_TOKENIZER} WordPiece (packaged vocab.txt)"
            )
    path = Path(spec).expanduser()
    if path.exists():
        return _local_wordpiece(path)
    if _HUB_ID.fullmatch(spec) and hub_reachable():
        try:
            return _wrap(Tokenizer.from_pretrained(spec), f"{spec} (Hugging Face hub)")
        except Exception as exc:
            raise DyntieError(
                f"Could not load tokenizer {spec!r} from the hub: pass --set data.tokenizer=PATH."
            ) from exc
    raise DyntieError(
        f"Tokenizer {spec!r} is no local file or folder (and not reachable on the hub): pass --set "
        "data.tokenizer=PATH to a folder with vocab.txt or tokenizer.json, or use bert-base-uncased."
    )


def _tokenizer_file(path: Path) -> Path | None:
    if path.is_file():
        return path if path.suffix in (".json", ".txt") else None
    for name in ("tokenizer.json", "vocab.txt"):
        if (path / name).is_file():
            return path / name
    return None


def _local_wordpiece(path: Path) -> WordPiece:
    file = _tokenizer_file(path)
    if file is None:
        raise DyntieError(
            f"{path} holds no tokenizer.json or vocab.txt: point --set data.tokenizer at BERT's files."
        )
    if file.suffix == ".json":
        try:
            return _wrap(Tokenizer.from_file(str(file)), f"local {file}")
        except Exception as exc:
            raise DyntieError(f"{file} is not a tokenizers JSON file: pass a valid tokenizer.json.") from exc
    return _wrap(_from_vocab(file, lowercase=_lowercase(file.parent)), f"WordPiece from local {file}")


def _lowercase(folder: Path) -> bool:
    """``do_lower_case`` of a saved tokenizer's config; uncased (True) when the config does not say."""
    config = folder / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text()).get("do_lower_case", True)) if config.is_file() else True
    except (OSError, ValueError):
        return True


def _from_vocab(vocab_file: Path, *, lowercase: bool) -> Tokenizer:
    """BERT's tokenizer from its vocab.txt: the normalizer, pre-tokenizer and [CLS]/[SEP] template BERT uses.

    Built with `tokenizers` directly: transformers 5's ``BertTokenizerFast(vocab_file=...)`` silently ignores
    the file and keeps only the five special tokens, which turns every word into [UNK].
    """
    try:
        vocab = models.WordPiece.read_file(str(vocab_file))
    except Exception as exc:
        raise DyntieError(
            f"{vocab_file} is not a WordPiece vocab.txt (one token a line): pass BERT's."
        ) from exc
    missing = [t for t in ("[CLS]", "[SEP]", "[UNK]", "[PAD]") if t not in vocab]
    if missing:
        raise DyntieError(f"{vocab_file} lacks the BERT tokens {', '.join(missing)}: pass a BERT vocab.txt.")
    tokenizer = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    # strip_accents=None follows lowercase, which is what BERT's uncased models were trained with
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tokenizer.decoder = decoders.WordPiece()
    return tokenizer


def _wrap(tokenizer: Tokenizer, description: str) -> WordPiece:
    # A saved tokenizer.json may carry its own padding/truncation; GlueData pads per batch and truncates.
    tokenizer.no_padding()
    tokenizer.no_truncation()
    pad = tokenizer.token_to_id("[PAD]")
    return WordPiece(tokenizer, description, 0 if pad is None else pad)


# -- batches -------------------------------------------------------------------------------------------


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
