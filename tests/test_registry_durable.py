"""The registry keeps every row: dyntie's own lock around DuckDB's, rows that travel with a checkpoint and are
written once on resume, and a registry held by another process that makes a run wait, never lose rows."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import duckdb

from dyntie_cli.results import db as registry
from dyntie_cli.results.db import connect, lock_path, read_registry


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
