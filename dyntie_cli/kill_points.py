"""Named points where a test can make a training process die at once, as a power cut or the OOM killer would.

dyntie promises that a run killed anywhere resumes with every registry row written once (docs/method.md,
"The registry while runs train"). The places where that is hardest to keep are inside the checkpoint step and
inside a flush, where a signal sent from outside lands only by luck, so the code names them: with
``DYNTIE_KILL_AT=POINT:N`` in its environment a process sends itself SIGKILL the N-th time it reaches ``POINT``
(N defaults to 1). Without the variable a point costs one dictionary lookup.

Points: ``checkpoint-rows`` (the new checkpoint's unwritten registry rows are in its temporary folder, which is
not yet in place), ``checkpoint-swapping`` (the previous checkpoint is renamed away, the new one not yet in
place), ``checkpoint-renamed`` (the new checkpoint is in place, its rows not yet flushed), ``flush``
(inside a flush's transaction: every row inserted, not yet committed), ``flush-committed`` (committed, the
registry not yet closed), ``step`` (a training step has ended, before its logging).
"""

from __future__ import annotations

import os
import signal

POINTS = ("checkpoint-rows", "checkpoint-swapping", "checkpoint-renamed", "flush", "flush-committed", "step")
ENV = "DYNTIE_KILL_AT"

_reached: dict[str, int] = {}


def kill_point(name: str) -> None:
    """Die here, by SIGKILL, if ``DYNTIE_KILL_AT`` names this point and this is the time it counts to."""
    wanted = os.environ.get(ENV)
    if not wanted:
        return
    point, _, times = wanted.partition(":")
    if point != name:
        return
    _reached[name] = _reached.get(name, 0) + 1
    if _reached[name] == int(times or 1):
        os.kill(os.getpid(), signal.SIGKILL)
