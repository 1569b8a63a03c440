"""What an ablation takes from its source run: config, tie schedule, final state, mean independent blocks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .db import connect, resolve_run_id


def load_source_run(db: Path, run_id: str) -> dict[str, Any]:
    with connect(db, read_only=True) as con:
        rid = resolve_run_id(con, run_id, db)
        config, variant, status = con.execute(
            "SELECT config, variant, status FROM runs WHERE run_id = ?", [rid]).fetchone()
        rows = con.execute(
            "SELECT decision, state, independent_layers FROM ties WHERE run_id = ? ORDER BY decision", [rid]
        ).fetchall()
    states = {int(d): [int(x) for x in s] for d, s, _ in rows}
    schedule = [states[d] for d in sorted(states) if d > 0]
    return {
        "run_id": rid,
        "variant": variant,
        "status": status,
        "config": json.loads(config) if isinstance(config, str) else config,
        "initial": states.get(0),
        "schedule": schedule,
        "final_state": states[max(states)] if states else None,
        "mean_independent": sum(r[2] for r in rows) / len(rows) if rows else 0.0,
    }
