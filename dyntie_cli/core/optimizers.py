"""The optimizers a run can train with (``train.optimizer``), in one table: the library each comes from, how its
parameter groups are built, what state it keeps per parameter (the memory plan), and what a block that unties
gets of it (the tie manager).

* ``adamw``: ``torch.optim.AdamW``, two fp32 moments per parameter (8 bytes per fp32 parameter);
* ``adafactor``: ``torch.optim.Adafactor``, a matrix's second moment factored into one row and one column vector,
  no first moment; ``train.lr`` is its relative step size (torch's default 1e-2), not AdamW's;
* ``adamw8bit``: bitsandbytes' ``AdamW8bit``, both moments quantised blockwise to 8 bits (about 2 bytes per
  parameter; tensors under 4,096 elements keep 32-bit moments), on CPU and CUDA;
* ``galore``: galore-torch's ``GaLoreAdamW``: the moments of every matrix inside a block live in a rank-r
  projection of its gradient (``train.low_rank``), refreshed from an SVD every ``train.low_rank_gap`` steps;
  embeddings and vectors keep AdamW's moments;
* ``apollo``: apollo-torch's ``APOLLOAdamW``: the same low-rank moments from a random projection, used only to
  scale the full gradient channel by channel.

The libraries of the last three are optional (``pip install 'dyntie[lowmem]'``); a run that names one that is not
installed is refused before any data loads. Parameter groups: matrices decayed, vectors (biases, norms) not, and
for galore and apollo the blocks' matrices in a group of their own with the projection settings -- a block that
unties joins its counterpart's group in block 0, so its matrices are projected too.
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import DyntieError
from ..settings import RunSettings, TrainSettings

Groups = list[dict[str, Any]]


@dataclass(frozen=True)
class OptimizerKind:
    name: str
    #: the module to import (None: torch itself) and the pip command that installs it
    module: str | None
    pip: str
    #: the blocks' matrices keep their moments in a low-rank projection (a parameter group of their own)
    low_rank: bool
    #: the optimizer from its parameter groups and the run's training settings
    make: Callable[[Groups, TrainSettings], torch.optim.Optimizer]


def _adamw(groups: Groups, t: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def _adafactor(groups: Groups, t: TrainSettings) -> torch.optim.Optimizer:
    return torch.optim.Adafactor(groups, lr=t.lr)


def _adamw8bit(groups: Groups, t: TrainSettings) -> torch.optim.Optimizer:
    with _quiet("bitsandbytes"):
        import bitsandbytes as bnb
    return bnb.optim.AdamW8bit(groups, lr=t.lr, betas=(t.beta1, t.beta2))


def _galore(groups: Groups, t: TrainSettings) -> torch.optim.Optimizer:
    with _quiet("bitsandbytes"):  # galore_torch imports bitsandbytes for its 8-bit variant
        from galore_torch import GaLoreAdamW
    return GaLoreAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), no_deprecation_warning=True)


def _apollo(groups: Groups, t: TrainSettings) -> torch.optim.Optimizer:
    with _quiet("bitsandbytes"):
        from apollo_torch import APOLLOAdamW
    return APOLLOAdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2))


OPTIMIZERS: dict[str, OptimizerKind] = {kind.name: kind for kind in (
    OptimizerKind("adamw", None, "", False, _adamw),
    OptimizerKind("adafactor", None, "", False, _adafactor),
    OptimizerKind("adamw8bit", "bitsandbytes", "pip install 'dyntie[lowmem]' (or pip install bitsandbytes)", False,
                  _adamw8bit),
    OptimizerKind("galore", "galore_torch", "pip install 'dyntie[lowmem]' (or pip install galore-torch)", True,
                  _galore),
    OptimizerKind("apollo", "apollo_torch", "pip install 'dyntie[lowmem]' (or pip install apollo-torch)", True,
                  _apollo),
)}

#: the library's own default scale of a projected update, where ``train.low_rank_scale`` is 0
_DEFAULT_SCALE = {"galore": 0.25, "apollo": 1.0}
#: bitsandbytes keeps 32-bit moments for tensors smaller than this, and quantises in blocks of this many elements
_BNB_MIN_8BIT = 4096
_BNB_BLOCK = 256


@contextmanager
def _quiet(logger: str):
    """bitsandbytes logs a warning at import on a CPU without its optional hub kernels (for 4-bit matrix
    products, which dyntie does not use): kept off the run's output."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def check_optimizer(settings: RunSettings) -> None:
    """Refuse, in one sentence, a run whose optimizer's library is not installed (before any data loads)."""
    kind = OPTIMIZERS[settings.train.optimizer]
    if kind.module is not None and importlib.util.find_spec(kind.module) is None:
        raise DyntieError(f"train.optimizer {kind.name} needs the {kind.module} package, which is not installed: "
                          f"{kind.pip}.")


def import_optimizer(settings: RunSettings) -> None:
    """Load the optimizer's library now (a library belongs to the process baseline, measured before the model)."""
    kind = OPTIMIZERS[settings.train.optimizer]
    if kind.module is not None:
        check_optimizer(settings)
        with _quiet("bitsandbytes"):
            importlib.import_module(kind.module)


def build_optimizer(model: nn.Module, cfg: RunSettings, projected: Iterable[nn.Parameter] = ()
                    ) -> torch.optim.Optimizer:
    """The run's optimizer over the de-duplicated trainable parameters: matrices decayed, vectors (biases, norms)
    not; for a low-rank optimizer the matrices among ``projected`` (the independent blocks' parameters) in a group
    of their own with the projection settings."""
    t = cfg.train
    kind = OPTIMIZERS[t.optimizer]
    check_optimizer(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    low = {id(p) for p in projected if p.dim() == 2} if kind.low_rank else set()
    groups: Groups = [
        {"params": [p for p in params if p.dim() >= 2 and id(p) not in low], "weight_decay": t.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if low:
        scale = t.low_rank_scale or _DEFAULT_SCALE[kind.name]
        group = {"params": [p for p in params if id(p) in low], "weight_decay": t.weight_decay,
                 "rank": t.low_rank, "update_proj_gap": t.low_rank_gap, "scale": scale, "proj_type": "std"}
        if kind.name == "apollo":
            group |= {"proj": "random", "scale_type": "channel"}
        groups.append(group)
    return kind.make(groups, t)


# -- what the tie manager gives a block that unties ----------------------------------------------------------


def fresh_state(optimizer: torch.optim.Optimizer, source: nn.Parameter) -> dict[str, Any]:
    """The state ``optimizer``'s constructor gives a parameter before its first step: nothing for most (they
    build their state at the first step), APOLLO's seed of its random projection (the parameter's position among
    the optimizer's parameters, as its constructor numbers them)."""
    if type(optimizer).__module__.startswith("apollo_torch"):
        return {"seed": sum(len(g["params"]) for g in optimizer.param_groups)}
    return {}


def copied_state(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a parameter's optimizer state that shares nothing with it: tensors cloned, and objects that
    hold tensors (GaLore's and APOLLO's projectors) copied whole."""
    return {k: v.detach().clone() if torch.is_tensor(v) else copy.deepcopy(v) for k, v in state.items()}


# -- what the memory plan counts ------------------------------------------------------------------------------


def _low_rank_bytes(name: str, shape: Sequence[int], rank: int, element: int) -> int:
    """Two moments of the projected gradient (the longer side by the rank) and the projection: APOLLO's is the
    shorter side by the rank; GaLore's is a slice of its SVD's factor, which keeps that whole factor (the shorter
    side squared) alive."""
    m, n = shape
    r, k = min(rank, m, n), min(m, n)
    return element * (2 * max(m, n) * r + (k * k if name == "galore" else k * r))


def state_bytes(t: TrainSettings, shape: Sequence[int], element: int, projected: bool) -> int:
    """Optimizer state bytes of one parameter of ``shape`` (``element`` bytes an element) under ``t.optimizer``;
    ``projected``: it is a block's parameter (what galore and apollo project when it is a matrix)."""
    numel = math.prod(shape)
    name = t.optimizer
    if name == "adafactor":
        if len(shape) < 2:
            return numel * element
        return (numel // shape[-1] + numel // shape[-2]) * element  # one row and one column vector
    if name == "adamw8bit":
        if numel < _BNB_MIN_8BIT:
            return 2 * numel * 4
        return 2 * numel + 2 * 4 * math.ceil(numel / _BNB_BLOCK)  # 8-bit codes and one fp32 scale a block
    if OPTIMIZERS[name].low_rank and projected and len(shape) == 2:
        return _low_rank_bytes(name, shape, t.low_rank, element)
    return 2 * numel * element


def step_transient_bytes(t: TrainSettings, shapes: Iterable[tuple[Sequence[int], bool]], element: int) -> int:
    """The most an optimizer step holds besides the stored state, over the parameters it updates one at a time:
    bitsandbytes on CPU dequantises both moments of a tensor to fp32; galore's SVD of a block's matrix (its two
    factors) and the full-size update it projects back; apollo the full-size scaled gradient."""
    worst = 0
    for shape, projected in shapes:
        numel = math.prod(shape)
        if t.optimizer == "adamw8bit" and numel >= _BNB_MIN_8BIT:
            worst = max(worst, 2 * numel * 4)
        elif OPTIMIZERS[t.optimizer].low_rank and projected and len(shape) == 2:
            m, n = shape
            k = min(m, n)
            svd = m * k + k * n if t.optimizer == "galore" else 0
            worst = max(worst, element * (svd + 2 * numel))
    return worst
