"""Several processes under ``torchrun`` (docs/method.md, "Several processes"): data parallel, gloo on CPU, NCCL on GPUs.

Every rank holds the whole model and the same tie state and trains on its own batches; after backward the
gradients are averaged over the ranks, as DDP does. (By hand, not with DDP: DDP fixes its parameter set when it
wraps the model, and a tie decision changes that set.) Rank 0 alone decides, scores rewards, evaluates, records
and checkpoints; every decision is broadcast and each rank applies the same change, so the ranks' weights stay
identical, which the end of the run checks. Without ``WORLD_SIZE`` (one process) every method is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from ..errors import DyntieError

_BUCKET = 1 << 24  # gradient elements per all-reduce (64 MiB in fp32): bounds the extra copy it needs

Parameters = nn.Module | Iterable[torch.Tensor]


def _tensors(params: Parameters) -> list[torch.Tensor]:
    """A module's parameters (each stored tensor once, as ``parameters()`` yields them), or the given ones."""
    return list(params.parameters() if isinstance(params, nn.Module) else params)


def _import_before_joining() -> None:
    """Import, before the process group exists, the torch modules that capture it when imported after (FSDP's
    defaults hold ``dist.group.WORLD``; transformers and timm import FSDP with their model code). A group they
    hold outlives ``destroy_process_group``: its gloo threads then run until the interpreter shuts down, and
    freeing the group that late can abort the process ("terminate called without an active exception") after
    the run itself has finished."""
    import torch.distributed.fsdp  # noqa: F401


class Group:
    def __init__(self, world: int = 1, rank: int = 0, local_rank: int = 0) -> None:
        self.world, self.rank, self.local_rank = world, rank, local_rank
        self.device: torch.device | None = None

    @classmethod
    def from_env(cls) -> Group:
        """The process group torchrun describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``); one process else."""
        try:
            world = int(os.environ.get("WORLD_SIZE") or 1)
            if world <= 1:
                return cls()  # one process: RANK or LOCAL_RANK left in the environment mean nothing
            return cls(world, int(os.environ.get("RANK") or 0), int(os.environ.get("LOCAL_RANK") or 0))
        except ValueError:
            raise DyntieError("WORLD_SIZE, RANK and LOCAL_RANK must be integers; launch with torchrun.") from None

    @classmethod
    def joined(cls, device: torch.device) -> Group:
        """The ranks of the process group this process is in (one a user's launcher, such as accelerate, already
        started), else the one torchrun describes, joined now; one process without either."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = cls(dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK") or 0))
            group.device = device
            return group
        group = cls.from_env()
        group.start(device)
        return group

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def start(self, device: torch.device) -> torch.device:
        """Join the process group (NCCL for CUDA, gloo for CPU); on CUDA each rank takes GPU ``LOCAL_RANK``."""
        if not self.active:
            self.device = device
            return device
        import torch.distributed as dist

        if device.type == "cuda":
            if self.local_rank >= torch.cuda.device_count():
                raise DyntieError(f"Rank {self.rank} wants GPU {self.local_rank} but {torch.cuda.device_count()} "
                                  "are visible; start as many processes per node as there are GPUs.")
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            _import_before_joining()
            # long enough for rank 0's evaluations, which the other ranks wait out at their next all-reduce
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=2))
        self.device = device
        return device

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()

    @contextmanager
    def main_first(self):
        """Rank 0 runs the body before the others (it may write a cache the others then read)."""
        if self.active and not self.is_main:
            self._barrier()
        yield
        if self.active and self.is_main:
            self._barrier()

    def _barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def wait_for_all(self) -> None:
        if self.active:
            self._barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (any picklable value)."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_parameters(self, params: Parameters) -> None:
        """Rank 0's weights on every rank (each stored tensor once: a tied block's tensors are its root's)."""
        if not self.active:
            return
        import torch.distributed as dist

        for p in _tensors(params):
            dist.broadcast(p.data, src=0)

    def average_gradients(self, params: Parameters) -> None:
        """Average every gradient over the ranks, in flat buckets (one all-reduce per bucket)."""
        if not self.active:
            return
        import torch.distributed as dist

        buckets: list[list[torch.Tensor]] = []
        for g in (p.grad for p in _tensors(params) if p.grad is not None):
            last = buckets[-1] if buckets else None
            if last and last[0].dtype == g.dtype and sum(b.numel() for b in last) + g.numel() <= _BUCKET:
                last.append(g)
            else:
                buckets.append([g])
        for bucket in buckets:
            flat = torch.cat([b.reshape(-1) for b in bucket])
            dist.all_reduce(flat)
            flat.div_(self.world)
            offset = 0
            for b in bucket:
                b.copy_(flat[offset: offset + b.numel()].view_as(b))
                offset += b.numel()

    def mean(self, value: float) -> float:
        """``value`` averaged over the ranks."""
        if not self.active:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t[0]) / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any."""
        if not self.active:
            return flag
        import torch.distributed as dist

        t = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t[0] > 0)

    def check_identical(self, params: Parameters) -> None:
        """Raise if the ranks' weights differ (they must not: same start, same averaged gradients, same ties)."""
        if not self.active:
            return
        # each tensor's sum as its float64 bytes: NaN weights (a diverged run, not a bug) compare equal to NaN
        sums = [p.detach().double().sum().cpu().numpy().tobytes() for p in _tensors(params)]
        if any(other != sums for other in self.gather(sums)):
            raise DyntieError("The ranks' weights diverged; this is a bug in dyntie's multi-process training, "
                              "please report it with the command you ran.")


class BackwardAverage:
    """Averages gradients over the ranks once a backward pass ends, as DDP's reducer does, but over the
    parameters that train *now* (``params()``, asked at every pass): a tie decision changes that set, which DDP
    fixes when it wraps a model. A hook on ``trigger``'s output (a module every forward runs through: block 0,
    independent in every tie state) queues the all-reduce on autograd's engine when the pass reaches it, so it
    runs after every gradient of the pass exists and before the caller clips or steps. ``wanted()`` false: this
    pass accumulates without averaging (DDP's ``no_sync``)."""

    def __init__(self, group: Group, trigger: nn.Module, params: Callable[[], Iterable[torch.Tensor]],
                 wanted: Callable[[], bool] = lambda: True) -> None:
        self.group, self.params, self.wanted = group, params, wanted
        self.averaged = 0  # backward passes whose gradients were averaged
        self._queued = False
        self._handle = trigger.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled() and self.wanted()):
            return
        tensor = _first_tensor_with_grad(output)
        if tensor is not None:
            tensor.register_hook(self._on_gradient)

    def _on_gradient(self, grad: torch.Tensor) -> None:
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._average)

    def _average(self) -> None:
        self._queued = False
        self.group.average_gradients(self.params())
        self.averaged += 1

    def remove(self) -> None:
        self._handle.remove()


def _first_tensor_with_grad(output: Any) -> torch.Tensor | None:
    if torch.is_tensor(output):
        return output if output.requires_grad else None
    values = output.values() if isinstance(output, dict) else output if isinstance(output, (list, tuple)) else ()
    for value in values:
        found = _first_tensor_with_grad(value)
        if found is not None:
            return found
    return None
