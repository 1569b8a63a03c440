"""Building a model without materialising the blocks that start tied.

A full build allocates every block before the tie manager releases the tied ones, so the setup peak would be the
whole model's weights -- on a GPU, a model that fits only when tied could not even start. ``build_lazily``
builds the model as usual, with one difference: the parameters of the blocks that start tied are made views of
one shared scratch buffer (one block's largest tensor) the moment they are created. Every initialiser still runs
on them, in the same order and on tensors of the same shapes, so the random-number stream is exactly that of a
full build: the blocks that stay real get the same values, and everything drawn after the blocks (heads,
poolers, dropout) too. The scratch values themselves are never used: the tie manager releases those parameters
and points the blocks at their root.

It works for any backbone whose blocks are constructed one after another as instances of one class (all three
built-ins and most transformer code); anything else falls back to a full build, and says why.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class BuildReport:
    """How a model was built: lazily (blocks that start tied were never materialised) or in full, and why."""

    lazy: bool
    skipped: int  # blocks whose parameters were never materialised
    reason: str = ""

    def label(self) -> dict:
        return {"lazy": self.lazy, "skipped_blocks": self.skipped, **({"reason": self.reason} if self.reason else {})}


class _Scratch:
    """One flat buffer per (dtype, device), as large as the block's largest parameter (``sizes``, read from the
    meta-device probe); every skipped parameter is a view of its start. ``meta``: a skipped parameter is a
    parameter on the meta device instead, so an initialiser run on it costs nothing and draws no number."""

    def __init__(self, sizes: dict[torch.dtype, int], *, meta: bool = False) -> None:
        self.sizes = sizes
        self.meta = meta
        self.buffers: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}

    def view(self, like: torch.Tensor) -> torch.Tensor:
        key = (like.dtype, like.device)
        buffer = self.buffers.get(key)
        if buffer is None or buffer.numel() < like.numel():
            size = max(like.numel(), self.sizes.get(like.dtype, 0))
            buffer = torch.empty(size, dtype=like.dtype, device=like.device)
            self.buffers[key] = buffer
        return buffer[: like.numel()].view(like.shape)


@contextmanager
def _skipping(block_cls: type[nn.Module], skip: set[int], created: list[nn.Module],
              scratch: _Scratch) -> Iterator[None]:
    """While a model is built: number the instances of ``block_cls`` in construction order (into ``created``)
    and turn every parameter registered inside a skipped instance into a view of ``scratch``."""
    state = threading.local()
    original_init = block_cls.__init__
    original_register = nn.Module.register_parameter

    def init(self, *args, **kwargs):
        index = len(created)
        created.append(self)
        outer = getattr(state, "skipping", False)
        state.skipping = outer or index in skip
        try:
            original_init(self, *args, **kwargs)
        finally:
            state.skipping = outer

    def register_parameter(self, name, param):
        skipped = param is not None and getattr(state, "skipping", False)
        if skipped and scratch.meta:  # a tensor's device cannot change in place: another parameter takes its name
            param = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        original_register(self, name, param)
        if skipped and not scratch.meta:
            with torch.no_grad():
                param.data = scratch.view(param.data)

    block_cls.__init__ = init
    nn.Module.register_parameter = register_parameter
    try:
        yield
    finally:
        block_cls.__init__ = original_init
        nn.Module.register_parameter = original_register


def build_lazily(build: Callable[[], nn.Module], blocks_of: Callable[[nn.Module], Sequence[nn.Module]],
                 initial_state: Sequence[int], probe_blocks: Sequence[nn.Module], *,
                 same_draws: bool = True) -> tuple[nn.Module, BuildReport]:
    """``build()`` with the parameters of every block that starts tied (``initial_state[i] != i``) held in
    scratch views. ``probe_blocks``: the blocks of the same model built on the meta device. Falls back to a
    plain ``build()`` when the blocks are not built the way this needs. ``same_draws=False``: the skipped
    parameters live on the meta device, so their initialisers take no time (47 blocks of 2048 wide draw for most
    of a minute on a CPU) but draw no number either: the other weights then differ from a full build's, which
    only a throwaway copy may accept (the memory plan's measurement, where only tensor sizes count)."""
    skip = {i for i, root in enumerate(initial_state) if root != i}
    if not skip:
        return build(), BuildReport(False, 0, "every block starts independent")
    block_types = {type(b) for b in probe_blocks}
    if len(block_types) != 1 or len(probe_blocks) != len(initial_state):
        return build(), BuildReport(False, 0, "the blocks are not instances of one class")
    sizes: dict[torch.dtype, int] = {}
    for p in probe_blocks[0].parameters():
        sizes[p.dtype] = max(sizes.get(p.dtype, 0), p.numel())
    rng = torch.get_rng_state()
    created: list[nn.Module] = []
    with _skipping(next(iter(block_types)), skip, created, _Scratch(sizes, meta=not same_draws)):
        model = build()
    if [id(b) for b in blocks_of(model)] != [id(b) for b in created]:
        # the blocks were not constructed in list order (or more instances were made): draw again, in full
        del model
        created.clear()
        torch.set_rng_state(rng)
        return build(), BuildReport(False, 0, "the blocks were not constructed in the order they run")
    return model, BuildReport(True, len(skip))
