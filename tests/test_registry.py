"""The DuckDB result registry: schema and migrations, the buffered writer, locking, report queries, rendering.

Every test uses a real DuckDB file under tmp_path; concurrency tests use real extra processes, because DuckDB's
file lock is per process and a single process never sees the conflict.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from dyntie_cli.errors import DyntieError, UsageError
from dyntie_cli.report.tables import human_bytes, render
from dyntie_cli.results import writer
from dyntie_cli.results.db import (
    SCHEMA_VERSION,
    RegistryLockedError,
    connect,
    migrate,
    resolve_db_path,
    schema_version,
)
from dyntie_cli.results.liveness import mark_stale_runs
from dyntie_cli.results.merge import merge_registries
from dyntie_cli.results.queries import QUERIES, REPORT_TABLES, run_query
from dyntie_cli.results.writer import RunWriter

EXPECTED_COLUMNS = {
    "runs": {
        "run_id", "command", "backbone", "dataset", "variant", "status", "config", "parent_run_id", "started_at",
        "ended_at", "preset", "seed", "out_dir", "pid", "host", "test_split", "error", "metric", "higher_is_better",
    },
    "metrics": {"run_id", "step", "split", "name", "value"},
    "memory": {
        "run_id", "step", "device", "peak_bytes", "current_bytes", "param_bytes", "grad_bytes", "optimizer_bytes",
        "trainable_params", "process_peak_bytes",
    },
    "ties": {
        "run_id", "decision", "step", "state", "action", "independent_layers", "distinct_block_weights",
        "changed_blocks",
    },
    "decisions": {
        "run_id", "decision", "step", "epsilon", "explored", "reward", "q_predicted", "q_target", "td_loss",
        "greedy_agreement", "q_spread", "ppl", "greedy_moves",
    },
    "schema_migrations": {"version", "name", "applied_at"},
}


def columns_of(con: duckdb.DuckDBPyConnection, table: str) -> dict[str, str]:
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = ?", [table]
    ).fetchall()
    return dict(rows)


def count(db: Path, sql: str, params: list | None = None) -> int:
    with connect(db, read_only=True) as con:
        return int(con.execute(sql, params or []).fetchone()[0])


def started_writer(db: Path, **kwargs) -> RunWriter:
    w = RunWriter(db, flush_every_s=3600, **kwargs)
    w.start("train", "gpt2", "wikitext-2", "dynamic", {"lr": 0.001})
    return w


# --- location ---------------------------------------------------------------------------------------------


def test_db_path_prefers_flag_then_env_then_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DYNTIE_DB", str(tmp_path / "env.duckdb"))
    assert resolve_db_path(str(tmp_path / "flag.duckdb")) == tmp_path / "flag.duckdb"
    assert resolve_db_path(None) == tmp_path / "env.duckdb"
    monkeypatch.delenv("DYNTIE_DB")
    assert resolve_db_path(None) == tmp_path / "dyntie.duckdb"


# --- schema and migrations --------------------------------------------------------------------------------


def test_new_registry_has_every_public_table_and_column(tmp_path):
    db = tmp_path / "sub" / "new.duckdb"  # a missing folder is created
    with connect(db) as con:
        for table, expected in EXPECTED_COLUMNS.items():
            assert expected <= set(columns_of(con, table)), table
        assert columns_of(con, "ties")["state"] == "INTEGER[]"
        assert columns_of(con, "runs")["config"] == "JSON"
        applied = con.execute("SELECT version, name FROM schema_migrations ORDER BY version").fetchall()
    assert [version for version, _ in applied] == list(range(1, SCHEMA_VERSION + 1))
    assert applied[0][1] == "create_core_tables"
    with connect(db) as con:  # reopening applies nothing twice
        assert con.execute("SELECT count(*) FROM schema_migrations").fetchone()[0] == SCHEMA_VERSION


def test_zero_byte_file_becomes_a_registry(tmp_path):
    db = tmp_path / "touched.duckdb"
    db.touch()
    with connect(db) as con:
        assert schema_version(con) == SCHEMA_VERSION


def test_oldest_schema_is_migrated_and_keeps_its_rows(tmp_path):
    db = tmp_path / "old.duckdb"
    raw = duckdb.connect(str(db))
    migrate(raw, db, target=1)
    raw.execute(
        "INSERT INTO runs (run_id, command, backbone, dataset, variant, status, config, started_at) "
        "VALUES ('old-run', 'train', 'gpt2', 'wikitext-2', 'dynamic', 'killed', '{}', now()::TIMESTAMP)"
    )
    raw.execute("INSERT INTO ties VALUES ('old-run', 1, 10, [0, 0, 2], [0, 0, 2], 2, 2)")
    raw.execute("INSERT INTO decisions VALUES ('old-run', 1, 10, 0.9, true, -1.5, 0.1, 0.2, 0.01)")
    assert "changed_blocks" not in columns_of(raw, "ties")
    raw.close()

    with connect(db) as con:
        assert schema_version(con) == SCHEMA_VERSION
        for table, expected in EXPECTED_COLUMNS.items():
            assert expected <= set(columns_of(con, table)), table
        assert con.execute("SELECT preset, test_split FROM runs").fetchall() == [(None, None)]
    tie = run_query("ties", db, ["old-run"]).iloc[0]
    assert list(tie.state) == [0, 0, 2] and pd.isna(tie.changed_blocks)
    assert run_query("decisions", db, ["old-run"]).iloc[0].reward == -1.5
    assert run_query("ppl", db, ["old-run"]).test_split.tolist() == ["test"]  # NULL in old rows means 'test'
    # The upgraded file takes new rows like any other.
    w = RunWriter(db, flush_every_s=3600)
    w.resume("old-run")
    w.tie(decision=2, step=20, state=[0, 1, 2], action=[0, 1, 0], independent_layers=3,
          distinct_block_weights=3, changed_blocks=1)
    w.finish()
    assert run_query("ties", db, ["old-run"]).changed_blocks.tolist()[1] == 1


def test_runs_recorded_before_the_headline_column_get_the_metric_reports_judged_them_by(tmp_path):
    db = tmp_path / "old.duckdb"
    raw = duckdb.connect(str(db))
    migrate(raw, db, target=1)
    logged = {  # run -> its validation and test metric names
        "lm": (["loss", "ppl"], ["loss", "ppl"]),
        "cola": (["loss", "ppl", "accuracy", "mcc"], ["loss", "ppl", "accuracy", "mcc"]),
        "mrpc": (["loss", "ppl", "accuracy", "f1"], ["loss", "ppl", "accuracy", "f1"]),
        "stsb": (["loss", "ppl", "pearson", "spearman"], ["loss", "ppl", "pearson", "spearman"]),
        "test-first": (["accuracy", "ppl"], ["ppl"]),  # a name of the final test row wins
        "never-evaluated": ([], []),
    }
    for run_id, splits in logged.items():
        raw.execute("INSERT INTO runs (run_id, backbone, status) VALUES (?, 'x', 'finished')", [run_id])
        for split, names in zip(("validation", "test"), splits, strict=True):
            for name in names:
                raw.execute("INSERT INTO metrics VALUES (?, 10, ?, ?, 1.0)", [run_id, split, name])
        raw.execute("INSERT INTO metrics VALUES (?, 10, 'train', 'mcc', 1.0)", [run_id])  # training rows: no say
    raw.close()
    with connect(db) as con:
        recorded = dict(con.execute("SELECT run_id, (metric, higher_is_better) FROM runs").fetchall())
    assert recorded == {"lm": ("ppl", False), "cola": ("mcc", True), "mrpc": ("accuracy", True),
                        "stsb": ("ppl", False), "test-first": ("ppl", False), "never-evaluated": (None, None)}


def test_a_run_records_its_headline_and_a_resume_fills_one_recorded_without(tmp_path):
    db = tmp_path / "r.duckdb"
    w = RunWriter(db, run_id="new", flush_every_s=3600)
    w.start("finetune", "glue", "cola", "dynamic", {}, headline=("mcc", True))
    w.finish("killed")  # a finished run is never resumed
    with connect(db) as con:
        con.execute("INSERT INTO runs (run_id, status) VALUES ('earlier', 'killed')")
    for run_id, headline in (("earlier", ("accuracy", True)), ("new", ("ppl", False))):
        again = RunWriter(db, flush_every_s=3600)
        again.resume(run_id, headline=headline)
        again.finish()
    # a run keeps the metric it started with; one recorded without gets the resuming backbone's
    assert count(db, "SELECT count(*) FROM runs WHERE run_id = 'new' AND metric = 'mcc' AND higher_is_better") == 1
    assert count(db, "SELECT count(*) FROM runs WHERE run_id = 'earlier' AND metric = 'accuracy'") == 1


def test_read_only_open_of_a_missing_registry_explains_and_creates_nothing(tmp_path):
    db = tmp_path / "missing.duckdb"
    with pytest.raises(DyntieError, match="No dyntie registry exists at .*--db"), connect(db, read_only=True):
        pass
    with pytest.raises(DyntieError, match="No dyntie registry"):
        run_query("runs", db)
    assert not db.exists()


def test_corrupt_file_is_refused_and_left_untouched(tmp_path):
    db = tmp_path / "notes.duckdb"
    content = b"these are my notes, not a database\n" * 200
    db.write_bytes(content)
    for attempt in (
        lambda: connect(db).__enter__(),
        lambda: connect(db, read_only=True).__enter__(),
        lambda: run_query("runs", db),
        lambda: started_writer(db),
    ):
        with pytest.raises(DyntieError, match=r"is not a DuckDB file; pass --db with another path\."):
            attempt()
    assert db.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.duckdb"]


def test_foreign_duckdb_and_newer_schema_are_refused(tmp_path):
    foreign = tmp_path / "foreign.duckdb"
    raw = duckdb.connect(str(foreign))
    raw.execute("CREATE TABLE sales (x INTEGER)")
    raw.close()
    with pytest.raises(DyntieError, match="not a dyntie registry"), connect(foreign):
        pass
    raw = duckdb.connect(str(foreign))
    assert [row[0] for row in raw.execute("SHOW TABLES").fetchall()] == ["sales"]
    raw.close()

    newer = tmp_path / "newer.duckdb"
    with connect(newer) as con:
        con.execute("INSERT INTO schema_migrations VALUES (99, 'from_the_future', now()::TIMESTAMP)")
    with pytest.raises(DyntieError, match="newer dyntie"):
        run_query("runs", newer)


def test_unwritable_location_names_the_fix(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(DyntieError, match="pass --db with a writable path"):
        started_writer(blocker / "dyntie.duckdb")


# --- the writer ---------------------------------------------------------------------------------------------


def test_every_writer_method_round_trips(tmp_path):
    db = tmp_path / "r.duckdb"
    w = RunWriter(db, flush_every_s=3600)
    run_id = w.start(
        "ablate", "gpt2", "wikitext-2", "final-arch", {"lr": 0.001, "out": Path("/x")}, parent_run_id="gpt2-parent",
        preset="gpt2-tiny", seed=7, out_dir=tmp_path / "out", test_split="validation",
    )
    assert run_id == w.run_id
    assert re.fullmatch(r"gpt2-\d{8}-\d{6}-[0-9a-f]{4}", run_id)
    w.metric(3, "train", "loss", 2.5)
    w.metric(4, "train", "loss", float("nan"))  # a diverged loss stays NaN, not NULL
    w.memory(step=3, device="cuda:0", peak_bytes=2**40, current_bytes=5, param_bytes=6, grad_bytes=7,
             optimizer_bytes=8, trainable_params=9, process_peak_bytes=2**41)
    w.tie(decision=1, step=10, state=[0, 0, 2], action=(0, 0, 2), independent_layers=2,
          distinct_block_weights=2, changed_blocks=1)
    w.decision(decision=1, step=10, epsilon=0.95, explored=True, reward=-3.5, q_predicted=0.25, q_target=0.5,
               td_loss=0.0625, greedy_agreement=0.75, q_spread=0.125, ppl=33.0)
    w.decision(decision=2, step=20, epsilon=0.9, explored=False, reward=-3.0, q_predicted=None, q_target=None,
               td_loss=None)
    w.finish()

    with connect(db, read_only=True) as con:
        run = con.execute("SELECT * FROM runs").df().iloc[0]
        metrics = con.execute("SELECT step, split, name, value FROM metrics ORDER BY step").fetchall()
        mem = con.execute("SELECT * EXCLUDE (run_id) FROM memory").fetchall()
        tie = con.execute("SELECT * EXCLUDE (run_id) FROM ties").fetchall()
        dec = con.execute(
            "SELECT decision, step, epsilon, explored, reward, q_predicted, q_target, td_loss, greedy_agreement, "
            "q_spread, ppl FROM decisions ORDER BY decision"
        ).fetchall()
    assert (run.command, run.backbone, run.dataset, run.variant, run.status) == (
        "ablate", "gpt2", "wikitext-2", "final-arch", "finished")
    assert json.loads(run.config) == {"lr": 0.001, "out": "/x"}
    assert (run.parent_run_id, run.preset, run.seed, run.out_dir) == ("gpt2-parent", "gpt2-tiny", 7, str(tmp_path / "out"))
    assert (run.pid, run.host, run.test_split) == (os.getpid(), socket.gethostname(), "validation")
    assert pd.notna(run.started_at) and run.ended_at >= run.started_at and pd.isna(run.error)
    assert metrics[0] == (3, "train", "loss", 2.5) and math.isnan(metrics[1][3])
    assert mem == [(3, "cuda:0", 2**40, 5, 6, 7, 8, 9, 2**41)]
    assert tie == [(1, 10, [0, 0, 2], [0, 0, 2], 2, 2, 1)]
    assert dec == [
        (1, 10, 0.95, True, -3.5, 0.25, 0.5, 0.0625, 0.75, 0.125, 33.0),
        (2, 20, 0.9, False, -3.0, None, None, None, None, None, None),
    ]


def test_rows_are_buffered_until_flush(tmp_path):
    db = tmp_path / "r.duckdb"
    w = started_writer(db)
    assert count(db, "SELECT count(*) FROM runs WHERE status = 'running'") == 1  # start() writes at once
    w.metric(1, "train", "loss", 1.0)
    w.tie(decision=1, step=1, state=[0, 0], action=[0, 0], independent_layers=1, distinct_block_weights=1)
    assert w.pending_rows == 2
    assert count(db, "SELECT count(*) FROM metrics") == 0
    assert w.maybe_flush() is False  # the interval has not passed
    w.flush_every_s = 0.0
    assert w.maybe_flush() is True
    assert w.pending_rows == 0
    assert count(db, "SELECT count(*) FROM metrics") == 1 and count(db, "SELECT count(*) FROM ties") == 1


def test_file_is_not_held_open_between_flushes(tmp_path):
    db = tmp_path / "r.duckdb"
    w = started_writer(db)
    w.metric(1, "train", "loss", 1.0)  # unflushed
    code = (
        "import duckdb, sys\n"
        "con = duckdb.connect(sys.argv[1])\n"  # a writing open: the strictest, needs no other holder at all
        "print(con.execute('SELECT count(*) FROM runs').fetchone()[0], "
        "con.execute('SELECT count(*) FROM metrics').fetchone()[0])\n"
    )
    other = subprocess.run(
        [sys.executable, "-c", code, str(db)], check=False, capture_output=True, text=True, timeout=60
    )
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == ["1", "0"]
    w.finish()
    assert count(db, "SELECT count(*) FROM metrics") == 1


HOLD_LOCK = (  # holds the registry open for writing until a line arrives on its stdin
    "import duckdb, sys\n"
    "con = duckdb.connect(sys.argv[1])\n"
    "print('held', flush=True)\n"
    "sys.stdin.readline()\n"
    "con.close()\n"
)


def test_locked_file_is_waited_for_and_maybe_flush_defers(tmp_path, monkeypatch):
    db = tmp_path / "r.duckdb"
    w = started_writer(db)
    w.metric(1, "train", "loss", 1.0)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(db)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    release = threading.Timer(0.5, lambda: (holder.stdin.write("\n"), holder.stdin.flush()))
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RegistryLockedError, match=rf"stayed locked by pid {holder.pid} \(python") as locked, \
                connect(db, timeout_s=0.2):
            pass
        assert "https" not in str(locked.value)  # the holder is named, not DuckDB's advice cut at a colon
        monkeypatch.setattr(writer, "MAYBE_FLUSH_TIMEOUT_S", 0.1)
        w.flush_every_s = 0.0
        assert w.maybe_flush() is False  # training goes on; the row waits
        assert w.pending_rows == 1
        began = time.monotonic()
        release.start()
        w.flush()  # waits for the holder to let go
        assert time.monotonic() - began >= 0.4
    finally:
        release.cancel()
        if release.is_alive():
            release.join()
        holder.stdin.close()  # the holder lets go at the end of its input, if it has not already
        holder.wait(timeout=30)
    assert w.pending_rows == 0
    assert count(db, "SELECT count(*) FROM metrics") == 1


CONCURRENT_WRITER = """
import sys, time
from dyntie_cli.results.writer import RunWriter
db, run_id, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
w = RunWriter(db, run_id=run_id, flush_every_s=0.03)
w.start("train", "gpt2", "synthetic", "dynamic", {"rows": rows})
for step in range(rows):
    w.metric(step, "train", "loss", step / 10)
    w.memory(step=step, device="cpu", peak_bytes=step, current_bytes=step, param_bytes=1, grad_bytes=1,
             optimizer_bytes=1, trainable_params=10)
    if step % 20 == 0:
        w.tie(decision=step // 20, step=step, state=[0, 1], action=[0, 1], independent_layers=2,
              distinct_block_weights=2, changed_blocks=0)
        w.decision(decision=step // 20, step=step, epsilon=0.5, explored=False, reward=-1.0, q_predicted=0.0,
                   q_target=0.0, td_loss=0.0)
    w.maybe_flush()
    time.sleep(0.002)
w.finish()
"""


def test_two_writers_and_a_reader_share_one_file_without_losing_rows(tmp_path):
    db = tmp_path / "shared.duckdb"
    with connect(db):
        pass
    rows = 200
    procs = [
        subprocess.Popen([sys.executable, "-c", CONCURRENT_WRITER, str(db), run_id, str(rows)],
                         stderr=subprocess.PIPE, text=True)
        for run_id in ("writer-a", "writer-b")
    ]
    reads = 0
    try:
        while any(proc.poll() is None for proc in procs):
            for query in ("runs", "paper", "layers"):
                run_query(query, db)  # must never fail while the writers run
                reads += 1
    finally:
        errors = [proc.communicate(timeout=60)[1] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], errors
    assert reads > 0
    for run_id in ("writer-a", "writer-b"):
        for table, expected in (("metrics", rows), ("memory", rows), ("ties", rows // 20), ("decisions", rows // 20)):
            assert count(db, f"SELECT count(*) FROM {table} WHERE run_id = ?", [run_id]) == expected, table
        assert count(db, "SELECT count(DISTINCT step) FROM metrics WHERE run_id = ?", [run_id]) == rows
    assert set(run_query("runs", db).status) == {"finished"}


def test_resume_keeps_rows_and_truncate_drops_steps_after_the_checkpoint(tmp_path):
    db = tmp_path / "r.duckdb"
    first = started_writer(db, run_id="gpt2-resumable")
    for step in range(11):
        first.metric(step, "train", "loss", float(step))
        first.memory(step=step, device="cpu", peak_bytes=1, current_bytes=1, param_bytes=1, grad_bytes=1,
                     optimizer_bytes=1, trainable_params=1)
    first.tie(decision=1, step=4, state=[0, 0], action=[0, 0], independent_layers=1, distinct_block_weights=1)
    first.tie(decision=2, step=8, state=[0, 1], action=[0, 1], independent_layers=2, distinct_block_weights=2)
    first.decision(decision=2, step=8, epsilon=0.5, explored=True, reward=-1.0, q_predicted=0.0, q_target=0.0,
                   td_loss=0.0)
    first.finish("killed")

    second = RunWriter(db, flush_every_s=3600)
    assert second.resume("gpt2-res") == "gpt2-resumable"  # a unique prefix is enough
    status, ended = run_query("runs", db).iloc[0][["status", "ended_at"]]
    assert status == "running" and pd.isna(ended)
    assert second.truncate_after(5) == 5 + 5 + 1 + 1
    for step in range(6, 11):
        second.metric(step, "train", "loss", float(step))
    second.finish()

    assert count(db, "SELECT count(*) FROM metrics") == 11
    assert count(db, "SELECT count(DISTINCT step) FROM metrics") == 11
    assert count(db, "SELECT count(*) FROM memory") == 6
    assert count(db, "SELECT count(*) FROM ties") == 1 and count(db, "SELECT count(*) FROM decisions") == 0
    assert run_query("runs", db).status.tolist() == ["finished"]
    with pytest.raises(DyntieError, match="No run 'nope'"):
        RunWriter(db).resume("nope")


def test_run_ids_are_unique(tmp_path, monkeypatch):
    db = tmp_path / "r.duckdb"
    started_writer(db, run_id="taken").finish()
    with pytest.raises(DyntieError, match="already exists"):
        started_writer(db, run_id="taken")
    drawn = iter(["taken", "fresh"])
    monkeypatch.setattr(writer, "new_run_id", lambda backbone: next(drawn))
    assert started_writer(db).run_id == "fresh"  # a generated id that collides is drawn again


def test_first_final_status_wins_and_late_rows_are_dropped(tmp_path):
    db = tmp_path / "r.duckdb"
    w = started_writer(db)
    w.finish("killed")
    w.finish("failed", "KeyboardInterrupt")
    w.metric(1, "train", "loss", 1.0)
    assert w.dropped_rows == 1
    assert run_query("runs", db).status.tolist() == ["killed"]
    with pytest.raises(ValueError, match="status must be one of"):
        w.finish("done")


def test_finish_from_a_signal_handler_during_a_flush_loses_nothing(tmp_path, monkeypatch):
    db = tmp_path / "r.duckdb"
    w = started_writer(db)
    w.metric(1, "train", "loss", 1.0)
    insert_rows = w._insert_rows

    def interrupted(con, table, rows):
        # What a SIGTERM handler calling finish('killed') looks like from inside a flush.
        if table == "metrics":
            w.finish("killed")
        insert_rows(con, table, rows)

    monkeypatch.setattr(w, "_insert_rows", interrupted)
    w.flush()
    assert w.finished
    assert run_query("runs", db).status.tolist() == ["killed"]
    assert count(db, "SELECT count(*) FROM metrics") == 1


def test_context_manager_records_a_failure(tmp_path):
    db = tmp_path / "r.duckdb"
    with pytest.raises(RuntimeError), RunWriter(db) as w:
        w.start("train", "gpt2", "wikitext-2", "dynamic", {})
        w.metric(1, "train", "loss", 1.0)
        raise RuntimeError("out of memory")
    row = run_query("runs", db).iloc[0]
    assert (row.status, row.error) == ("failed", "RuntimeError: out of memory")
    assert count(db, "SELECT count(*) FROM metrics") == 1


def test_runs_of_dead_processes_are_marked_killed(tmp_path):
    db = tmp_path / "r.duckdb"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    processes = (("dead", dead.pid, socket.gethostname()), ("alive", os.getpid(), socket.gethostname()),
                 ("elsewhere", dead.pid, "another-host"))
    for run_id, _, _ in processes:
        started_writer(db, run_id=run_id)
    with connect(db) as con:
        for run_id, pid, host in processes:
            con.execute("UPDATE runs SET pid = ?, host = ? WHERE run_id = ?", [pid, host, run_id])
    with connect(db) as con:
        heartbeat = con.execute("SELECT heartbeat_at FROM runs WHERE run_id = 'dead'").fetchone()[0]
    before = db.read_bytes()
    table = run_query("runs", db).set_index("run_id")  # reads show the dead run as killed...
    assert table.loc["dead", "status"] == "killed" and "ended without finishing" in table.loc["dead", "error"]
    assert table.loc["dead", "ended_at"] == heartbeat
    assert table.loc["alive", "status"] == "running" and table.loc["elsewhere", "status"] == "running"
    assert pd.isna(table.loc["alive", "ended_at"])
    assert db.read_bytes() == before  # ... without writing
    with connect(db) as con:
        assert con.execute("SELECT status FROM runs WHERE run_id = 'dead'").fetchone()[0] == "running"
    # the next run that starts marks it, and says which it marked
    w = RunWriter(db, flush_every_s=3600, backbone="gpt2")
    w.start("train", "gpt2", "wikitext-2", "dynamic", {})
    assert w.marked_stale == ["dead"]
    w.finish()
    with connect(db) as con:
        assert con.execute("SELECT status FROM runs WHERE run_id = 'dead'").fetchone()[0] == "killed"
        assert mark_stale_runs(con) == []


def test_a_run_whose_process_lives_on_this_host_is_neither_resumed_nor_merged(tmp_path):
    db = tmp_path / "r.duckdb"
    started_writer(db, run_id="live")
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as other:
        try:
            with connect(db) as con:
                con.execute("UPDATE runs SET pid = ? WHERE run_id = 'live'", [other.pid])
            with pytest.raises(DyntieError, match="still running"):
                RunWriter(db, flush_every_s=3600).resume("live")
            with pytest.raises(DyntieError, match="still training"):
                merge_registries([db], tmp_path / "merged.duckdb")
        finally:
            other.kill()
    resumed = RunWriter(db, flush_every_s=3600)
    resumed.resume("live")  # once its process has ended, both work
    resumed.finish()
    assert merge_registries([db], tmp_path / "merged.duckdb").copied == ["live"]


# --- report queries on a synthetic registry ---------------------------------------------------------------

# Run "dyn": 4 blocks, 50 always-trained parameters + 10 per independent block, decisions at steps 10/20/30.
DYN_STATES = [(10, [0, 0, 2, 2], 2), (20, [0, 1, 2, 0], 3), (30, [0, 0, 0, 3], 2)]
DYN_MEMORY = [(5, 60, 1000), (15, 70, 3000), (25, 80, 2000), (35, 70, 4000)]  # step, trainable, peak bytes


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    db = tmp_path_factory.mktemp("registry") / "synthetic.duckdb"
    dyn = RunWriter(db, run_id="dyn", flush_every_s=3600)
    dyn.start("train", "gpt2", "wikitext-2", "dynamic", {"k": 10}, headline=("ppl", False))
    for decision, (step, state, independent) in enumerate(DYN_STATES, start=1):
        # The last decision's weights collapsed: distinct storages disagree with the state.
        distinct = 1 if decision == 3 else independent
        dyn.tie(decision=decision, step=step, state=state, action=state, independent_layers=independent,
                distinct_block_weights=distinct, changed_blocks=decision)
        dyn.decision(decision=decision, step=step, epsilon=0.9, explored=True, reward=-float(decision),
                     q_predicted=0.5, q_target=1.0, td_loss=0.25)
        dyn.metric(step, "train", "tokens_per_s", 100.0 * decision)
        dyn.metric(step, "train", "agent_time_s", float(decision))
    for step, trainable, peak in DYN_MEMORY:
        dyn.memory(step=step, device="cpu", peak_bytes=peak, current_bytes=peak // 2, param_bytes=4 * trainable,
                   grad_bytes=4 * trainable, optimizer_bytes=8 * trainable, trainable_params=trainable)
    for step, value in ((10, 50.0), (20, 40.0), (30, 45.0)):
        dyn.metric(step, "validation", "ppl", value)
        dyn.metric(step, "validation", "loss", math.log(value))
    dyn.metric(35, "test", "ppl", 42.0)
    dyn.finish()

    base = RunWriter(db, run_id="base", flush_every_s=3600)
    base.start("ablate", "gpt2", "wikitext-2", "no-tying", {}, parent_run_id="dyn", headline=("ppl", False))
    for step, _, _ in DYN_MEMORY:
        base.memory(step=step, device="cpu", peak_bytes=8000, current_bytes=4000, param_bytes=360, grad_bytes=360,
                    optimizer_bytes=720, trainable_params=90)
    base.metric(10, "validation", "ppl", 48.0)
    base.metric(30, "validation", "ppl", 44.0)
    base.metric(35, "test", "ppl", 43.0)
    base.metric(10, "train", "tokens_per_s", 400.0)
    base.finish()

    glue = RunWriter(db, run_id="glue-rte", flush_every_s=3600)
    glue.start("finetune", "bert", "rte", "dynamic", {}, test_split="validation", headline=("accuracy", True))
    glue.metric(10, "validation", "accuracy", 0.6)
    glue.metric(20, "validation", "accuracy", 0.7)
    glue.metric(30, "validation", "accuracy", 0.65)
    glue.metric(30, "validation", "loss", 0.5)
    glue.metric(30, "test", "accuracy", 0.65)
    glue.finish()
    return db


def test_runs_lists_most_recent_first_and_accepts_prefixes(registry):
    assert run_query("runs", registry).run_id.tolist() == ["glue-rte", "base", "dyn"]
    table = run_query("runs", registry, ["dy", "glue"])
    assert table.run_id.tolist() == ["dyn", "glue-rte"]  # the order asked for
    assert table.last_logged_step.tolist() == [35, 30]
    assert table.status.tolist() == ["finished", "finished"]


def test_unknown_or_ambiguous_run_ids_name_the_fix(registry, tmp_path):
    with pytest.raises(DyntieError, match=r"No run 'nope' in .*synthetic\.duckdb; `dyntie report --table runs`"):
        run_query("ppl", registry, ["nope"])
    with connect(tmp_path / "x.duckdb") as con:
        con.execute("INSERT INTO runs (run_id, status) VALUES ('ab-1', 'finished'), ('ab-2', 'finished')")
    with pytest.raises(DyntieError, match="matches 2 runs"):
        run_query("runs", tmp_path / "x.duckdb", ["ab"])
    with pytest.raises(UsageError, match="No report table 'nope'"):
        run_query("nope", registry)


def test_ppl_reports_final_validation_and_test_with_the_split(registry):
    table = run_query("ppl", registry, ["dyn", "base", "glue-rte"]).set_index("run_id")
    dyn = table.loc["dyn"]
    assert (dyn.metric, dyn.validation, dyn.validation_step, dyn.best_validation) == ("ppl", 45.0, 30, 40.0)
    assert (dyn.test, dyn.test_step, dyn.test_split) == (42.0, 35, "test")
    assert (table.loc["base", "validation"], table.loc["base", "test"]) == (44.0, 43.0)
    glue = table.loc["glue-rte"]
    assert (glue.metric, glue.validation, glue.best_validation) == ("accuracy", 0.65, 0.7)
    assert (glue.test, glue.test_split) == (0.65, "validation")


def test_params_mean_end_max_and_conventional(registry):
    table = run_query("params", registry, ["dyn", "base"]).set_index("run_id")
    dyn = table.loc["dyn"]
    assert (dyn.trainable_params_mean, dyn.trainable_params_end, dyn.trainable_params_max) == (70.0, 70, 80)
    # Fitted from the history: 50 shared + 10 per block, at all 4 blocks.
    assert dyn.trainable_params_conventional == 90.0
    assert dyn.reduction_mean == pytest.approx(90 / 70)
    base = table.loc["base"]
    assert (base.trainable_params_mean, base.trainable_params_conventional) == (90.0, 90.0)


def test_layers_means_ends_and_per_layer_counts(registry):
    table = run_query("layers", registry, ["dyn", "base"]).set_index("run_id")
    dyn = table.loc["dyn"]
    assert dyn.decisions == 3 and dyn.layers == 4
    assert dyn.independent_layers_mean == pytest.approx(7 / 3)
    assert dyn.independent_layers_end == 2 and dyn.distinct_block_weights_end == 1
    assert dyn.weight_mismatches == 1 and dyn.changed_blocks_mean == 2.0
    assert dyn.independent_decisions_per_layer == [3, 1, 2, 1]
    assert pd.isna(table.loc["base", "independent_layers_mean"])  # no decisions: nothing invented
    counts = run_query("layer-counts", registry, ["dyn"])
    assert counts.layer.tolist() == [0, 1, 2, 3]
    assert counts.independent_fraction.tolist() == pytest.approx([1, 1 / 3, 2 / 3, 1 / 3])


def test_memory_peak_and_average(registry):
    dyn = run_query("memory", registry, ["dyn"]).iloc[0]
    assert (dyn.device, dyn.samples, dyn.training_peak_bytes, dyn.avg_training_peak_bytes) == ("cpu", 4, 4000, 2500.0)
    assert (dyn.param_bytes_mean, dyn.param_bytes_peak) == (280.0, 320)
    assert (dyn.optimizer_bytes_mean, dyn.optimizer_bytes_peak) == (560.0, 640)
    assert dyn.training_state_bytes_peak == 1280


def test_ties_and_decisions_return_the_rows(registry):
    tie_rows = run_query("ties", registry, ["dyn"])
    assert [list(state) for state in tie_rows.state] == [state for _, state, _ in DYN_STATES]
    assert tie_rows.step.tolist() == [10, 20, 30]
    dec = run_query("decisions", registry, ["dyn"])
    assert dec.reward.tolist() == [-1.0, -2.0, -3.0] and dec.td_loss.tolist() == [0.25] * 3
    assert run_query("ties", registry, ["base"]).empty


def test_paper_table_has_one_column_per_run(registry):
    table = run_query("paper", registry, ["dyn", "base"]).set_index("quantity")
    assert table.columns.tolist() == ["dyn", "base"]
    assert table.loc["variant"].tolist() == ["dynamic", "no-tying"]
    assert table.loc["metric"].tolist() == ["ppl (test)", "ppl (test)"]
    assert table.loc["result"].tolist() == [42.0, 43.0]
    assert table.loc["trainable_params_conventional"].tolist() == [90.0, 90.0]
    assert table.loc["trainable_params_mean"].tolist() == [70.0, 90.0]
    assert table.loc["trainable_params_end"].tolist() == [70, 90]
    assert table.loc["independent_layers_mean", "dyn"] == pytest.approx(7 / 3)
    assert table.loc["independent_layers_end"].tolist() == [2, None]
    assert table.loc["training_peak_bytes"].tolist() == [4000, 8000]
    assert table.loc["avg_memory_bytes"].tolist() == [1250.0, 4000.0]  # mean of current_bytes
    glue = run_query("paper", registry, ["glue-rte"]).set_index("quantity")["glue-rte"]
    assert (glue["metric"], glue["result"]) == ("accuracy (validation)", 0.65)


def test_compare_gives_ratios_to_the_first_run(registry):
    table = run_query("compare", registry, ["dyn", "base"]).set_index("quantity")
    ratio = table["base / dyn"]
    assert ratio["result"] == pytest.approx(43 / 42)
    assert ratio["trainable_params_mean"] == pytest.approx(90 / 70)
    assert ratio["training_peak_bytes"] == 2.0
    assert ratio["tokens_per_s"] == 2.0  # 400 vs the median of 100, 200, 300 (no step times logged)
    assert table.loc["agent_time_s", "dyn"] == 3.0  # cumulative: the last value
    assert ratio["variant"] is None


# --- rendering ----------------------------------------------------------------------------------------------


def test_render_json_and_csv_keep_raw_values(registry):
    table = run_query("memory", registry, ["dyn", "base"])
    records = json.loads(render(table, "json"))
    assert [r["run_id"] for r in records] == ["dyn", "base"]
    assert records[0]["training_peak_bytes"] == 4000 and records[0]["avg_training_peak_bytes"] == 2500.0
    assert records[1]["param_bytes_mean"] == 360.0
    parsed = list(csv.DictReader(io.StringIO(render(table, "csv"))))
    assert list(parsed[0]) == table.columns.tolist()
    for row, (_, expected) in zip(parsed, table.iterrows(), strict=True):
        assert row["run_id"] == expected.run_id
        for column in ("training_peak_bytes", "avg_training_peak_bytes", "param_bytes_mean", "training_state_bytes_peak"):
            assert float(row[column]) == expected[column]
    ties = run_query("ties", registry, ["dyn"])
    assert json.loads(render(ties, "json"))[0]["state"] == [0, 0, 2, 2]
    assert next(csv.DictReader(io.StringIO(render(ties, "csv"))))["state"] == "[0, 0, 2, 2]"
    missing = json.loads(render(run_query("layers", registry, ["base"]), "json"))[0]
    assert missing["independent_layers_mean"] is None  # NaN becomes null: valid JSON


def test_render_table_and_markdown_are_for_people(registry):
    table = run_query("memory", registry, ["dyn", "base"])
    markdown = render(table, "markdown", title="Memory").splitlines()
    assert markdown[0] == "### Memory"
    assert markdown[2].startswith("| run_id | status | variant |")
    assert markdown[3].startswith("|---|---|---|---|---:|---|---:|")  # no process peak in these rows: text column
    assert len(markdown) == 4 + 2
    cells = [cell.strip() for cell in markdown[4].strip("|").split("|")]
    assert cells[:7] == ["dyn", "finished", "dynamic", "cpu", "4", "-", "3.9 KiB"]
    rich_text = render(table, "table", title="Memory")
    assert "Memory" in rich_text and "7.8 KiB" in rich_text and "dynamic" in rich_text
    assert "…" not in rich_text and "4000" not in rich_text
    paper_text = render(run_query("compare", registry, ["dyn", "base"]), "markdown")
    peak = next(line for line in paper_text.splitlines() if line.startswith("| training_peak_bytes"))
    assert [cell.strip() for cell in peak.strip("|").split("|")] == ["training_peak_bytes", "3.9 KiB", "7.8 KiB", "2x"]
    assert "| a \\| b |" in render(pd.DataFrame({"x": ["a | b"]}), "markdown")


def left_out(text: str) -> set[str]:
    """The columns a fitted table names below itself as not shown."""
    text = text.replace("\n", " ")
    if "every digit): " not in text:
        return set()
    return {name.strip() for name in text.split("every digit): ", 1)[1].split(",")}


def test_a_narrow_terminal_drops_other_columns_before_the_headline_ones():
    wide = "x" * 12
    table = pd.DataFrame({"run_id": ["r1"], **{f"col_{i}": [wide] for i in range(6)}, "a / b": [0.5],
                          "last": [wide]})
    text = render(table, "table", width=60, headline=("last", "* / *"))
    assert left_out(text) == {"col_1", "col_2", "col_3", "col_4", "col_5"}  # col_0 fits beside the headline
    assert "0.5x" in text and max(len(line) for line in text.splitlines()) <= 60
    # headline columns wider than the terminal are all shown, every character of them
    squeezed = render(table, "table", width=30, headline=("last", "* / *"))
    assert left_out(squeezed) == {f"col_{i}" for i in range(6)}
    assert wide in squeezed and "0.5x" in squeezed and "…" not in squeezed
    # a table from run_query carries its own headline: the one render falls back on
    table.attrs["headline"] = ("col_5",)
    assert "col_5" not in left_out(render(table, "table", width=40))


@pytest.mark.parametrize("name", [name for name in REPORT_TABLES if name != "evidence"])  # evidence: test_report
def test_each_report_table_keeps_its_headline_columns_at_80_columns(registry, name):
    table = run_query(name, registry, ["dyn", "base", "glue-rte"])
    headline = QUERIES[name].headline
    assert table.attrs["headline"] == headline
    if name not in ("paper", "bench"):  # transposed: one column per run, ratios named after them
        assert set(headline) <= set(table.columns), name
    text = render(table, "table", title=name, width=80)
    kept = [str(c) for c in table.columns if any(fnmatch.fnmatchcase(str(c), h) for h in headline)]
    assert not left_out(text) & {str(table.columns[0]), *kept}, name


def test_render_rejects_unknown_formats_and_humanises_bytes():
    with pytest.raises(ValueError, match="format must be one of"):
        render(pd.DataFrame({"x": [1]}), "xml")
    assert [human_bytes(n) for n in (512, 1536, 3 * 1024**3)] == ["512 B", "1.5 KiB", "3.0 GiB"]


def test_compare_speed_ratios_are_reciprocal_when_step_times_vary(tmp_path):
    """A run slowed down for half its intervals (another job on the machine) beside a steady one: means of the
    logged per-interval values would give tokens/s 0.55x and step time 0.60x, both "slower" and "faster" at
    once; the compare table's figures come from one median step time, so the ratios are exact reciprocals."""
    db = tmp_path / "speed.duckdb"
    tokens = 1024
    for run_id, times in (("busy", [0.1, 0.1, 0.1, 1.0, 1.0, 1.0]), ("steady", [0.33] * 6)):
        w = RunWriter(db, run_id=run_id, flush_every_s=3600)
        w.start("train", "gpt2", "wikitext-2", "dynamic", {})
        for i, t in enumerate(times, start=1):
            w.metric(10 * i, "train", "step_time_s", t)
            w.metric(10 * i, "train", "tokens_per_s", tokens / t)
        w.finish()
    table = run_query("compare", db, ["busy", "steady"]).set_index("quantity")
    ratio = table["steady / busy"]
    assert table.loc["step_time_s", "busy"] == pytest.approx(0.55)  # the median of the intervals
    assert table.loc["tokens_per_s", "busy"] == pytest.approx(tokens / 0.55)
    assert ratio["tokens_per_s"] * ratio["step_time_s"] == pytest.approx(1.0)


def test_an_open_error_keeps_the_os_reason_and_any_url_whole():
    from dyntie_cli.results.db import _reason

    assert _reason('IO Error: Cannot open file "/x/r.duckdb": Permission denied') == "Permission denied"
    see = "IO Error: Could not set lock on file: see https://duckdb.org/docs/stable/connect/concurrency"
    assert _reason(see) == "see https://duckdb.org/docs/stable/connect/concurrency"
