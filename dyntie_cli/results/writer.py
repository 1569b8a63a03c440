"""``RunWriter``: the trainer's only way to write to the registry.

It never holds the DuckDB file open. Rows are buffered in memory and written in one short transaction
(open, insert everything, commit, close) every ``flush_every_s`` seconds, so ``dyntie report`` and a second run
can use the same file while this one trains. A run that dies loses at most the rows since its last flush, and
none at all when its checkpoints carry the rows not yet written (``pending``), which a resume writes
(``truncate_after(..., carried=...)``) where the registry does not already hold them.

A registry held by another process never loses rows or fails the run while the buffer has room
(``max_pending_rows``): the rows wait for a later flush. Where the run must write (its start, its end, a full
buffer) it waits up to ``registry_wait_s``, saying once what it waits for, and then fails with every row kept.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import socket
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import duckdb

from dyntie_cli.errors import DyntieError
from dyntie_cli.kill_points import kill_point
from dyntie_cli.results.db import (
    LOCK_TIMEOUT_S,
    RegistryLockedError,
    connect,
    read_registry,
    resolve_run_id,
    seconds,
    transaction,
    utc_now,
)
from dyntie_cli.results.liveness import mark_stale_runs, running_here

if TYPE_CHECKING:
    from typing_extensions import Self

# Columns each buffered row fills, after run_id (added at write time, so a run id can still change at start()).
ROW_COLUMNS: dict[str, tuple[str, ...]] = {
    "metrics": ("step", "split", "name", "value"),
    "memory": (
        "step", "device", "peak_bytes", "current_bytes", "param_bytes", "grad_bytes", "optimizer_bytes",
        "trainable_params", "process_peak_bytes",
    ),
    "ties": (
        "decision", "step", "state", "action", "independent_layers", "distinct_block_weights", "changed_blocks",
    ),
    "decisions": (
        "decision", "step", "epsilon", "explored", "reward", "q_predicted", "q_target", "td_loss",
        "greedy_agreement", "q_spread", "ppl", "greedy_moves",
    ),
}
# What makes a row of each table unique within a run: a run logs each key once (the rows of the steps after a
# checkpoint are deleted before a resume logs them again), so a row whose key is already in the registry is
# one written before.
ROW_KEYS: dict[str, tuple[str, ...]] = {
    "metrics": ("step", "split", "name"),
    "memory": ("step",),
    "ties": ("decision",),
    "decisions": ("decision",),
}
RunChange = Callable[[duckdb.DuckDBPyConnection], None]
Rows = dict[str, list[tuple[Any, ...]]]
SPLITS = ("train", "validation", "test", "reward")
FINAL_STATUSES = ("finished", "failed", "killed", "diverged")

# maybe_flush runs inside the training loop: it waits only briefly for a busy file and tries again later,
# rather than stalling training for the full lock timeout.
MAYBE_FLUSH_TIMEOUT_S = 1.0
#: how long a run waits for a registry another process holds where it must write (start, end, a full buffer)
REGISTRY_WAIT_S = 600.0
#: rows a run keeps while the registry is held before it waits for it (a few rows a step: hours of training)
MAX_PENDING_ROWS = 200_000
#: the version of ``RunWriter.pending``'s format
PENDING_FORMAT = 1
# Enough rows per INSERT to amortise statement overhead, few enough to stay far below parameter limits.
_PARAMS_PER_STATEMENT = 2000


def new_run_id(backbone: str) -> str:
    """``<backbone>-<YYYYmmdd>-<HHMMSS>-<4 hex>``: sorts by start time, readable, unlikely to collide."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", backbone).strip("-") or "run"
    return f"{safe}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _dyntie_version() -> str | None:
    try:
        return metadata.version("dyntie")
    except metadata.PackageNotFoundError:
        return None


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _int_list(values: Iterable[Any]) -> list[int]:
    # Accepts lists, tuples, numpy arrays and torch tensors alike.
    return [int(v) for v in values]


@dataclass
class _Batch:
    """What one flush writes; handed back to the buffers if the write fails."""

    rows: Rows  # new rows: a plain INSERT
    uncertain: Rows  # rows the registry may already hold: written where their key is absent
    final: tuple[str, str | None, datetime] | None = None
    committing: bool = False  # the transaction reached COMMIT: after a failure, its rows may have landed


def _no_rows() -> Rows:
    return {table: [] for table in ROW_COLUMNS}


def _before(table: str, row: tuple[Any, ...], step: int, first_decision: int) -> bool:
    """Whether a buffered row belongs before a resume point: at or before ``step``, and for decision rows
    before ``first_decision``."""
    columns = ROW_COLUMNS[table]
    at = row[columns.index("step")]
    if at is not None and at > step:
        return False
    return table != "decisions" or row[columns.index("decision")] < first_decision


def _print_notice(message: str) -> None:
    print(f"dyntie: {message}", file=sys.stderr, flush=True)


def _resumable(con: duckdb.DuckDBPyConnection, run_id: str, db_path: Path) -> str:
    """The full id of a run that may be resumed: not finished, and not training in another live process."""
    full_id = resolve_run_id(con, run_id, db_path)
    status, pid, host, error = con.execute(
        "SELECT status, pid, host, error FROM runs WHERE run_id = ?", [full_id]).fetchone()
    if status == "diverged":
        raise DyntieError(
            f"Run {full_id} {error or 'diverged'}; a resume keeps its settings and would diverge again: train a new "
            "run with a lower train.lr (or data without NaN)."
        )
    if status == "finished":
        last = con.execute(
            "SELECT max(step) FROM (SELECT step FROM metrics WHERE run_id = $id "
            "UNION ALL SELECT step FROM ties WHERE run_id = $id)", {"id": full_id},
        ).fetchone()[0]
        raise DyntieError(
            f"Run {full_id} finished{'' if last is None else f' at step {last}'}; nothing to resume "
            f"(`dyntie report --table paper --run {full_id}` shows its results)."
        )
    if pid != os.getpid() and running_here(status, pid, host):
        raise DyntieError(f"Run '{full_id}' is still running (pid {pid}); stop it before resuming.")
    return full_id


class RunWriter:
    """Buffered, lock-tolerant writer for one run. Call ``start`` (or ``resume``) first, ``finish`` last.

    ``registry_wait_s``: how long the run waits for a registry another process holds where it must write (its
    start, its end, a full buffer) before it fails; ``max_pending_rows``: how many rows it keeps while the
    registry is held before it waits; ``on_wait``: called once with a sentence when such a wait begins (by
    default printed to stderr); ``trackers``: the fan-out to TensorBoard and MLflow (results/trackers.py), told
    every event -- the start or resume, each row as it is logged, each flush, the end -- beside the registry.
    """

    def __init__(
        self,
        db_path: str | os.PathLike[str],
        run_id: str | None = None,
        flush_every_s: float = 10.0,
        *,
        backbone: str | None = None,
        registry_wait_s: float = REGISTRY_WAIT_S,
        max_pending_rows: int = MAX_PENDING_ROWS,
        on_wait: Callable[[str], None] | None = None,
        trackers: Callable[..., None] | None = None,
    ) -> None:
        self.db_path = Path(db_path)
        self.trackers = trackers
        self.flush_every_s = flush_every_s
        self.registry_wait_s = registry_wait_s
        self.max_pending_rows = max_pending_rows
        self.on_wait = on_wait or _print_notice
        # A generated id is fixed at start() unless the backbone is known now; a given id never changes.
        self._given_id = run_id is not None
        self._run_id = run_id or (new_run_id(backbone) if backbone else None)
        self._rows = _no_rows()
        self._uncertain = _no_rows()
        self._final: tuple[str, str | None, datetime] | None = None
        self._active = False
        self._finished = False
        self._busy = False
        self._gave_up = False  # a wait for the registry ran out: later writes try briefly, not for minutes again
        self._once = False  # rows logged from now on may be in the registry already (write_missing_only)
        self._last_flush = time.monotonic()
        self.dropped_rows = 0
        #: runs of dead processes this writer marked killed when it started or resumed its run
        self.marked_stale: list[str] = []

    # --- identity and lifecycle ------------------------------------------------------------------------

    @property
    def run_id(self) -> str:
        if self._run_id is None:
            raise RuntimeError("The run id is chosen at start(); pass run_id= or backbone= to know it earlier.")
        return self._run_id

    @property
    def finished(self) -> bool:
        return self._finished

    def start(
        self,
        command: str,
        backbone: str,
        dataset: str,
        variant: str,
        config: dict[str, Any],
        *,
        parent_run_id: str | None = None,
        preset: str | None = None,
        seed: int | None = None,
        out_dir: str | os.PathLike[str] | None = None,
        test_split: str = "test",
        headline: tuple[str, bool] | None = None,
    ) -> str:
        """Insert the run's row (status ``running``) right away, so reports see the run; returns its id.
        ``headline``: the metric the run is judged by and whether higher is better (``Backbone.headline``)."""
        if self._active or self._finished:
            raise RuntimeError("This writer has already started a run.")
        if test_split not in ("test", "validation"):
            raise ValueError(f"test_split must be 'test' or 'validation', not {test_split!r}")
        if self._run_id is None:
            self._run_id = new_run_id(backbone)
        values = {
            "command": command, "backbone": backbone, "dataset": dataset, "variant": variant,
            "config": json.dumps(config, sort_keys=True, default=str), "parent_run_id": parent_run_id,
            "preset": preset, "seed": _opt_int(seed), "out_dir": None if out_dir is None else str(out_dir),
            "test_split": test_split, "dyntie_version": _dyntie_version(),
            "metric": headline[0] if headline else None, "higher_is_better": headline[1] if headline else None,
        }
        self._commit_waiting(lambda con: self._mark_stale_then(con, self._insert_run, values))
        self._active = True
        self._tell("start", {"run_id": self.run_id, "command": command, "backbone": backbone, "dataset": dataset,
                             "variant": variant, "config": config, "metric": values["metric"]})
        return self.run_id

    def _tell(self, event: str, *args: Any) -> None:
        if self.trackers:
            self.trackers(event, *args)

    def _mark_stale_then(self, con: duckdb.DuckDBPyConnection, change: Callable[..., None], *args: Any) -> None:
        self.marked_stale = mark_stale_runs(con)
        change(con, *args)

    def _insert_run(self, con: duckdb.DuckDBPyConnection, values: dict[str, Any]) -> None:
        while self._run_exists(con, self.run_id):
            if self._given_id:
                raise DyntieError(
                    f"Run '{self.run_id}' already exists in {self.db_path}; resume it with --resume "
                    f"{self.run_id} or choose another run id."
                )
            # Two runs of one backbone started in the same second drew the same 4 hex digits: draw again.
            self._run_id = new_run_id(str(values["backbone"]))
        now = utc_now()
        row = {"run_id": self.run_id, "status": "running", **values, "started_at": now, "heartbeat_at": now,
               "pid": os.getpid(), "host": socket.gethostname()}
        columns = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        con.execute(f"INSERT INTO runs ({columns}) VALUES ({marks})", list(row.values()))

    @staticmethod
    def _run_exists(con: duckdb.DuckDBPyConnection, run_id: str) -> bool:
        return con.execute("SELECT count(*) FROM runs WHERE run_id = ?", [run_id]).fetchone()[0] > 0

    def check_resumable(self, run_id: str) -> str:
        """The full id of run ``run_id`` (or a unique prefix of it) if it can be resumed; writes nothing, so a
        command can refuse a run before it loads anything. ``resume`` checks the same."""
        with read_registry(self.db_path) as con:
            return _resumable(con, run_id, self.db_path)

    def resume(self, run_id: str, headline: tuple[str, bool] | None = None,
               config: dict[str, Any] | None = None) -> str:
        """Mark an existing run (id or unique prefix) ``running`` again, keeping its rows; returns its full id.
        A finished run is refused: resuming it would only write its end-of-run rows a second time. ``headline``
        is recorded where the run has none (a run recorded before runs named their metric); ``config``, where
        given, replaces ``runs.config`` (a resume that changed what the run is, such as a longer --max-steps)."""
        if self._active:
            raise RuntimeError("This writer already has an active run.")

        def reopen(con: duckdb.DuckDBPyConnection) -> None:
            full_id = _resumable(con, run_id, self.db_path)
            con.execute(
                """
                UPDATE runs SET status = 'running', ended_at = NULL, error = NULL, pid = ?, host = ?,
                    heartbeat_at = ?
                WHERE run_id = ?
                """,
                [os.getpid(), socket.gethostname(), utc_now(), full_id],
            )
            if headline:
                con.execute("UPDATE runs SET metric = ?, higher_is_better = ? WHERE run_id = ? AND metric IS NULL",
                            [headline[0], headline[1], full_id])
            if config is not None:
                con.execute("UPDATE runs SET config = ? WHERE run_id = ?",
                            [json.dumps(config, sort_keys=True, default=str), full_id])
            self._run_id = full_id

        self._commit_waiting(lambda con: self._mark_stale_then(con, reopen))
        self._given_id = True
        self._active, self._finished, self._final = True, False, None
        return self.run_id

    def truncate_after(
        self, step: int, decisions_from: int | None = None, carried: dict[str, Any] | None = None
    ) -> int:
        """Delete this run's rows at steps after ``step`` (the checkpoint resumed from); returns rows deleted.
        ``decisions_from``: also delete decision rows from this decision on (a decision that was waiting for
        its reward at the checkpoint, and may have been logged after it). Without this, the steps between the
        checkpoint and the kill would be logged twice.

        ``carried``: the rows the checkpoint carries (``pending()`` when it was saved), written in the same
        transaction where the registry does not hold them yet: the rows the killed process never flushed.
        """
        first = decisions_from if decisions_from is not None else 2**31 - 1
        self._tell("resume", self.run_id, step, self.db_path)
        if carried is not None:
            for table, rows in self._carried_rows(carried).items():
                self._uncertain[table].extend(rows)
        for buffer in (self._rows, self._uncertain):
            for table, rows in buffer.items():
                rows[:] = [row for row in rows if _before(table, row, step, first)]
        deleted = 0

        def delete(con: duckdb.DuckDBPyConnection) -> None:
            nonlocal deleted
            for table in ROW_COLUMNS:
                result = con.execute(f"DELETE FROM {table} WHERE run_id = ? AND step > ?", [self.run_id, step])
                deleted += int(result.fetchone()[0])
            result = con.execute("DELETE FROM decisions WHERE run_id = ? AND decision >= ?", [self.run_id, first])
            deleted += int(result.fetchone()[0])

        self._commit_waiting(delete)
        return deleted

    def write_missing_only(self) -> None:
        """Rows logged from now on are written only where the registry lacks their key (``ROW_KEYS``): for a
        resume that repeats work a killed process may have logged after its last checkpoint at the same step
        (the end of a run: its final validation, test and summary rows)."""
        self._once = True

    def _carried_rows(self, carried: dict[str, Any]) -> Rows:
        """``pending()``'s rows as buffer rows, by column name (a checkpoint may predate a column)."""
        if carried.get("format") != PENDING_FORMAT or not isinstance(carried.get("tables"), dict):
            raise DyntieError(
                f"The checkpoint's unwritten registry rows are in an unknown format ({carried.get('format')!r}); "
                "resume with the dyntie version that wrote the checkpoint."
            )
        if carried.get("run_id") != self.run_id:
            raise DyntieError(
                f"The checkpoint's unwritten registry rows belong to run {carried.get('run_id')}, not "
                f"{self.run_id}; resume the run whose folder holds the checkpoint."
            )
        rows = _no_rows()
        for table, saved in carried["tables"].items():
            if table not in ROW_COLUMNS:
                continue
            for values in saved["rows"]:
                by_name = dict(zip(saved["columns"], values))
                rows[table].append(tuple(by_name.get(column) for column in ROW_COLUMNS[table]))
        return rows

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        """Flush, then set the final status and ``ended_at``. Later calls are ignored: the first outcome wins
        (a SIGTERM handler's 'killed' is not overwritten by the 'failed' of the unwinding that follows)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINAL_STATUSES)}, not {status!r}")
        if self._finished or (not self._active and self._final is None):
            return
        if self._final is None:
            self._final = (status, error, utc_now())
        if self._busy:
            # Called from a signal handler in the middle of a flush: that flush writes the status when done.
            return
        # The status goes out in the same transaction as every row still buffered, or not at all: a run never
        # reads "finished" over rows it has not written.
        try:
            self._commit_waiting()
        finally:
            self._tell("finish", status)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if not self._active or self._finished:
            return
        if error is None:
            self.finish("finished")
        elif isinstance(error, KeyboardInterrupt):
            self.finish("killed", "interrupted")
        else:
            self.finish("failed", f"{type(error).__name__}: {error}")

    # --- rows ------------------------------------------------------------------------------------------

    def _append(self, table: str, row: tuple[Any, ...]) -> None:
        if self._finished:
            # Rows that arrive after a signal handler finished the run have no run to belong to.
            self.dropped_rows += 1
            return
        if not self._active:
            raise RuntimeError("Call start() or resume() before logging rows.")
        (self._uncertain if self._once else self._rows)[table].append(row)
        if self.trackers:
            self._tell("row", table, dict(zip(ROW_COLUMNS[table], row, strict=True)))

    def metric(self, step: int, split: str, name: str, value: float) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
        self._append("metrics", (int(step), split, name, _opt_float(value)))

    def memory(
        self,
        *,
        step: int,
        device: str,
        peak_bytes: int | None,
        current_bytes: int | None,
        param_bytes: int | None,
        grad_bytes: int | None,
        optimizer_bytes: int | None,
        trainable_params: int | None,
        process_peak_bytes: int | None = None,
    ) -> None:
        sizes = (peak_bytes, current_bytes, param_bytes, grad_bytes, optimizer_bytes, trainable_params,
                 process_peak_bytes)
        self._append("memory", (int(step), str(device), *(_opt_int(size) for size in sizes)))

    def tie(
        self,
        *,
        decision: int,
        step: int,
        state: Sequence[int],
        action: Sequence[int] | None,
        independent_layers: int,
        distinct_block_weights: int | None,
        changed_blocks: int | None = None,
    ) -> None:
        row = (
            int(decision), int(step), _int_list(state), None if action is None else _int_list(action),
            int(independent_layers), _opt_int(distinct_block_weights), _opt_int(changed_blocks),
        )
        self._append("ties", row)

    def decision(
        self,
        *,
        decision: int,
        step: int,
        epsilon: float | None,
        explored: bool | None,
        reward: float | None,
        q_predicted: float | None,
        q_target: float | None,
        td_loss: float | None,
        greedy_agreement: float | None = None,
        q_spread: float | None = None,
        ppl: float | None = None,
        greedy_moves: int | None = None,
    ) -> None:
        floats = (reward, q_predicted, q_target, td_loss, greedy_agreement, q_spread, ppl)
        row = (
            int(decision), int(step), _opt_float(epsilon), None if explored is None else bool(explored),
            *(_opt_float(value) for value in floats), None if greedy_moves is None else int(greedy_moves),
        )
        self._append("decisions", row)

    @property
    def pending_rows(self) -> int:
        """Rows logged but not yet written."""
        return sum(len(rows) for buffer in (self._rows, self._uncertain) for rows in buffer.values())

    def pending(self) -> dict[str, Any]:
        """Every row not yet known to be in the registry, as JSON-able data. A checkpoint saves it before it
        moves into place, so a process killed before its next flush loses no row: the resume passes it to
        ``truncate_after(carried=...)``."""
        tables = {
            table: {
                "columns": list(ROW_COLUMNS[table]),
                "rows": [list(row) for row in (*self._uncertain[table], *self._rows[table])],
            }
            for table in ROW_COLUMNS
        }
        return {"format": PENDING_FORMAT, "run_id": self.run_id, "tables": tables}

    # --- flushing --------------------------------------------------------------------------------------

    def maybe_flush(self) -> bool:
        """Flush if ``flush_every_s`` passed since the last one; cheap enough to call every step.

        A file kept busy by another process does not stall training: the rows wait for the next interval.
        Once ``max_pending_rows`` wait, training waits for the registry instead (up to ``registry_wait_s``).
        """
        if self._busy or not self._active or self._finished:
            return False
        if self.pending_rows >= self.max_pending_rows:
            self._commit_waiting()
            return True
        if time.monotonic() - self._last_flush < self.flush_every_s:
            return False
        return self.flush(MAYBE_FLUSH_TIMEOUT_S)

    def flush(self, timeout_s: float = LOCK_TIMEOUT_S) -> bool:
        """Write every buffered row now, waiting up to ``timeout_s`` for a busy file; False if it stayed busy
        (the rows stay buffered for a later flush, and ``pending`` still holds them)."""
        if self._finished or not self._active:
            return True
        if self._busy:
            return False
        try:
            self._commit(timeout_s)
        except RegistryLockedError:
            return False
        self._tell("flush")
        return True

    def _commit_waiting(self, run_change: RunChange | None = None) -> None:
        """Write now, waiting up to ``registry_wait_s`` for a registry another process holds (saying so once);
        then fail with every row kept."""
        wait = MAYBE_FLUSH_TIMEOUT_S if self._gave_up else self.registry_wait_s
        began = time.monotonic()
        try:
            self._commit(min(MAYBE_FLUSH_TIMEOUT_S, wait), run_change)
            return
        except RegistryLockedError as error:
            if wait <= MAYBE_FLUSH_TIMEOUT_S:
                raise self._unavailable(error, began) from None
            kept = f" ({self.pending_rows} rows kept meanwhile)" if self.pending_rows else ""
            self.on_wait(f"the registry {error.path} is held by {error.holder}; waiting up to {seconds(wait)} "
                         f"for it{kept}.")
        try:
            self._commit(max(wait - (time.monotonic() - began), 0.0), run_change)
        except RegistryLockedError as error:
            self._gave_up = True
            raise self._unavailable(error, began) from None

    def _unavailable(self, error: RegistryLockedError, began: float) -> RegistryLockedError:
        who = f"Run {self._run_id}" if self._run_id else "The run"
        return RegistryLockedError(
            f"{who} could not write to the registry {error.path}: {error.holder} held it for "
            f"{seconds(time.monotonic() - began)} ({self.pending_rows} rows are kept, not written); stop that "
            "process and try again.",
            path=error.path, holder=error.holder,
        )

    def _take_batch(self) -> _Batch:
        batch = _Batch(rows=self._rows, uncertain=self._uncertain, final=self._final)
        self._rows, self._uncertain = _no_rows(), _no_rows()
        return batch

    def _put_back(self, batch: _Batch) -> None:
        # Older rows go first so a retried flush keeps the logging order. A batch that failed at or after its
        # COMMIT may have landed: its rows are written again only where the registry lacks them.
        if batch.committing:
            self._uncertain = {t: batch.uncertain[t] + batch.rows[t] + self._uncertain[t] for t in ROW_COLUMNS}
        else:
            self._uncertain = {t: batch.uncertain[t] + self._uncertain[t] for t in ROW_COLUMNS}
            self._rows = {t: batch.rows[t] + self._rows[t] for t in ROW_COLUMNS}

    def _commit(self, timeout_s: float, run_change: RunChange | None = None) -> None:
        """One transaction: an optional change to the runs row, the buffered rows, the heartbeat, the status.

        If ``finish`` was called by a signal handler while this ran, its status goes out in a second pass.
        """
        self._busy = True
        try:
            while True:
                batch = self._take_batch()
                try:
                    self._write(batch, timeout_s, run_change)
                except BaseException:
                    self._put_back(batch)
                    raise
                run_change = None
                if batch.final is not None:
                    self._finished, self._active = True, False
                if self._final is None or self._finished:
                    break
        finally:
            self._busy = False
            self._last_flush = time.monotonic()

    def _write(self, batch: _Batch, timeout_s: float, run_change: RunChange | None) -> None:
        with connect(self.db_path, timeout_s=timeout_s) as con:
            with transaction(con):
                if run_change is not None:
                    run_change(con)
                for table in ROW_COLUMNS:
                    self._insert_rows(con, table, batch.rows[table])
                    self._insert_missing(con, table, batch.uncertain[table])
                if self._active or batch.final is not None:
                    self._update_run(con, batch)
                kill_point("flush")
                batch.committing = True
            kill_point("flush-committed")

    def _insert_rows(
        self, con: duckdb.DuckDBPyConnection, table: str, rows: list[tuple[Any, ...]], into: str | None = None
    ) -> None:
        # Multi-row VALUES statements: far faster than executemany in DuckDB, and unlike a DataFrame insert
        # they keep a NaN metric (a diverged loss) as NaN instead of turning it into NULL.
        if not rows:
            return
        columns = ("run_id", *ROW_COLUMNS[table])
        per_statement = max(1, _PARAMS_PER_STATEMENT // len(columns))
        row_marks = "(" + ", ".join("?" for _ in columns) + ")"
        for start in range(0, len(rows), per_statement):
            chunk = rows[start : start + per_statement]
            params = [value for row in chunk for value in (self.run_id, *row)]
            marks = ", ".join([row_marks] * len(chunk))
            con.execute(f"INSERT INTO {into or table} ({', '.join(columns)}) VALUES {marks}", params)

    def _insert_missing(self, con: duckdb.DuckDBPyConnection, table: str, rows: list[tuple[Any, ...]]) -> int:
        """Insert the rows whose key (``ROW_KEYS``) this run does not have yet; returns how many."""
        if not rows:
            return 0
        staged = f"staged_{table}"
        con.execute(f"CREATE OR REPLACE TEMP TABLE {staged} AS SELECT * FROM {table} LIMIT 0")
        self._insert_rows(con, table, rows, into=staged)
        keys = ROW_KEYS[table]
        columns = ", ".join(("run_id", *ROW_COLUMNS[table]))
        same_key = " AND ".join(f"t.{key} IS NOT DISTINCT FROM s.{key}" for key in ("run_id", *keys))
        inserted = con.execute(
            f"""
            INSERT INTO {table} ({columns})
            SELECT DISTINCT ON ({", ".join(keys)}) {columns} FROM {staged} s
            WHERE NOT EXISTS (SELECT 1 FROM {table} t WHERE {same_key})
            """
        ).fetchone()[0]
        con.execute(f"DROP TABLE {staged}")
        return int(inserted)

    def _update_run(self, con: duckdb.DuckDBPyConnection, batch: _Batch) -> None:
        now = utc_now()
        if batch.final is None:
            con.execute("UPDATE runs SET heartbeat_at = ? WHERE run_id = ?", [now, self.run_id])
            return
        status, error, ended_at = batch.final
        con.execute(
            "UPDATE runs SET status = ?, error = ?, ended_at = ?, heartbeat_at = ? WHERE run_id = ?",
            [status, error, ended_at, now, self.run_id],
        )


class RankWriter:
    """What a rank other than 0 of a multi-process run writes: nothing (rank 0 records the run). It knows the
    run's id, which rank 0 chose, so every rank finds the same checkpoint folder."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.finished = False

    def start(self, *args: Any, **kwargs: Any) -> str:
        return self.run_id

    def check_resumable(self, run_id: str) -> str:
        return self.run_id

    def resume(self, run_id: str, headline: tuple[str, bool] | None = None, config: Any = None) -> str:
        return self.run_id

    def truncate_after(self, step: int, decisions_from: int | None = None, carried: Any = None) -> int:
        return 0

    def write_missing_only(self) -> None:
        pass

    def pending(self) -> dict[str, Any]:
        return {"format": PENDING_FORMAT, "run_id": self.run_id, "tables": {}}

    def finish(self, status: str = "finished", error: str | None = None) -> None:
        self.finished = True

    def metric(self, *args: Any, **kwargs: Any) -> None:
        pass

    memory = tie = decision = metric

    def maybe_flush(self) -> bool:
        return False

    def flush(self, timeout_s: float = LOCK_TIMEOUT_S) -> bool:
        return True
