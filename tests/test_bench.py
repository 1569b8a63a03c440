"""`dyntie bench`: variants in their own processes, recorded as bench runs, ratios against no-tying."""

from __future__ import annotations

import json

import duckdb

from tests.conftest import invoke


def test_bench_runs_each_variant_and_reports_ratios(runner, tmp_path):
    db = tmp_path / "b.duckdb"
    r = invoke(runner, "bench", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "20", "--db", db, "--out",
               tmp_path / "runs", "--variants", "dynamic,final-arch", "--format", "json", "--quiet")
    assert r.exit_code == 0, r.stderr
    table = json.loads(r.stdout)
    rows = {row["quantity"]: row for row in (table["rows"] if isinstance(table, dict) else table)}
    con = duckdb.connect(str(db), read_only=True)
    runs = con.execute("SELECT run_id, variant, command, parent_run_id FROM runs").fetchall()
    trainable = dict(con.execute("SELECT run_id, arg_max(trainable_params, step) FROM memory GROUP BY run_id")
                     .fetchall())
    con.close()
    by_variant = {v: (rid, cmd, parent) for rid, v, cmd, parent in runs}
    assert set(by_variant) == {"no-tying", "dynamic", "final-arch"}
    assert all(cmd == "bench" for _, cmd, _ in by_variant.values())
    assert by_variant["final-arch"][2] == by_variant["dynamic"][0]
    end = rows["trainable_params_end"]
    assert end["no-tying"] == trainable[by_variant["no-tying"][0]]
    assert end["dynamic / no-tying"] == trainable[by_variant["dynamic"][0]] / trainable[by_variant["no-tying"][0]]
    # dynamic tying starts from one block and never holds more state than conventional training
    assert rows["trainable_params_mean"]["dynamic / no-tying"] < 1
    assert rows["state_bytes_mean"]["dynamic / no-tying"] < 1
    assert 0 < rows["agent_share"]["dynamic"] < 1
    # on CPU the device peak is the process's peak RSS: each variant has its own process, so its own peak
    assert rows["device"]["dynamic"] == "cpu"
    assert 0 < rows["peak_bytes"]["dynamic / no-tying"] and rows["peak_bytes"]["dynamic"] >= rows["avg_peak_bytes"]["dynamic"]
    # the libraries and data held before the model exists, and the peak less that, are reported apart
    for v in ("no-tying", "dynamic"):
        assert 100 * 2**20 < rows["base_bytes"][v] < rows["peak_bytes"][v]
        assert rows["peak_above_base_bytes"][v] == rows["peak_bytes"][v] - rows["base_bytes"][v]
    # the same table comes back from the registry later
    r2 = invoke(runner, "report", "--table", "bench", "--db", db, "--run", by_variant["no-tying"][0], "--run",
                by_variant["dynamic"][0], "--format", "json")
    assert r2.exit_code == 0

    # a second bench in the same registry (other steps): each run is compared with the no-tying run of its own set
    r3 = invoke(runner, "bench", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "10", "--db", db, "--out",
                tmp_path / "runs", "--variants", "dynamic", "--format", "json", "--quiet")
    assert r3.exit_code == 0, r3.stderr
    r4 = invoke(runner, "report", "--table", "bench", "--db", db, "--format", "json")
    table = json.loads(r4.stdout)
    rows = {row["quantity"]: row for row in (table["rows"] if isinstance(table, dict) else table)}
    con = duckdb.connect(str(db), read_only=True)
    steps = dict(con.execute("SELECT run_id, max(step) FROM memory GROUP BY run_id").fetchall())
    con.close()
    ratio_columns = [c for c in rows["steps"] if " / " in c]
    assert len(ratio_columns) == 3  # two dynamic runs and one final-arch, each against its own no-tying
    for column in ratio_columns:
        run, base = (rows["run_id"][part] for part in column.split(" / "))
        assert steps[run] == steps[base]
