"""A job in a process of its own: the parent's side (``ChildRun``: `dyntie bench` and `dyntie study --jobs N` start
each run this way, so its peak memory is its own; ``run_in_turns``: several at once, training in turns) and the
child's (``train_job_file``, the hidden `dyntie job` command). The child reads the job from a file and writes what
it did to another; nothing is parsed from its output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..core.turns import deal_turns
from ..errors import DyntieError

#: exit statuses of a child whose run was stopped by a signal at a step boundary (checkpointed, marked killed)
STOPPED_EXIT = (128 + signal.SIGINT, 128 + signal.SIGTERM)


class ChildRun:
    """One job trained by ``dyntie job`` (``train_job_file``) in a fresh interpreter. ``payload`` is
    ``{"job": Job.to_dict(), "db", "out"}`` for a new run or ``{"resume": run id, "db"}`` to continue a killed one,
    either with ``"force"`` and ``"threads"`` as ``Launch`` has them.
    ``own_session``: the child does not get the terminal's Ctrl-C; the parent stops it with ``stop()``.
    ``turns``: the child trains in turns dealt through two pipes (``run_in_turns`` deals them)."""

    def __init__(self, payload: dict[str, Any], label: str, *, own_session: bool = False,
                 turns: bool = False) -> None:
        self.label = label
        self._tmp = Path(tempfile.mkdtemp(prefix="dyntie-job-"))
        job_file, self._result_file, self._log = (self._tmp / n for n in ("job.json", "result.json", "log.txt"))
        child_fds: tuple[int, ...] = ()
        if turns:  # the child reads its turns from one pipe and writes its requests into the other
            (child_read, self.turn_write), (self.turn_read, child_write) = os.pipe(), os.pipe()
            child_fds = (child_read, child_write)
            payload = {**payload, "turns": list(child_fds)}
        job_file.write_text(json.dumps(payload))
        cmd = [sys.executable, "-m", "dyntie_cli", "job", str(job_file), "--result", str(self._result_file)]
        try:
            with open(self._log, "w") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                             start_new_session=own_session, pass_fds=child_fds)
        finally:
            for fd in child_fds:  # the child's ends are the child's alone: its exit then reads as end of file
                os.close(fd)

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self) -> int:
        return self.proc.wait()

    def stop(self) -> None:
        """Ask the child to stop at its next step boundary (it checkpoints and marks its run killed)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    @property
    def stopped(self) -> bool:
        """Stopped by a signal: at a step boundary (its exit status says so), or before training began."""
        code = self.proc.returncode
        return code in STOPPED_EXIT or code in (-signal.SIGTERM, -signal.SIGINT)

    def result(self) -> dict[str, Any]:
        """The finished run's result (``RunResult`` as a dict); a ``DyntieError`` naming the child's last line if
        it did not finish. Removes the child's files."""
        try:
            if self.proc.returncode == 0 and self._result_file.exists():
                return json.loads(self._result_file.read_text())
            last = (self._log.read_text().strip().splitlines() or ["(no output)"])[-1]
            raise DyntieError(f"{self.label} failed: {last}")
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)


def run_in_child(payload: dict[str, Any], label: str) -> dict[str, Any]:
    """Train one job in a child process and wait for its result."""
    child = ChildRun(payload, label)
    child.wait()
    return child.result()


def run_in_turns(jobs: list[tuple[dict[str, Any], str]]) -> list[dict[str, Any] | DyntieError]:
    """Train the jobs (``(payload, label)`` as ``run_in_child`` takes them) in child processes started at once, in
    turns (core/turns.py): once every child has set up (or ended), one child at a time does one iteration of its loop,
    the children in the order given, round and round, until each has left. Returns each job's result, or the error
    that says it failed; the others train on. An interrupt (Ctrl-C, which the children get too) ends the turns: the
    children then stop at their next step as they would alone."""
    children = [ChildRun(payload, label, turns=True) for payload, label in jobs]
    try:
        deal_turns([(c.turn_read, c.turn_write) for c in children])
    finally:
        for child in children:  # a child still waiting for a turn reads the end and goes on alone
            for fd in (child.turn_read, child.turn_write):
                with suppress(OSError):
                    os.close(fd)
    for child in children:
        child.wait()
    results: list[dict[str, Any] | DyntieError] = []
    for child in children:
        try:
            results.append(child.result())
        except DyntieError as e:
            results.append(e)
    return results


def train_job_file(job_file: Path, result_file: Path) -> None:
    """The child's side: train the job of ``job_file`` (a ``ChildRun`` payload), or continue the killed run it names,
    and write the run's result to ``result_file``; a run the memory plan refuses is written there as a finding."""
    from ..core.plan import DoesNotFit
    from .jobs import Launch, job_from_dict, resume_recorded, run_job

    data = read_job_file(job_file)
    force, threads = bool(data.get("force")), data.get("threads")
    turns = tuple(data["turns"]) if data.get("turns") else None
    try:
        if "resume" in data:
            run = resume_recorded(Path(data["db"]), data["resume"], quiet=True, print_summary=False, force=force,
                                  threads=threads)
        else:
            try:
                backbone, job = job_from_dict(data["job"])
                launch = Launch(Path(data["db"]), Path(data["out"]), quiet=True, force=force, threads=threads,
                                turns=turns)
            except (KeyError, TypeError, AttributeError) as e:
                raise _not_a_job(job_file, f"no {e}" if isinstance(e, KeyError) else str(e)) from None
            run = run_job(backbone, job, launch, print_summary=False)
    except DoesNotFit as refused:  # not an error of the run's command: a finding, reported as such
        result_file.write_text(json.dumps({"refused": str(refused), "plan": refused.plan.to_dict()}))
        return
    result_file.write_text(json.dumps(asdict(run)))


def read_job_file(job_file: Path) -> dict[str, Any]:
    """A ``ChildRun`` payload, or one sentence saying the file is not one."""
    try:
        data = json.loads(job_file.read_text())
    except OSError as e:
        raise _not_a_job(job_file, e.strerror or type(e).__name__) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise _not_a_job(job_file, f"not JSON: {e}") from None
    if not isinstance(data, dict) or "db" not in data or ("job" not in data and "resume" not in data):
        raise _not_a_job(job_file, "it names no job to train or run to resume, and no registry")
    return data


def _not_a_job(job_file: Path, reason: str) -> DyntieError:
    return DyntieError(f"{job_file} is not a dyntie job file ({reason}); dyntie writes them itself when `dyntie "
                       "bench` or `dyntie study --jobs N` trains a run in a process of its own.")
