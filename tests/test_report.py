"""`dyntie report` over real ablation runs: the paper table, --compare, --table agent, and every plot.

The runs come from ``tests/test_ablate.py``'s session fixture (one dynamic gpt2-tiny run and one ablation of
it per variant), so every number checked here is checked against direct SQL on a registry dyntie wrote itself.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

import duckdb
import matplotlib.image
import numpy as np
import pytest

from dyntie_cli.core.ties import transition
from dyntie_cli.report.tables import render
from dyntie_cli.results.queries import QUERIES, independent_lifetime, run_query
from dyntie_cli.results.writer import RunWriter
from tests.conftest import invoke
from tests.test_ablate import AblationRuns, build_ablation_runs, sql
from tests.test_registry import left_out

FORMATS = ("table", "csv", "json", "markdown")
SHOWN = ("final-arch", "replay", "no-tying", "static-cycle")


@pytest.fixture(scope="session")
def ablation_runs(tmp_path_factory, dyntie_cache) -> AblationRuns:
    return build_ablation_runs(tmp_path_factory)


def paper_ids(runs: AblationRuns) -> list[str]:
    return [runs.source, *(runs.by_variant[v] for v in SHOWN)]


def report(runner, db: Path, *args: Any) -> str:
    r = invoke(runner, "report", *args, "--db", db)
    assert r.exit_code == 0, r.stderr
    return r.stdout


def parsed(text: str, fmt: str) -> dict[str, dict[str, Any]]:
    """A transposed report as {quantity: {column: value}}, from csv (text cells) or json."""
    records = list(csv.DictReader(io.StringIO(text))) if fmt == "csv" else json.loads(text)
    return {row["quantity"]: row for row in records}


def number(value: Any) -> float:
    return float(value)


QUANTITIES = {  # paper-table quantity -> the SQL it must equal, straight from the registry tables
    "result": "SELECT value FROM metrics WHERE run_id = $run AND split = 'test' AND name = 'ppl'",
    "trainable_params_mean": "SELECT value FROM metrics WHERE run_id = $run AND name = 'trainable_params_mean'",
    "trainable_params_end": "SELECT arg_max(trainable_params, step) FROM memory WHERE run_id = $run",
    "trainable_params_conventional": "SELECT value FROM metrics WHERE run_id = $run "
                                     "AND name = 'conventional_params'",
    "independent_layers_mean": "SELECT value FROM metrics WHERE run_id = $run "
                               "AND name = 'independent_layers_mean'",
    "independent_layers_end": "SELECT arg_max(independent_layers, decision) FROM ties WHERE run_id = $run",
    "training_peak_bytes": "SELECT max(peak_bytes) FROM memory WHERE run_id = $run",
    "process_peak_bytes": "SELECT greatest(max(process_peak_bytes), (SELECT value FROM metrics WHERE run_id = $run "
                          "AND name = 'process_peak_bytes')) FROM memory WHERE run_id = $run",
}


def expected(db: Path, run_ids: list[str]) -> dict[str, dict[str, float]]:
    """{run: {quantity: value}} for every quantity in QUANTITIES, over one connection."""
    con = duckdb.connect(str(db), read_only=True)
    try:
        return {run_id: {name: con.execute(query, {"run": run_id}).fetchone()[0]
                         for name, query in QUANTITIES.items()} for run_id in run_ids}
    finally:
        con.close()


# --- the paper table ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_paper_table_matches_the_registry(ablation_runs, runner, fmt):
    db, ids = ablation_runs.db, paper_ids(ablation_runs)
    text = report(runner, db, "--table", "paper", *(a for i in ids for a in ("--run", i)), "--format", fmt)
    table = parsed(text, fmt)
    assert list(table["variant"])[1:] == ids  # one column per run, in the order asked for
    assert [table["variant"][i] for i in ids] == ["dynamic", *SHOWN]
    assert {table["metric"][i] for i in ids} == {"ppl (test)"}
    for run_id, want in expected(db, ids).items():
        for quantity, value in want.items():
            assert number(table[quantity][run_id]) == pytest.approx(value), (run_id, quantity)


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_paper_table_for_people_names_runs_and_variants(ablation_runs, runner, fmt):
    db, ids = ablation_runs.db, paper_ids(ablation_runs)
    text = report(runner, db, "--table", "paper", *(a for i in ids for a in ("--run", i)), "--format", fmt)
    lines = text.splitlines()
    header = next(line for line in lines if "quantity" in line)
    assert all(run_id in header for run_id in ids)
    variants = next(line for line in lines if line.lstrip("| ").startswith("variant"))
    assert all(v in variants for v in ("dynamic", *SHOWN))
    ppl = expected(db, [ablation_runs.source])[ablation_runs.source]["result"]
    assert f"{ppl:.2f}" in next(line for line in lines if line.lstrip("| ").startswith("result"))
    if fmt == "markdown":
        assert all(line.startswith("|") for line in lines if line and not line.startswith("###"))


# --- compare: ratios to the first run -----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_compare_gives_ratios_to_the_first_run(ablation_runs, runner, fmt):
    db = ablation_runs.db
    first = ablation_runs.source
    others = [ablation_runs.by_variant["no-tying"], ablation_runs.by_variant["static-all"]]
    table = parsed(report(runner, db, "--compare", first, *others, "--format", fmt), fmt)
    want = expected(db, [first, *others])
    for quantity in ("result", "trainable_params_mean", "process_peak_bytes", "independent_layers_end"):
        base = want[first][quantity]
        for run_id in others:
            value = want[run_id][quantity]
            assert number(table[quantity][run_id]) == pytest.approx(value)
            assert number(table[quantity][f"{run_id} / {first}"]) == pytest.approx(value / base)
    # Text rows have no ratio; no-tying trains every block, so more parameters than the dynamic run.
    assert table["variant"][f"{others[0]} / {first}"] in ("", None)
    assert number(table["trainable_params_mean"][f"{others[0]} / {first}"]) > 1


@pytest.mark.parametrize("fmt", ["table", "markdown"])
def test_compare_for_people_shows_ratios(ablation_runs, runner, fmt):
    first, other = ablation_runs.source, ablation_runs.by_variant["final-arch"]
    text = report(runner, ablation_runs.db, "--compare", first, other, "--format", fmt)
    assert f"{other} / {first}" in text
    result_line = next(line for line in text.splitlines() if line.lstrip("| ").startswith("result"))
    assert result_line.rstrip(" |").endswith("x")


def test_compare_needs_two_runs(ablation_runs, runner):
    r = invoke(runner, "report", "--compare", ablation_runs.source, "--db", ablation_runs.db)
    assert r.exit_code == 2 and "at least two runs" in r.stderr


# --- agent table --------------------------------------------------------------------------------------------

# Block 1 is independent at decisions 1-2 and again at 4 (still open), block 2 at 2-3, block 3 at 3-4:
# spells of 2, 1, 2 and 2 decisions, a mean lifetime of 7 / 4.
HAND_STATES = [[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 2, 0], [0, 0, 2, 3], [0, 1, 0, 3]]
HAND_CHANGED = [0, 1, 1, 2, 2]
HAND_DECISIONS = [  # greedy_agreement, q_spread, td_loss for decisions 1..4
    (None, 0.5, 4.0), (0.25, 0.25, 2.0), (0.5, 0.75, 1.0), (0.75, 0.5, 1.0),
]


@pytest.fixture
def hand_registry(tmp_path) -> Path:
    db = tmp_path / "hand.duckdb"
    with RunWriter(db, run_id="hand", flush_every_s=3600) as w:
        w.start("train", "gpt2", "wikitext-2", "dynamic", {})
        for decision, (state, changed) in enumerate(zip(HAND_STATES, HAND_CHANGED, strict=True)):
            w.tie(decision=decision, step=10 * decision, state=state, action=state,
                  independent_layers=sum(s == i for i, s in enumerate(state)), distinct_block_weights=None,
                  changed_blocks=changed)
        for decision, (agreement, spread, td) in enumerate(HAND_DECISIONS, start=1):
            w.decision(decision=decision, step=10 * decision, epsilon=0.5, explored=False, reward=-1.0,
                       q_predicted=0.0, q_target=0.0, td_loss=td, greedy_agreement=agreement, q_spread=spread)
    return db


def test_agent_table_on_a_hand_made_history(hand_registry, runner):
    row = json.loads(report(runner, hand_registry, "--table", "agent", "--format", "json"))[0]
    assert row["run_id"] == "hand" and row["variant"] == "dynamic"
    assert row["decisions"] == 4
    assert row["changed_blocks_mean"] == pytest.approx((1 + 1 + 2 + 2) / 4)  # decision 0 is no choice
    assert row["greedy_agreement_mean"] == pytest.approx(0.5)  # the first decision has nothing to agree with
    assert row["q_spread_mean"] == pytest.approx(0.5)
    assert row["td_loss_mean"] == pytest.approx(2.0)
    assert row["independent_lifetime_mean"] == pytest.approx(7 / 4)


def _study_run(db: Path, run_id: str, variant: str, study: str, seed: int, states: list[list[int]]) -> None:
    with RunWriter(db, run_id=run_id, flush_every_s=3600) as w:
        w.start("train", "gpt2", "wikitext-2", variant, {"study": {"name": study}}, seed=seed)
        for decision, state in enumerate(states):
            w.tie(decision=decision, step=10 * decision, state=state, action=state,
                  independent_layers=sum(s == i for i, s in enumerate(state)), distinct_block_weights=None,
                  changed_blocks=0)


def test_agent_table_counts_the_decisions_that_differ_from_the_q_off_run_of_the_same_study_and_seed(tmp_path, runner):
    db = tmp_path / "twins.duckdb"
    q_off = [[0, 0, 0], [0, 1, 0], [0, 1, 0], [0, 1, 2], [0, 1, 2]]
    dynamic = [[0, 0, 0], [0, 1, 0], [0, 0, 0], [0, 1, 2], [0, 1, 0]]  # differs after decisions 2 and 4
    _study_run(db, "dyn", "dynamic", "s", 0, dynamic)
    _study_run(db, "twin", "q-off", "s", 0, q_off)
    _study_run(db, "other-seed", "q-off", "s", 1, dynamic)  # not its twin: another seed
    _study_run(db, "other-study", "q-off", "t", 0, dynamic)  # nor another study's run
    _study_run(db, "alone", "dynamic", "u", 0, dynamic)  # a study with no q-off run: no count
    rows = {row["run_id"]: row for row in json.loads(report(runner, db, "--table", "agent", "--format", "json"))}
    assert rows["dyn"]["differs_from_q_off"] == 2
    assert rows["alone"]["differs_from_q_off"] is None
    assert rows["twin"]["differs_from_q_off"] is None  # q-off itself is the reference


@pytest.mark.parametrize(("states", "want"), [
    ([[0, 0, 0]] * 3, math.nan),  # only block 0 ever owns weights: no spell to measure
    ([[0, 1, 2]] * 5, 5.0),  # never re-tied: the whole run
    ([[0, 1], [0, 0], [0, 1], [0, 0], [0, 1]], 1.0),  # flips every decision
    ([[0, 0, 2], [0, 1, 2], [0, 1, 2], [0, 0, 0]], (2 + 3) / 2),  # block 1 for 2, block 2 for 3
])
def test_independent_lifetime(states, want):
    got = independent_lifetime(states)
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want)


def test_agent_table_on_real_runs(ablation_runs, runner):
    db = ablation_runs.db
    ids = [ablation_runs.source, ablation_runs.by_variant["no-tying"], ablation_runs.by_variant["random"]]
    text = report(runner, db, "--table", "agent", *(a for i in ids for a in ("--run", i)), "--format", "csv")
    rows = {row["run_id"]: row for row in csv.DictReader(io.StringIO(text))}
    assert list(rows) == ids
    assert {int(row["decisions"]) for row in rows.values()} == {9}
    # A fixed state never changes and its blocks stay independent for all ten logged states.
    fixed = rows[ids[1]]
    assert float(fixed["changed_blocks_mean"]) == 0 and float(fixed["independent_lifetime_mean"]) == 10
    assert fixed["td_loss_mean"] == ""  # nothing learns: empty, not zero
    dynamic = rows[ids[0]]
    want_td = sql(db, "SELECT avg(td_loss) FROM decisions WHERE run_id = ? AND decision > 0", ids[0])[0][0]
    assert float(dynamic["td_loss_mean"]) == pytest.approx(want_td)
    rows = sql(db, "SELECT state FROM ties WHERE run_id = ? ORDER BY decision", ids[0])
    schedule = [list(row[0]) for row in rows]
    assert float(dynamic["independent_lifetime_mean"]) == pytest.approx(independent_lifetime(schedule))


# --- plots --------------------------------------------------------------------------------------------------

PLOT_RUNS = {  # kind -> variants plotted together (None: the source run)
    "ties": [None, "replay"],
    "layers": [None, "random", "no-tying"],
    "memory": [None, "no-tying"],
    "params": [None, "static-all", "no-tying"],
    "metrics": [None, "final-arch", "replay", "no-tying"],
}


def assert_real_png(path: Path) -> None:
    """A PNG of a real figure: a sensible size, several colours, not a blank page."""
    image = matplotlib.image.imread(path)
    height, width = image.shape[:2]
    assert width >= 300 and height >= 200
    pixels = image[..., :3].reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 10
    assert (pixels < 0.9).any(axis=1).mean() > 0.02  # a visible share of the page is not white


@pytest.mark.parametrize("kind", list(PLOT_RUNS))
def test_each_plot_is_a_real_png(ablation_runs, runner, tmp_path, kind):
    ids = [ablation_runs.by_variant[v] if v else ablation_runs.source for v in PLOT_RUNS[kind]]
    target = tmp_path / "figs" / f"{kind}.png"
    out = report(runner, ablation_runs.db, "--plot", kind, *(a for i in ids for a in ("--run", i)),
                 "--out", target)
    assert out.strip() == str(target)
    assert_real_png(target)


def test_plot_default_file_is_named_after_kind_and_run(ablation_runs, runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = ablation_runs.source
    out = report(runner, ablation_runs.db, "--plot", "ties", "--run", source[:-1])  # a prefix works too
    assert Path(out.strip()) == tmp_path / f"ties-{source}.png"
    assert_real_png(tmp_path / f"ties-{source}.png")


def test_plot_errors_name_the_fix(ablation_runs, runner, tmp_path, hand_registry):
    r = invoke(runner, "report", "--plot", "histogram", "--db", ablation_runs.db)
    assert r.exit_code == 2
    assert all(kind in r.stderr for kind in PLOT_RUNS), r.stderr
    r = invoke(runner, "report", "--plot", "ties", "--out", tmp_path / "ties.txt", "--db", ablation_runs.db)
    assert r.exit_code == 2 and ".png" in r.stderr
    # The hand-made run logged ties but never a memory row or a validation metric.
    for kind, missing in (("memory", "no memory rows"), ("metrics", "no validation metrics")):
        r = invoke(runner, "report", "--plot", kind, "--run", "hand", "--db", hand_registry,
                   "--out", tmp_path / "x.png")
        assert r.exit_code == 1, r.stderr
        assert f"Run hand has {missing}" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


# --- what each table counts, and plots read correctly ------------------------------------------------------


def test_agent_and_layers_tables_count_the_same_decisions(ablation_runs, runner):
    db = ablation_runs.db
    ids = [ablation_runs.source, ablation_runs.by_variant["no-tying"], ablation_runs.by_variant["final-arch"]]
    runs = [a for i in ids for a in ("--run", i)]
    agent = json.loads(report(runner, db, "--table", "agent", *runs, "--format", "json"))
    layers = json.loads(report(runner, db, "--table", "layers", *runs, "--format", "json"))
    for run_id, a, lay in zip(ids, agent, layers, strict=True):
        made = sql(db, "SELECT count(*) FROM ties WHERE run_id = ? AND decision > 0", run_id)[0][0]
        assert a["decisions"] == lay["decisions"] == made == 9  # the initial state (decision 0) is no decision
        assert max(lay["independent_decisions_per_layer"]) <= made
    no_tying = layers[1]
    assert no_tying["independent_decisions_per_layer"] == [9] * len(no_tying["independent_decisions_per_layer"])


def test_memory_plot_starts_at_zero_and_marks_the_intervals_with_a_validation(ablation_runs):
    from dyntie_cli.report import plots
    from dyntie_cli.results.db import read_registry

    ids = [ablation_runs.source, ablation_runs.by_variant["no-tying"]]
    with read_registry(ablation_runs.db) as con:
        data = plots._load_memory(con, ids)
        labels = plots._run_labels(con, ids)
    source = data[data.run_id == ids[0]]
    validated = [s for (s,) in sql(ablation_runs.db, "SELECT DISTINCT step FROM metrics WHERE run_id = ? AND "
                                                     "split = 'validation' ORDER BY step", ids[0])]
    logged = sorted(source.step)
    # a validation at step v runs after the reading at v: its memory shows in the next reading
    want = sorted({next(s for s in logged if s > v) for v in validated if v < max(logged)})
    assert sorted(source[source.after_validation].step) == want and want
    figure = plots._draw_memory(data, labels)
    peak, state = figure.axes[:2]
    assert peak.get_ylim()[0] == 0 and state.get_ylim()[0] == 0
    assert "interval with a validation (and its checkpoint)" in [t.get_text() for t in peak.get_legend().texts]


def _moves(state: list[int], before: list[int]) -> tuple[int, int]:
    """Blocks a decision untied and tied."""
    untied = sum(s == i != b for i, (s, b) in enumerate(zip(state, before)))
    tied = sum(s != i == b for i, (s, b) in enumerate(zip(state, before)))
    return untied, tied


def _evidence_run(w: RunWriter, states: list[list[int]], effects: tuple[float, float], noise: list[float],
                  heldout: tuple[tuple[float, float], list[float]] | None = None) -> None:
    """A run whose decision d is rewarded 0.1 * d (training progress) plus the given effects of each block it
    untied and tied, plus noise; with ``heldout`` (effects, noise), also a held-out probe whose -log perplexity
    is 0.2 * d plus those, logged at the end of the decision's interval."""
    w.start("train", "gpt2", "wikitext-2", "dynamic", {"train": {"max_steps": 10 * len(states)},
                                                       "ties": {"decide_every": 10}})
    for d, state in enumerate(states):
        w.tie(decision=d, step=10 * d, state=state, action=state, independent_layers=sum(s == i for i, s in
              enumerate(state)), distinct_block_weights=None, changed_blocks=0)
        if d:
            untied, tied = _moves(state, states[d - 1])
            w.decision(decision=d, step=10 * d, epsilon=0.5, explored=True,
                       reward=0.1 * d + effects[0] * untied + effects[1] * tied + noise[d], q_predicted=0.0,
                       q_target=0.0, td_loss=0.0, greedy_agreement=None, q_spread=0.0)
            if heldout:
                (untie, tie), probe_noise = heldout
                w.metric(10 * d + 10, "reward", "decision", d)
                w.metric(10 * d + 10, "reward", "ppl_heldout",
                         math.exp(6 - 0.2 * d - untie * untied - tie * tied - probe_noise[d]))


def _local_moves(g: np.random.Generator, blocks: int = 6, decisions: int = 8) -> list[list[int]]:
    """Tie states from all tied, each decision one random local move or none: untie a block, or join it to the
    group before."""
    states = [[0] * blocks]
    for _ in range(decisions):
        s, i = states[-1], int(g.integers(1, blocks))
        action = [k if s[k] == k else k - 1 for k in range(blocks)]  # every row keeps (groups are consecutive)
        move = int(g.integers(0, 3))
        if move:
            action[i] = i if move == 1 else i - 1
        states.append(transition(s, action))
    return states


def test_evidence_table_recovers_known_effects_of_tie_moves(tmp_path, runner):
    """Rewards that follow training progress plus a known effect of each newly untied (+0.03) and tied (-0.05)
    block: the table gives those effects back, separates runs of another depth, and estimates nothing from a
    lone run (its moves cannot be told from its decisions' levels)."""
    db = tmp_path / "evidence.duckdb"
    g = np.random.default_rng(0)
    for r in range(6):
        states = _local_moves(g)
        with RunWriter(db, run_id=f"r{r}", flush_every_s=3600) as w:
            _evidence_run(w, states, (0.03, -0.05), list(g.normal(0, 0.002, 9)))
    with RunWriter(db, run_id="deep", flush_every_s=3600) as w:
        _evidence_run(w, [[0] * 12, [0] * 6 + [6] * 6, [0] * 6 + [6] * 6], (0.03, -0.05), [0.0] * 3)
    table = {row["blocks"]: row for row in json.loads(report(runner, db, "--table", "evidence", "--format", "json"))}
    six = table[6]
    assert six["runs"] == 6 and six["transitions"] == 48 and six["steps"] == 90 and six["decide_every"] == 10
    assert six["untie_effect"] == pytest.approx(0.03, abs=0.004) and six["untie_t"] > 5
    assert six["tie_effect"] == pytest.approx(-0.05, abs=0.004)
    assert six["reward_noise_sd"] == pytest.approx(0.002, rel=0.5)
    assert table[12]["runs"] == 1 and table[12]["untie_effect"] is None and table[12]["untie_se"] is None
    # at 80 columns the effects, their standard errors and the noise stay
    fitted = render(run_query("evidence", db), "table", width=80)
    assert not left_out(fitted) & {"backbone", *QUERIES["evidence"].headline}


def test_evidence_table_fits_each_probed_reward_on_the_same_decisions(tmp_path, runner):
    """Runs that also probed a held-out reward (reward/decision and reward/ppl_heldout rows at the end of each
    decision's interval): one row per reward on the same decisions, the acting one as recorded, the probe as -log
    of its perplexity, each with its own effects and noise."""
    db = tmp_path / "probes.duckdb"
    g = np.random.default_rng(1)
    for r in range(6):
        states = _local_moves(g)
        with RunWriter(db, run_id=f"r{r}", flush_every_s=3600) as w:
            _evidence_run(w, states, (0.03, -0.05), list(g.normal(0, 0.02, 9)),
                          heldout=((0.01, -0.02), list(g.normal(0, 0.0005, 9))))
    table = {row["reward"]: row for row in json.loads(report(runner, db, "--table", "evidence", "--format", "json"))}
    assert set(table) == {"relative on fresh", "-log ppl on heldout"}  # the acting reward of a run recorded without
    acting, heldout = table["relative on fresh"], table["-log ppl on heldout"]  # agent settings: the legacy one
    assert acting["transitions"] == heldout["transitions"] == 48
    assert heldout["untie_effect"] == pytest.approx(0.01, abs=0.001) and heldout["untie_t"] > 10
    assert heldout["tie_effect"] == pytest.approx(-0.02, abs=0.001)
    assert heldout["reward_noise_sd"] == pytest.approx(0.0005, rel=0.5)
    assert acting["reward_noise_sd"] == pytest.approx(0.02, rel=0.5)
