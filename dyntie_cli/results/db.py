"""Where the result registry lives, how to open it safely, and its schema (a public interface: docs/registry.md).

DuckDB lets one process at a time hold the file open for writing, and while it does no other process can open
it at all, not even read-only (and a read-only holder blocks writers too). So nothing in dyntie keeps a
connection: every user opens, does one short piece of work and closes, and opening retries with backoff while
another process holds the lock.
"""

from __future__ import annotations

import contextlib
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from dyntie_cli.errors import DyntieError

DB_ENV_VAR = "DYNTIE_DB"
DEFAULT_DB_NAME = "dyntie.duckdb"
LOCK_TIMEOUT_S = 30.0

# Backoff between open attempts: starts short because flushes take tens of milliseconds, and is capped so a
# waiting writer notices a released lock quickly.
_FIRST_BACKOFF_S = 0.01
_MAX_BACKOFF_S = 0.5

Migration = Callable[[duckdb.DuckDBPyConnection], None]

#: SQL that filters and orders rows by a list of resolved run ids (the casts keep an empty list well-typed)
IN_RUNS = "run_id IN (SELECT unnest($ids::TEXT[]))"
RUN_ORDER = "list_position($ids::TEXT[], run_id)"


def resolve_db_path(db: str | os.PathLike[str] | None) -> Path:
    """The registry path: ``--db`` if given, else ``$DYNTIE_DB``, else ``./dyntie.duckdb``."""
    chosen = db if db else os.environ.get(DB_ENV_VAR) or DEFAULT_DB_NAME
    return Path(chosen).expanduser().absolute()


def utc_now() -> datetime:
    """Timestamps are stored as naive UTC so runs from machines in different zones sort together."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


# --- migrations ---------------------------------------------------------------------------------------
# Each migration is a small function; its version is its position in MIGRATIONS (1-based). Never edit or
# reorder one that has shipped: registries in the wild have it recorded as applied. Add a new one instead.


def _create_core_tables(con: duckdb.DuckDBPyConnection) -> None:
    """The tables and columns the public schema promises (docs/registry.md)."""
    con.execute(
        """
        CREATE TABLE runs (
            run_id TEXT PRIMARY KEY, command TEXT, backbone TEXT, dataset TEXT, variant TEXT,
            status TEXT NOT NULL, config JSON, parent_run_id TEXT,
            started_at TIMESTAMP, ended_at TIMESTAMP)
        """
    )
    con.execute("CREATE TABLE metrics (run_id TEXT NOT NULL, step INTEGER, split TEXT, name TEXT, value DOUBLE)")
    con.execute(
        """
        CREATE TABLE memory (
            run_id TEXT NOT NULL, step INTEGER, device TEXT, peak_bytes BIGINT, current_bytes BIGINT,
            param_bytes BIGINT, grad_bytes BIGINT, optimizer_bytes BIGINT, trainable_params BIGINT)
        """
    )
    con.execute(
        """
        CREATE TABLE ties (
            run_id TEXT NOT NULL, decision INTEGER, step INTEGER, state INTEGER[], action INTEGER[],
            independent_layers INTEGER, distinct_block_weights INTEGER)
        """
    )
    con.execute(
        """
        CREATE TABLE decisions (
            run_id TEXT NOT NULL, decision INTEGER, step INTEGER, epsilon DOUBLE, explored BOOLEAN,
            reward DOUBLE, q_predicted DOUBLE, q_target DOUBLE, td_loss DOUBLE)
        """
    )


def _add_run_provenance(con: duckdb.DuckDBPyConnection) -> None:
    """What is needed to find a run's files, spot a killed run (pid/host/heartbeat) and read its score."""
    for column in (
        "preset TEXT",
        "seed INTEGER",
        "out_dir TEXT",
        "pid INTEGER",
        "host TEXT",
        # Which split the final `metrics` row with split='test' really scored on: GLUE has no test labels.
        "test_split TEXT",
        "error TEXT",
        # Last successful flush: the best estimate of when a killed run stopped.
        "heartbeat_at TIMESTAMP",
        "dyntie_version TEXT",
    ):
        con.execute(f"ALTER TABLE runs ADD COLUMN {column}")


def _add_tie_changes(con: duckdb.DuckDBPyConnection) -> None:
    """How many blocks were re-targeted per decision: the symptom of an agent that has not learned."""
    con.execute("ALTER TABLE ties ADD COLUMN changed_blocks INTEGER")


def _add_decision_diagnostics(con: duckdb.DuckDBPyConnection) -> None:
    """Whether the agent converges: greedy choice stability, Q spread, and the reward batch's perplexity."""
    for column in ("greedy_agreement DOUBLE", "q_spread DOUBLE", "ppl DOUBLE"):
        con.execute(f"ALTER TABLE decisions ADD COLUMN {column}")


def _add_process_peak(con: duckdb.DuckDBPyConnection) -> None:
    """The whole process's peak so far at each memory row (on CPU the RSS high-water mark, which dyntie never
    resets; on CUDA peak allocated since the process started), beside the per-interval ``peak_bytes``."""
    con.execute("ALTER TABLE memory ADD COLUMN process_peak_bytes BIGINT")


def _add_greedy_moves(con: duckdb.DuckDBPyConnection) -> None:
    """Whether the learned part acts: rows whose greedy Q choice would change their tie (NULL: no Q-network)."""
    con.execute("ALTER TABLE decisions ADD COLUMN greedy_moves INTEGER")


# How reports chose a run's headline metric before runs recorded it: the first of these names the run logged,
# preferring one of its final test row. Kept as it was: it fills the runs recorded before the columns existed.
_HEADLINES_BEFORE_RECORDING = ["mcc", "accuracy", "ppl", "f1", "loss"]


def _add_run_headline(con: duckdb.DuckDBPyConnection) -> None:
    """The metric a run is judged by and its direction, from the backbone when the run starts, so that reports,
    studies and plots read them from the registry alone. Earlier runs get what reports chose from their rows
    (NULL for a run that never evaluated)."""
    con.execute("ALTER TABLE runs ADD COLUMN metric TEXT")
    con.execute("ALTER TABLE runs ADD COLUMN higher_is_better BOOLEAN")
    con.execute(
        """
        UPDATE runs SET metric = chosen.name, higher_is_better = chosen.name NOT IN ('ppl', 'loss')
        FROM (
            SELECT run_id, name FROM (
                SELECT DISTINCT run_id, split, name FROM metrics
                WHERE split IN ('validation', 'test') AND list_contains($names::TEXT[], name))
            QUALIFY row_number() OVER (
                PARTITION BY run_id ORDER BY split = 'test' DESC, list_position($names::TEXT[], name)) = 1
        ) chosen
        WHERE runs.run_id = chosen.run_id
        """,
        {"names": _HEADLINES_BEFORE_RECORDING},
    )


MIGRATIONS: list[tuple[str, Migration]] = [
    ("create_core_tables", _create_core_tables),
    ("add_run_provenance", _add_run_provenance),
    ("add_tie_changes", _add_tie_changes),
    ("add_decision_diagnostics", _add_decision_diagnostics),
    ("add_process_peak", _add_process_peak),
    ("add_greedy_moves", _add_greedy_moves),
    ("add_run_headline", _add_run_headline),
]
SCHEMA_VERSION = len(MIGRATIONS)


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main' AND table_name = ?", [name]
    ).fetchone()
    return bool(row and row[0])


def schema_version(con: duckdb.DuckDBPyConnection) -> int:
    """The highest migration applied to this database (0 for an empty database)."""
    if not _has_table(con, "schema_migrations"):
        return 0
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def migrate(con: duckdb.DuckDBPyConnection, path: Path, target: int = SCHEMA_VERSION) -> int:
    """Apply the migrations after the database's version, up to ``target``; returns the new version."""
    current = _check_is_registry(con, path)
    if not _has_table(con, "schema_migrations"):
        con.execute("CREATE TABLE schema_migrations (version INTEGER, name TEXT, applied_at TIMESTAMP)")
    for version in range(current + 1, target + 1):
        name, apply = MIGRATIONS[version - 1]
        # One transaction per migration, so a failure leaves the database at a recorded version.
        con.execute("BEGIN TRANSACTION")
        try:
            apply(con)
            con.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", [version, name, utc_now()])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    return max(current, target)


def _check_is_registry(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The schema version, after refusing databases dyntie must not touch (foreign or from a newer dyntie)."""
    version = schema_version(con)
    if version == 0:
        row = con.execute("SELECT count(*) FROM duckdb_tables() WHERE schema_name = 'main'").fetchone()
        if row and row[0]:
            raise DyntieError(
                f"{path} is a DuckDB database but not a dyntie registry; pass --db with another path."
            )
    if version > SCHEMA_VERSION:
        raise DyntieError(
            f"{path} was written by a newer dyntie (schema {version}, this one knows {SCHEMA_VERSION}); "
            "upgrade dyntie or pass --db with another path."
        )
    return version


# --- opening --------------------------------------------------------------------------------------------


def is_lock_conflict(error: BaseException) -> bool:
    """True for DuckDB's 'another process holds the file' error, the one failure worth waiting out."""
    return isinstance(error, duckdb.IOException) and "lock" in str(error).lower()


def _friendly_open_error(error: duckdb.Error, path: Path, read_only: bool) -> DyntieError:
    """One sentence naming the fix for each way opening the file can fail."""
    text = str(error)
    if "not a valid DuckDB database file" in text or "Is a directory" in text:
        return DyntieError(f"{path} is not a DuckDB file; pass --db with another path.")
    if "version number" in text or "newer version" in text.lower():
        return DyntieError(
            f"{path} was written by another DuckDB version than the installed {duckdb.__version__}; "
            "install a matching duckdb or pass --db with another path."
        )
    if "does not exist" in text and read_only:
        return _missing_registry(path)
    action = "read" if read_only else "write"
    return DyntieError(f"Cannot {action} the registry at {path} ({_reason(text)}); pass --db with a writable path.")


def _reason(text: str) -> str:
    # DuckDB messages look like 'IO Error: Cannot open file "...": Permission denied'; keep the OS reason.
    return text.rsplit(":", 1)[-1].strip() or text


def _missing_registry(path: Path) -> DyntieError:
    return DyntieError(
        f"No dyntie registry exists at {path}; run a training first (dyntie train gpt2) or pass --db."
    )


class RegistryLockedError(DyntieError):
    """Another process kept the registry locked past the wait limit; the caller may defer and try later."""


def _lock_timeout(path: Path, error: BaseException, waited_s: float) -> DyntieError:
    return RegistryLockedError(
        f"The registry {path} stayed locked by another process for {waited_s:.0f} s ({_reason(str(error))}); "
        "wait for it to finish or pass --db with another path."
    )


def _prepare_location(path: Path, read_only: bool) -> None:
    """Fail early, without touching the file, for the cases DuckDB reports poorly."""
    if read_only:
        if not path.exists():
            raise _missing_registry(path)
        if path.is_file() and path.stat().st_size == 0:
            # An empty file (e.g. from `touch`) is not a database yet; DuckDB calls it invalid.
            raise DyntieError(f"The registry {path} is empty; run a training first or pass --db.")
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DyntieError(
            f"Cannot create the registry's folder {path.parent} ({error.strerror}); pass --db with a writable path."
        ) from None
    if path.is_file() and path.stat().st_size == 0:
        # A zero-byte file holds nothing to lose, and DuckDB refuses to initialise one; replace it.
        path.unlink()


def open_with_retry(
    path: Path, read_only: bool = False, timeout_s: float = LOCK_TIMEOUT_S
) -> duckdb.DuckDBPyConnection:
    """Open the file, waiting with jittered exponential backoff while another process holds its lock."""
    _prepare_location(path, read_only)
    start = time.monotonic()
    delay = _FIRST_BACKOFF_S
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as error:
            if not is_lock_conflict(error):
                raise _friendly_open_error(error, path, read_only) from None
            waited = time.monotonic() - start
            if waited >= timeout_s:
                raise _lock_timeout(path, error, waited) from None
            # Jitter keeps two waiting writers from retrying in lockstep.
            time.sleep(min(delay * random.uniform(0.5, 1.5), max(timeout_s - waited, 0.0)))
            delay = min(delay * 2, _MAX_BACKOFF_S)


@contextlib.contextmanager
def connect(
    path: str | os.PathLike[str], read_only: bool = False, *, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the registry for one short piece of work, migrating it first when opened for writing.

    Read-only opening never creates or upgrades anything: a missing file, or one at an older schema,
    is reported as a ``DyntieError``.
    """
    db_path = Path(path)
    con = open_with_retry(db_path, read_only=read_only, timeout_s=timeout_s)
    try:
        if read_only:
            _require_current_schema(con, db_path)
        else:
            migrate(con, db_path)
        yield con
    finally:
        con.close()


@contextlib.contextmanager
def read_registry(path: str | os.PathLike[str]) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open an existing registry read-only. Reading writes nothing, with one exception that it announces: a
    registry written by an older dyntie is upgraded to the current schema first (when the file is writable).
    Never creates a registry: a missing or empty file raises ``DyntieError``."""
    db_path = Path(path)
    _upgrade_if_older(db_path)
    with connect(db_path, read_only=True) as con:
        yield con


def _upgrade_if_older(path: Path) -> None:
    if not (path.is_file() and path.stat().st_size > 0 and os.access(path, os.W_OK)):
        return
    con = open_with_retry(path, read_only=True)
    try:
        version = _check_is_registry(con, path)
    finally:
        con.close()
    if 0 < version < SCHEMA_VERSION:
        with connect(path):
            pass
        print(f"dyntie: upgraded the registry {path} from schema {version} to {SCHEMA_VERSION}.", file=sys.stderr)


def _require_current_schema(con: duckdb.DuckDBPyConnection, path: Path) -> None:
    version = _check_is_registry(con, path)
    if version == 0:
        raise DyntieError(f"{path} holds no dyntie runs yet; run a training first or pass --db.")
    if version < SCHEMA_VERSION:
        raise DyntieError(
            f"{path} uses an older registry schema and is opened read-only; make it writable (or copy it) "
            "so dyntie can upgrade it."
        )


@contextlib.contextmanager
def transaction(con: duckdb.DuckDBPyConnection) -> Iterator[duckdb.DuckDBPyConnection]:
    """BEGIN ... COMMIT, rolling back on any failure so a half-written flush never lands."""
    con.execute("BEGIN TRANSACTION")
    try:
        yield con
    except BaseException:
        con.execute("ROLLBACK")
        raise
    con.execute("COMMIT")


# --- run ids ---------------------------------------------------------------------------------------------


def _no_run(run_id: str, path: Path) -> DyntieError:
    return DyntieError(f"No run '{run_id}' in {path}; `dyntie report --table runs` lists the runs.")


def resolve_run_id(con: duckdb.DuckDBPyConnection, run_id: str, path: Path) -> str:
    """The full id for ``run_id`` or for a prefix of exactly one run's id."""
    rows = con.execute(
        "SELECT run_id FROM runs WHERE run_id = ? OR starts_with(run_id, ?) ORDER BY run_id", [run_id, run_id]
    ).fetchall()
    ids = [row[0] for row in rows]
    if run_id in ids:
        return run_id
    if len(ids) == 1:
        return ids[0]
    if not ids:
        raise _no_run(run_id, path)
    listed = ", ".join(ids[:5]) + (", ..." if len(ids) > 5 else "")
    raise DyntieError(f"Run id prefix '{run_id}' matches {len(ids)} runs ({listed}); give more of the id.")


def resolve_run_ids(con: duckdb.DuckDBPyConnection, run_ids: Sequence[str] | None, path: Path) -> list[str]:
    """Full ids in the order asked for (duplicates dropped); ``None`` means every run, most recent first."""
    if run_ids is None:
        rows = con.execute("SELECT run_id FROM runs ORDER BY started_at DESC NULLS LAST, run_id DESC").fetchall()
        return [row[0] for row in rows]
    resolved = [resolve_run_id(con, run_id, path) for run_id in run_ids]
    return list(dict.fromkeys(resolved))
