"""What an ablation takes from its source run: config, tie schedule, final state, mean independent blocks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import duckdb

from .db import connect, resolve_run_id


def load_source_run(db: Path, run_id: str) -> dict[str, Any]:
    """The source run as ``core.policies.make_policy`` wants it.

    ``schedule[d]`` is the state after decision d (``schedule[0]`` the initial state), the indexing
    ``ReplayPolicy`` uses, so the replay applies the source's state d at its own decision d.
    """
    with connect(db, read_only=True) as con:
        rid = resolve_run_id(con, run_id, db)
        config, variant, status = con.execute(
            "SELECT config, variant, status FROM runs WHERE run_id = ?", [rid]).fetchone()
        rows = con.execute(
            "SELECT decision, state, independent_layers FROM ties WHERE run_id = ? ORDER BY decision", [rid]
        ).fetchall()
        logged_mean = _logged_mean_independent(con, rid)
    states = {int(d): [int(x) for x in s] for d, s, _ in rows}
    decision_mean = sum(r[2] for r in rows) / len(rows) if rows else 0.0
    return {
        "run_id": rid,
        "variant": variant,
        "status": status,
        "config": json.loads(config) if isinstance(config, str) else config,
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
