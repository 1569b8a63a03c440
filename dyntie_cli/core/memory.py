"""Memory probes and byte accounting (docs/method.md, "Memory").

Two peaks are kept apart, so nobody mistakes one for the other:

* the **process peak** (``process_peak_bytes``): the whole process from its first byte -- on CPU the kernel's RSS
  high-water mark (``ru_maxrss``, what ``/usr/bin/time`` and a parent's ``getrusage`` report; dyntie never resets
  it), on CUDA the peak allocated bytes since the process started;
* the **interval peaks** (``peak_bytes``, one per logging interval): on CUDA ``max_memory_allocated`` reset after
  each reading; on CPU the largest RSS a sampling thread saw in the interval (every few milliseconds), or the
  high-water mark itself when it rose during the interval (then it is exact).

Besides the device view, an exact account of parameter, gradient and optimizer-state bytes, each stored tensor
counted once (a tied block's tensors are its root's storage).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import resource
import sys
import threading
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
    """The optimizer's state, with the tensors an object in it holds (GaLore's and APOLLO's projections)."""
    def tensors(value) -> Iterable[torch.Tensor]:
        if torch.is_tensor(value):
            yield value
        else:
            yield from (t for t in getattr(value, "__dict__", {}).values() if torch.is_tensor(t))

    return _unique_bytes(t for state in optimizer.state.values() for v in state.values() for t in tensors(v))


def trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters, a shared tensor counted once (``parameters()`` de-duplicates by identity)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def peak_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB, macOS bytes


def current_rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss_bytes()


def _glibc():
    """The C library where it is glibc (Linux, with ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # musl: no malloc_trim


_GLIBC = _glibc()

#: glibc's mallopt parameter for the size from which an allocation gets its own mapping
_M_MMAP_THRESHOLD = -3
#: the threshold ``release_memory_at_once`` sets: glibc's initial one, which it otherwise raises (up to 32 MiB)
#: each time a mapped block is freed, after which freed tensors stay in the heap
RELEASE_THRESHOLD = 128 * 1024


def release_memory_at_once() -> bool:
    """Have glibc map every allocation of ``RELEASE_THRESHOLD`` bytes or more on its own and unmap it when freed,
    so tensors freed during a step leave the process instead of staying resident in the heap for reuse: the
    process peak becomes the peak of live memory, at the price of page faults on each new large tensor. False
    where the C library is not glibc."""
    return _GLIBC is not None and bool(_GLIBC.mallopt(_M_MMAP_THRESHOLD, RELEASE_THRESHOLD))


def release_freed_memory() -> None:
    """Give memory freed by released blocks back to the OS. glibc keeps freed heap pages mapped (RSS stays
    up) until ``malloc_trim``; without it a tie would free tensors without lowering the process's footprint."""
    gc.collect()
    if _GLIBC is not None:
        _GLIBC.malloc_trim(0)


def base_bytes(device: torch.device) -> int:
    """The device memory in use before a model is built: the process's RSS on CPU (the libraries and the data,
    which the tie state cannot change), allocated bytes on CUDA."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    release_freed_memory()  # what loading the data freed is not part of the baseline
    return current_rss_bytes()


class RSSSampler:
    """The largest RSS seen between two ``take()`` calls, sampled every ``interval_s`` by a daemon thread. It
    leaves the kernel's high-water mark alone; a rise of that mark during an interval gives the exact peak."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._max = current_rss_bytes()
        self._hwm = peak_rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dyntie-rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            rss = current_rss_bytes()
            with self._lock:
                self._max = max(self._max, rss)

    def take(self) -> int:
        """The interval's peak; starts the next interval."""
        now, hwm = current_rss_bytes(), peak_rss_bytes()
        with self._lock:
            peak = max(self._max, now)
            self._max = now
        if hwm > self._hwm:  # the process reached a new peak in this interval: the kernel knows it exactly
            peak = max(peak, hwm)
        self._hwm = hwm
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1.0)


@dataclass
class MemoryReading:
    device: str
    peak_bytes: int
    current_bytes: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    trainable_params: int
    process_peak_bytes: int  # the whole process so far (see the module docstring)


class MemoryProbe:
    """Reads memory once per logging interval: the interval's peak and the process's peak so far."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.sampler: RSSSampler | None = None
        if self.is_cuda:
            self.setup_peak = torch.cuda.max_memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            self.setup_peak = peak_rss_bytes()
            release_freed_memory()  # what the initial tie state released leaves the process before training
            self.sampler = RSSSampler()
        self.process_peak = self.setup_peak

    def process_peak_now(self) -> int:
        """The whole process's peak up to now."""
        now = torch.cuda.max_memory_allocated(self.device) if self.is_cuda else peak_rss_bytes()
        self.process_peak = max(self.process_peak, now)
        return int(self.process_peak)

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.close()

    def read(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_bytes: int | None = None) -> MemoryReading:
        """``grad_bytes``: the gradient bytes measured during the last step (they are freed after it)."""
        if self.is_cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            current = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            name = torch.cuda.get_device_name(self.device)
            self.process_peak = max(self.process_peak, peak)
        else:
            assert self.sampler is not None
            peak, current, name = self.sampler.take(), current_rss_bytes(), "cpu"
            self.process_peak = max(self.process_peak, peak_rss_bytes())
        return MemoryReading(
            device=name, peak_bytes=int(peak), current_bytes=int(current),
            param_bytes=parameter_bytes(model),
            grad_bytes=gradient_bytes(model) if grad_bytes is None else grad_bytes,
            optimizer_bytes=optimizer_bytes(optimizer), trainable_params=trainable_parameters(model),
            process_peak_bytes=int(self.process_peak),
        )
