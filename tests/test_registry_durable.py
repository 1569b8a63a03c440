"""The registry keeps every row: dyntie's own lock around DuckDB's, rows that travel with a checkpoint and are
written once on resume, and a registry held by another process that makes a run wait, never lose rows."""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pytest

from dyntie_cli.core.checkpoint import REGISTRY_ROWS, load_registry_rows, save_registry_rows
from dyntie_cli.errors import DyntieError
from dyntie_cli.results import db as registry
from dyntie_cli.results import writer as writer_module
from dyntie_cli.results.db import RegistryLockedError, connect, lock_path, read_registry, transaction
from dyntie_cli.results.queries import run_query
from dyntie_cli.results.writer import ROW_COLUMNS, RunWriter


def python(code: str, *args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=120, check=False)


def lock_is_free(db: Path) -> bool:
    """Whether another open of the lock file could take it exclusively now."""
    fd = os.open(lock_path(db), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
    return True


def test_duckdb_reads_the_file_only_while_dyntie_holds_its_lock(tmp_path, monkeypatch):
    # DuckDB reads the file's headers before it takes its own lock and uses them after it: a writer whose open
    # overlaps another writer's last checkpoint would start from the state before it and erase it. So DuckDB
    # may touch the registry only while dyntie's lock is held, until it has closed the file.
    db = tmp_path / "r.duckdb"
    with connect(db):
        pass
    seen = []
    real_connect = duckdb.connect

    class Watched:
        def __init__(self, con):
            self.con = con

        def __getattr__(self, name):
            return getattr(self.con, name)

        def close(self):
            seen.append(("close", lock_is_free(db)))
            self.con.close()

    def watched_connect(path, read_only=False):
        seen.append(("open", lock_is_free(db)))
        return Watched(real_connect(path, read_only=read_only))

    monkeypatch.setattr(registry.duckdb, "connect", watched_connect)
    with connect(db) as con:
        con.execute("SELECT count(*) FROM runs").fetchone()
    with read_registry(db) as con:
        con.execute("SELECT count(*) FROM runs").fetchone()
    assert seen and all(not free for _, free in seen), seen
    assert lock_is_free(db)


def test_a_reader_shares_the_lock_and_a_writer_waits_for_it(tmp_path):
    db = tmp_path / "r.duckdb"
    with connect(db):
        pass
    read = "with read_registry(sys.argv[1]) as con: print(con.execute('SELECT 1').fetchone()[0])"
    write = "with connect(sys.argv[1], timeout_s=0.3): pass"
    with read_registry(db), read_registry(db):  # nested in one process: no wait for itself
        reader = python(f"import sys\nfrom dyntie_cli.results.db import read_registry\n{read}", db)
        assert reader.stdout.strip() == "1", reader.stderr  # readers share the lock
        writer = python(f"import sys\nfrom dyntie_cli.results.db import connect\n{write}", db)
        assert writer.returncode != 0 and f"stayed locked by pid {os.getpid()}" in writer.stderr
    assert lock_is_free(db)


# --- rows that travel with a checkpoint ----------------------------------------------------------------------


def log_step(w: RunWriter, step: int, decide_every: int = 2) -> None:
    """What one logged training step writes: metrics, a memory row, and every other step a decision."""
    w.metric(step, "train", "loss", 1.0 / step)
    w.metric(step, "train", "ppl", float("nan") if step == 3 else 2.0 * step)  # a NaN survives the trip
    w.memory(step=step, device="cpu", peak_bytes=step, current_bytes=step, param_bytes=1, grad_bytes=1,
             optimizer_bytes=1, trainable_params=10, process_peak_bytes=step)
    if step % decide_every == 0:
        decision = step // decide_every
        w.tie(decision=decision, step=step, state=[0, decision], action=[0, 1], independent_layers=2,
              distinct_block_weights=2, changed_blocks=1)
        w.decision(decision=decision, step=step, epsilon=0.5, explored=True, reward=-1.0, q_predicted=None,
                   q_target=None, td_loss=None)
        w.metric(step, "reward", "ppl", 3.0)


def started(db: Path, run_id: str) -> RunWriter:
    w = RunWriter(db, run_id=run_id, flush_every_s=3600)
    w.start("train", "gpt2", "synthetic", "dynamic", {})
    w.tie(decision=0, step=0, state=[0, 0], action=[0, 0], independent_layers=1, distinct_block_weights=1)
    return w


def tables(db: Path, run_id: str) -> dict[str, list[tuple]]:
    """Every row of a run, ordered, with NaN made comparable."""
    out = {}
    with read_registry(db) as con:
        for table, columns in ROW_COLUMNS.items():
            rows = con.execute(f"SELECT {', '.join(columns)} FROM {table} WHERE run_id = ? ORDER BY ALL",
                               [run_id]).fetchall()
            out[table] = [tuple("NaN" if isinstance(v, float) and math.isnan(v) else v for v in row)
                          for row in rows]
    return out


def reference(db: Path, steps: int) -> dict[str, list[tuple]]:
    w = started(db, "ref")
    for step in range(1, steps + 1):
        log_step(w, step)
    w.finish()
    return tables(db, "ref")


def checkpoint_rows(tmp_path: Path, w: RunWriter) -> dict:
    """What a checkpoint carries, through its file (as a resume reads it)."""
    folder = tmp_path / "checkpoint"
    folder.mkdir(exist_ok=True)
    save_registry_rows(folder, w.pending())
    return load_registry_rows(folder)


def resume_to_the_end(db: Path, run_id: str, carried: dict | None, *, at: int, steps: int) -> dict:
    """Resume a killed run from its checkpoint at step ``at``, train it to ``steps``; its rows."""
    w = RunWriter(db, flush_every_s=3600)
    w.resume(run_id)
    w.truncate_after(at, carried=carried)
    for step in range(at + 1, steps + 1):
        log_step(w, step)
    w.finish()
    return tables(db, run_id)


@pytest.mark.parametrize("flushed", [True, False], ids=["flushed-and-carried", "only-carried"])
def test_rows_carried_by_a_checkpoint_are_written_once_on_resume(tmp_path, flushed):
    db = tmp_path / "r.duckdb"
    want = reference(db, 8)
    w = started(db, "run")
    for step in range(1, 5):
        log_step(w, step)
    carried = checkpoint_rows(tmp_path, w)  # the checkpoint at step 4
    if flushed:
        assert w.flush()  # the checkpoint's flush landed before the kill, so the rows are there twice over
        for step in range(5, 7):
            log_step(w, step)  # steps after the checkpoint: the resume deletes them and logs them again
        assert w.flush()
    # the process is killed here: no finish, and without the flush, nothing but the runs row in the registry
    assert resume_to_the_end(db, "run", carried, at=4, steps=8) == want


def test_a_kill_between_the_checkpoint_and_its_flush_leaves_no_hole(tmp_path):
    db = tmp_path / "r.duckdb"
    want = reference(db, 8)
    w = started(db, "run")
    log_step(w, 1)
    log_step(w, 2)
    w.flush()  # an ordinary flush
    log_step(w, 3)
    log_step(w, 4)
    carried = checkpoint_rows(tmp_path, w)  # renamed into place; the process dies before the flush after it
    assert all(t["rows"] for t in carried["tables"].values())  # rows of every table wait
    assert resume_to_the_end(db, "run", carried, at=4, steps=8) == want


def test_carried_rows_of_another_run_or_format_are_refused(tmp_path):
    db = tmp_path / "r.duckdb"
    w = started(db, "run")
    log_step(w, 1)
    carried = w.pending()
    w.finish("killed")
    other = started(db, "other")
    other.finish("killed")
    other = RunWriter(db)
    other.resume("other")
    with pytest.raises(DyntieError, match="belong to run run, not other"):
        other.truncate_after(1, carried=carried)
    with pytest.raises(DyntieError, match="unknown format"):
        other.truncate_after(1, carried={**carried, "format": 99})
    (tmp_path / REGISTRY_ROWS).write_text('{"format": 1, "tab')
    with pytest.raises(DyntieError, match="is corrupt; delete it"):
        load_registry_rows(tmp_path)


def test_a_flush_that_fails_after_its_commit_is_not_written_twice(tmp_path, monkeypatch):
    db = tmp_path / "r.duckdb"
    w = started(db, "run")
    log_step(w, 1)
    log_step(w, 2)

    @contextlib.contextmanager
    def commit_then_fail(con):
        with transaction(con):
            yield con
        raise duckdb.IOException("the file could not be closed")  # the rows are in; the writer cannot know

    monkeypatch.setattr(writer_module, "transaction", commit_then_fail)
    with pytest.raises(duckdb.IOException):
        w.flush()
    monkeypatch.undo()
    assert w.pending_rows == 10  # kept, in case they did not land
    log_step(w, 3)
    w.finish()
    assert [row[0] for row in tables(db, "run")["memory"]] == [1, 2, 3]
    assert len(tables(db, "run")["metrics"]) == 7


def test_resume_of_a_finished_run_is_refused_and_writes_nothing(tmp_path):
    db = tmp_path / "r.duckdb"
    w = started(db, "run")
    for step in range(1, 5):
        log_step(w, step)
    w.finish()
    before = tables(db, "run"), run_row(db, "run")
    for attempt in (RunWriter(db).check_resumable, RunWriter(db).resume):  # before loading anything, and at it
        with pytest.raises(DyntieError, match=r"^Run run finished at step 4; nothing to resume"):
            attempt("ru")
    assert (tables(db, "run"), run_row(db, "run")) == before
    killed = started(db, "killed")
    killed.finish("killed")
    assert RunWriter(db).check_resumable("kil") == "killed"


def run_row(db: Path, run_id: str) -> tuple:
    with read_registry(db) as con:
        return con.execute("SELECT status, ended_at, heartbeat_at, error FROM runs WHERE run_id = ?",
                           [run_id]).fetchone()


# --- a registry held by another process ----------------------------------------------------------------------


READER = (  # a dyntie reader holding the registry until a line arrives on its stdin
    "import sys\n"
    "from dyntie_cli.results.db import read_registry\n"
    "with read_registry(sys.argv[1]):\n"
    "    print('held', flush=True)\n"
    "    sys.stdin.readline()\n"
)


@contextlib.contextmanager
def held(db: Path):
    holder = subprocess.Popen([sys.executable, "-c", READER, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        release(holder)
        holder.wait(timeout=60)


def release(holder: subprocess.Popen) -> None:
    if not holder.stdin.closed:
        holder.stdin.close()  # the holder lets go at the end of its input


def test_a_held_registry_keeps_the_rows_and_a_checkpoint_carries_them(tmp_path, monkeypatch):
    db = tmp_path / "r.duckdb"
    w = started(db, "run")
    monkeypatch.setattr(writer_module, "MAYBE_FLUSH_TIMEOUT_S", 0.1)
    with held(db):
        log_step(w, 1)
        w.flush_every_s = 0.0
        assert w.maybe_flush() is False  # training goes on
        assert w.flush(timeout_s=0.2) is False  # the checkpoint's flush does not fail the run either
        assert w.pending_rows == 4
        assert [row[1] for row in w.pending()["tables"]["memory"]["rows"]] == ["cpu"]
    assert w.flush()
    assert w.pending_rows == 0


def test_the_end_of_a_run_waits_for_a_held_registry_and_says_so_once(tmp_path):
    db = tmp_path / "r.duckdb"
    notices = []
    w = RunWriter(db, run_id="run", flush_every_s=3600, registry_wait_s=60, on_wait=notices.append)
    w.start("train", "gpt2", "synthetic", "dynamic", {})
    log_step(w, 1)
    with held(db) as holder:
        threading.Timer(1.5, release, [holder]).start()
        began = time.monotonic()
        w.finish()
        assert time.monotonic() - began >= 1.0
    assert len(notices) == 1 and f"is held by pid {holder.pid} (python" in notices[0], notices
    assert "waiting up to 60 s" in notices[0]
    assert run_row(db, "run")[0] == "finished" and len(tables(db, "run")["metrics"]) == 2


def test_a_registry_held_past_the_wait_fails_the_end_loudly_and_keeps_every_row(tmp_path):
    db = tmp_path / "r.duckdb"
    w = RunWriter(db, run_id="run", flush_every_s=3600, registry_wait_s=0.5, on_wait=lambda message: None)
    w.start("train", "gpt2", "synthetic", "dynamic", {})
    log_step(w, 1)
    log_step(w, 2)
    with held(db) as holder, pytest.raises(RegistryLockedError) as failed:
        w.finish()
    message = str(failed.value)
    assert message.startswith("Run run could not write to the registry") and f"pid {holder.pid}" in message
    assert "9 rows are kept, not written" in message
    assert w.pending_rows == 9 and not w.finished
    assert run_row(db, "run")[0] == "running"  # never "finished" over rows it has not written
    w.finish("failed", "a later outcome does not replace the first")
    assert run_row(db, "run")[0] == "finished" and len(tables(db, "run")["metrics"]) == 5


def test_a_full_buffer_makes_training_wait_for_the_registry(tmp_path):
    db = tmp_path / "r.duckdb"
    notices = []
    w = RunWriter(db, run_id="run", flush_every_s=3600, max_pending_rows=6, on_wait=notices.append)
    w.start("train", "gpt2", "synthetic", "dynamic", {})
    with held(db) as holder:
        log_step(w, 1)
        assert w.maybe_flush() is False  # room left: no wait
        threading.Timer(1.0, release, [holder]).start()
        log_step(w, 2)  # 9 rows: full
        began = time.monotonic()
        assert w.maybe_flush() is True
        assert time.monotonic() - began >= 0.5
    assert len(notices) == 1 and w.pending_rows == 0
    assert len(tables(db, "run")["metrics"]) == 5


# --- many writers and readers at once ------------------------------------------------------------------------


COMMITTING_WRITER = """
import sys
from dyntie_cli.results import db
db._MAX_BACKOFF_S = 0.005  # many tries to open: as many chances to open while another writer closes
path, writer, commits = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for commit in range(commits):
    with db.connect(path, timeout_s=600) as con, db.transaction(con):
        con.execute("INSERT INTO metrics SELECT ?, ?, 'train', 'loss', range FROM range(10)", [f"w{writer}", commit])
"""

RAW_POLLER = """
import sys, duckdb
from pathlib import Path
stop = Path(sys.argv[2])
while not stop.exists():
    try:
        con = duckdb.connect(sys.argv[1], read_only=True)  # no dyntie lock: what a user's script does
    except duckdb.Error:
        continue
    try:
        con.execute("SELECT count(*) FROM metrics").fetchone()
    except duckdb.Error:
        pass
    finally:
        con.close()
"""


@pytest.mark.slow
def test_writers_and_readers_at_once_lose_no_transaction(tmp_path):
    # Without dyntie's lock, DuckDB's header read before its own lock let a writer erase another's last
    # transaction: three such writers with a reader lost 1-4 of 900 commits in 10 of 12 tries.
    db, stop, commits = tmp_path / "shared.duckdb", tmp_path / "stop", 300
    with connect(db):
        pass
    poller = subprocess.Popen([sys.executable, "-c", RAW_POLLER, str(db), str(stop)])
    writers = [subprocess.Popen([sys.executable, "-c", COMMITTING_WRITER, str(db), str(n), str(commits)],
                                stderr=subprocess.PIPE, text=True) for n in range(3)]
    try:
        while any(w.poll() is None for w in writers):
            run_query("runs", db)  # dyntie's own reader, under its lock
    finally:
        errors = [w.communicate(timeout=600)[1] for w in writers]
        stop.touch()
        poller.wait(timeout=60)
    assert [w.returncode for w in writers] == [0, 0, 0], errors
    with read_registry(db) as con:
        landed = con.execute("SELECT run_id, step, count(*) FROM metrics GROUP BY ALL").fetchall()
    lost = {(f"w{n}", commit) for n in range(3) for commit in range(commits)} - {(r, s) for r, s, c in landed if c == 10}
    assert not lost, f"{len(lost)} committed transactions lost: {sorted(lost)[:10]}"
