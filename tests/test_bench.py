"""`dyntie bench`: variants in their own processes, recorded as bench runs, ratios against no-tying."""

from __future__ import annotations

import json
import time

import duckdb
import pandas as pd
import pytest

from dyntie_cli.report.tables import render
from dyntie_cli.results.queries import run_query
from tests.conftest import invoke
from tests.test_registry import left_out


def _bench(runner, tmp_path, *args) -> dict:
    """Run `dyntie bench gpt2 --preset gpt2-tiny ... --format json`; its table as {quantity: row}."""
    r = invoke(runner, "bench", "gpt2", "--preset", "gpt2-tiny", "--db", tmp_path / "b.duckdb", "--out",
               tmp_path / "runs", *args, "--format", "json", "--quiet")
    assert r.exit_code == 0, r.stderr
    return _rows(r.stdout)


def con_rows(db, sql: str) -> list[tuple]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _rows(stdout: str) -> dict:
    table = json.loads(stdout)
    return {row["quantity"]: row for row in (table["rows"] if isinstance(table, dict) else table)}


def test_bench_runs_each_variant_in_turns_and_reports_ratios(runner, tmp_path):
    db = tmp_path / "b.duckdb"
    started = time.perf_counter()
    rows = _bench(runner, tmp_path, "--max-steps", "20", "--variants", "dynamic,final-arch")
    elapsed = time.perf_counter() - started
    con = duckdb.connect(str(db), read_only=True)
    runs = con.execute("SELECT run_id, coalesce(json_extract_string(config, '$.bench.variant'), variant), command, "
                       "parent_run_id, CAST(json_extract(config, '$.bench.turns') AS INTEGER) FROM runs").fetchall()
    trainable = dict(con.execute("SELECT run_id, arg_max(trainable_params, step) FROM memory GROUP BY run_id")
                     .fetchall())
    wall = dict(con.execute("SELECT run_id, arg_max(value, step) FROM metrics WHERE name = 'wall_time_s' "
                            "GROUP BY run_id").fetchall())
    con.close()
    by_variant = {v: (rid, cmd, parent) for rid, v, cmd, parent, _ in runs}
    assert set(by_variant) == {"no-tying", "dynamic", "final-arch", "dynamic (rerun)"}
    assert all(cmd == "bench" for _, cmd, _ in by_variant.values())
    assert by_variant["final-arch"][2] == by_variant["dynamic"][0]
    # no-tying and dynamic train in turns; final-arch needs the dynamic run's end, so it trains afterwards, in turns
    # beside a rerun of the dynamic run, through which its speed is compared
    assert {v: turns for _, v, _, _, turns in runs} == {"no-tying": 1, "dynamic": 1, "final-arch": 2,
                                                        "dynamic (rerun)": 2}
    # a run's wall time is its own: the waits for the other runs' turns are left out (with them, the runs of a set
    # would each last about as long as the whole set)
    assert sum(wall.values()) < elapsed
    end = rows["trainable_params_end"]
    assert end["no-tying"] == trainable[by_variant["no-tying"][0]]
    assert end["dynamic / no-tying"] == trainable[by_variant["dynamic"][0]] / trainable[by_variant["no-tying"][0]]
    # dynamic tying starts from one block and never holds more state than conventional training
    assert rows["trainable_params_mean"]["dynamic / no-tying"] < 1
    assert rows["state_bytes_mean"]["dynamic / no-tying"] < 1
    assert 0 < rows["agent_share"]["dynamic"] < 1
    # the dynamic run against its fixed-layout twin (its final state from step 0): the tie machinery's own cost.
    # The twin trained beside the rerun, so their speeds compare directly, and the twin's against no-tying's through
    # the dynamic run and its rerun, one in each set of turns
    step_time = dict(con_rows(db, "SELECT run_id, median(value) FROM metrics WHERE name = 'step_time_s' GROUP BY run_id"))
    nt, dynamic, twin, rerun = (by_variant[v][0] for v in ("no-tying", "dynamic", "final-arch", "dynamic (rerun)"))
    assert rows["step_time_s"]["dynamic / final-arch"] == pytest.approx(step_time[rerun] / step_time[twin])
    assert rows["step_time_s"]["final-arch / no-tying"] == pytest.approx(
        (step_time[twin] / step_time[rerun]) * (step_time[dynamic] / step_time[nt]))
    # how far the machine moved between the two sets of turns; the rerun trains exactly as the dynamic run did
    assert rows["step_time_s"]["dynamic (rerun) / dynamic"] == pytest.approx(step_time[rerun] / step_time[dynamic])
    assert rows["validation_ppl"]["dynamic (rerun) / dynamic"] == pytest.approx(1, rel=1e-4)
    # memory and counts do not drift with the machine: compared directly
    assert rows["state_bytes_mean"]["final-arch / no-tying"] == pytest.approx(
        rows["state_bytes_mean"]["final-arch"] / rows["state_bytes_mean"]["no-tying"])
    assert rows["trainable_params_end"]["dynamic / final-arch"] == 1  # the same independent blocks at the end
    assert "final-arch / dynamic" not in rows["steps"]
    # the CPU threads each run trained with, beside its step time (runs.config records them)
    threads = dict(con_rows(db, "SELECT variant, CAST(json_extract(config, '$.threads') AS INTEGER) FROM runs "
                                "WHERE json_extract_string(config, '$.bench.variant') IS NULL"))
    assert all(rows["threads"][v] == threads[v] >= 1 for v in ("no-tying", "dynamic", "final-arch"))
    # on CPU the device peak is the process's peak RSS: each variant has its own process, so its own peak
    assert rows["device"]["dynamic"] == "cpu"
    assert 0 < rows["process_peak_bytes"]["dynamic / no-tying"]
    assert rows["training_peak_bytes"]["dynamic"] >= rows["avg_training_peak_bytes"]["dynamic"]
    # the libraries and data held before the model exists, and the peak less that, are reported apart; the
    # whole process's peak covers setup and every interval
    for v in ("no-tying", "dynamic"):
        assert 100 * 2**20 < rows["base_bytes"][v] < rows["process_peak_bytes"][v]
        assert rows["process_peak_above_base_bytes"][v] == rows["process_peak_bytes"][v] - rows["base_bytes"][v]
        assert rows["process_peak_bytes"][v] >= max(rows["training_peak_bytes"][v], rows["setup_peak_bytes"][v])
    # the same table comes back from the registry later
    r2 = invoke(runner, "report", "--table", "bench", "--db", db, "--run", by_variant["no-tying"][0], "--run",
                by_variant["dynamic"][0], "--format", "json")
    assert r2.exit_code == 0
    # at 80 columns every ratio to no-tying stays
    table = run_query("bench", db)
    ratios = {str(c) for c in table.columns if " / " in str(c)}
    assert len(ratios) == 4 and not left_out(render(table, "table", width=80)) & ratios

    # a second bench in the same registry (other steps): each run is compared with the no-tying run of its own set
    _bench(runner, tmp_path, "--max-steps", "10", "--variants", "dynamic")
    rows = _rows(invoke(runner, "report", "--table", "bench", "--db", db, "--format", "json").stdout)
    con = duckdb.connect(str(db), read_only=True)
    steps = dict(con.execute("SELECT run_id, max(step) FROM memory GROUP BY run_id").fetchall())
    con.close()
    ratio_columns = [c for c in rows["steps"] if " / " in c]
    # two dynamic runs, each against its own no-tying; the first dynamic run against its twin, the twin against its
    # bench's no-tying, the rerun against its bench's dynamic run
    assert len(ratio_columns) == 5
    for column in ratio_columns:
        run, base = (rows["run_id"][part] for part in column.split(" / "))
        assert steps[run] == steps[base]


@pytest.mark.slow  # about 45 s
def test_bench_one_at_a_time_alternates_the_order_and_reports_medians_over_rounds(runner, tmp_path):
    db = tmp_path / "b.duckdb"
    rows = _bench(runner, tmp_path, "--max-steps", "10", "--repeat", "2", "--one-at-a-time")
    con = duckdb.connect(str(db), read_only=True)
    runs = con.execute("SELECT run_id, variant FROM runs ORDER BY started_at").fetchall()
    step_time = dict(con.execute("SELECT run_id, median(value) FROM metrics WHERE name = 'step_time_s' "
                                 "AND split = 'train' GROUP BY run_id").fetchall())
    ppl = dict(con.execute("SELECT run_id, arg_max(value, step) FROM metrics WHERE name = 'ppl' "
                           "AND split = 'validation' GROUP BY run_id").fetchall())
    con.close()
    # round 1 runs no-tying then dynamic, round 2 the reverse, so the rounds' pairs are adjacent; each round's
    # dynamic run is then trained again with its final state fixed from step 0 (its twin, final-arch)
    assert [v for _, v in runs] == ["no-tying", "dynamic", "final-arch", "dynamic", "no-tying", "final-arch"]
    (nt1, _), (dy1, _), (fa1, _), (dy2, _), (nt2, _), (fa2, _) = runs
    assert rows["rounds"]["dynamic"] == 2
    threads = [t for (t,) in con_rows(db, "SELECT CAST(json_extract(config, '$.threads') AS INTEGER) FROM runs "
                                        "WHERE variant = 'dynamic' ORDER BY started_at")]
    assert rows["threads"]["dynamic"] == (threads[0] if len(set(threads)) == 1 else ", ".join(map(str, threads)))
    assert rows["step_time_s"]["dynamic"] == (step_time[dy1] + step_time[dy2]) / 2  # the median of two
    per_round = sorted([step_time[dy1] / step_time[nt1], step_time[dy2] / step_time[nt2]])
    assert rows["step_time_s ratio, lowest round"]["dynamic / no-tying"] == per_round[0]
    assert rows["step_time_s ratio, highest round"]["dynamic / no-tying"] == per_round[1]
    assert rows["step_time_s"]["dynamic / no-tying"] == sum(per_round) / 2
    twin_rounds = sorted([step_time[dy1] / step_time[fa1], step_time[dy2] / step_time[fa2]])
    assert rows["step_time_s"]["dynamic / final-arch"] == sum(twin_rounds) / 2
    assert rows["step_time_s ratio, lowest round"]["dynamic / final-arch"] == twin_rounds[0]
    # the same seed and steps train the same model in every round: only the timings differ
    assert ppl[dy1] == ppl[dy2] and ppl[nt1] == ppl[nt2]
    assert rows["validation_ppl"]["dynamic / no-tying"] == ppl[dy1] / ppl[nt1]

    # each run's config says its round, so the registry gives the same pooled table later
    def report() -> dict:
        r = invoke(runner, "report", "--table", "bench", "--db", db, "--format", "json")
        assert r.exit_code == 0, r.stderr
        return _rows(r.stdout)

    assert report() == rows
    con = duckdb.connect(str(db), read_only=True)
    labels = [json.loads(c)["bench"] for (c,) in con.execute("SELECT config FROM runs ORDER BY started_at").fetchall()]
    con.close()
    group = labels[0]["group"]
    assert [(x["group"], x["round"], x["rounds"]) for x in labels] == [(group, 1, 2)] * 3 + [(group, 2, 2)] * 3
    # beside a single bench: that bench side by side, the repeated one still pooled, its columns named by group
    _bench(runner, tmp_path, "--max-steps", "10", "--variants", "dynamic")
    both = report()
    assert both["rounds"][f"dynamic [{group}]"] == 2
    assert both["step_time_s"][f"dynamic / no-tying [{group}]"] == rows["step_time_s"]["dynamic / no-tying"]
    single = {k: v for k, v in both["run_id"].items() if k != "quantity" and v is not None}
    assert set(single) == {"no-tying", "dynamic"} and not set(single.values()) & {nt1, dy1, dy2, nt2}
    assert "dynamic / no-tying" in both["steps"]  # the single bench's dynamic run against its own no-tying run

    def report_runs(*ids) -> dict:
        args = [a for rid in ids for a in ("--run", rid)]
        r = invoke(runner, "report", "--table", "bench", "--db", db, *args, "--format", "json")
        assert r.exit_code == 0, r.stderr
        return _rows(r.stdout)

    # without its own no-tying run, a single run is compared with the pooled group's matching one, named by id
    assert f"dynamic / no-tying ({nt1[-4:]})" in report_runs(nt1, dy1, nt2, dy2, single["dynamic"])["steps"]
    # a round picked without its other runs is not pooled: the runs are shown one by one
    assert "rounds" not in report_runs(nt1, dy1, nt2)


def test_bench_in_turns_pools_rounds_and_times_the_twin_beside_the_rerun(runner, tmp_path):
    db = tmp_path / "b.duckdb"
    rows = _bench(runner, tmp_path, "--max-steps", "10", "--repeat", "2")
    step_time = dict(con_rows(db, "SELECT run_id, median(value) FROM metrics WHERE name = 'step_time_s' "
                                  "AND split = 'train' GROUP BY run_id"))
    found = con_rows(db, "SELECT coalesce(json_extract_string(config, '$.bench.variant'), variant), run_id, "
                         "CAST(json_extract(config, '$.bench.round') AS INTEGER) FROM runs")
    rounds = [{v: rid for v, rid, r in found if r == n} for n in (1, 2)]
    assert all(set(r) == {"no-tying", "dynamic", "final-arch", "dynamic (rerun)"} for r in rounds)
    assert rows["rounds"]["dynamic"] == rows["rounds"]["dynamic (rerun)"] == 2

    def per_round(ratio) -> list[float]:
        return sorted(ratio({v: step_time[rid] for v, rid in r.items()}) for r in rounds)

    # per round: the twin against the rerun it trained beside, and against no-tying through the dynamic run
    twin = per_round(lambda t: t["dynamic (rerun)"] / t["final-arch"])
    assert rows["step_time_s"]["dynamic / final-arch"] == pytest.approx(sum(twin) / 2)
    assert rows["step_time_s ratio, lowest round"]["dynamic / final-arch"] == pytest.approx(twin[0])
    assert rows["step_time_s"]["final-arch / no-tying"] == pytest.approx(sum(per_round(
        lambda t: t["final-arch"] / t["dynamic (rerun)"] * t["dynamic"] / t["no-tying"])) / 2)
    assert rows["step_time_s"]["dynamic / no-tying"] == pytest.approx(sum(per_round(
        lambda t: t["dynamic"] / t["no-tying"])) / 2)
    # memory does not drift: dynamic against its twin directly
    assert rows["trainable_params_end"]["dynamic / final-arch"] == 1


def test_pooled_bench_names_each_rounds_threads_when_they_differ():
    from dyntie_cli.results.bench import _threads

    assert _threads(pd.Series([2, 2])) == 2
    assert _threads(pd.Series([2, 1])) == "2, 1"  # rounds at different counts: their step times are not alike
    assert _threads(pd.Series([None, None])) is None  # runs from before the count was recorded


def test_bench_refuses_a_repeat_below_one(runner, tmp_path):
    r = invoke(runner, "bench", "gpt2", "--preset", "gpt2-tiny", "--repeat", "0", "--db", tmp_path / "b.duckdb")
    assert r.exit_code != 0
    assert "--repeat must be at least 1" in r.stderr


def test_bench_refuses_to_run_under_torchrun(runner, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    r = invoke(runner, "bench", "gpt2", "--preset", "gpt2-tiny", "--db", tmp_path / "b.duckdb")
    assert r.exit_code != 0 and "without torchrun" in r.stderr


def test_bench_variants_add_memory_savers_and_compare_with_plain_no_tying(runner, tmp_path):
    db = tmp_path / "b.duckdb"
    rows = _bench(runner, tmp_path, "--max-steps", "6", "--variants",
                  "no-tying+checkpointing,dynamic+checkpointing+adafactor")
    runs = con_rows(db, "SELECT variant, json_extract_string(config, '$.bench.variant'), "
                        "json_extract_string(config, '$.train.checkpointing'), "
                        "json_extract_string(config, '$.train.optimizer') FROM runs")
    assert sorted(runs, key=str) == [("dynamic", "dynamic+checkpointing+adafactor", "all", "adafactor"),
                                     ("no-tying", "no-tying+checkpointing", "all", "adamw"),
                                     ("no-tying", None, "off", "adamw")]
    peak = rows["process_peak_bytes"]
    for name in ("no-tying+checkpointing", "dynamic+checkpointing+adafactor"):
        assert peak[f"{name} / no-tying"] == peak[name] / peak["no-tying"]  # the baseline is plain no-tying
    # checkpointing changes no number the run computes
    assert rows["validation_ppl"]["no-tying+checkpointing / no-tying"] == 1


def test_bench_refuses_an_unknown_saver_in_one_sentence(runner, tmp_path):
    r = invoke(runner, "bench", "gpt2", "--preset", "gpt2-tiny", "--db", tmp_path / "b.duckdb", "--variants",
               "dynamic+ram-doubler", "--quiet")
    assert r.exit_code == 2 and "Unknown memory saver 'ram-doubler'" in r.stderr and "checkpointing" in r.stderr
    assert not (tmp_path / "b.duckdb").exists()
