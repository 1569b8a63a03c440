"""`dyntie ablate`: every variant run for real from one dynamic source run, checked against the registry.

One session-wide registry (``ablation_runs``) holds a dynamic gpt2-tiny run and one ablation of it per
variant, plus two runs made without a source; ``tests/test_report.py`` reports and plots the same runs.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
from typer.testing import CliRunner

from dyntie_cli.core.policies import random_permutation, static_state
from dyntie_cli.core.ties import independent_count, permute_state, transition
from dyntie_cli.results.lineage import load_source_run
from dyntie_cli.results.writer import RunWriter
from tests.conftest import MOVING_AGENT, invoke

VARIANTS = ("final-arch", "replay", "no-tying", "random", "static-all", "static-sequence", "static-cycle",
            "static-cycle-rev")
STATIC = [v for v in VARIANTS if v.startswith("static-")]
# 40 steps with a decision every 4: ten tie states per run, enough for a schedule that moves; one checkpoint
# (at the end) instead of one per validation keeps the eleven runs quick.
SOURCE_ARGS = ("--preset", "gpt2-tiny", "--max-steps", "40", "--decide-every", "4",
               "--set", "train.checkpoint_every=40", *MOVING_AGENT)


@dataclass(frozen=True)
class AblationRuns:
    db: Path
    out: Path
    source: str
    by_variant: dict[str, str]  # variant -> run id, each made with --from-run source
    free_static: str  # static-cycle with --backbone gpt2 --independent 3, no source
    free_random: str  # random with --backbone gpt2, no source


_BUILT: dict[str, AblationRuns] = {}


def run_id_of(result: Any) -> str:
    assert result.exit_code == 0, result.stderr
    return next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("run_id: "))


def _build(tmp: Path) -> AblationRuns:
    runner = CliRunner()
    db, out = tmp / "r.duckdb", tmp / "runs"
    common = ("--db", db, "--out", out, "--quiet")
    source = run_id_of(invoke(runner, "train", "gpt2", *SOURCE_ARGS, *common))
    by_variant = {v: run_id_of(invoke(runner, "ablate", "--variant", v, "--from-run", source, *common))
                  for v in VARIANTS}
    free = ("--backbone", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "12", "--decide-every", "4")
    free_static = run_id_of(invoke(runner, "ablate", "--variant", "static-cycle", "--independent", "3", *free,
                                   *common))
    free_random = run_id_of(invoke(runner, "ablate", "--variant", "random", *free, *common))
    return AblationRuns(db, out, source, by_variant, free_static, free_random)


def build_ablation_runs(tmp_path_factory: pytest.TempPathFactory) -> AblationRuns:
    """The runs, built once per session: test_report.py's session fixture calls this too, and the memo keeps
    the two modules from training everything twice."""
    if "runs" not in _BUILT:  # (conftest runs the session on one torch thread)
        _BUILT["runs"] = _build(tmp_path_factory.mktemp("ablations"))
    return _BUILT["runs"]


@pytest.fixture(scope="session")
def ablation_runs(tmp_path_factory, dyntie_cache) -> AblationRuns:
    return build_ablation_runs(tmp_path_factory)


def sql(db: Path, query: str, *params: Any) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(db), read_only=True)
    try:
        return con.execute(query, list(params)).fetchall()
    finally:
        con.close()


def states(db: Path, run_id: str) -> list[list[int]]:
    rows = sql(db, "SELECT state FROM ties WHERE run_id = ? ORDER BY decision", run_id)
    return [list(row[0]) for row in rows]


def config(db: Path, run_id: str) -> dict[str, Any]:
    return json.loads(sql(db, "SELECT config FROM runs WHERE run_id = ?", run_id)[0][0])


def logged_mean_independent(db: Path, run_id: str) -> float:
    query = "SELECT value FROM metrics WHERE run_id = ? AND name = 'independent_layers_mean'"
    return sql(db, query, run_id)[0][0]


# --- lineage: every variant is a run linked to its source, with the source's settings ----------------------


def test_the_source_schedule_moves(ablation_runs):
    """The other tests need a schedule with tied and independent blocks; seed 0 of gpt2-tiny gives one."""
    schedule = states(ablation_runs.db, ablation_runs.source)
    assert len(schedule) == 10
    assert any(0 < independent_count(s) < len(s) for s in schedule)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_is_recorded_with_its_source(ablation_runs, variant):
    db, source = ablation_runs.db, ablation_runs.source
    run_id = ablation_runs.by_variant[variant]
    row = sql(db, "SELECT variant, parent_run_id, command, status, dataset, seed, preset FROM runs "
                  "WHERE run_id = ?", run_id)[0]
    src = sql(db, "SELECT dataset, seed, preset FROM runs WHERE run_id = ?", source)[0]
    assert row[:4] == (variant, source, "ablate", "finished")
    assert row[4:] == src
    # The same config except the variant and what the ablation had to resolve (and records so it can rerun), and
    # the label saying how many blocks started tied (the build never materialised them)
    got, want = config(db, run_id), config(db, source)
    assert got["variant"] == variant
    for cfg in (got, want):
        cfg.pop("variant")
        cfg.pop("setup")
        cfg["ties"].pop("independent")
        cfg["ties"].pop("perm_seed")
    assert got == want
    last_step = "SELECT max(step) FROM metrics WHERE run_id = ?"
    assert sql(db, last_step, run_id) == sql(db, last_step, source) == [(40,)]
    decisions = "SELECT count(*) FROM ties WHERE run_id = ?"
    assert sql(db, decisions, run_id) == sql(db, decisions, source)


def test_weights_really_follow_every_ablation_state(ablation_runs):
    """Distinct weight storages among the blocks always equal the independent blocks the state claims."""
    ids = list(ablation_runs.by_variant.values())
    bad = sql(ablation_runs.db, "SELECT run_id, decision FROM ties WHERE list_contains(?, run_id) "
                                "AND distinct_block_weights <> independent_layers", ids)
    assert bad == []


# --- the tie states each variant must produce ---------------------------------------------------------------


def test_final_arch_holds_the_source_final_state_throughout(ablation_runs):
    final = states(ablation_runs.db, ablation_runs.source)[-1]
    got = states(ablation_runs.db, ablation_runs.by_variant["final-arch"])
    assert len(got) == 10 and all(state == final for state in got)


def test_replay_moves_the_schedule_onto_other_layers(ablation_runs):
    db = ablation_runs.db
    run_id = ablation_runs.by_variant["replay"]
    source, replayed = states(db, ablation_runs.source), states(db, run_id)
    assert [independent_count(s) for s in replayed] == [independent_count(s) for s in source]
    assert any(a != b for a, b in zip(replayed, source, strict=True))
    # Decision d replays the source's state d (not d + 1), under the permutation the config records.
    perm = random_permutation(4, config(db, run_id)["ties"]["perm_seed"])
    assert replayed == [permute_state(s, perm) for s in source]


def test_no_tying_keeps_every_block_independent(ablation_runs):
    db = ablation_runs.db
    run_id = ablation_runs.by_variant["no-tying"]
    assert all(state == [0, 1, 2, 3] for state in states(db, run_id))
    conventional = sql(db, "SELECT value FROM metrics WHERE run_id = ? AND name = 'conventional_params'",
                       run_id)
    trainable = sql(db, "SELECT DISTINCT trainable_params FROM memory WHERE run_id = ?", run_id)
    assert trainable == [(int(conventional[0][0]),)]


@pytest.mark.parametrize("variant", STATIC)
def test_static_schemes_match_the_source_mean(ablation_runs, variant):
    db = ablation_runs.db
    run_id = ablation_runs.by_variant[variant]
    # Rounded half up from the step-weighted mean the source printed; recorded in the config (all-shared
    # has one independent block whatever the source did).
    independent = max(1, math.floor(logged_mean_independent(db, ablation_runs.source) + 0.5))
    recorded = config(db, run_id)["ties"]["independent"]
    assert recorded == (1 if variant == "static-all" else independent)
    want = static_state(variant, 4, independent)
    assert all(state == want for state in states(db, run_id))


def test_random_logs_actions_and_rewards(ablation_runs):
    db = ablation_runs.db
    run_id = ablation_runs.by_variant["random"]
    ties = sql(db, "SELECT state, action FROM ties WHERE run_id = ? ORDER BY decision", run_id)
    for (before, _), (after, action) in itertools.pairwise(ties):
        assert action is not None and transition(list(before), list(action)) == list(after)
    decisions = sql(db, "SELECT explored, reward, ppl FROM decisions WHERE run_id = ? ORDER BY decision",
                    run_id)
    assert len(decisions) == 9
    # Every random action is exploration, rewarded on the fresh batch's perplexity like the agent's.
    assert all(explored and reward is not None and ppl > 1 for explored, reward, ppl in decisions)


def test_without_a_source_the_backbone_is_named(ablation_runs):
    db = ablation_runs.db
    free = ((ablation_runs.free_static, "static-cycle"), (ablation_runs.free_random, "random"))
    for run_id, variant in free:
        assert sql(db, "SELECT variant, parent_run_id FROM runs WHERE run_id = ?", run_id) == [(variant, None)]
    assert config(db, ablation_runs.free_static)["ties"]["independent"] == 3
    assert all(s == [0, 1, 2, 0] for s in states(db, ablation_runs.free_static))
    explored = sql(db, "SELECT count(*) FILTER (WHERE explored) FROM decisions WHERE run_id = ?",
                   ablation_runs.free_random)
    assert explored == [(2,)]  # 12 steps, a decision every 4


# --- static schemes by hand ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("scheme", "blocks", "independent", "want"), [
    ("static-sequence", 6, 3, [0, 0, 2, 2, 4, 4]),
    ("static-cycle", 6, 3, [0, 1, 2, 0, 1, 2]),
    ("static-cycle-rev", 6, 3, [0, 1, 2, 2, 1, 0]),
    ("static-all", 6, 3, [0] * 6),
    ("static-sequence", 4, 2, [0, 0, 2, 2]),
    ("static-cycle", 4, 2, [0, 1, 0, 1]),
    ("static-cycle-rev", 4, 2, [0, 1, 1, 0]),
    ("static-cycle-rev", 8, 3, [0, 1, 2, 0, 1, 2, 1, 0]),
    ("static-sequence", 5, 2, [0, 0, 0, 3, 3]),
    ("static-cycle", 3, 5, [0, 1, 2]),  # more independent blocks than blocks: all of them
])
def test_static_state_by_hand(scheme, blocks, independent, want):
    state = static_state(scheme, blocks, independent)
    assert state == want
    assert independent_count(state) == (1 if scheme == "static-all" else min(independent, blocks))


# --- what the source run hands over -------------------------------------------------------------------------


def test_source_schedule_is_indexed_by_decision(tmp_path):
    db = tmp_path / "r.duckdb"
    with RunWriter(db, run_id="src", flush_every_s=3600) as w:
        w.start("train", "gpt2", "wikitext-2", "dynamic", {"seed": 0})
        # Decision 2 is missing from the log: it keeps the state of decision 1.
        for decision, state in ((0, [0, 0, 0]), (1, [0, 1, 0]), (3, [0, 1, 2])):
            w.tie(decision=decision, step=decision * 5, state=state, action=state,
                  independent_layers=independent_count(state), distinct_block_weights=None)
        w.metric(15, "train", "independent_layers_mean", 1.8)
    source = load_source_run(db, "sr")
    assert source["run_id"] == "src"
    assert source["schedule"] == [[0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 2]]
    assert source["initial"] == [0, 0, 0] and source["final_state"] == [0, 1, 2]
    assert source["mean_independent"] == 1.8  # the trainer's step-weighted mean, not the per-decision one


# --- user errors: one sentence naming the fix, no training started ------------------------------------------


@pytest.mark.parametrize(("args", "code", "words"), [
    # no --from-run and no dynamic run in the registry to start from
    (["--variant", "final-arch", "--backbone", "gpt2"], 1, ["--from-run RUN", "`dyntie train gpt2`", "--table runs"]),
    (["--variant", "shuffle", "--backbone", "gpt2"], 2, ["shuffle", "static-cycle-rev"]),
    (["--variant", "no-tying"], 1, ["--from-run RUN", "`dyntie train gpt2`", "--table runs", "--backbone NAME"]),
    (["--variant", "random", "--backbone", "gpt2", "--independent", "2"], 2, ["static-* variants and grow only"]),
    (["--variant", "static-cycle", "--backbone", "gpt2", "--independent", "0"], 2, ["at least 1"]),
    (["--variant", "replay", "--from-run", "nosuchrun"], 1, ["No run 'nosuchrun'", "--table runs"]),
])
def test_user_errors(runner, tmp_path, args, code, words):
    db = tmp_path / "r.duckdb"
    with RunWriter(db, run_id="src", flush_every_s=3600) as w:
        w.start("train", "gpt2", "wikitext-2", "dynamic", {})
    r = invoke(runner, "ablate", *args, "--db", db, "--out", tmp_path / "runs", "--quiet")
    assert r.exit_code == code, r.stderr
    assert r.stderr.startswith("Error: ") and len(r.stderr.strip().splitlines()) == 1
    assert all(word in r.stderr for word in words), r.stderr
    assert r.stdout == ""


def test_errors_that_need_the_source(ablation_runs, runner, tmp_path):
    common = ("--db", ablation_runs.db, "--out", tmp_path / "runs", "--quiet")
    source = ablation_runs.source
    r = invoke(runner, "ablate", "--variant", "no-tying", "--from-run", source, "--preset", "gpt2-cpu",
               *common)
    assert r.exit_code == 2 and "--preset cannot be combined with a source run" in r.stderr
    r = invoke(runner, "ablate", "--variant", "no-tying", "--from-run", source, "--backbone", "vit", *common)
    assert r.exit_code == 2 and "drop --backbone" in r.stderr
    # A run without tie history cannot give final-arch its state.
    empty = tmp_path / "empty.duckdb"
    with RunWriter(empty, run_id="bare", flush_every_s=3600) as w:
        w.start("train", "gpt2", "wikitext-2", "dynamic", config(ablation_runs.db, source))
    r = invoke(runner, "ablate", "--variant", "final-arch", "--from-run", "bare", "--db", empty, "--quiet")
    assert r.exit_code == 1 and "has no tie history" in r.stderr
