"""Memory probes and byte accounting (docs/method.md, "Memory").

On CUDA: peak allocated bytes per logging interval (the peak is reset after each reading) and the current
allocation. On CPU ``torch.cuda.max_memory_allocated`` silently returns 0, so the peak is the process's
peak RSS. On Linux the RSS high-water mark is reset the same way as the CUDA peak -- once after setup (model
construction allocates every block before the tie state releases the tied ones, as a GPU run does on the host
before moving the model) and after each reading -- by writing 5 to ``/proc/self/clear_refs``; the setup peak
is reported separately. Where that is not possible the peak is the whole-process ``ru_maxrss``. Besides the device view, an exact account of parameter, gradient and
optimizer-state bytes, each stored tensor counted once (a tied block's tensors are its root's storage).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen or storage.nbytes() == 0:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def parameter_bytes(model: nn.Module) -> int:
    return _unique_bytes(model.parameters())


def gradient_bytes(model: nn.Module) -> int:
    return _unique_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _unique_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))


def trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters, a shared tensor counted once (``parameters()`` de-duplicates by identity)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def reset_peak_rss() -> bool:
    """Reset the RSS high-water mark to the current RSS (Linux >= 4.0); False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def _libc_malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Give memory freed by released blocks back to the OS. glibc keeps freed heap pages mapped (RSS stays
    up) until ``malloc_trim``; without it a tie would free tensors without lowering the process's footprint."""
    gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def base_bytes(device: torch.device) -> int:
    """The device memory in use before a model is built: the process's RSS on CPU (the libraries and the data,
    which the tie state cannot change), allocated bytes on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    release_freed_memory()  # what loading the data freed is not part of the baseline
    return current_rss_bytes()


@dataclass
class MemoryReading:
    device: str
    peak_bytes: int
    current_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    trainable_params: int


class MemoryProbe:
    """Reads memory once per logging interval; on CUDA the peak counter is reset after each reading."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        if self.is_cuda:
            self.setup_peak = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            self.resets = True
        else:
            self.setup_peak = peak_rss_bytes()
            release_freed_memory()  # what the initial tie state released leaves the process before training
            self.resets = reset_peak_rss()

    def read(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_bytes: int | None = None) -> MemoryReading:
        """``grad_bytes``: the gradient bytes measured during the last step (they are freed after it)."""
        if self.is_cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            current = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            name = torch.cuda.get_device_name(self.device)
        else:
            peak, current, name = peak_rss_bytes(), current_rss_bytes(), "cpu"
            if self.resets:
                reset_peak_rss()
        return MemoryReading(
            device=name, peak_bytes=int(peak), current_bytes=int(current),
            param_bytes=parameter_bytes(model),
            grad_bytes=gradient_bytes(model) if grad_bytes is None else grad_bytes,
            optimizer_bytes=optimizer_bytes(optimizer), trainable_params=trainable_parameters(model),
        )
