"""Merging registries: the runs of several registry files copied into one (`dyntie merge`).

Runs trained in parallel processes, each writing its own registry file (no process waits for another's lock), are
put together afterwards: every run of each source, with all its rows, is copied into the target. A run the target
already holds (the same id, start time and config) is skipped when nothing changed (merging twice changes nothing)
and copied again when it did (a killed run continued and finished since the last merge); a run id the target holds
for another run is refused, as is a source with a run still training on this machine: nothing is written then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from dyntie_cli.errors import DyntieError
from dyntie_cli.results.db import connect, read_registry, transaction
from dyntie_cli.results.liveness import running_here
from dyntie_cli.results.writer import ROW_COLUMNS

ROW_TABLES = tuple(ROW_COLUMNS)  # metrics, memory, ties, decisions


@dataclass
class MergeReport:
    copied: list[str] = field(default_factory=list)  # run ids copied into the target (new or updated)
    skipped: list[str] = field(default_factory=list)  # already there, unchanged
    rows: int = 0  # metric, memory, tie and decision rows copied


def _runs(con: duckdb.DuckDBPyConnection, schema: str) -> dict[str, tuple]:
    """run id -> (start, config, status, pid, host, end, last flush): who the run is, then how far it got."""
    rows = con.execute(f"SELECT run_id, started_at, CAST(config AS TEXT), status, pid, host, ended_at, heartbeat_at "
                       f"FROM {schema}.runs")
    return {row[0]: row[1:] for row in rows.fetchall()}


def _columns(con: duckdb.DuckDBPyConnection, table: str) -> list[str]:
    return [row[0] for row in con.execute(f"SELECT column_name FROM (DESCRIBE {table})").fetchall()]


def merge_registries(sources: list[Path], target: Path) -> MergeReport:
    """Copy every run of ``sources`` (registry files) into ``target`` (created if needed), in one transaction."""
    target = Path(target).absolute()
    report = MergeReport()
    for source in sources:
        if Path(source).absolute() == target:
            raise DyntieError(f"{source} is the target of the merge; list only the registries to copy from.")
        with read_registry(source):  # a registry at the current schema (an older one is upgraded first)
            pass
    with connect(target) as con, transaction(con):
        for number, source in enumerate(sources):
            schema = f"source_{number}"
            con.execute(f"ATTACH '{Path(source).absolute()}' AS {schema} (READ_ONLY)")
            try:
                _merge_one(con, schema, Path(source), report)
            finally:
                con.execute(f"DETACH {schema}")
    return report


def _merge_one(con: duckdb.DuckDBPyConnection, schema: str, source: Path, report: MergeReport) -> None:
    have = _runs(con, "main")
    new: list[str] = []
    for run_id, run in _runs(con, schema).items():
        started, config, status, pid, host = run[:5]
        if running_here(status, pid, host):
            raise DyntieError(f"Run {run_id} in {source} is still training; merge once it has ended.")
        if run_id in have:
            if have[run_id][:2] != (started, config):
                raise DyntieError(f"Run id {run_id} is in both {source} and the target for different runs; "
                                  "merge into another registry.")
            if have[run_id] == run:
                report.skipped.append(run_id)
                continue
        new.append(run_id)
    if not new:
        return
    for table in ("runs", *ROW_TABLES):  # an updated run is replaced as a whole
        con.execute(f"DELETE FROM {table} WHERE run_id IN (SELECT unnest($ids::TEXT[]))", {"ids": new})
    for table in ("runs", *ROW_TABLES):
        columns = ", ".join(c for c in _columns(con, table) if c in set(_columns(con, f"{schema}.{table}")))
        result = con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {schema}.{table} "
                             "WHERE run_id IN (SELECT unnest($ids::TEXT[]))", {"ids": new})
        if table != "runs":
            report.rows += int(result.fetchone()[0])
    report.copied += new
