"""The shared per-block Q-network (agent.qnet=shared), warm starts from earlier runs, and the greedy_moves record."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from dyntie_cli.core.agent import QAgent, greedy_moves
from dyntie_cli.core.qnets import SHARED_FEATURES, SharedQNetwork
from dyntie_cli.core.ties import all_tied, canonicalize, independent_count, transition
from dyntie_cli.errors import DyntieError
from dyntie_cli.settings import AgentSettings
from tests.conftest import invoke, rows
from tests.test_grow_qoff import _check_tie_log

#: the learning machinery alone: nothing between the Q-network and its greedy choice
BARE = dict(gamma=0.0, keep_bias=0.0, keep_bonus=0.0, keep_trained=False, max_independent=0)


def _shared(**kw) -> AgentSettings:
    return AgentSettings.from_preset("default", qnet="shared", **kw)


# --- the network ----------------------------------------------------------------------------------------------


def test_shared_network_has_one_size_at_any_depth_and_loads_across_depths():
    agents = {L: QAgent(L, _shared(seed=1)) for L in (4, 12, 48)}
    counts = {L: sum(p.numel() for p in a.q.parameters()) for L, a in agents.items()}
    assert len(set(counts.values())) == 1
    assert counts[4] == sum(p.numel() for p in SharedQNetwork(_shared()).parameters())
    # the matrix network grows with L squared
    matrix = {L: sum(p.numel() for p in QAgent(L, AgentSettings.from_preset("default")).q.parameters())
              for L in (4, 12, 48)}
    assert matrix[4] < matrix[12] < matrix[48]
    # a 12-block agent's network applies to 48 blocks: the same weights give the same scores to the same entries
    small, big = agents[12], QAgent(48, _shared(seed=2))
    big.warm_start([], small.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(small.q.state_dict().values(), big.q.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(big.q.state_dict().values(), big.target.state_dict().values()))
    assert torch.isfinite(big.q_matrix(all_tied(48), 0.5).tril()).all()


@pytest.mark.parametrize("L", [1, 5, 12, 48])
def test_shared_q_matrix_is_lower_triangular_and_matches_the_taken_entries(L):
    agent = QAgent(L, _shared(seed=0))
    g = torch.Generator().manual_seed(L)
    states = torch.tensor([_state(L, g) for _ in range(3)])
    progress = torch.tensor([0.0, 0.4, 1.0])
    with torch.no_grad():
        q = agent.q(states, progress)
        above = torch.ones(L, L, dtype=torch.bool).triu(1)
        assert torch.isneginf(q[:, above]).all() and torch.isfinite(q[:, ~above]).all()
        actions = torch.tensor([[int(torch.randint(0, i + 1, (1,), generator=g)) for i in range(L)] for _ in range(3)])
        taken = agent.q.q_taken(states, progress, actions)
        assert torch.allclose(taken, q.gather(2, actions.unsqueeze(2)).squeeze(2), atol=1e-6)
    feats = agent.q.features(states, progress, *torch.tril_indices(L, L).unsqueeze(1).expand(2, 3, -1))
    assert feats.shape[-1] == len(SHARED_FEATURES) and torch.isfinite(feats).all()


def test_features_depend_on_the_state_and_progress_only():
    """A replayed transition is scored as the agent saw it: the same (state, progress) gives the same Q matrix,
    whatever else the agent has seen or done, and progress is ignored without progress_input."""
    a, b = QAgent(12, _shared(seed=4)), QAgent(12, _shared(seed=4))
    s = [0, 0, 0, 3, 3, 3, 3, 7, 7, 7, 7, 7]
    for d in range(5):  # a acts and learns; b's network is then given a's weights
        dec = a.act(s, d / 5)
        a.update(s, dec.action, 0.1 * d, transition(s, dec.action), d / 5, (d + 1) / 5)
    b.q.load_state_dict(a.q.state_dict())
    assert torch.equal(a.q_matrix(s, 0.3), b.q_matrix(s, 0.3))
    no_progress = QAgent(12, _shared(seed=4, progress_input=False))
    assert torch.equal(no_progress.q_matrix(s, 0.0), no_progress.q_matrix(s, 0.9))


def _row_cost(L: int, i: int, j: int) -> float:
    """A per-row cost that means the same at any depth: the upper half of the stack unties, the lower half
    follows the block before."""
    if i == 0:
        return 0.0
    best = i if i / (L - 1) > 0.5 else i - 1
    return 0.0 if j == best else 1.0


def _best(L: int) -> list[int]:
    return [min(range(i + 1), key=lambda j: _row_cost(L, i, j)) for i in range(L)]


def _state(L: int, g: torch.Generator) -> list[int]:
    """A canonical state whose share of independent blocks is itself random (from all tied to all independent)."""
    q = float(torch.rand((), generator=g))
    return canonicalize([i if float(torch.rand((), generator=g)) < q else int(torch.randint(0, i + 1, (1,), generator=g))
                         for i in range(L)])


def _known_reward_transitions(depths, per_depth, seed=0):
    """Transitions of a policy that takes each row's best entry 70% of the time (as a run late in its schedule
    mostly repeats what it learned), rewarded with minus the mean row cost."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for L in depths:
        best = _best(L)
        for _ in range(per_depth):
            s = _state(L, g)
            a = [best[i] if float(torch.rand((), generator=g)) < 0.7 else int(torch.randint(0, i + 1, (1,), generator=g))
                 for i in range(L)]
            r = -sum(_row_cost(L, i, j) for i, j in enumerate(a)) / L
            out.append((s, a, r, transition(s, a), 0.0, 0.0))
    return out


def _share_right(agent: QAgent, L: int, g: torch.Generator) -> list[float]:
    best = _best(L)
    shares = []
    for s in (all_tied(L), list(range(L)), _state(L, g), _state(L, g)):
        greedy = agent.act(s, greedy_only=True).greedy
        shares.append(sum(a == b for a, b in zip(greedy, best)) / L)
    return shares


def test_per_row_training_learns_a_known_per_row_reward_at_several_depths_with_one_network():
    """One network, trained on transitions of 6- and 12-block runs (L training rows each), chooses nearly every
    row's best entry at those depths and at depths it never saw (24, 48); untrained, it does not."""
    cfg = _shared(seed=0, lr=3e-3, warm_updates=1500, progress_input=False, **BARE)
    teacher = QAgent(12, cfg)
    teacher.warm_start(_known_reward_transitions((6, 12), 300))
    trained, untrained = [], []
    for L in (6, 12, 24, 48):
        agent, fresh = QAgent(L, cfg), QAgent(L, cfg)
        agent.warm_start([], teacher.state_dict())
        trained += _share_right(agent, L, torch.Generator().manual_seed(100 + L))
        untrained += _share_right(fresh, L, torch.Generator().manual_seed(100 + L))
    assert min(trained) >= 0.6 and sum(trained) / len(trained) >= 0.85, trained
    assert sum(trained) / len(trained) > sum(untrained) / len(untrained) + 0.3


def test_shared_agent_learns_a_known_reward_online():
    """The act/update loop (exploration, replay, target network) with the shared network, as for the matrix one."""
    L = 8
    cfg = _shared(seed=3, lr=3e-3, progress_input=False, **BARE)
    agent = QAgent(L, cfg, total_decisions=150)
    s = all_tied(L)
    for _ in range(150):
        dec = agent.act(s, 0.0)
        r = -sum(_row_cost(L, i, j) for i, j in enumerate(dec.action))
        s2 = transition(s, dec.action)
        agent.update(s, dec.action, r, s2)
        s = s2
    assert agent.act(s, greedy_only=True).greedy == _best(L)


def test_the_default_agents_structure_works_with_the_shared_network():
    """keep bias, local moves, keep_trained, the budget, the run schedule and the greedy target, unchanged: groups
    stay consecutive, the budget holds, a trained block is tied only by exploration or the budget, and the agent's
    state round-trips exactly."""
    L = 24
    cfg = _shared(seed=5)
    agent = QAgent(L, cfg, total_decisions=40)
    s = all_tied(L)
    for d in range(40):
        dec = agent.act(s, d / 40)
        s2 = transition(s, dec.action)
        assert independent_count(s2) <= cfg.max_independent
        assert all(s2[i] in (i, s2[i - 1]) for i in range(1, L))  # groups of consecutive blocks
        assert all(dec.greedy[i] == i for i in range(L) if s[i] == i)  # keep_trained
        assert 0 <= dec.greedy_moves <= L - 1
        agent.update(s, dec.action, 0.05 * (d % 3), s2, d / 40, (d + 1) / 40)
        s = s2
    assert agent.epsilon == pytest.approx(cfg.epsilon_min)
    twin = QAgent(L, cfg, total_decisions=40)
    twin.load_state_dict(agent.state_dict())
    assert twin.act(s, 0.5) == agent.act(s, 0.5)


def test_q_off_never_moves_greedily_with_the_shared_network():
    L = 12
    agent = QAgent(L, _shared(seed=0, use_q=False, keep_bonus=0.0), total_decisions=30)
    s = all_tied(L)
    for d in range(30):
        dec = agent.act(s, d / 30)
        assert dec.greedy_moves == 0
        s2 = transition(s, dec.action)
        agent.update(s, dec.action, 1.0 if s2 != s else 0.0, s2, d / 30, (d + 1) / 30)
        s = s2


def test_greedy_moves_counts_the_rows_whose_greedy_choice_changes_the_state():
    s = [0, 0, 0, 3, 3, 5]
    keep = [0, 0, 1, 3, 3, 5]  # keep_target=previous: a tied row follows the block before it
    assert greedy_moves(s, keep, keep) == 0
    assert greedy_moves(s, [0, 0, 0, 3, 3, 5], keep) == 0  # row 2 points at its root directly: the same state
    assert greedy_moves(s, [0, 0, 2, 3, 3, 5], keep) == 1  # row 2 unties
    assert greedy_moves(s, [0, 0, 1, 0, 3, 4], keep) == 2  # row 3 joins block 0's group, row 5 follows row 4
    agent = QAgent(6, _shared(seed=0))
    dec = agent.act(s, 0.5)
    assert dec.greedy_moves == greedy_moves(s, dec.greedy, agent._keep_entries(torch.tensor([s]))[0].tolist())


def test_matrix_network_refuses_knowledge_of_another_depth():
    small = QAgent(4, AgentSettings.from_preset("default"))
    big = QAgent(8, AgentSettings.from_preset("default"))
    with pytest.raises(DyntieError, match="only a shared network"):
        big.warm_start([], small.state_dict())
    with pytest.raises(DyntieError, match="use agent.qnet=shared"):
        big.warm_start(_known_reward_transitions((4,), 2))
    with pytest.raises(DyntieError, match="shared Q-network and this run a matrix"):
        big.warm_start([], QAgent(8, _shared()).state_dict())


# --- runs: warm starts, provenance, the record --------------------------------------------------------------

TINY = ("train", "gpt2", "--preset", "gpt2-tiny", "--quiet", "--set", "agent.qnet=shared")
#: a cheaper agent for the 48-block test runs (the shared network scores 1,176 entries per state)
LIGHT = ("--set", "agent.updates_per_decision=2", "--set", "agent.batch_size=8", "--set", "agent.warm_updates=20")


def _train(runner, db, out, *args) -> str:
    result = invoke(runner, *TINY, "--db", db, "--out", out, *args)
    assert result.exit_code == 0, result.stderr or result.output
    return rows(db, "SELECT run_id FROM runs ORDER BY started_at DESC, run_id DESC LIMIT 1")[0][0]


def _config(db, run_id) -> dict:
    return json.loads(rows(db, "SELECT config FROM runs WHERE run_id = ?", run_id)[0][0])


def test_a_48_block_run_warm_starts_from_12_block_runs(runner, twelve_block_runs):
    db, out, ids = twelve_block_runs
    rid = _train(runner, db, out, "--set", "model.n_layer=48", "--max-steps", "16", "--decide-every", "4",
                 "--agent-from", ",".join(ids), "--agent-weights", ids[0], *LIGHT)
    sources = _config(db, rid)["agent_sources"]
    decided = rows(db, "SELECT count(*) FROM decisions WHERE run_id = ? AND decision > 0", ids[0])[0][0]
    assert sources["runs"] == ids and sources["weights_run"] == ids[0] and sources["updates"] == 20
    assert sources["transitions"] == 2 * decided > 0
    assert _config(db, rid)["agent"]["warm_from"] == ",".join(ids)  # the setting itself, as given
    log = _check_tie_log(db, rid)
    assert len(log[0][2]) == 48
    moves = rows(db, "SELECT decision, greedy_moves FROM decisions WHERE run_id = ? ORDER BY decision", rid)
    assert [d for d, _ in moves] == [1, 2, 3] and all(0 <= m <= 47 for _, m in moves)


def test_agent_from_all_takes_every_finished_dynamic_run_of_the_backbone(runner, twelve_block_runs, tmp_path):
    db, out, ids = twelve_block_runs
    dynamic = [r for (r,) in rows(db, "SELECT run_id FROM runs WHERE variant = 'dynamic' AND status = 'finished' "
                                      "ORDER BY started_at, run_id")]
    assert set(ids) <= set(dynamic)
    rid = _train(runner, db, out, "--set", "model.n_layer=4", "--max-steps", "8", "--decide-every", "4",
                 "--agent-from", "all", "--seed", "7")
    assert _config(db, rid)["agent_sources"]["runs"] == dynamic  # the grow run is not a dynamic run
    assert _config(db, rid)["agent_sources"]["weights_run"] is None


@pytest.mark.parametrize(("args", "says"), [
    (("--agent-from", "no-such-run"), "No run 'no-such-run'"),
    (("--agent-from", "all,x"), "either all or run ids"),
    (("--set", "agent.qnet=matrix", "--agent-from", "all"), "use agent.qnet=shared"),
])
def test_bad_warm_starts_are_one_sentence(runner, twelve_block_runs, args, says):
    db, out, _ = twelve_block_runs
    before = rows(db, "SELECT count(*) FROM runs")[0][0]
    result = invoke(runner, *TINY, "--db", db, "--out", out, "--max-steps", "4", *args)
    assert result.exit_code != 0 and says in (result.stderr or result.output)
    assert "Traceback" not in (result.stderr or result.output)
    assert rows(db, "SELECT count(*) FROM runs")[0][0] == before  # refused before any run was recorded


def test_a_named_run_without_rewards_is_refused(runner, twelve_block_runs):
    db, out, _ = twelve_block_runs
    grow = rows(db, "SELECT run_id FROM runs WHERE variant = 'grow'")[0][0]
    no_tying = _train(runner, db, out, "--max-steps", "4", "--variant", "no-tying")
    result = invoke(runner, *TINY, "--db", db, "--out", out, "--max-steps", "4", "--agent-from", no_tying)
    assert result.exit_code != 0 and "recorded no rewarded decision" in (result.stderr or result.output)
    # a grow run logs shaped rewards: its transitions teach too
    rid = _train(runner, db, out, "--max-steps", "8", "--decide-every", "4", "--set", "model.n_layer=12",
                 "--agent-from", grow)
    assert _config(db, rid)["agent_sources"]["runs"] == [grow]


def test_greedy_moves_is_recorded_and_reported(runner, tmp_path):
    db, out = tmp_path / "r.duckdb", tmp_path / "runs"
    common = ("--max-steps", "24", "--decide-every", "3", "--set", "agent.keep_bonus=0")
    dyn = _train(runner, db, out, *common)
    qoff = _train(runner, db, out, *common, "--variant", "q-off")
    fixed = _train(runner, db, out, "--max-steps", "8", "--decide-every", "4", "--variant", "grow")
    got = dict(rows(db, "SELECT run_id, list(greedy_moves ORDER BY decision) FROM decisions GROUP BY run_id"))
    assert got[qoff] == [0] * 7 and got[fixed] == [None]
    assert len(got[dyn]) == 7 and all(m is not None and 0 <= m <= 3 for m in got[dyn])
    result = invoke(runner, "report", "--table", "agent", "--db", db, "--format", "json")
    assert result.exit_code == 0, result.output
    table = {row["run_id"]: row for row in json.loads(result.stdout)}
    share = sum(m > 0 for m in got[dyn]) / 7
    assert table[dyn]["greedy_moved_share"] == pytest.approx(share)
    assert table[qoff]["greedy_moved_share"] == 0 and table[qoff]["greedy_moves_mean"] == 0
    assert table[fixed]["greedy_moved_share"] is None


@pytest.mark.parametrize("qnet", ["shared", "advantage"])
def test_resume_of_a_warm_started_run_is_bit_exact(twelve_block_runs, tmp_path, qnet):
    """A warm-started 12-block run stopped by SIGTERM after its second validation and resumed logs what the same
    run uninterrupted logs: every tie, decision and metric (timings aside). The shared agent also starts from a
    saved network; the advantage agent (its own network shape) from the transitions alone."""
    from dyntie_cli.commands.options import TrainingOptions
    from dyntie_cli.core.loop import Job
    from dyntie_cli.runner.jobs import Launch, resume_recorded, run_job
    from dyntie_cli.runner.settings_source import new_settings
    from tests.test_reproducible import logged

    src_db, _, ids = twelve_block_runs
    db = tmp_path / "r.duckdb"  # a copy of the registry: the sources' rows and checkpoints, and these two runs
    shutil.copy(src_db, db)
    sets = ["model.n_layer=12", "train.eval_every=10", "agent.warm_updates=30"]
    weights = {"agent_weights": ids[0]} if qnet == "shared" else {}
    opts = TrainingOptions({"preset": "gpt2-tiny", "max_steps": 40, "decide_every": 4, "sets": sets, "agent": qnet,
                            "agent_from": ids[1], "quiet": True, **weights})
    backbone, settings = new_settings("gpt2", opts.sources())
    launch = Launch(db, tmp_path / "runs", quiet=True)
    whole = run_job(backbone, Job(settings, "train"), launch, print_summary=False)

    def stop_after_second_validation(event):
        if event["type"] == "eval" and event["step"] == 20:
            os.kill(os.getpid(), signal.SIGTERM)  # the loop stops at this step boundary and checkpoints

    _, settings = new_settings("gpt2", opts.sources())
    with pytest.raises(DyntieError, match="resume it with"):
        run_job(backbone, Job(settings, "train"), launch, print_summary=False, listen=stop_after_second_validation)
    killed = rows(db, "SELECT run_id FROM runs WHERE status = 'killed'")[0][0]
    resume_recorded(db, killed, quiet=True, print_summary=False)
    assert rows(db, "SELECT status FROM runs WHERE run_id = ?", killed)[0][0] == "finished"
    assert _config(db, killed)["agent_sources"] == _config(db, whole.run_id)["agent_sources"]
    got, want = logged(db, killed), logged(db, whole.run_id)
    assert got == want
    _check_tie_log(db, killed)


def test_agent_from_all_leaves_out_the_runs_of_the_same_study(twelve_block_runs, tmp_path):
    """A study's seeds do not learn from each other: `all` skips the runs labelled with the asking run's study."""
    import duckdb

    from dyntie_cli.results.lineage import agent_knowledge

    src, _, ids = twelve_block_runs
    db = tmp_path / "r.duckdb"
    shutil.copy(src, db)
    con = duckdb.connect(str(db))
    con.execute("""UPDATE runs SET config = json_merge_patch(config, '{"study": {"name": "s1"}}')
                   WHERE run_id = ?""", [ids[0]])
    con.close()
    everything = agent_knowledge(db, "all", "", "gpt2")["runs"]
    assert ids[0] in everything
    outside = agent_knowledge(db, "all", "", "gpt2", study="s1")["runs"]
    assert outside == [r for r in everything if r != ids[0]]
    with pytest.raises(DyntieError, match="found no finished dynamic run of vit"):
        agent_knowledge(db, "all", "", "vit")
