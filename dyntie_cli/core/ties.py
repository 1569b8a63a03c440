"""Tie state, Eq. 1, and the tie manager that makes a state true in a model's tensors.

State ``s`` (docs/method.md): ``s[i] == i`` means block i is independent (owns and trains its
weights); ``s[i] == j < i`` means block i computes with block j's weights. States are canonical: every
tied block points straight at an independent root, so ``s[s[i]] == s[i]``.

The manager shares at the *parameter* level, never by placing one module in two slots: each block keeps
its own module (and so its own HF ``layer_idx`` and KV-cache slot) while a tied block's weight attributes
are the root's tensors. A tied block owns no ``nn.Parameter`` at all, so ``model.parameters()``, the
optimizer and ``state_dict()`` see exactly the independent blocks plus the always-trained parameters.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import DyntieError
from ..settings import TiedGrad, UntieOptim
from .optimizers import copied_state, fresh_state
from .recompute import Every, checkpoint_forward, checkpointed_blocks, uncheckpoint

# --------------------------------------------------------------------------------------------------
# The state vector and Eq. 1
# --------------------------------------------------------------------------------------------------


def validate_action(action: Sequence[int], num_blocks: int) -> list[int]:
    """Return ``action`` as a list of ints, or raise if it is not a valid action for ``num_blocks``."""
    a = [int(x) for x in action]
    if len(a) != num_blocks:
        raise DyntieError(f"An action needs {num_blocks} entries (one per block), got {len(a)}.")
    for i, ai in enumerate(a):
        if not 0 <= ai <= i:
            raise DyntieError(
                f"Action entry {i} is {ai}, but block {i} may only follow a block 0..{i}; fix the action."
            )
    return a


def transition(state: Sequence[int], action: Sequence[int]) -> list[int]:
    """Eq. 1: ``s'[0] = 0``; ``s'[i] = i if a[i] == i else s'[a[i]]``, rows resolved in order.

    The new state does not depend on ``state`` (the paper's transition is a function of the action
    alone), but ``state`` is validated so a caller cannot pair an action with a malformed state.
    """
    validate_state(state)
    a = validate_action(action, len(state))
    new = [0] * len(a)
    for i in range(1, len(a)):
        # a block asked to follow a block that is itself being tied this step ends on the final root
        new[i] = i if a[i] == i else new[a[i]]
    return new


def is_canonical(state: Sequence[int]) -> bool:
    s = list(state)
    return bool(s) and s[0] == 0 and all(0 <= s[i] <= i and s[s[i]] == s[i] for i in range(len(s)))


def validate_state(state: Sequence[int]) -> list[int]:
    s = [int(x) for x in state]
    if not is_canonical(s):
        raise DyntieError(
            f"Tie state {s} is not canonical: need s[0] == 0, s[i] <= i and every tied block pointing at "
            "an independent block."
        )
    return s


def canonicalize(parent: Sequence[int]) -> list[int]:
    """Resolve chains in any vector with ``parent[i] <= i`` to the root, giving a canonical state."""
    s = validate_action(parent, len(parent))
    for i in range(len(s)):
        s[i] = s[s[i]]  # s[s[i]] is already resolved because s[i] <= i
    return s


def independent_count(state: Sequence[int]) -> int:
    return sum(1 for i, r in enumerate(state) if r == i)


def roots(state: Sequence[int]) -> list[int]:
    return [i for i, r in enumerate(state) if r == i]


def all_tied(num_blocks: int) -> list[int]:
    return [0] * num_blocks


def all_independent(num_blocks: int) -> list[int]:
    return list(range(num_blocks))


def permute_state(state: Sequence[int], perm: Sequence[int]) -> list[int]:
    """Move a tie pattern onto other layers: block ``perm[i]`` gets block i's group, re-canonicalised.

    Groups (blocks sharing one set of weights) keep their sizes, so the number of independent blocks is
    unchanged; each group's new root is its lowest new index.
    """
    s = validate_state(state)
    groups: dict[int, list[int]] = {}
    for i, r in enumerate(s):
        groups.setdefault(r, []).append(int(perm[i]))
    new = [0] * len(s)
    for members in groups.values():
        root = min(members)
        for m in members:
            new[m] = root
    return validate_state(new)


# --------------------------------------------------------------------------------------------------
# The tie manager
# --------------------------------------------------------------------------------------------------


def _matmul_modules() -> tuple[type, ...]:
    """Module types whose weight and bias go straight into a matrix product (autocast casts them down):
    ``nn.Linear`` and, when transformers is loaded, its GPT-2 ``Conv1D``."""
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


class TieManager:
    """Applies tie states to an ordered list of blocks with identical parameter structure.

    ``tied_grad="follow"`` (the paper's frozen semantics): a tied block computes with a *detached* view of
    its root's tensors. Backward still flows through the block's activations to earlier blocks, but autograd
    neither computes nor stores a weight gradient for it (and so saves fewer activations).
    ``tied_grad="sum"`` (ALBERT-style): a tied block uses the root's Parameter itself, so autograd adds the
    gradient of every position that uses a weight into the root's ``.grad``.

    Under autocast (bf16/fp16), autocast casts a detached weight again at every position that uses it and
    autograd keeps each copy for the input gradient: 45 tied positions would save 45 half-precision copies
    of their root's matrices. With ``share_casts`` (the default) the tied positions of one root share a
    single cast, made again only after the root's weights change (an optimizer step), with the same values
    autocast would have made, so the outputs are unchanged and the copies are saved once per root.
    """

    def __init__(
        self,
        blocks: Sequence[nn.Module],
        initial_state: Sequence[int] | None = None,
        *,
        tied_grad: TiedGrad = "follow",
        untie_optim: UntieOptim = "fresh",
        share_casts: bool = True,
    ) -> None:
        if not blocks:
            raise DyntieError("The backbone exposed no blocks to tie.")
        self.blocks = list(blocks)
        self.tied_grad: TiedGrad = tied_grad
        self.untie_optim: UntieOptim = untie_optim
        self.optimizer: torch.optim.Optimizer | None = None
        self.share_casts = share_casts
        self.names = [n for n, _ in self.blocks[0].named_parameters()]
        shapes = [p.shape for _, p in self.blocks[0].named_parameters()]
        for i, b in enumerate(self.blocks):
            got = [(n, p.shape) for n, p in b.named_parameters()]
            if got != list(zip(self.names, shapes)):
                raise DyntieError(f"Block {i} does not have the parameter structure of block 0; only identical "
                                  "blocks can be tied.")
        # (submodule, attribute) of every parameter, per block: where a tensor is read at forward time
        self._slots = [[self._slot(b, n) for n in self.names] for b in self.blocks]
        # The parameters each block owns; None for a tied block.  Every block starts independent with the
        # weights it was built with, then the initial state is applied.
        self._own: list[list[nn.Parameter] | None] = [
            [getattr(m, leaf) for m, leaf in slots] for slots in self._slots
        ]
        self.state: list[int] = all_independent(len(self.blocks))
        self._group_of: list[int] = []
        # which of a block's tensors feed a matrix product (autocast runs those in half precision)
        matmul = _matmul_modules()
        self._feeds_matmul = [isinstance(m, matmul) for m, _ in self._slots[0]]
        self._casts: dict[int, tuple[tuple, list[torch.Tensor]]] = {}  # root -> (key, shared casts)
        # Re-read the root's tensors before each forward, so a tie survives .to()/.double() (which replace a
        # Parameter's data but skip plain tensor attributes) and can never go stale; after the forward a
        # tied block holds plain views of its root again (not the half-precision casts of the forward).
        self._hooks = [b.register_forward_pre_hook(self._make_refresh(i)) for i, b in enumerate(self.blocks)]
        self._hooks += [b.register_forward_hook(self._make_restore(i)) for i, b in enumerate(self.blocks)]
        self.apply(initial_state if initial_state is not None else all_tied(len(self.blocks)))

    # -- wiring ------------------------------------------------------------------------------------

    @staticmethod
    def _slot(block: nn.Module, name: str) -> tuple[nn.Module, str]:
        path, _, leaf = name.rpartition(".")
        return (block.get_submodule(path) if path else block), leaf

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Track ``optimizer``: new parameters join the group block 0's counterpart is in."""
        where = {id(p): g for g, group in enumerate(optimizer.param_groups) for p in group["params"]}
        assert self._own[0] is not None
        missing = [n for n, p in zip(self.names, self._own[0]) if id(p) not in where]
        if missing:
            raise DyntieError(f"The optimizer does not hold block 0's parameters {missing[:3]}.")
        self._group_of = [where[id(p)] for p in self._own[0]]
        self.optimizer = optimizer
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        for i, own in enumerate(self._own):
            if own is not None and any(id(p) not in held for p in own):
                raise DyntieError(f"The optimizer does not hold independent block {i}'s parameters.")

    def _make_refresh(self, i: int):
        def refresh(module, args):
            self._before_forward(i)
        return refresh

    def _make_restore(self, i: int):
        def restore(module, args, output):
            self._after_forward(i)
        return restore

    def _before_forward(self, i: int) -> None:
        if self.state[i] != i:
            self._inject(i, forward=True)

    def _after_forward(self, i: int) -> None:
        if self.state[i] != i and self._casts:
            self._inject(i)

    def checkpoint(self, every: Every) -> list[int]:
        """Activation checkpointing of the blocks ``every`` names (off, all, or every n-th: core/recompute.py);
        a tied block's recomputation reads its root's tensors as its forward did. Returns the blocks."""
        uncheckpoint(self.blocks)
        chosen = checkpointed_blocks(len(self.blocks), every)
        for i in chosen:
            checkpoint_forward(self.blocks[i], lambda i=i: self._before_forward(i), lambda i=i: self._after_forward(i))
        return chosen

    def _view(self, p: nn.Parameter) -> torch.Tensor:
        return p.detach() if self.tied_grad == "follow" else p

    def _shared_casts(self, r: int, root: list[nn.Parameter]) -> list[torch.Tensor] | None:
        """Root r's tensors as autocast would cast them for a matrix product, made once per weight update
        and shared by every position that follows r; None where autocast is off or gradients are summed."""
        if not self.share_casts or self.tied_grad != "follow":
            return None
        device = root[0].device.type
        if not torch.is_autocast_enabled(device):
            return None
        dtype = torch.get_autocast_dtype(device)
        # an optimizer step bumps each tensor's version; a device or dtype move changes its storage
        key = (dtype, tuple((p.data_ptr(), p._version) for p in root))
        hit = self._casts.get(r)
        if hit is not None and hit[0] == key:
            return hit[1]
        casts = [p.detach().to(dtype) if mm and p.is_floating_point() else p.detach()
                 for p, mm in zip(root, self._feeds_matmul)]
        self._casts[r] = (key, casts)
        return casts

    def _inject(self, i: int, forward: bool = False) -> None:
        r = self.state[i]
        root = self._own[r]
        assert root is not None
        tensors = (self._shared_casts(r, root) if forward else None) or [self._view(p) for p in root]
        for (m, leaf), t in zip(self._slots[i], tensors):
            # object.__setattr__ keeps the tensor out of m._parameters: the block owns nothing
            object.__setattr__(m, leaf, t)

    # -- applying a state --------------------------------------------------------------------------

    def apply(self, new_state: Sequence[int]) -> dict[str, list[int]]:
        """Make ``new_state`` true. Returns the blocks untied and tied by this change."""
        new = validate_state(new_state)
        if len(new) != len(self.blocks):
            raise DyntieError(f"A tie state needs {len(self.blocks)} entries, got {len(new)}.")
        old = self.state
        self._casts.clear()  # casts of weights that may be released or re-rooted
        untie = [i for i in range(len(new)) if new[i] == i and old[i] != i]
        release = [i for i in range(len(new)) if new[i] != i and old[i] == i]
        # 1. untie: a fresh copy of the weights the block was using (read before anything is released)
        for i in untie:
            source = self._own[old[i]]
            assert source is not None
            fresh = [nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad) for p in source]
            for (m, leaf), p in zip(self._slots[i], fresh):
                m.__dict__.pop(leaf, None)  # register_parameter refuses a name set as an attribute
                m.register_parameter(leaf, p)
            self._own[i] = fresh
            self._optimizer_add(fresh, source)
        # 2. release: the block's own weights, gradients and optimizer state go; that is the memory saving
        for i in release:
            own = self._own[i]
            assert own is not None
            self._optimizer_remove(own)
            for (m, leaf), p in zip(self._slots[i], own):
                p.grad = None
                del m._parameters[leaf]
            self._own[i] = None
        self.state = new
        # 3. every tied block computes with its (possibly new) root's tensors
        for i in range(len(new)):
            if new[i] != i:
                self._inject(i)
        return {"untied": untie, "tied": release}

    def reinject(self) -> None:
        """Point every tied block at its root's tensors again (after a device or dtype move of the model)."""
        self._casts.clear()
        for i, root in enumerate(self.state):
            if root != i:
                self._inject(i)

    def _optimizer_add(self, params: list[nn.Parameter], source: list[nn.Parameter]) -> None:
        opt = self.optimizer
        if opt is None:
            return
        for p, src, g in zip(params, source, self._group_of):
            opt.param_groups[g]["params"].append(p)
            # the state of the optimizer's own kind: a copy of the source's, or what its constructor gives a
            # parameter before any step (empty for most; APOLLO's projection seed)
            state = copied_state(opt.state[src]) if self.untie_optim == "copy" and src in opt.state else \
                fresh_state(opt, src)
            if state:
                opt.state[p] = state

    def _optimizer_remove(self, params: list[nn.Parameter]) -> None:
        opt = self.optimizer
        if opt is None:
            return
        gone = {id(p) for p in params}
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for p in params:
            opt.state.pop(p, None)

    # -- measurements ------------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def independent_layers(self) -> int:
        return independent_count(self.state)

    def block_tensors(self, i: int) -> list[torch.Tensor]:
        """The tensors block i computes with right now, read from the module (not from the state)."""
        return [getattr(m, leaf) for m, leaf in self._slots[i]]

    def distinct_block_weights(self) -> int:
        """Number of distinct weight storages among the blocks, measured from the tensors themselves."""
        keys = {
            tuple(t.untyped_storage().data_ptr() for t in self.block_tensors(i)) for i in range(len(self.blocks))
        }
        return len(keys)

    def block_numel(self) -> int:
        assert self._own[0] is not None
        return sum(p.numel() for p in self._own[0])

    def owned_parameters(self) -> list[nn.Parameter]:
        return [p for own in self._own if own is not None for p in own]

    def tie_map(self) -> dict:
        """What a checkpoint needs besides the independent blocks' tensors (state_dict omits tied ones)."""
        return {"state": list(self.state), "tied_grad": self.tied_grad, "names": list(self.names)}

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        uncheckpoint(self.blocks)
