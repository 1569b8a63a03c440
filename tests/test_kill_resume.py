"""A run killed anywhere (SIGKILL: nothing of the process survives but its files) and resumed, as often as it takes,
ends with the registry an uninterrupted run writes: every table equal, no hole, no duplicate.

The processes die at named points (``dyntie_cli.kill_points``: inside the checkpoint step, inside a flush's
transaction, after a training step), also while another process holds the registry. The quick tests fork this
test process for each command (the CLI runs in the child, which inherits the imported libraries, so a command
costs the training, not the imports); the slow one starts real ``python -m dyntie_cli`` processes and also kills
them from outside at random moments.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import duckdb
import pytest

from dyntie_cli.results.db import lock_path

STEPS = 30
#: a decision every 5 steps (each rewarded by the 5 training batches that follow it, so one is pending at every
#: checkpoint), a checkpoint at every validation (steps 10 and 20) and at the end; rows are flushed only when the
#: run must (its start, each checkpoint, its end), so the kill points below fall at the same place every time
RUN = ["gpt2", "--preset", "gpt2-tiny", "--max-steps", STEPS, "--decide-every", 5, "--set", "train.eval_every=10",
       "--set", "train.log_every=5", "--set", "train.flush_every_s=1000", "--set", "agent.keep_bias=0",
       "--set", "agent.keep_bonus=0", "--set", "agent.keep_trained=false"]

#: columns whose values differ between two runs of the same settings: times and process memory sizes
VARYING_METRICS = ("step_time_s", "tokens_per_s", "agent_time_s", "wall_time_s", "setup_peak_bytes", "base_bytes",
                   "process_peak_bytes", "planned_peak_bytes")
VARYING_MEMORY = ("peak_bytes", "current_bytes", "process_peak_bytes")
#: the runs row: what it says about the run (not its id, times, process or folder)
RUN_COLUMNS = ("command", "backbone", "dataset", "variant", "status", "config", "parent_run_id", "preset", "seed",
               "test_split", "error", "dyntie_version", "metric", "higher_is_better")


# --- the registry of one run, every table, comparable ---------------------------------------------------------


def run_tables(db: Path, run_id: str) -> dict[str, list[tuple]]:
    """Every table's rows of one run, in a fixed order, without the run id and the columns that vary."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        def table(name: str, skip: tuple[str, ...] = ()) -> tuple[list[str], list[tuple]]:
            columns = [c for (c, *_) in con.execute(f"DESCRIBE {name}").fetchall() if c != "run_id" and c not in skip]
            rows = con.execute(f"SELECT {', '.join(columns)} FROM {name} WHERE run_id = ? ORDER BY ALL",
                               [run_id]).fetchall()
            return columns, rows

        out: dict[str, list[tuple]] = {}
        columns = ", ".join(RUN_COLUMNS)
        runs = con.execute(f"SELECT {columns} FROM runs WHERE run_id = ?", [run_id]).fetchall()
        out["runs"] = [tuple(json.loads(v) if c == "config" else v for c, v in zip(RUN_COLUMNS, row)) for row in runs]
        _, metrics = table("metrics")
        out["metrics"] = [row for row in metrics if row[2] not in VARYING_METRICS]
        for name, skip in (("memory", VARYING_MEMORY), ("ties", ()), ("decisions", ())):
            _, out[name] = table(name, skip)
        return out
    finally:
        con.close()


def _same_value(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12)
    return a == b


def assert_same_tables(got: dict[str, list[tuple]], want: dict[str, list[tuple]]) -> None:
    """Equal tables: the same rows (none missing, none twice), floats to 1e-4 relative, everything else exact."""
    for name, w in want.items():
        g = got[name]
        assert len(g) == len(w), f"{name}: {len(g)} rows, uninterrupted {len(w)}; missing {sorted(set(w) - set(g))[:5]}" \
                                 f", extra {sorted(set(g) - set(w))[:5]}"
        for row_got, row_want in zip(g, w):
            assert len(row_got) == len(row_want) and all(map(_same_value, row_got, row_want)), \
                f"{name}: {row_got} != uninterrupted {row_want}"


# --- commands in forked children -------------------------------------------------------------------------------


def dyntie_forked(log: Path, *args, env: dict[str, str] | None = None, setup=None) -> int:
    """Run the dyntie CLI with ``args`` in a forked child of this process; its exit status (-9: killed by
    SIGKILL). ``setup`` runs in the child first."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout, sys.stderr = os.fdopen(1, "w"), os.fdopen(2, "w")  # not pytest's captures
            os.environ.update(env or {})
            if setup is not None:
                setup()
            from dyntie_cli.app import app

            try:
                app([str(a) for a in args], standalone_mode=False)
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 -- whatever happens, the child must not return into pytest
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def rows_status(db: Path) -> str:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute("SELECT status FROM runs").fetchone()[0]
    finally:
        con.close()


def _run_id(out: Path) -> str:
    (run_id,) = [d.name for d in out.iterdir() if d.is_dir()]
    return run_id


def uninterrupted(folder: Path) -> dict[str, list[tuple]]:
    db, out = folder / "ref.duckdb", folder / "ref"
    assert dyntie_forked(folder / "ref.log", "train", *RUN, "--db", db, "--out", out, "--quiet") == 0, \
        (folder / "ref.log").read_text()
    return run_tables(db, _run_id(out))


def kill_and_resume(folder: Path, kills: list[str], *, started: bool = False) -> tuple[Path, str, list[int]]:
    """Train the run (``started``: it is in ``folder`` already), killed at each of ``kills`` in turn (a kill
    point), each time resumed, then resumed to its end; the registry, the run id and every exit status."""
    db, out, log = folder / "k.duckdb", folder / "k", folder / "k.log"
    codes, run_id = [], _run_id(out) if started else None
    for point in [*kills, None]:
        env = {"DYNTIE_KILL_AT": point} if point else {}
        with log.open("a") as f:
            f.write(f"--- killed at {point}\n")
        if run_id is None:
            codes.append(dyntie_forked(log, "train", *RUN, "--db", db, "--out", out, "--quiet", env=env))
            run_id = _run_id(out)
        else:
            codes.append(dyntie_forked(log, "train", "--resume", run_id, "--db", db, "--quiet", env=env))
    return db, run_id, codes


# --- a registry held by another process ----------------------------------------------------------------------


def hold_registry_after_first_checkpoint(db: Path, pid_file: Path):
    """A child setup: once the run's first checkpoint is in place, a process of its own takes the registry's lock
    (shared, as a reader does) and keeps it until it is killed, so the checkpoints after it cannot flush."""

    def setup() -> None:
        from dyntie_cli.core import checkpoint

        save = checkpoint.save_checkpoint

        def save_then_hold(*args, **kwargs):
            path = save(*args, **kwargs)
            if not pid_file.exists():
                holder = os.fork()
                if holder == 0:
                    fd = os.open(lock_path(db), os.O_RDWR)
                    fcntl.flock(fd, fcntl.LOCK_SH)
                    pid_file.write_text(str(os.getpid()))
                    signal.pause()
                    os._exit(0)
                while not pid_file.exists():
                    time.sleep(0.01)
            return path

        checkpoint.save_checkpoint = save_then_hold

    return setup


def release(pid_file: Path) -> None:
    pid = int(pid_file.read_text())
    os.kill(pid, signal.SIGKILL)
    for _ in range(500):  # the holder is a child of a process that died: wait until it is gone too
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.01)


# --- the tests -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, list[tuple]]:
    return uninterrupted(tmp_path_factory.mktemp("reference"))


def test_the_reference_run_has_rows_in_every_table(reference):
    assert reference["runs"][0][4] == "finished"
    counts = {name: len(rows) for name, rows in reference.items()}
    # decisions at steps 5..25 and the initial state; a memory row every 5 steps
    assert counts["ties"] == 6 and counts["decisions"] == 5 and counts["memory"] == 6, counts
    assert {row[1] for row in reference["metrics"]} >= {"train", "validation", "test", "reward"}


def test_killed_while_the_registry_is_held_and_after_its_last_checkpoint_a_run_resumes_to_the_same_tables(
        tmp_path, reference):
    db, pid_file = tmp_path / "k.duckdb", tmp_path / "holder.pid"
    out = tmp_path / "k"

    def rows_in_checkpoint() -> dict:
        return json.loads((out / _run_id(out) / "checkpoint" / "registry_rows.json").read_text())["tables"]

    # 1. held from the first checkpoint on, neither checkpoint can flush: when the run dies at step 22, its rows
    #    since the start exist only in the checkpoint of step 20
    code = dyntie_forked(tmp_path / "k.log", "train", *RUN, "--db", db, "--out", out, "--quiet",
                         env={"DYNTIE_KILL_AT": "step:22"}, setup=hold_registry_after_first_checkpoint(db, pid_file))
    assert code == -signal.SIGKILL, (tmp_path / "k.log").read_text()
    assert [row[0] for row in rows_in_checkpoint()["memory"]["rows"]] == [5, 10, 15, 20]
    release(pid_file)
    # 2. resumed, and killed when its last checkpoint is in place: the end's rows are in the checkpoint only
    # 3. resumed from the end: the end's rows are written once
    db, run_id, codes = kill_and_resume(tmp_path, ["checkpoint-renamed:1"], started=True)
    assert codes == [-signal.SIGKILL, 0], (tmp_path / "k.log").read_text()
    assert_same_tables(run_tables(db, run_id), reference)


@pytest.mark.slow
def test_killed_at_every_point_of_the_checkpoint_step_and_of_a_flush_and_resumed_equals_the_uninterrupted_run(
        tmp_path, reference):
    # each kill in the process that resumed from the one before; a count is the time that process reaches the
    # point (a resume's first two transactions are its own: marking the run running, then truncating it)
    kills = [
        "checkpoint-renamed:1",  # step 10: the checkpoint in place, its rows not flushed
        "flush:3",  # step 20: inside the checkpoint's flush, before COMMIT
        "checkpoint-swapping:1",  # step 30 (the last): the old checkpoint renamed away, the new one not in place
        "flush:2",  # the resume's truncation itself, uncommitted
        "step:3",  # after step 23, mid-interval: a decision waits for its reward
        "checkpoint-rows:1",  # step 30: written in full, not in place
        "flush:3",  # step 30: inside the last checkpoint's flush
        "flush-committed:4",  # the end redone from the last checkpoint: its final status committed, not closed
    ]
    db, run_id, codes = kill_and_resume(tmp_path, kills)
    log = (tmp_path / "k.log").read_text()
    assert codes == [-signal.SIGKILL] * len(kills) + [1], log
    assert "finished at step 30; nothing to resume" in log.splitlines()[-1]  # and the refusal wrote nothing
    assert_same_tables(run_tables(db, run_id), reference)


@pytest.mark.slow
def test_killed_from_outside_at_random_moments_and_resumed_equals_the_uninterrupted_run(tmp_path, reference):
    # real processes, each sent SIGKILL at a random moment (the first once it has a checkpoint to resume from)
    # until one is left to finish
    db, out = tmp_path / "k.duckdb", tmp_path / "k"
    draw = random.Random(28)
    command = ["train", *RUN, "--db", db, "--out", out, "--quiet"]
    kills = 0
    for attempt in range(12):
        process = subprocess.Popen([sys.executable, "-m", "dyntie_cli", *map(str, command)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt == 0:
            while not list(out.glob("*/checkpoint/ties.json")) and process.poll() is None:
                time.sleep(0.02)
        if kills < 6:
            try:
                process.wait(timeout=draw.uniform(0.0, 8.0))
            except subprocess.TimeoutExpired:
                process.kill()
                kills += 1
        _, err = process.communicate()
        if process.returncode == 0 or "nothing to resume" in err:  # killed after its end was recorded
            break
        assert process.returncode == -signal.SIGKILL, err
        command = ["train", "--resume", _run_id(out), "--db", db, "--quiet"]
    assert kills and rows_status(db) == "finished", (kills, err)
    assert_same_tables(run_tables(db, _run_id(out)), reference)
