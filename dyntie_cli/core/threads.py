"""CPU threads: how many intra-op threads a run uses, and a warning when they exceed the cores left free.

torch starts one OpenMP thread per core, and at the end of every parallel region each thread waits for the
others. When another process holds one of those cores, the thread that lost it holds up all the others: on a
2-core machine beside one other busy process, ``gpt2-cpu`` steps take many times longer than with one thread.
So a run's default is the cores left free by what else runs (the 1-minute load average, read when the run
starts), at most torch's own default; ``--threads N`` or ``OMP_NUM_THREADS`` choose the number instead, and a
run whose threads exceed the free cores -- at the start, or later when another job starts -- says so once, with
the fix.

The thread count changes the order of float reductions, so runs with different counts differ in their last
bits; the registry records the count each run used (``threads`` in ``runs.config``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

#: the environment variables torch reads its thread count from
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: how often a running job looks at the load again (the load average itself moves over a minute)
RECHECK_S = 60.0


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, where the platform tells)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def load_average() -> float | None:
    """The 1-minute load average: runnable (and waiting) threads of every process; None where unknown."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def free_cores(cores: int, busy: float) -> int:
    """Cores left when ``busy`` cores' worth of other work runs; at least one."""
    return max(1, min(cores, int(cores - busy + 0.5)))


def thread_variable() -> str | None:
    """The thread variable the environment sets (torch follows it), if any."""
    return next((name for name in THREAD_VARIABLES if os.environ.get(name, "").strip()), None)


@dataclass
class ThreadPlan:
    """The intra-op threads of a run and why that number."""

    threads: int
    chosen_by: str  # "--threads", an environment variable's name, or "free cores"
    cores: int
    load: float | None  # the load average it was chosen by (None: unknown)

    def describe(self) -> str:
        """The choice in one line, for the start of a run: 'CPU threads: 1 (the load average, 1.6, leaves 1 of 2
        cores free; --threads N chooses)'."""
        if self.chosen_by == "--threads":
            why = "--threads"
        elif self.chosen_by != "free cores":
            why = f"{self.chosen_by}={os.environ.get(self.chosen_by, '').strip()}"
        elif self.load is None:
            why = "torch's default; the load average is unknown here; --threads N chooses"
        else:
            free = free_cores(self.cores, self.load)
            default = "torch's default; " if self.threads < free else ""
            left = f"all {self.cores}" if free == self.cores else f"{free} of {self.cores}"
            why = f"{default}the load average, {self.load:.1f}, leaves {left} cores free; --threads N chooses"
        return f"CPU threads: {self.threads} ({why})"

    def warning(self, busy: float | None = None) -> str | None:
        """One sentence when the threads exceed the cores left free by ``busy`` (default: the load at the
        start) cores of other work; None otherwise."""
        busy = self.load if busy is None else busy
        if busy is None or self.threads <= 1:
            return None
        free = free_cores(self.cores, busy)
        if self.threads <= free:
            return None
        fix = "--threads 1" if free == 1 else f"--threads {free}"
        how = f"chosen by {self.chosen_by}" if self.chosen_by != "free cores" else "the cores free at its start"
        return (f"Warning: this run uses {self.threads} CPU threads ({how}) but only {free} of {self.cores} "
                f"cores are free (other processes keep {busy:.1f} busy), which can make every step many times "
                f"slower; run it with {fix} (or OMP_NUM_THREADS={free}) while the other work runs.")


def plan_threads(requested: int | None) -> ThreadPlan:
    """How many threads a run uses: ``requested`` (``--threads``), else what ``OMP_NUM_THREADS`` or
    ``MKL_NUM_THREADS`` made torch use, else torch's default capped at the cores the load average leaves free."""
    cores, load = usable_cores(), load_average()
    if requested is not None:
        return ThreadPlan(requested, "--threads", cores, load)
    variable = thread_variable()
    if variable is not None:
        return ThreadPlan(torch.get_num_threads(), variable, cores, load)
    threads = torch.get_num_threads()
    if load is not None:
        threads = min(threads, free_cores(cores, load))
    return ThreadPlan(threads, "free cores", cores, load)


class ThreadWatch:
    """Applies a plan for one run (and puts torch's thread count back afterwards) and, while it trains,
    looks at the load again every ``RECHECK_S`` seconds of log events: the first time its threads exceed the
    free cores it hands ``warn`` one sentence, and never again."""

    def __init__(self, plan: ThreadPlan, warn: Callable[[str], None], *, clock: Callable[[], float] = time.monotonic,
                 cpu_clock: Callable[[], float] = time.process_time,
                 load: Callable[[], float | None] = load_average) -> None:
        self.plan = plan
        self.warn = warn
        self.clock, self.cpu_clock, self.load = clock, cpu_clock, load
        self.warned = False
        self.previous: int | None = None
        self.mark = (clock(), cpu_clock())

    def __enter__(self) -> None:
        self.previous = torch.get_num_threads()
        if self.plan.threads != self.previous:
            torch.set_num_threads(self.plan.threads)
        self._say(self.plan.warning())
        self.mark = (self.clock(), self.cpu_clock())

    def __exit__(self, *exc: object) -> None:
        if self.previous is not None and torch.get_num_threads() != self.previous:
            torch.set_num_threads(self.previous)

    def __call__(self, event: dict) -> None:
        if self.warned or event.get("type") != "log":
            return
        now, cpu = self.clock(), self.cpu_clock()
        wall = now - self.mark[0]
        if wall < RECHECK_S:
            return
        load = self.load()
        if load is None:
            return
        # the load counts this run's own threads too: what this process computed over the last interval
        # (CPU seconds per second) is taken off, the rest is other work
        own = min(float(self.plan.threads), max(0.0, (cpu - self.mark[1]) / wall))
        self.mark = (now, cpu)
        self._say(self.plan.warning(max(0.0, load - own)))

    def _say(self, text: str | None) -> None:
        if text and not self.warned:
            self.warned = True
            self.warn(text)
