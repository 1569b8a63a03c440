"""Real processes: two trainings writing one registry while reports read it, and kill + resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb


def _dyntie(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dyntie_cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy(), **kw)


def _train_args(db: Path, out: Path, steps: int, *extra):
    return ["train", "gpt2", "--preset", "gpt2-tiny", "--db", db, "--out", out, "--quiet", "--max-steps", steps,
            "--decide-every", 5, "--set", "train.flush_every_s=0.3", *extra]


def _counts(db: Path, run_id: str) -> dict[str, int]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {t: con.execute(f"SELECT count(*) FROM {t} WHERE run_id = ?", [run_id]).fetchone()[0]
                for t in ("ties", "decisions", "memory", "metrics")}
    finally:
        con.close()


def _run_id(stdout: str) -> str:
    return next(line.split(": ")[1] for line in stdout.splitlines() if line.startswith("run_id: "))


def test_two_concurrent_runs_and_a_report_loop_keep_every_row(tmp_path):
    db = tmp_path / "shared.duckdb"
    procs = [_dyntie(*_train_args(db, tmp_path / "runs", 60, "--seed", seed)) for seed in (1, 2)]
    reports = []
    while any(p.poll() is None for p in procs):
        if not db.exists():  # the first writer has not created the registry yet
            time.sleep(0.05)
            continue
        reports.append(subprocess.run([sys.executable, "-m", "dyntie_cli", "report", "--table", "runs", "--db", db,
                                       "--format", "json"], capture_output=True, text=True, check=False))
    outs = [p.communicate() for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    assert reports, "the report loop ran at least once while training"
    assert all(r.returncode == 0 for r in reports), [r.stderr for r in reports if r.returncode]
    for stdout, _ in outs:
        run_id = _run_id(stdout)
        # 60 steps, a decision every 5 (steps 5..55) plus the initial state, logs every 5 steps
        c = _counts(db, run_id)
        assert c["ties"] == 12 and c["decisions"] == 11 and c["memory"] == 12
        assert c["metrics"] > 12 * 6


def test_killed_run_is_marked_and_resumes_exactly(tmp_path):
    steps = 120
    extra = ["--set", "train.eval_every=20"]
    # reference: the same run, uninterrupted
    ref = _dyntie(*_train_args(tmp_path / "ref.duckdb", tmp_path / "ref", steps, *extra))
    ref_out, ref_err = ref.communicate()
    assert ref.returncode == 0, ref_err
    db, out = tmp_path / "k.duckdb", tmp_path / "k"
    p = _dyntie(*_train_args(db, out, steps, *extra))
    deadline = time.time() + 120
    while not list(out.glob("*/checkpoint/ties.json")) and time.time() < deadline and p.poll() is None:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate()
    assert p.returncode != 0 and "resume it with" in err and "Traceback" not in err
    run_id = next(d.name for d in out.iterdir())
    con = duckdb.connect(str(db), read_only=True)
    status, = con.execute("SELECT status FROM runs").fetchone()
    killed_at = con.execute("SELECT max(step) FROM memory").fetchone()[0]
    con.close()
    assert status == "killed" and killed_at < steps
    r = _dyntie("train", "--resume", run_id, "--db", db, "--quiet")
    res_out, res_err = r.communicate()
    assert r.returncode == 0, res_err
    ref_id = _run_id(ref_out)

    def final(dbfile, rid):
        con = duckdb.connect(str(dbfile), read_only=True)
        try:
            test = con.execute("SELECT name, value FROM metrics WHERE run_id=? AND split='test' ORDER BY name",
                               [rid]).fetchall()
            ties = con.execute("SELECT decision, step, state FROM ties WHERE run_id=? ORDER BY decision",
                               [rid]).fetchall()
            status = con.execute("SELECT status FROM runs WHERE run_id=?", [rid]).fetchone()[0]
            return test, ties, status
        finally:
            con.close()

    got, want = final(db, run_id), final(tmp_path / "ref.duckdb", ref_id)
    assert got[2] == "finished"
    assert got[1] == want[1], "the tie schedule after resume is the uninterrupted one"
    assert got[0] == want[0], "bit-identical test metrics after kill + resume"
    assert json.loads((out / run_id / "checkpoint" / "ties.json").read_text())["state"] == want[1][-1][2]
