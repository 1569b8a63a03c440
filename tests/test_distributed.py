"""Several processes under torchrun (gloo on CPU): one run recorded by rank 0, gradients averaged over ranks,
decisions broadcast, weights identical on every rank (the run fails otherwise), kill + resume bit-exact."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import rows as _rows
from tests.test_processes import _run_id, _train_args

# dyntie's CLI, then, as the interpreter exits, each rank's native threads written to THREADS_DIR/RANK
_RECORD_THREADS_AT_EXIT = """
import atexit, os, pathlib, sys

def record():
    names = []
    for task in pathlib.Path("/proc/self/task").iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # a thread that ended meanwhile
            pass
    pathlib.Path(os.environ["THREADS_DIR"], os.environ["RANK"]).write_text("\\n".join(sorted(names)))

atexit.register(record)
sys.argv[0] = "dyntie"
from dyntie_cli.app import main
main()
"""


def _launch(*args, nproc: int = 2, threads_dir: Path | None = None) -> subprocess.Popen:
    """torchrun with ``nproc`` ranks of ``dyntie ARGS``; with ``threads_dir``, each rank records the threads it
    still has when its interpreter exits (Linux)."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}  # a rank that aborts shows its stack
    program = ["-m", "dyntie_cli"]
    if threads_dir is not None:
        driver = threads_dir / "dyntie_recording_threads.py"
        driver.write_text(_RECORD_THREADS_AT_EXIT)
        env["THREADS_DIR"] = str(threads_dir)
        program = [str(driver)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *program, *map(str, args)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _finish(p: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err if len(err) <= 8000 else f"{err[:4000]}\n...\n{err[-4000:]}"
    return out


def _final(db: Path, rid: str):
    test = _rows(db, "SELECT name, value FROM metrics WHERE run_id=? AND split='test' ORDER BY name", rid)
    ties = _rows(db, "SELECT decision, step, state FROM ties WHERE run_id=? ORDER BY decision", rid)
    return test, ties


def test_two_processes_record_one_run_with_twice_the_batch(tmp_path):
    db = tmp_path / "r.duckdb"
    threads = tmp_path / "threads"
    threads.mkdir()
    two = _run_id(_finish(_launch(*_train_args(db, tmp_path / "runs", 30), threads_dir=threads)))
    if Path("/proc/self/task").is_dir():
        # the process group is released when the run ends: no gloo thread is left for the interpreter's exit,
        # where freeing the group can abort a rank after its run has finished
        left = {rank.name: [t for t in rank.read_text().split() if "gloo" in t]
                for rank in threads.iterdir() if rank.name.isdigit()}
        assert left == {"0": [], "1": []}, left
    one = _run_id(_finish(_launch(*_train_args(db, tmp_path / "runs", 30), nproc=1)))
    runs = dict(_rows(db, "SELECT run_id, json_extract(config, '$.world_size') FROM runs WHERE status='finished'"))
    assert runs == {two: "2", one: None}  # rank 1 recorded nothing of its own
    # 30 steps, a decision every 5 (and the initial state): each logged once, by rank 0
    assert _rows(db, "SELECT count(*), count(DISTINCT decision) FROM ties WHERE run_id=?", two) == [(6, 6)]
    assert _rows(db, "SELECT count(*) FROM decisions WHERE run_id=?", two) == [(5,)]

    def items_per_step(rid):  # tokens/s x seconds/step, per logging interval
        rows = _rows(db, "SELECT step, name, value FROM metrics WHERE run_id=? AND split='train' AND name IN "
                     "('tokens_per_s', 'step_time_s')", rid)
        by_step = {}
        for step, name, value in rows:
            by_step.setdefault(step, {})[name] = value
        return {round(v["tokens_per_s"] * v["step_time_s"]) for v in by_step.values()}

    assert items_per_step(two) == {2 * n for n in items_per_step(one)}
    # a run trained by two processes resumes only with two (the run is marked killed: a finished run is refused
    # before its checkpoint is read)
    import duckdb

    con = duckdb.connect(str(db))
    con.execute("UPDATE runs SET status = 'killed' WHERE run_id = ?", [two])
    con.close()
    r = subprocess.run([sys.executable, "-m", "dyntie_cli", "train", "--resume", two, "--db", db, "--quiet"],
                       capture_output=True, text=True, check=False)
    assert r.returncode != 0 and "trained by 2 process(es)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow  # about 45 s
def test_two_processes_stop_together_and_resume_exactly(tmp_path):
    # the stop comes after the first checkpoint (step 20): 80 steps left keep it well before the end
    steps, extra = 100, ["--set", "train.eval_every=20"]
    ref = _run_id(_finish(_launch(*_train_args(tmp_path / "ref.duckdb", tmp_path / "ref", steps, *extra))))
    db, out = tmp_path / "k.duckdb", tmp_path / "k"
    p = _launch(*_train_args(db, out, steps, *extra))
    deadline = time.time() + 300
    while not list(out.glob("*/checkpoint/ties.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # torchrun passes it to both ranks; they stop at the same step
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0 and "resume it with" in err, err[-4000:]
    run_id = next(d.name for d in out.iterdir())
    assert _rows(db, "SELECT status FROM runs") == [("killed",)]
    assert _rows(db, "SELECT max(step) FROM memory")[0][0] < steps
    _finish(_launch("train", "--resume", run_id, "--db", db, "--quiet"))
    assert _rows(db, "SELECT status FROM runs") == [("finished",)]
    got, want = _final(db, run_id), _final(tmp_path / "ref.duckdb", ref)
    assert got[1] == want[1], "the tie schedule after resume is the uninterrupted one"
    assert got[0] == want[0], "bit-identical test metrics after kill + resume on two processes"


def test_one_process_ignores_rank_variables_left_in_the_environment(monkeypatch):
    from dyntie_cli.core.distributed import Group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "not a number")
    g = Group.from_env()
    assert (g.active, g.is_main, g.world) == (False, True, 1)
