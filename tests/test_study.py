"""`dyntie study`: variants x seeds recorded as one study, its table (checked against SQL on the registry), a study
stopped and continued, and `dyntie merge` of registries written in parallel."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from dyntie_cli.report.tables import render
from dyntie_cli.results.queries import QUERIES, run_query
from dyntie_cli.results.study import study_run_ids
from tests.conftest import invoke, rows
from tests.test_registry import left_out

TINY = ("gpt2", "--preset", "gpt2-tiny", "--max-steps", "16", "--decide-every", "2")


def _study(runner, db: Path, out: Path, *args: str):
    return invoke(runner, "study", *TINY, "--db", db, "--out", out, "--quiet", "--format", "json", *args)


def _by_hand(db: Path, name: str) -> dict[str, dict]:
    """The study table recomputed from the registry with plain SQL and the statistics module."""
    runs = rows(db, "SELECT run_id, variant, seed FROM runs WHERE json_extract_string(config, '$.study.name') = ? "
                    "AND status = 'finished'", name)
    val, best_step, test, indep, end = {}, {}, {}, {}, {}
    for run_id, variant, seed in runs:
        # the best validation figure: the least of the run's validation perplexities, at the step it recorded
        val[variant, seed], best_step[variant, seed] = rows(
            db, "SELECT value, step FROM metrics WHERE run_id = ? AND split = 'validation' AND name = 'ppl' "
                "ORDER BY value, step LIMIT 1", run_id)[0]
        assert rows(db, "SELECT value FROM metrics WHERE run_id = ? AND name = 'best_step'", run_id) == \
            [(best_step[variant, seed],)]
        test[variant, seed] = rows(db, "SELECT value FROM metrics WHERE run_id = ? AND split = 'test' AND "
                                       "name = 'ppl'", run_id)[0][0]
        indep[variant, seed] = rows(db, "SELECT value FROM metrics WHERE run_id = ? AND name = "
                                        "'independent_layers_mean'", run_id)[0][0]
        end[variant, seed] = rows(db, "SELECT independent_layers FROM ties WHERE run_id = ? ORDER BY decision DESC "
                                      "LIMIT 1", run_id)[0][0]
    table = {}
    for variant in {v for v, _ in val}:
        seeds = sorted(s for v, s in val if v == variant)
        values = [val[variant, s] for s in seeds]
        diffs = [val[variant, s] - val["dynamic", s] for s in seeds] if variant != "dynamic" else None
        table[variant] = {
            "seeds": seeds, "per seed": values, "mean": statistics.mean(values), "std": statistics.stdev(values),
            "min": min(values), "max": max(values), "best step per seed": [best_step[variant, s] for s in seeds],
            "test at best, per seed": [test[variant, s] for s in seeds],
            "test at best, mean": statistics.mean(test[variant, s] for s in seeds),
            "mean / no-tying": statistics.mean(val[variant, s] / val["no-tying", s] for s in seeds),
            "independent mean": statistics.mean(indep[variant, s] for s in seeds),
            "independent end": statistics.mean(end[variant, s] for s in seeds),
            "minus dynamic, per seed": diffs, "minus dynamic, mean": statistics.mean(diffs) if diffs else None,
            "dynamic better": f"{sum(d > 0 for d in diffs)} of {len(diffs)}" if diffs else None,
        }
    return table


def _same(printed: list[dict], expected: dict[str, dict]) -> None:
    assert {row["variant"] for row in printed} == set(expected)
    for row in printed:
        want = expected[row["variant"]]
        for key, value in want.items():
            got = row[key]
            if isinstance(value, float) or (isinstance(value, list) and value and isinstance(value[0], float)):
                assert got == pytest.approx(value, rel=1e-12), (row["variant"], key)
            elif key == "dynamic better" and value is not None:
                assert got.startswith(value), (row["variant"], key)
            else:
                assert got == value, (row["variant"], key)


def test_study_table_is_what_the_registry_says_and_report_prints_it_again(runner, tmp_path):
    db, out = tmp_path / "s.duckdb", tmp_path / "runs"
    r = _study(runner, db, out, "--seeds", "0,1", "--variants", "no-tying,grow,dynamic", "--name", "tiny")
    assert r.exit_code == 0, r.stderr
    printed = json.loads(r.stdout)
    _same(printed, _by_hand(db, "tiny"))
    assert [row["variant"] for row in printed] == ["dynamic", "no-tying", "grow"]  # dynamic first
    # every run is labelled with the study; grow took each seed's dynamic run as its source and its final count
    runs = rows(db, "SELECT run_id, variant, seed, command, parent_run_id, config FROM runs")
    assert len(runs) == 6 and all(cmd == "study" and json.loads(c)["study"] == {"name": "tiny"}
                                  for _, _, _, cmd, _, c in runs)
    dynamic = {seed: run_id for run_id, variant, seed, *_ in runs if variant == "dynamic"}
    for run_id, variant, seed, _, parent, config in runs:
        if variant == "grow":
            assert parent == dynamic[seed]
            final = rows(db, "SELECT independent_layers FROM ties WHERE run_id = ? ORDER BY decision DESC LIMIT 1",
                         parent)[0][0]
            assert json.loads(config)["ties"]["independent"] == final

    again = invoke(runner, "report", "--table", "study", "--study", "tiny", "--db", db, "--format", "json")
    assert again.exit_code == 0 and json.loads(again.stdout) == printed
    # at 80 columns the means, the ratio to no-tying and the paired difference stay
    fitted = render(run_query("study", db, study_run_ids(db, "tiny")), "table", width=80)
    assert not left_out(fitted) & {"study", *QUERIES["study"].headline}
    # the same command again trains nothing and prints the same table
    r2 = _study(runner, db, out, "--seeds", "0,1", "--variants", "no-tying,grow,dynamic", "--name", "tiny")
    assert r2.exit_code == 0 and json.loads(r2.stdout) == printed
    assert rows(db, "SELECT count(*) FROM runs")[0][0] == 6
    # other settings under the same name are refused, naming the setting, before anything trains
    r3 = _study(runner, db, out, "--seeds", "0", "--variants", "dynamic", "--name", "tiny", "--set", "train.lr=0.01")
    assert r3.exit_code == 1 and "train.lr" in r3.stderr and len(r3.stderr.strip().splitlines()) == 1
    plot = invoke(runner, "report", "--plot", "study", "--db", db, "--out", tmp_path / "study.png")
    assert plot.exit_code == 0, plot.stderr
    assert (tmp_path / "study.png").stat().st_size > 10_000

    # a registry written apart (as parallel processes do) merges into one, and the study table covers both
    other = tmp_path / "other.duckdb"
    r4 = _study(runner, other, out, "--seeds", "2", "--variants", "no-tying", "--name", "tiny")
    assert r4.exit_code == 0, r4.stderr
    merged = tmp_path / "merged.duckdb"
    m = invoke(runner, "merge", db, other, "--db", merged)
    assert m.exit_code == 0 and "7 runs copied" in m.stdout, m.stdout + m.stderr
    for table in ("runs", "metrics", "memory", "ties", "decisions"):
        count = f"SELECT count(*) FROM {table}"
        assert rows(merged, count) == [(rows(db, count)[0][0] + rows(other, count)[0][0],)]
    table = {row["variant"]: row for row in json.loads(invoke(runner, "report", "--table", "study", "--db", merged,
                                                              "--format", "json").stdout)}
    assert table["no-tying"]["seeds"] == [0, 1, 2] and table["grow"] == next(r for r in printed if r["variant"] == "grow")
    twice = invoke(runner, "merge", db, other, "--db", merged)
    assert twice.exit_code == 0 and "0 runs copied" in twice.stdout and "7 already there" in twice.stdout


def test_study_refuses_what_it_cannot_run(runner, tmp_path):
    db, out = tmp_path / "s.duckdb", tmp_path / "runs"
    for args, words in [
        (("--variants", "final-arch,no-tying"), "needs dynamic"),
        (("--variants", "dynamic,shuffle"), "Unknown variant 'shuffle'"),
        (("--seeds", "0,x"), "--seeds takes whole numbers"),
        (("--seeds", "1,1"), "distinct seeds"),
        (("--jobs", "0"), "--jobs must be at least 1"),
    ]:
        r = _study(runner, db, out, *args)
        assert r.exit_code == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not db.exists()  # refused before any run


def _wait_for(db: Path, sql: str, timeout_s: float = 120.0) -> None:
    """Poll the registry (read-only, retried while the trainer holds its lock) until ``sql`` returns a true value."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if db.exists():
            try:
                con = duckdb.connect(str(db), read_only=True)
                try:
                    if con.execute(sql).fetchone()[0]:
                        return
                finally:
                    con.close()
            except duckdb.Error:
                pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for: {sql}")


def test_a_stopped_study_continues_and_finishes_each_run_once(runner, tmp_path):
    db, out = tmp_path / "s.duckdb", tmp_path / "runs"
    # 300 steps (about 10 ms each): seconds of margin between the first logged steps and the end of a run, so the
    # stop arrives while both runs still train, however late the registry shows their progress
    args = ["gpt2", "--preset", "gpt2-tiny", "--max-steps", "300", "--seeds", "0", "--variants",
            "dynamic,no-tying,final-arch", "--name", "stopped", "--db", str(db), "--out", str(out), "--quiet",
            "--set", "train.flush_every_s=0.2", "--format", "json"]
    # two runs in child processes; SIGTERM to the study reaches both, each checkpoints and is marked killed
    proc = subprocess.Popen([sys.executable, "-m", "dyntie_cli", "study", *args, "--jobs", "2"], env=os.environ.copy(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(db, "SELECT count(DISTINCT run_id) = 2 AND min(step) >= 5 FROM (SELECT run_id, max(step) AS step "
                      "FROM metrics GROUP BY run_id)")
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "run the same command again to continue" in stderr
    killed = rows(db, "SELECT run_id, variant, status FROM runs ORDER BY variant")
    assert [(v, s) for _, v, s in killed] == [("dynamic", "killed"), ("no-tying", "killed")]
    merged = tmp_path / "merged.duckdb"
    assert invoke(runner, "merge", db, "--db", merged).exit_code == 0  # what the registry holds so far

    # the same command again (in this process, one run at a time) resumes both and trains final-arch
    r = invoke(runner, "study", *args)
    assert r.exit_code == 0, r.stderr
    finished = rows(db, "SELECT variant, seed, status, count(*) FROM runs GROUP BY ALL ORDER BY variant")
    assert finished == [("dynamic", 0, "finished", 1), ("final-arch", 0, "finished", 1), ("no-tying", 0, "finished", 1)]
    resumed = {run_id for run_id, _, _ in killed}
    assert resumed <= {run_id for (run_id,) in rows(db, "SELECT run_id FROM runs WHERE status = 'finished'")}
    # a resumed run logged each step once
    assert rows(db, "SELECT count(*) FROM (SELECT run_id, step FROM metrics WHERE split = 'validation' "
                    "GROUP BY run_id, step, name HAVING count(*) > 1)") == [(0,)]
    assert {row["variant"] for row in json.loads(r.stdout)} == {"dynamic", "no-tying", "final-arch"}
    # merged again, the continued runs replace their killed copies and the new one is added
    m = invoke(runner, "merge", db, "--db", merged)
    assert m.exit_code == 0 and "3 runs copied" in m.stdout and "0 already there" in m.stdout, m.stdout
    for table in ("runs", "metrics", "memory", "ties", "decisions"):
        assert rows(merged, f"SELECT count(*) FROM {table}") == rows(db, f"SELECT count(*) FROM {table}")
    assert rows(merged, "SELECT run_id, status FROM runs ORDER BY run_id") == rows(
        db, "SELECT run_id, status FROM runs ORDER BY run_id")
