"""GLUE splits: a task's train and dev examples read from local TSVs, the copy dyntie ships or the hub, and
the seeded hold-out carved from train for validation.

Local files follow the layout ``download_glue_data.py`` writes (``DIR/RTE/{train,dev}.tsv``). Mind the quirks:
the TSVs need quoting off, MRPC's start with a byte-order mark, CoLA's have no header.
"""

from __future__ import annotations

import csv
import io
import lzma
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from dyntie_cli.errors import DyntieError, UsageError

from .common import carve, hub_reachable, require_data_dir
from .glue_tasks import TASKS, GlueTask, fold_task_name

#: the hold-out is the same rows whatever the run's --seed, so validation numbers compare across seeds
SPLIT_SEED = 0
#: a file with more unreadable rows than this share is the wrong file (or was read with the wrong quoting)
MAX_BAD_ROW_SHARE = 0.01
HUB_REPO = "nyu-mll/glue"


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
    require_data_dir(data_dir, f"holding {task.folder}/")
    for child in sorted(data_dir.iterdir()):
        if child.is_dir() and fold_task_name(child.name) == task.name:
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
