"""What a command takes from a recorded run: a resume its config and folder; an ablation its config, tie
schedule, final state and mean independent blocks, and the run it starts from when none is named."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from .db import read_registry, resolve_run_id
from .writer import stale_reason


@dataclass
class RecordedRun:
    run_id: str
    command: str
    backbone: str
    variant: str
    status: str  # a run whose process is gone reads as killed
    config: dict[str, Any]
    out_dir: str | None
    parent_run_id: str | None


def _recorded(con: duckdb.DuckDBPyConnection, rid: str) -> RecordedRun:
    row = con.execute("SELECT command, backbone, variant, status, config, out_dir, parent_run_id, pid, host "
                      "FROM runs WHERE run_id = ?", [rid]).fetchone()
    command, backbone, variant, status, config, out_dir, parent, pid, host = row
    if stale_reason(status, pid, host):
        status = "killed"
    return RecordedRun(rid, command, backbone, variant, status,
                       json.loads(config) if isinstance(config, str) else config, out_dir, parent)


def load_run(db: Path, run_id: str) -> RecordedRun:
    """A recorded run (id or unique prefix) as a resume needs it."""
    with read_registry(db) as con:
        return _recorded(con, resolve_run_id(con, run_id, db))


def newest_finished_run(db: Path, variant: str = "dynamic", backbone: str | None = None) -> str | None:
    """The id of the newest finished run of ``variant`` (of ``backbone``, when given) that logged tie states:
    what ``dyntie ablate`` uses when no ``--from-run`` is given. None when there is none, or no registry."""
    if not db.is_file() or db.stat().st_size == 0:
        return None
    with read_registry(db) as con:
        row = con.execute(
            "SELECT run_id FROM runs WHERE status = 'finished' AND variant = $variant "
            "AND ($backbone IS NULL OR backbone = $backbone) "
            "AND EXISTS (SELECT 1 FROM ties WHERE ties.run_id = runs.run_id) "
            "ORDER BY started_at DESC NULLS LAST, run_id DESC LIMIT 1",
            {"variant": variant, "backbone": backbone},
        ).fetchone()
    return row[0] if row else None


def load_source_run(db: Path, run_id: str) -> dict[str, Any]:
    """The source run as ``core.policies.make_policy`` wants it.

    ``schedule[d]`` is the state after decision d (``schedule[0]`` the initial state), the indexing
    ``ReplayPolicy`` uses, so the replay applies the source's state d at its own decision d.
    """
    with read_registry(db) as con:
        rid = resolve_run_id(con, run_id, db)
        run = _recorded(con, rid)
        rows = con.execute(
            "SELECT decision, state, independent_layers FROM ties WHERE run_id = ? ORDER BY decision", [rid]
        ).fetchall()
        logged_mean = _logged_mean_independent(con, rid)
    states = {int(d): [int(x) for x in s] for d, s, _ in rows}
    decision_mean = sum(r[2] for r in rows) / len(rows) if rows else 0.0
    return {
        "run_id": rid,
        "variant": run.variant,
        "status": run.status,
        "config": run.config,
        "initial": states.get(0),
        "schedule": dense_schedule(states),
        "final_state": states[max(states)] if states else None,
        # The step-weighted mean the trainer printed; the per-decision mean only for runs that did not log it.
        "mean_independent": logged_mean if logged_mean is not None else decision_mean,
    }


def dense_schedule(states: dict[int, list[int]]) -> list[list[int]]:
    """States indexed by decision number; a decision missing from the log keeps the state before it."""
    if not states:
        return []
    schedule: list[list[int]] = []
    for decision in range(max(states) + 1):
        schedule.append(states.get(decision, schedule[-1] if schedule else states[min(states)]))
    return schedule


def _logged_mean_independent(con: duckdb.DuckDBPyConnection, run_id: str) -> float | None:
    row = con.execute(
        "SELECT arg_max(value, step) FROM metrics WHERE run_id = ? AND split = 'train' "
        "AND name = 'independent_layers_mean'",
        [run_id],
    ).fetchone()
    return None if row is None or row[0] is None else float(row[0])
