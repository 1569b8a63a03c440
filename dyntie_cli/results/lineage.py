"""What a command takes from a recorded run: a resume its config and folder; an ablation its config, tie
schedule, final state and mean independent blocks, and the run it starts from when none is named; a
warm-started agent the transitions of earlier runs and the checkpoint of a trained one."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb

from ..errors import DyntieError
from .db import read_registry, resolve_run_id
from .liveness import stale_reason


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


#: the backbone of the main job (`dyntie train gpt2`, the README's first command): what "the newest run" prefers
#: when a command is not told which backbone
MAIN_BACKBONE = "gpt2"

def newest_finished(con: duckdb.DuckDBPyConnection, variant: str = "dynamic", backbone: str | None = None
                    ) -> str | None:
    """``newest_finished_run`` on an open registry."""
    row = con.execute(
        "SELECT run_id FROM runs WHERE status = 'finished' AND variant = $variant "
        "AND ($backbone IS NULL OR backbone = $backbone) "
        "AND EXISTS (SELECT 1 FROM ties WHERE ties.run_id = runs.run_id) "
        "ORDER BY backbone = $main DESC, started_at DESC NULLS LAST, run_id DESC LIMIT 1",
        {"variant": variant, "backbone": backbone, "main": MAIN_BACKBONE},
    ).fetchone()
    return row[0] if row else None


def newest_finished_run(db: Path, variant: str = "dynamic", backbone: str | None = None) -> str | None:
    """The id of the newest finished run of ``variant`` that logged tie states: of ``backbone`` when given, else of
    gpt2 when the registry has one (the main job, however many GLUE or ViT runs came after it), else of any
    backbone. What ``dyntie ablate`` starts from and ``dyntie report`` shows when no run is named. None when there
    is none, or no registry."""
    if not db.is_file() or db.stat().st_size == 0:
        return None
    with read_registry(db) as con:
        return newest_finished(con, variant, backbone)


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


# --- what an agent learns from earlier runs ------------------------------------------------------------------

#: a run's transitions: the state before each rewarded decision, its action, the state after it and the reward,
#: with the step it was taken at
_TRANSITIONS_SQL = """
    SELECT t.run_id, t.step, p.state, t.action, t.state, d.reward
    FROM ties t
    JOIN ties p ON p.run_id = t.run_id AND p.decision = t.decision - 1
    JOIN decisions d ON d.run_id = t.run_id AND d.decision = t.decision
    WHERE t.run_id IN (SELECT unnest($ids::TEXT[])) AND t.decision > 0 AND d.reward IS NOT NULL
    ORDER BY list_position($ids::TEXT[], t.run_id), t.decision
"""


def _warm_runs(con: duckdb.DuckDBPyConnection, db: Path, spec: str, backbone: str,
               study: str | None) -> list[str]:
    """The run ids ``agent.warm_from`` names: ``all`` -- every finished dynamic run of ``backbone``, except runs
    of the study ``study`` -- or a comma-separated list of ids and prefixes."""
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if names == ["all"]:
        rows = con.execute(
            "SELECT run_id, config FROM runs WHERE backbone = ? AND variant = 'dynamic' AND status = 'finished' "
            "ORDER BY started_at, run_id", [backbone]).fetchall()
        ids = []
        for rid, config in rows:
            config = json.loads(config) if isinstance(config, str) else config or {}
            if study is None or (config.get("study") or {}).get("name") != study:
                ids.append(rid)
        if not ids:
            extra = f" outside the study {study!r}" if study else ""
            raise DyntieError(f"--agent-from all found no finished dynamic run of {backbone}{extra} in {db}; "
                              "train one first, or name runs with --agent-from RUN,RUN.")
        return ids
    if "all" in names:
        raise DyntieError("--agent-from takes either all or run ids, not both.")
    return list(dict.fromkeys(resolve_run_id(con, name, db) for name in names))


def agent_knowledge(db: Path, spec: str, weights_run: str, backbone: str, study: str | None = None
                    ) -> dict[str, Any]:
    """What a new run's agent starts from: the transitions of the runs ``spec`` names (``agent.warm_from``) and
    the checkpoint folder of ``weights_run`` (``agent.warm_weights``).

    Each transition is ``(state, action, reward, next_state, progress, next_progress)``, progress being the
    step over the source run's ``train.max_steps`` and the next one ``decide_every`` steps on, as the source's
    agent saw them. ``runs`` lists the ids that gave at least one transition; a named run that gave none is
    refused (it recorded no reward: a fixed schedule, or killed before its first decision was scored)."""
    out: dict[str, Any] = {"runs": [], "transitions": [], "weights_run": None, "weights_dir": None}
    with read_registry(db) as con:
        if spec:
            ids = _warm_runs(con, db, spec, backbone, study)
            configs = {rid: _recorded(con, rid) for rid in ids}
            for rid, run in configs.items():
                if run.backbone != backbone:
                    raise DyntieError(f"Run {rid} trained {run.backbone}, not {backbone}; an agent learns only "
                                      "from runs of its own backbone.")
            rows = con.execute(_TRANSITIONS_SQL, {"ids": ids}).fetchall()
            for rid, step, state, action, next_state, reward in rows:
                cfg = configs[rid].config
                max_steps = int(cfg["train"]["max_steps"])
                k = int(cfg["ties"]["decide_every"])
                out["transitions"].append(([int(x) for x in state], [int(x) for x in action], float(reward),
                                           [int(x) for x in next_state], step / max_steps,
                                           min(1.0, (step + k) / max_steps)))
            used = list(dict.fromkeys(row[0] for row in rows))
            if spec.strip() != "all":
                empty = [rid for rid in ids if rid not in used]
                if empty:
                    raise DyntieError(f"Run {empty[0]} recorded no rewarded decision to learn from; name runs of "
                                      "the dynamic (or q-off, grow, random) variant.")
            out["runs"] = used
        if weights_run:
            run = _recorded(con, resolve_run_id(con, weights_run, db))
            folder = Path(run.out_dir or "") / "checkpoint"
            if run.backbone != backbone:
                raise DyntieError(f"Run {run.run_id} trained {run.backbone}, not {backbone}; its agent does not "
                                  "apply here.")
            if not run.out_dir or not (folder / "trainer.pt").is_file():
                raise DyntieError(f"Run {run.run_id} has no checkpoint at {folder} to take its agent from.")
            out["weights_run"], out["weights_dir"] = run.run_id, str(folder)
    return out
