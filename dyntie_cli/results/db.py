"""Where the result registry lives, how to open it safely, and its schema (a public interface: docs/registry.md).

DuckDB lets one process at a time hold the file open for writing, and while it does no other process can open
it at all, not even read-only (and a read-only holder blocks writers too). So nothing in dyntie keeps a
connection: every user opens, does one short piece of work and closes, and opening retries with backoff while
another process holds the lock.

DuckDB's own lock is not enough to keep every row, though: it reads the file's headers before it takes its lock
and uses them afterwards, so a writer that opens while another process writes its last checkpoint starts from
the state before that checkpoint, and its own checkpoint then erases the other process's last transaction (a
whole flush of a training run, seen with three runs and readers sharing one file). dyntie therefore takes a lock
of its own on a file beside the registry (``<registry>.lock``: shared to read, exclusive to write) before DuckDB
touches the registry, and keeps it until DuckDB has closed it. Other programs that only read the registry (the
DuckDB CLI, pandas) need not take it; a program other than dyntie must not write the registry while runs train.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

import duckdb

from dyntie_cli.errors import DyntieError

try:
    import fcntl
except ImportError:  # Windows: DuckDB's own lock only
    fcntl = None  # type: ignore[assignment]

DB_ENV_VAR = "DYNTIE_DB"
DEFAULT_DB_NAME = "dyntie.duckdb"
LOCK_TIMEOUT_S = 30.0
LOCK_SUFFIX = ".lock"

# Backoff between open attempts (see _Backoff).
_FIRST_BACKOFF_S = 0.01
_MAX_BACKOFF_S = 0.5

Migration = Callable[[duckdb.DuckDBPyConnection], None]

#: SQL that filters and orders rows by a list of resolved run ids (the casts keep an empty list well-typed)
IN_RUNS = "run_id IN (SELECT unnest($ids::TEXT[]))"
RUN_ORDER = "list_position($ids::TEXT[], run_id)"


def resolve_db_path(db: str | os.PathLike[str] | None) -> Path:
    """The registry path: ``--db`` if given, else ``$DYNTIE_DB``, else ``./dyntie.duckdb``."""
    if db is not None and not str(db).strip():
        raise DyntieError("--db is empty; pass the registry's file path (or leave --db out for ./dyntie.duckdb).",
                          exit_code=2)
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
    if path.is_file() and any(sign in text.lower() for sign in _CORRUPT_SIGNS):
        return DyntieError(f"The registry {path} is truncated or corrupt ({_reason(text)}); restore it from a copy, "
                           "or pass --db with another path to start a new one.")
    action = "read" if read_only else "write"
    return DyntieError(f"Cannot {action} the registry at {path} ({_reason(text)}); pass --db with a writable path.")


#: how DuckDB words a database file that is cut short or damaged
_CORRUPT_SIGNS = ("attempted to read", "corrupt", "checksum", "truncated")


def _reason(text: str) -> str:
    # DuckDB messages look like 'IO Error: Cannot open file "...": Permission denied'; keep the OS reason (split
    # at a colon and a space, so a URL in the message stays whole)
    return text.rsplit(": ", 1)[-1].strip() or text


def _missing_registry(path: Path) -> DyntieError:
    return DyntieError(
        f"No dyntie registry exists at {path}; run a training first (dyntie train gpt2) or pass --db."
    )


class RegistryLockedError(DyntieError):
    """Another process kept the registry locked past the wait limit; the caller may defer and try later.
    ``holder`` says which process, as well as it can be known."""

    def __init__(self, message: str, *, path: Path, holder: str) -> None:
        super().__init__(message)
        self.path = path
        self.holder = holder


def _lock_timeout(path: Path, holder: str, waited_s: float) -> RegistryLockedError:
    return RegistryLockedError(
        f"The registry {path} stayed locked by {holder} for {seconds(waited_s)}; "
        "wait for it to finish or pass --db with another path.",
        path=path, holder=holder,
    )


def seconds(value: float) -> str:
    return f"{value:.1f} s" if value < 10 else f"{value:.0f} s"


def lock_path(path: Path) -> Path:
    """The file dyntie locks around every open of the registry at ``path``."""
    return path.with_name(path.name + LOCK_SUFFIX)


def lock_holders(path: Path) -> str:
    """Which other processes lock the registry or its lock file, e.g. 'pid 812 (dyntie report)', from the
    kernel's lock table (Linux); '' where it cannot be known."""
    inodes = set()
    for file in (path, lock_path(path)):
        with contextlib.suppress(OSError):
            inodes.add(file.stat().st_ino)
    try:
        table = Path("/proc/locks").read_text()
    except OSError:
        return ""
    pids: list[int] = []
    for line in table.splitlines():
        fields = line.split()
        if len(fields) < 6 or "->" in fields:  # '->' marks a process waiting for the lock, not holding it
            continue
        pid, inode = fields[4], fields[5].rsplit(":", 1)[-1]
        if inode.isdigit() and int(inode) in inodes and pid.isdigit() and int(pid) != os.getpid():
            pids.append(int(pid))
    return ", ".join(_describe_process(pid) for pid in dict.fromkeys(pids))


def _describe_process(pid: int) -> str:
    try:
        args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return f"pid {pid}"
    words = [a.decode(errors="replace") for a in args if a]
    if not words:
        return f"pid {pid}"
    # the program, and the script it runs (python .../bin/dyntie report), by their names only
    script = 1 if len(words) > 1 and not words[1].startswith("-") else 0
    words[: script + 1] = [Path(word).name for word in words[: script + 1]]
    command = " ".join(" ".join(words).split())
    return f"pid {pid} ({command[:80]}{'...' if len(command) > 80 else ''})"


def _holder(path: Path, error: BaseException | None = None) -> str:
    found = lock_holders(path)
    if found:
        return found
    # DuckDB names the holder of its own lock: 'Conflicting lock is held in /usr/bin/python3 (PID 812) by user x'
    match = re.search(r"Conflicting lock is held in (.+?)(?:\. |$)", str(error or ""))
    return match.group(1) if match else "another process"


class _Backoff:
    """Jittered exponential backoff up to a deadline: starts short because flushes take tens of milliseconds,
    is capped so a waiting writer notices a released lock quickly, and jitter keeps two waiting writers from
    retrying in lockstep."""

    def __init__(self, timeout_s: float) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + timeout_s
        self.delay = _FIRST_BACKOFF_S

    @property
    def waited(self) -> float:
        return time.monotonic() - self.start

    def sleep(self) -> bool:
        """Wait before the next try; False once the deadline has passed."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(self.delay * random.uniform(0.5, 1.5), left))
        self.delay = min(self.delay * 2, _MAX_BACKOFF_S)
        return True


def _prepare_location(path: Path, read_only: bool) -> None:
    """Fail early, without touching the file (or creating the lock file beside it), for the cases DuckDB
    reports poorly."""
    if path.is_dir() or not (_holds_lock(path) or _may_be_duckdb(path)):
        raise DyntieError(f"{path} is not a DuckDB file; pass --db with another path.")
    if read_only:
        if not path.exists():
            raise _missing_registry(path)
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DyntieError(
            f"Cannot create the registry's folder {path.parent} ({error.strerror}); pass --db with a writable path."
        ) from None


def _may_be_duckdb(path: Path) -> bool:
    """False for a file that is surely no DuckDB database (DuckDB's magic bytes follow an 8-byte checksum).
    Not while this process has the file open in DuckDB: closing any descriptor of a file drops the process's
    POSIX locks on it, DuckDB's among them."""
    try:
        with path.open("rb") as file:
            head = file.read(12)
    except OSError:
        return True  # missing or unreadable: DuckDB says which
    return len(head) < 12 or head[8:12] == b"DUCK"


def _check_empty_file(path: Path, read_only: bool) -> None:
    # Under the lock: a registry another writer is creating must not look empty to this one.
    if not (path.is_file() and path.stat().st_size == 0):
        return
    if read_only:
        # An empty file (e.g. from `touch`) is not a database yet; DuckDB calls it invalid.
        raise DyntieError(f"The registry {path} is empty; run a training first or pass --db.")
    # A zero-byte file holds nothing to lose, and DuckDB refuses to initialise one; replace it.
    path.unlink()


# Lock files this process holds, and how many opens use each: DuckDB shares one open database within a process,
# and an open nested in another (same process, same file) must not wait for itself.
_held_locks: dict[Path, list[int]] = {}
_held_guard = threading.Lock()


def _holds_lock(path: Path) -> bool:
    with _held_guard:
        return lock_path(path).absolute() in _held_locks


def _open_lock_file(path: Path, read_only: bool) -> int | None:
    lock = lock_path(path)
    cloexec = getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(lock, os.O_RDWR | os.O_CREAT | cloexec, 0o666)
    except OSError as error:
        if not read_only:
            raise DyntieError(
                f"Cannot create the registry's lock file {lock} ({error.strerror}); pass --db with a writable path."
            ) from None
    try:
        return os.open(lock, os.O_RDONLY | cloexec)
    except OSError:
        return None  # a registry in a folder this user cannot write: reading it cannot lose anything


@contextlib.contextmanager
def _registry_lock(path: Path, read_only: bool, backoff: _Backoff) -> Iterator[None]:
    """Hold the lock file beside the registry (shared to read, exclusive to write) for one open."""
    key = lock_path(path).absolute()
    with _held_guard:
        if key in _held_locks:
            _held_locks[key][1] += 1
            fd = None
        else:
            fd = _open_lock_file(path, read_only) if fcntl is not None else None
            if fd is not None:
                _held_locks[key] = [fd, 1]
    if fd is not None:
        try:
            _flock(fd, path, read_only, backoff)
        except BaseException:
            with _held_guard:
                del _held_locks[key]
            os.close(fd)
            raise
    try:
        yield
    finally:
        with _held_guard:
            entry = _held_locks.get(key)
            if entry is not None:
                entry[1] -= 1
                if entry[1] == 0:
                    del _held_locks[key]
                    os.close(entry[0])  # closing the file releases the lock


def _flock(fd: int, path: Path, read_only: bool, backoff: _Backoff) -> None:
    mode = fcntl.LOCK_SH if read_only else fcntl.LOCK_EX
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    except OSError:
        return  # a file system without flock: DuckDB's own lock still applies
    if not _wait_for_flock(fd, mode, backoff.deadline - time.monotonic()):
        raise _lock_timeout(path, _holder(path), backoff.waited)


def _wait_for_flock(fd: int, mode: int, timeout_s: float) -> bool:
    """Block until the lock is ours, up to ``timeout_s``. A blocked waiter gets the lock when it is let go,
    where one that polls could wait for ever behind runs that flush back to back (or that it sleeps past)."""
    # The waiting thread locks a duplicate of ``fd``: both share one open file, which the lock belongs to. If the
    # wait is given up, the caller closes ``fd``, and a lock taken later dies with the thread's duplicate.
    waiter = os.dup(fd)
    taken = threading.Event()

    def wait() -> None:
        try:
            fcntl.flock(waiter, mode)
            taken.set()
        except OSError:
            pass
        finally:
            os.close(waiter)

    threading.Thread(target=wait, name="dyntie-registry-lock", daemon=True).start()
    return taken.wait(max(timeout_s, 0.0))


def _open_duckdb(path: Path, read_only: bool, backoff: _Backoff) -> duckdb.DuckDBPyConnection:
    """Open the file, waiting while a process that does not take dyntie's lock holds DuckDB's."""
    while True:
        try:
            return duckdb.connect(str(path), read_only=read_only)
        except duckdb.Error as error:
            if not is_lock_conflict(error):
                raise _friendly_open_error(error, path, read_only) from None
            if not backoff.sleep():
                raise _lock_timeout(path, _holder(path, error), backoff.waited) from None


@contextlib.contextmanager
def open_registry(
    path: Path, read_only: bool = False, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[duckdb.DuckDBPyConnection]:
    """The file opened under dyntie's lock, waiting with jittered exponential backoff while another process
    holds it; closed (and the lock released) on exit."""
    path = Path(path)
    _prepare_location(path, read_only)
    backoff = _Backoff(timeout_s)
    with _registry_lock(path, read_only, backoff):
        _check_empty_file(path, read_only)
        con = _open_duckdb(path, read_only, backoff)
        try:
            yield con
        finally:
            con.close()


@contextlib.contextmanager
def connect(
    path: str | os.PathLike[str], read_only: bool = False, *, timeout_s: float = LOCK_TIMEOUT_S
) -> Iterator[duckdb.DuckDBPyConnection]:
    """Open the registry for one short piece of work, migrating it first when opened for writing.

    Read-only opening never creates or upgrades anything: a missing file, or one at an older schema,
    is reported as a ``DyntieError``.
    """
    db_path = Path(path)
    with open_registry(db_path, read_only=read_only, timeout_s=timeout_s) as con:
        if read_only:
            _require_current_schema(con, db_path)
        else:
            migrate(con, db_path)
        yield con


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
    with open_registry(path, read_only=True) as con:
        version = _check_is_registry(con, path)
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
    if not run_id.strip():
        raise DyntieError("The run id is empty; pass a run id or a unique prefix of one (`dyntie report --table "
                          "runs` lists them).", exit_code=2)
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
