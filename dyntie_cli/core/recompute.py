"""Activation checkpointing of whole blocks (``train.checkpointing``): a checkpointed block keeps only its inputs
for the backward pass and runs its forward again there, as transformers' ``gradient_checkpointing`` does.

It is applied through the backbone contract alone -- the ordered block list -- by wrapping each chosen block's
``forward`` in non-reentrant ``torch.utils.checkpoint``, so it works for any backbone. A tied block holds no
weights of its own: the tie manager points it at its root's tensors just before its forward. The recomputation in
the backward pass runs ``forward`` again without the module's hooks, so the wrapper calls the same preparation
(``before``) inside the checkpointed function: the recomputed block reads its root's current tensors (the very
tensors of the first pass, since no weight changes between a forward and its backward), and its gradients -- the
root's summed gradient under ``tied_grad=sum``, none under ``follow`` -- are those of the uncheckpointed model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

Every = str | int  # train.checkpointing: "off", "all" or n


def checkpointed_blocks(num_blocks: int, every: Every) -> list[int]:
    """The blocks ``every`` checkpoints: none (off), all, or every n-th from block 0."""
    if every == "off":
        return []
    step = 1 if every == "all" else int(every)
    return list(range(0, num_blocks, step))


def checkpoint_forward(block: nn.Module, before: Callable[[], None], after: Callable[[], None]) -> None:
    """Wrap ``block.forward`` in activation checkpointing; ``before``/``after`` run around every pass of it,
    the recomputation included. Outside autograd (evaluation) the block runs as it is."""
    inner = block.forward

    def run(*args: Any, **kwargs: Any) -> Any:
        before()
        try:
            return inner(*args, **kwargs)
        finally:
            after()

    def forward(*args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return inner(*args, **kwargs)
        return checkpoint(run, *args, use_reentrant=False, **kwargs)

    forward.dyntie_checkpointed = True  # type: ignore[attr-defined]
    block.forward = forward


def uncheckpoint(blocks: Sequence[nn.Module]) -> None:
    """Undo ``checkpoint_forward`` on every block of ``blocks`` (a plain library model again)."""
    for block in blocks:
        if getattr(block.__dict__.get("forward"), "dyntie_checkpointed", False):
            del block.forward


def is_checkpointed(block: nn.Module) -> bool:
    return bool(getattr(block.__dict__.get("forward"), "dyntie_checkpointed", False))
