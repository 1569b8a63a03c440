"""Checkpoints: everything needed to resume a run exactly (docs/method.md, "Resume").

A checkpoint folder holds
* ``model.safetensors`` -- each stored tensor once. Tied blocks own no tensors (``state_dict`` omits them);
  other aliases (GPT-2's lm_head is its token embedding) are saved once and listed in the metadata,
  because safetensors refuses tensors that share memory;
* ``ties.json`` -- the tie map: the state vector and the tie mode;
* ``trainer.pt`` -- the loop's state (``LoopState``: step and decision counters, timers, a decision still
  waiting for its reward), the optimizer (with the *names* of its parameters in order, since the tie manager
  changes the parameter set), and every other resumable part the trainer lists (LR schedule, policy/agent,
  batch generators), and the RNG states;
* ``run.json`` -- where the run stands and what it is built from, small enough for a report to read: the step
  of the checkpoint, and what a variant took from its source run (final-arch's state, replay's schedule), so a
  resume rebuilds the same policy without the source run;
* ``registry_rows.json`` -- the registry rows the run had logged but not yet written when the checkpoint was
  taken (``RunWriter.pending``): a process killed before its next flush loses none of them, since a resume
  writes them (those the registry does not hold yet).
The folder is written under a temporary name and renamed, so a kill mid-write leaves the last good one. A reader
that must see one checkpoint whole while a run may replace it (an export of a running run) opens its files
through ``snapshot``.

Beside it, a run keeps the model of its best validation figure in ``best/`` (``save_model``): the weights and the
tie map as above, and ``best.json`` (the step and the figure), without the training state, which nothing resumes
from a best model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DyntieError
from ..kill_points import kill_point
from .checkpoint_info import RUN_FILE


@dataclass
class PendingDecision:
    """A decision whose reward batches are still being trained on (``reward_batch`` interval, next or heldout, or a
    probe of one of them)."""

    decision: int
    step: int
    state: list[int]
    action: list[int]
    next_state: list[int]
    progress: float
    next_progress: float
    epsilon: float | None
    explored: bool | None
    greedy_agreement: float | None
    q_spread: float | None
    losses: list[float] = field(default_factory=list)
    greedy_moves: int | None = None
    scores: dict[str, float] = field(default_factory=dict)  # reward kind -> perplexity, as each is scored
    rewarded: bool = False  # the policy has had its reward (its decisions row is logged)


@dataclass
class LoopState:
    """The loop's own state: one list of fields, saved and restored as a whole, so a new piece of loop state
    cannot be forgotten at resume (add it here and it is checkpointed)."""

    step: int = 0
    decision: int = 0
    agent_time: float = 0.0  # seconds spent choosing, applying and rewarding decisions
    wall_time: float = 0.0  # loop seconds of the earlier processes of this run (before a resume)
    indep_steps: float = 0.0  # step-weighted sum of independent blocks, for the mean over training
    bad_grad_steps: int = 0  # steps in a row whose gradient norm was not finite (each skipped)
    pending: PendingDecision | None = None
    # the steps since the last train row: a run stopped between two rows logs the same mean after its resume
    losses: list[float] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    best_value: float | None = None  # the best validation figure of the run's headline metric so far
    best_step: int | None = None  # the step of it (its model is in the run's best/ folder)
    since_best: int = 0  # validations since the best one (early stopping)
    validated_step: int | None = None  # the step of the last validation
    stopped_early: bool = False  # train.patience ran out: the run ends at this step

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> LoopState:
        values = {f.name: saved[f.name] for f in fields(cls) if f.name in saved}
        pending = values.get("pending")
        values["pending"] = PendingDecision(**pending) if pending else None
        return cls(**values)


def dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Each stored tensor once (contiguous, on the CPU), and alias name -> the name it is stored under."""
    unique: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_storage: dict[tuple[int, int, tuple], str] = {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in by_storage:
            aliases[name] = by_storage[key]
        else:
            by_storage[key] = name
            unique[name] = t.detach().contiguous().cpu()
    return unique, aliases


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


REGISTRY_ROWS = "registry_rows.json"


def save_checkpoint(path: Path, *, model: nn.Module, ties_map: dict, optimizer: torch.optim.Optimizer,
                    trainer: dict[str, Any], registry_rows: dict[str, Any] | None = None,
                    run: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    tmp = _new_folder(path)
    # the step in the weights' header too, where a resume reads it before it loads anything
    _save_weights(tmp, model, ties_map, step=trainer.get("step"))
    if run is not None:
        (tmp / RUN_FILE).write_text(json.dumps(run))
    if registry_rows is not None:
        save_registry_rows(tmp, registry_rows)
    torch.save({
        **trainer,
        "optimizer": optimizer.state_dict(),
        "optimizer_param_names": optimizer_param_names(model, optimizer),
        "rng": rng_state(),
    }, tmp / "trainer.pt")
    kill_point("checkpoint-rows")
    _into_place(tmp, path)
    return path


def _new_folder(path: Path) -> Path:
    """An empty folder beside ``path`` to write a new version of it into (``_into_place`` then swaps them)."""
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def _into_place(tmp: Path, path: Path) -> None:
    """``tmp`` becomes ``path`` by renames, so a kill leaves the old folder or the new one, never half of one."""
    recover(path)  # what a kill during the last swap left
    old = _old(path)
    if path.exists():
        os.replace(path, old)
        kill_point("checkpoint-swapping")
    os.replace(tmp, path)
    kill_point("checkpoint-renamed")
    if old.exists():
        shutil.rmtree(old)


BEST_INFO = "best.json"


def save_model(path: Path, *, model: nn.Module, ties_map: dict, info: dict[str, Any]) -> Path:
    """A model without its training state (the weights, each stored tensor once, and the tie map), with
    ``info`` (what it is: the step and the validation figure of a best model) as ``best.json``; written as a
    checkpoint is, so a kill leaves the previous folder whole."""
    path = Path(path)
    tmp = _new_folder(path)
    _save_weights(tmp, model, ties_map, step=info.get("step"))
    (tmp / BEST_INFO).write_text(json.dumps(info))
    _into_place(tmp, path)
    return path


def _old(path: Path) -> Path:
    return path.with_name(path.name + ".old")


def recover(path: Path) -> None:
    """A process killed between the two renames of a checkpoint swap left the previous checkpoint under its old
    name and none in place: put it back. Killed after them, it left that old one beside the new: remove it. Only
    for a folder no live process is writing."""
    old = _old(Path(path))
    if not old.is_dir():
        return
    if Path(path).exists():
        shutil.rmtree(old)
    else:
        os.replace(old, path)


def load_model_info(path: Path) -> dict[str, Any] | None:
    """What ``save_model`` recorded of the model in ``path``, or None where there is none."""
    file = Path(path) / BEST_INFO
    return json.loads(file.read_text()) if file.is_file() else None


def _save_weights(folder: Path, model: nn.Module, ties_map: dict, step: int | None = None) -> None:
    tensors, aliases = dedupe(model.state_dict())
    # one metadata key: safetensors writes several in no fixed order, and a checkpoint's bytes must not vary
    save_file(tensors, str(folder / "model.safetensors"),
              metadata={WEIGHTS_KEY: json.dumps({"aliases": aliases, "step": step}, sort_keys=True)})
    (folder / "ties.json").write_text(json.dumps(ties_map))


def save_registry_rows(path: Path, rows: dict[str, Any]) -> None:
    """The rows a run has not yet written to the registry (``RunWriter.pending``), into checkpoint folder
    ``path``; replaced in one step, so a kill leaves the old file or the new one. A NaN value (a diverged loss)
    is kept as JSON's NaN extension."""
    file = Path(path) / REGISTRY_ROWS
    partial = file.with_name(file.name + ".tmp")
    partial.write_text(json.dumps(rows))
    os.replace(partial, file)


def load_registry_rows(path: Path) -> dict[str, Any] | None:
    """The rows checkpoint folder ``path`` carries for the registry, or None (a checkpoint without them)."""
    file = Path(path) / REGISTRY_ROWS
    if not file.exists():
        return None
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError):
        raise DyntieError(
            f"The checkpoint's {file} is corrupt; delete it to resume without the registry rows it carries "
            "(the registry then lacks the rows logged between its last flush and this checkpoint)."
        ) from None


class CorruptCheckpoint(DyntieError):
    """A checkpoint file that cannot be read as what it should be (truncated, overwritten, edited)."""

    def __init__(self, file: Path, problem: str) -> None:
        super().__init__(f"The checkpoint file {file} is corrupt ({problem}); the run cannot continue from it: "
                         "restore the file from a copy, or train the run again without --resume.")
        self.file = file


def _short(error: BaseException) -> str:
    return str(error).split("\n")[0].split(". ")[0].rstrip(".") or type(error).__name__


def load_tie_map(path: Path) -> dict:
    f = Path(path) / "ties.json"
    if not f.exists():
        raise DyntieError(f"No checkpoint in {path}; the run cannot be resumed (was it started with --out?).")
    try:
        tie_map = json.loads(f.read_text())
        state = tie_map["state"]
        if not isinstance(state, list) or not all(isinstance(x, int) for x in state):
            raise TypeError("its state is not a list of block indices")
    except (ValueError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorruptCheckpoint(f, "not a tie map: " + _short(e)) from None
    return tie_map


WEIGHTS_KEY = "dyntie"


def _weights_header(file: Path) -> dict[str, Any]:
    """What dyntie keeps in a checkpoint's weights file (``aliases``, ``step``); refused if the file is not whole.
    Weights written before the step was kept there hold only their aliases, under their own key."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), "pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptCheckpoint(file, _short(e)) from None
    try:
        if WEIGHTS_KEY in metadata:
            return json.loads(metadata[WEIGHTS_KEY])
        return {"aliases": json.loads(metadata.get("aliases", "{}"))}
    except ValueError as e:
        raise CorruptCheckpoint(file, "its header is not dyntie's: " + _short(e)) from None


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load weights into a model whose tie manager already holds the checkpoint's tie state."""
    from safetensors import SafetensorError

    file = Path(path) / "model.safetensors"
    aliases = _weights_header(file).get("aliases", {})
    try:
        tensors = load_file(str(file))
    except SafetensorError as e:
        raise CorruptCheckpoint(file, _short(e)) from None
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CorruptCheckpoint(file, "its tensors do not match the model its tie map and settings build: "
                                + _short(e).replace("Error(s) in loading state_dict for ", "")) from None


def load_trainer_state(path: Path) -> dict[str, Any]:
    file = Path(path) / "trainer.pt"
    try:
        return torch.load(file, weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 -- a damaged file raises pickle, zip and runtime errors alike
        raise CorruptCheckpoint(file, _short(e)) from None


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, trainer: dict[str, Any]) -> None:
    """Rebuild the optimizer's groups in the saved parameter order, then load its state."""
    params = dict(model.named_parameters())
    saved = trainer["optimizer_param_names"]
    missing = [n for group in saved for n in group if n not in params]
    if missing or len(saved) != len(optimizer.param_groups):
        raise DyntieError("The checkpoint's optimizer does not match this model; resume with the same preset.")
    for group, names in zip(optimizer.param_groups, saved):
        group["params"] = [params[n] for n in names]
    optimizer.load_state_dict(trainer["optimizer"])


def rng_state() -> dict[str, Any]:
    """The process's random-number generators (torch, Python, NumPy, CUDA)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def restore_rng(trainer: dict[str, Any]) -> None:
    rng = trainer["rng"]
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def check_checkpoint(path: Path) -> int | None:
    """A checkpoint's files checked before a resume loads anything (the tie map read, the weights' header and
    the trainer state's archive directory checked whole), and the step it was taken at (None: a checkpoint
    from before the weights recorded it). Cheap: no tensor is read."""
    path = Path(path)
    recover(path)
    load_tie_map(path)
    for name in ("model.safetensors", "trainer.pt"):
        if not (path / name).is_file():
            raise CorruptCheckpoint(path / name, "the file is missing")
    header = _weights_header(path / "model.safetensors")
    if not zipfile.is_zipfile(path / "trainer.pt"):
        raise CorruptCheckpoint(path / "trainer.pt", "not a whole torch archive")
    step = header.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


@contextmanager
def snapshot(path: Path, needed: tuple[str, ...] = ("ties.json", "model.safetensors")) -> Iterator[Path]:
    """``path``, a checkpoint folder, as one checkpoint: a folder whose files are those of the checkpoint in place
    when it was opened, even if a run moves a newer one into place meanwhile (every file is opened at once and
    read through its descriptor, so a file the swap deletes stays readable). Linux: through /proc/self/fd;
    elsewhere the folder itself."""
    import tempfile

    proc = Path("/proc/self/fd")
    if not proc.is_dir():
        yield Path(path)
        return
    for _ in range(20):
        # a run killed between the two renames of a swap left its last checkpoint under the old name
        opened = _open_files(Path(path)) if Path(path).exists() else _open_files(_old(Path(path)))
        if opened is None or not all(name in opened for name in needed):
            for fd in (opened or {}).values():
                os.close(fd)
            time.sleep(0.05)  # caught between the two renames of a swap, or in the old folder as it was removed
            continue
        try:
            with tempfile.TemporaryDirectory(prefix="dyntie-checkpoint-") as links:
                for name, fd in opened.items():
                    os.symlink(proc / str(fd), Path(links) / name)
                yield Path(links)
        finally:
            for fd in opened.values():
                os.close(fd)
        return
    raise DyntieError(f"The checkpoint {path} kept being replaced while it was opened; try again.")


def _open_files(path: Path) -> dict[str, int] | None:
    """Each file of folder ``path``, opened for reading; None if the folder or one of its files went away."""
    try:
        folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    opened: dict[str, int] = {}
    try:
        for name in os.listdir(folder):
            opened[name] = os.open(name, os.O_RDONLY, dir_fd=folder)
    except FileNotFoundError:
        for fd in opened.values():
            os.close(fd)
        return None
    finally:
        os.close(folder)
    return opened
