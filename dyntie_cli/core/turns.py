"""Turns: runs in processes of their own that train one loop iteration at a time each, in rotation.

A benchmark that trains its variants one after another times each on the machine of its own minutes; a shared or
virtual machine drifts by more than the differences it measures (on a 2-core cloud machine the same run's step
time moved by 20% within half an hour). In turns, every run is started at once and a referee (``runner/children.py``,
``run_in_turns``) lets one run at a time do one iteration of its loop (a step, and the decision, evaluation or
checkpoint that follows it) while the others wait, blocked, using no CPU: each run's steps are timed alone on the
machine, and interleaved with the others' a second apart, so a drift of the machine falls on every run alike.

Both sides are here: a run's (``Turns``, a run alone: every turn is its own; ``PipeTurns``, a referee's pipes) and
the referee's (``deal_turns``). The protocol, one byte each: the run writes ``r`` when it wants a turn and blocks
until it reads ``g``; it writes ``d`` when the turn is done, and ``x`` when it wants no more. A referee that is gone
(end of file) ends the turns: the run goes on alone; a run that is gone (end of file) leaves them.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

READY, GO, DONE, LEAVE = b"r", b"g", b"d", b"x"


class Turns:
    """A run alone: every turn is its own at once."""

    waited_s = 0.0  # seconds spent waiting for turns (a run's wall time leaves them out)

    @contextmanager
    def turn(self) -> Iterator[None]:
        yield

    def close(self) -> None:
        """No more turns are wanted (the run's end): the others go on without it."""


class PipeTurns(Turns):
    """Turns dealt by a referee: ``read_fd`` brings its ``g``, ``write_fd`` takes this run's ``r``, ``d`` and ``x``."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._read, self._write = read_fd, write_fd
        self._open = True
        self.waited_s = 0.0

    @contextmanager
    def turn(self) -> Iterator[None]:
        if self._open:
            started = time.perf_counter()
            if not (_write(self._write, READY) and os.read(self._read, 1) == GO):
                self._end()  # the referee is gone: the run goes on alone
            self.waited_s += time.perf_counter() - started
        try:
            yield
        finally:
            if self._open and not _write(self._write, DONE):
                self._end()

    def close(self) -> None:
        if self._open:
            _write(self._write, LEAVE)
            self._end()

    def _end(self) -> None:
        self._open = False
        for fd in (self._read, self._write):
            with suppress(OSError):
                os.close(fd)


def deal_turns(players: list[tuple[int, int]]) -> None:
    """The referee: ``players`` are (read fd, write fd) pairs, one per run (its requests come in on the first, its
    turns go out on the second). Once every run has asked for its first turn (or left), one run at a time gets a
    turn, in the order given, round and round, until every run has left. Closes no fd."""
    playing = [p for p in players if _wait_for(p, READY)]  # every run set up before the first step is timed
    while playing:
        for player in list(playing):
            if not (_write(player[1], GO) and _wait_for(player, DONE)):
                playing.remove(player)


def _wait_for(player: tuple[int, int], byte: bytes) -> bool:
    """Read the run's bytes up to ``byte``; False where it left the turns (or ended) first."""
    while True:
        try:
            got = os.read(player[0], 1)
        except OSError:
            return False
        if got == byte:
            return True
        if got in (b"", LEAVE):
            return False


def _write(fd: int, byte: bytes) -> bool:
    """Write one byte of the protocol; False where the other side has closed its end (a run ended, or the referee)."""
    try:
        os.write(fd, byte)
        return True
    except OSError:
        return False
