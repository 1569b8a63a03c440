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
* ``registry_rows.json`` -- the registry rows the run had logged but not yet written when the checkpoint was
  taken (``RunWriter.pending``): a process killed before its next flush loses none of them, since a resume
  writes them (those the registry does not hold yet).
The folder is written under a temporary name and renamed, so a kill mid-write leaves the last good one.

Beside it, a run keeps the model of its best validation figure in ``best/`` (``save_model``): the weights and the
tie map as above, and ``best.json`` (the step and the figure), without the training state, which nothing resumes
from a best model.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import DyntieError


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
    pending: PendingDecision | None = None
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
                    trainer: dict[str, Any], registry_rows: dict[str, Any] | None = None) -> Path:
    path = Path(path)
    tmp = _new_folder(path)
    _save_weights(tmp, model, ties_map)
    if registry_rows is not None:
        save_registry_rows(tmp, registry_rows)
    torch.save({
        **trainer,
        "optimizer": optimizer.state_dict(),
        "optimizer_param_names": optimizer_param_names(model, optimizer),
        "rng": rng_state(),
    }, tmp / "trainer.pt")
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
    old = path.with_name(path.name + ".old")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    if old.exists():
        shutil.rmtree(old)


BEST_INFO = "best.json"


def save_model(path: Path, *, model: nn.Module, ties_map: dict, info: dict[str, Any]) -> Path:
    """A model without its training state (the weights, each stored tensor once, and the tie map), with
    ``info`` (what it is: the step and the validation figure of a best model) as ``best.json``; written as a
    checkpoint is, so a kill leaves the previous folder whole."""
    path = Path(path)
    tmp = _new_folder(path)
    _save_weights(tmp, model, ties_map)
    (tmp / BEST_INFO).write_text(json.dumps(info))
    _into_place(tmp, path)
    return path


def load_model_info(path: Path) -> dict[str, Any] | None:
    """What ``save_model`` recorded of the model in ``path``, or None where there is none."""
    file = Path(path) / BEST_INFO
    return json.loads(file.read_text()) if file.is_file() else None


def _save_weights(folder: Path, model: nn.Module, ties_map: dict) -> None:
    tensors, aliases = dedupe(model.state_dict())
    save_file(tensors, str(folder / "model.safetensors"), metadata={"aliases": json.dumps(aliases)})
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


def load_tie_map(path: Path) -> dict:
    f = Path(path) / "ties.json"
    if not f.exists():
        raise DyntieError(f"No checkpoint in {path}; the run cannot be resumed (was it started with --out?).")
    return json.loads(f.read_text())


def load_model_weights(path: Path, model: nn.Module) -> None:
    """Load weights into a model whose tie manager already holds the checkpoint's tie state."""
    from safetensors import safe_open

    file = Path(path) / "model.safetensors"
    tensors = load_file(str(file))
    with safe_open(str(file), "pt") as f:
        aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        tensors[alias] = tensors[name]
    model.load_state_dict(tensors, strict=True)


def load_trainer_state(path: Path) -> dict[str, Any]:
    return torch.load(Path(path) / "trainer.pt", weights_only=False)


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
