"""Whether a run's process still lives: what readers show for a ``running`` run, and what a writer marks ``killed``.

A run records the id and host of the process that trains it. A ``running`` run of this host whose process is
gone died without finishing (killed, out of memory, a power cut): reads show it as killed at once, and the next
writer to open the registry marks it so. Runs of other hosts are taken at their word.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path
from typing import Any

import duckdb

from dyntie_cli.results.db import utc_now


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this host (a zombie counts as ended)."""
    if pid <= 0:
        return False
    if os.name != "posix":
        # Signal 0 is not a probe on Windows; assume alive rather than mark a live run killed.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def running_here(status: str | None, pid: Any, host: str | None) -> bool:
    """Whether a run is ``running`` with its process alive on this host."""
    return _running_on_this_host(status, pid, host) and pid_alive(int(pid))


def stale_reason(status: str | None, pid: Any, host: str | None) -> str | None:
    """Why a ``running`` run of this host is not running any more (its process is gone), else None."""
    if not _running_on_this_host(status, pid, host) or pid_alive(int(pid)):
        return None
    return f"process {int(pid)} on {host} ended without finishing the run"


def _running_on_this_host(status: str | None, pid: Any, host: str | None) -> bool:
    # pid is NaN where a run's row went through pandas without one
    missing = pid is None or (isinstance(pid, float) and math.isnan(pid))
    return status == "running" and host == socket.gethostname() and not missing


def mark_stale_runs(con: duckdb.DuckDBPyConnection) -> list[str]:
    """Mark ``running`` runs of this host whose process is gone as ``killed``; returns their ids. A writer does
    this when it starts or resumes a run (reads only show such runs as killed).

    Their ``ended_at`` is the last successful flush (the heartbeat), the best estimate of when they stopped.
    """
    rows = con.execute("SELECT run_id, status, pid, host FROM runs WHERE status = 'running'").fetchall()
    stale = [(run_id, reason) for run_id, status, pid, host in rows if (reason := stale_reason(status, pid, host))]
    for run_id, reason in stale:
        con.execute(
            """
            UPDATE runs SET status = 'killed', ended_at = coalesce(heartbeat_at, ?),
                error = coalesce(error, ?)
            WHERE run_id = ? AND status = 'running'
            """,
            [utc_now(), reason, run_id],
        )
    return [run_id for run_id, _ in stale]
