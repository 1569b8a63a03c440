"""`dyntie train gpt2` end to end through the real CLI, the registry it writes, and its error messages."""

from __future__ import annotations

import itertools
import json
import math
import os
import stat

import pytest

from dyntie_cli.core.ties import transition
from tests.conftest import MOVING_AGENT, invoke
from tests.conftest import rows as _rows

GROUPS = ["train", "finetune", "ablate", "report", "bench", "backbones"]


def _train(runner, tmp, *extra):
    return invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--db", tmp / "r.duckdb", "--out", tmp / "runs",
                  "--quiet", *extra)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from typer.testing import CliRunner

    tmp = tmp_path_factory.mktemp("tiny")
    result = _train(CliRunner(), tmp, "--max-steps", "40", "--decide-every", "4", *MOVING_AGENT)
    assert result.exit_code == 0, result.stderr
    run_id = next(line.split(": ")[1] for line in result.stdout.splitlines() if line.startswith("run_id: "))
    return tmp, run_id, result



# -- help and version ---------------------------------------------------------------------------------


def test_help_everywhere(runner):
    r = invoke(runner, "--help")
    assert r.exit_code == 0 and all(g in r.stdout for g in GROUPS)
    for g in GROUPS:
        r = invoke(runner, g, "--help")
        assert r.exit_code == 0, (g, r.stderr)
        assert "Usage" in r.stdout


def test_version_and_unknown_command(runner):
    r = invoke(runner, "--version")
    assert r.exit_code == 0 and r.stdout.startswith("dyntie ")
    r = invoke(runner, "frobnicate")
    assert r.exit_code != 0 and "No such command" in r.stderr


def test_backbones_lists_gpt2_with_presets(runner):
    r = invoke(runner, "backbones", "gpt2*")
    assert r.exit_code == 0
    assert "gpt2-tiny" in r.stdout and "gpt2-deep-cpu" in r.stdout and "gpt2-paper" in r.stdout


# -- a real run -----------------------------------------------------------------------------------------


def test_run_prints_its_result(tiny_run):
    tmp, run_id, result = tiny_run
    assert "final test: loss=" in result.stdout and "ppl=" in result.stdout
    assert result.stderr == ""  # --quiet


def test_every_table_has_rows(tiny_run):
    tmp, run_id, _ = tiny_run
    db = tmp / "r.duckdb"
    for table in ("runs", "metrics", "memory", "ties", "decisions"):
        assert _rows(db, f"SELECT count(*) FROM {table} WHERE run_id = ?", run_id)[0][0] > 0, table
    status, command, variant, cfg = _rows(db, "SELECT status, command, variant, config FROM runs")[0]
    assert (status, command, variant) == ("finished", "train", "dynamic")
    assert json.loads(cfg)["preset"] == "gpt2-tiny"
    names = {(s, n) for s, n in _rows(db, "SELECT DISTINCT split, name FROM metrics")}
    for expected in [("train", "loss"), ("train", "tokens_per_s"), ("train", "step_time_s"),
                     ("train", "agent_time_s"), ("validation", "ppl"), ("test", "ppl"), ("reward", "ppl")]:
        assert expected in names
    # the test split is scored once, at the last step
    assert _rows(db, "SELECT DISTINCT step FROM metrics WHERE split = 'test'") == [(40,)]


def test_logged_states_follow_eq1_and_weights_are_really_distinct(tiny_run):
    tmp, run_id, _ = tiny_run
    rows = _rows(tmp / "r.duckdb", "SELECT decision, state, action, independent_layers, distinct_block_weights "
                 "FROM ties WHERE run_id = ? ORDER BY decision", run_id)
    assert [r[0] for r in rows] == list(range(len(rows))) and len(rows) == 10  # decision 0 + 9 decisions
    assert rows[0][1] == [0, 0, 0, 0]  # the paper's initial state: everything is block 0
    for prev, cur in itertools.pairwise(rows):
        assert transition(prev[1], cur[2]) == cur[1]
    for _, state, _, indep, distinct in rows:
        assert indep == sum(1 for i, r in enumerate(state) if r == i)
        assert distinct == indep


def test_trainable_params_and_bytes_follow_independent_layers(tiny_run):
    tmp, run_id, _ = tiny_run
    db = tmp / "r.duckdb"
    # the state in force at each memory row: the last decision at or before its step
    rows = _rows(db, """
        SELECT m.step, m.trainable_params, m.param_bytes, m.optimizer_bytes,
               (SELECT t.independent_layers FROM ties t WHERE t.run_id = m.run_id AND t.step <= m.step
                ORDER BY t.step DESC, t.decision DESC LIMIT 1) AS indep
        FROM memory m WHERE m.run_id = ? ORDER BY m.step""", run_id)
    by_indep: dict[int, set[int]] = {}
    for _, trainable, pbytes, _, indep in rows:
        by_indep.setdefault(indep, set()).add(trainable)
    assert all(len(v) == 1 for v in by_indep.values()), "trainable params depend only on independent layers"
    ordered = sorted((k, next(iter(v))) for k, v in by_indep.items())
    assert len(ordered) >= 2, "the run should visit at least two tie states"
    per_block = (ordered[-1][1] - ordered[0][1]) / (ordered[-1][0] - ordered[0][0])
    for (k1, p1), (k2, p2) in itertools.pairwise(ordered):
        assert p2 - p1 == per_block * (k2 - k1)  # one block's parameters per independent block
    for _, trainable, pbytes, _, _ in rows:
        assert pbytes == 4 * trainable  # float32, each tensor once


def test_decisions_carry_rewards_and_epsilon(tiny_run):
    tmp, run_id, _ = tiny_run
    rows = _rows(tmp / "r.duckdb", "SELECT decision, epsilon, reward, ppl, td_loss FROM decisions "
                 "WHERE run_id = ? ORDER BY decision", run_id)
    assert len(rows) == 9
    assert all(r[2] is not None and r[3] > 1 and r[4] >= 0 for r in rows)
    eps = [r[1] for r in rows]
    assert eps[0] == 1.0 and eps == sorted(eps, reverse=True)


@pytest.mark.parametrize("fmt", ["table", "csv", "json", "markdown"])
def test_report_tables_in_every_format(tiny_run, runner, fmt):
    tmp, run_id, _ = tiny_run
    for table in ("runs", "ppl", "params", "layers", "memory", "ties", "decisions"):
        r = invoke(runner, "report", "--table", table, "--db", tmp / "r.duckdb", "--format", fmt)
        assert r.exit_code == 0, (table, r.stderr)
        assert run_id[:10] in r.stdout or fmt == "table"
    r = invoke(runner, "report", "--table", "ppl", "--db", tmp / "r.duckdb", "--format", "json")
    rec = json.loads(r.stdout)
    rows = rec["rows"] if isinstance(rec, dict) else rec
    test_ppl = _rows(tmp / "r.duckdb", "SELECT value FROM metrics WHERE split='test' AND name='ppl'")[0][0]
    assert rows[0]["test"] == pytest.approx(test_ppl)


def test_run_resolves_by_prefix_and_checkpoint_exists(tiny_run, runner):
    tmp, run_id, result = tiny_run
    r = invoke(runner, "report", "--table", "ties", "--run", run_id[:-2], "--db", tmp / "r.duckdb", "--format", "csv")
    assert r.exit_code == 0 and r.stdout.count(run_id) == 10
    ckpt = tmp / "runs" / run_id / "checkpoint"
    assert (ckpt / "model.safetensors").exists() and (ckpt / "ties.json").exists()
    assert json.loads((ckpt / "ties.json").read_text())["state"] == _rows(
        tmp / "r.duckdb", "SELECT state FROM ties WHERE run_id = ? ORDER BY decision DESC LIMIT 1", run_id)[0][0]


# -- errors: one line, non-zero exit, no traceback, registry intact ------------------------------------


def _one_line_error(r, *needles):
    assert r.exit_code != 0
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [line for line in r.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def test_user_errors(tiny_run, runner, tmp_path):
    db_dir, run_id, _ = tiny_run
    db = db_dir / "r.duckdb"
    before = _rows(db, "SELECT count(*) FROM metrics")[0][0]
    cases = [
        (["train", "gpt3"], ["Unknown backbone", "gpt2"]),
        (["train", "gpt2", "--dataset", "wikitext-9"], ["Unknown dataset", "wikitext-103"]),
        (["train", "gpt2", "--preset", "huge"], ["Unknown preset", "gpt2-tiny"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--set", "train.lrr=3"], ["train.lr"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--set", "nonsense"], ["key=value"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--set", "train.max_steps=abc"], ["number"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "-3"], ["--max-steps"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--dataset", "wikitext-103"], ["--data-dir"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--dataset", f"text:{tmp_path}/nope.txt"], ["nope.txt"]),
        (["report", "--table", "runs", "--run", "nosuchrun"], ["nosuchrun", "--table runs"]),
        (["report", "--table", "frobs"], ["frobs", "runs"]),
        (["train", "gpt2", "--recipe", str(tmp_path / "missing.toml")], ["Recipe"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--reward", "accuracy"], ["--reward", "neg-ppl"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--max-independent", "-1"], ["--max-independent"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--param-penalty", "-0.5"], ["--param-penalty"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--set", "agent.reward_batch=test"], ["interval"]),
        (["train", "gpt2", "--preset", "gpt2-tiny", "--set", "agent.keep_target=next"], ["previous"]),
    ]
    for args, needles in cases:
        r = invoke(runner, *args, "--db", db)
        _one_line_error(r, *needles)
    assert _rows(db, "SELECT count(*) FROM metrics")[0][0] == before
    assert _rows(db, "SELECT count(*) FROM runs")[0][0] == 1


def test_non_numeric_max_steps_is_a_usage_error(runner, tmp_path):
    r = invoke(runner, "train", "gpt2", "--max-steps", "many", "--db", tmp_path / "x.duckdb")
    assert r.exit_code == 2 and "max-steps" in r.stderr and "Traceback" not in r.stderr


def test_corrupt_and_unwritable_db(runner, tmp_path):
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"this is not a database" * 100)
    content = bad.read_bytes()
    r = _train(runner, tmp_path, "--db", bad)
    _one_line_error(r, "DuckDB")
    assert bad.read_bytes() == content
    r = invoke(runner, "report", "--db", bad)
    _one_line_error(r, "DuckDB")
    if os.geteuid() != 0:  # root can write anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        r = _train(runner, tmp_path, "--db", ro / "r.duckdb")
        _one_line_error(r)
    (tmp_path / "file.txt").write_text("x")  # a registry path under a file cannot be created
    r = _train(runner, tmp_path, "--db", tmp_path / "file.txt" / "sub" / "r.duckdb")
    _one_line_error(r)


def test_bad_recipe_is_a_clear_error(runner, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text("[train\nlr = ")
    r = invoke(runner, "train", "gpt2", "--recipe", recipe, "--db", tmp_path / "x.duckdb")
    _one_line_error(r, "TOML")
    recipe.write_text("[train]\nwarp = 9\n")
    r = invoke(runner, "train", "gpt2", "--recipe", recipe, "--db", tmp_path / "x.duckdb")
    _one_line_error(r, "train.warp")


def test_text_dataset_and_recipe(runner, tmp_path):
    src = tmp_path / "corpus.txt"
    lines = [f"line {i} of a small corpus about tying layers ." for i in range(3000)]
    src.write_text("\n".join(lines))
    recipe = tmp_path / "r.toml"
    recipe.write_text('preset = "gpt2-tiny"\n[train]\nmax_steps = 6\n[ties]\ndecide_every = 3\n')
    r = invoke(runner, "train", "gpt2", "--dataset", f"text:{src}", "--recipe", recipe, "--db",
               tmp_path / "x.duckdb", "--out", tmp_path / "runs", "--quiet")
    assert r.exit_code == 0, r.stderr
    assert _rows(tmp_path / "x.duckdb", "SELECT count(*) FROM ties")[0][0] == 2


@pytest.mark.parametrize("mode", ["interval", "next"])
def test_reward_is_scored_on_the_training_batches_after_the_change(runner, tmp_path, mode):
    """interval: exp of the mean loss of the k training batches after a decision; next: the first of them.
    Each batch is scored by the forward pass before the optimizer uses it, so it is fresh for the model."""
    r = _train(runner, tmp_path, "--max-steps", "23", "--decide-every", "5", "--set", "train.log_every=1",
               "--set", f"agent.reward_batch={mode}")
    assert r.exit_code == 0, r.stderr
    db = tmp_path / "r.duckdb"
    loss = dict(_rows(db, "SELECT step, value FROM metrics WHERE split = 'train' AND name = 'loss'"))
    decisions = _rows(db, "SELECT step, ppl, reward FROM decisions ORDER BY decision")
    assert [s for s, _, _ in decisions] == [5, 10, 15, 20]
    for step, ppl, reward in decisions:
        after = [loss[s] for s in range(step + 1, min(step + 5, 23) + 1)]  # the last interval is cut at step 23
        scored = after if mode == "interval" else after[:1]
        assert ppl == pytest.approx(math.exp(sum(scored) / len(scored)), rel=1e-9)
        assert reward is not None


def test_memory_budget_and_parameter_cost_options(runner, tmp_path):
    """--max-independent is a hard cap on every logged state; the other agent flags land in the config."""
    r = _train(runner, tmp_path, "--max-steps", "30", "--decide-every", "2", "--max-independent", "2",
               "--param-penalty", "0.25", "--reward", "neg-log-ppl", "--set", "agent.epsilon_min=1.0")
    assert r.exit_code == 0, r.stderr
    db = tmp_path / "r.duckdb"
    counts = [n for (n,) in _rows(db, "SELECT independent_layers FROM ties")]
    assert len(counts) == 15 and max(counts) <= 2
    agent = json.loads(_rows(db, "SELECT config FROM runs")[0][0])["agent"]
    assert (agent["max_independent"], agent["param_penalty"], agent["reward"]) == (2, 0.25, "neg-log-ppl")
