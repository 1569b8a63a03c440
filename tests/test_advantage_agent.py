"""The advantage agent (agent.qnet=advantage): a least-squares state value plus each entry's advantage over keeping,
in bootstrap heads. Untrained it is q-off; it moves a row only where the evidence for the move clears its spread."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from dyntie_cli.core.agent import QAgent
from dyntie_cli.core.qnets import VALUE_KNOTS, AdvantageQNetwork
from dyntie_cli.core.ties import all_tied, independent_count, transition
from dyntie_cli.settings import AgentSettings
from tests.conftest import rows
from tests.test_grow_qoff import _check_tie_log
from tests.test_shared_agent import _train


def _advantage(**kw) -> AgentSettings:
    return AgentSettings.from_preset("advantage", **kw)


def _trend(progress: float) -> float:
    """A reward level shaped like the relative reward of a real run: 0 at the first decision, a fast rise, then a
    slow decline (docs/studies.md), far larger than the effect of any one tie."""
    return 1.5 * math.sin(math.pi * min(progress / 0.5, 1.0) / 2) ** 2 - 1.2 * max(progress - 0.3, 0.0)


def _unties(state: list[int], nxt: list[int]) -> int:
    return max(independent_count(nxt) - independent_count(state), 0)


def _run(agent: QAgent, L: int, effect: float, noise: torch.Tensor, decisions: int = 29, learn: bool = True):
    """Decisions of one simulated run: reward = trend + effect per newly untied block + noise. Returns the actions
    and the greedy moves of each decision."""
    state, actions, moves = all_tied(L), [], []
    for d in range(decisions):
        p, p2 = (d + 1) / (decisions + 1), (d + 2) / (decisions + 1)
        dec = agent.act(state, p)
        nxt = transition(state, dec.action)
        if learn:
            agent.update(state, dec.action, _trend(p) + effect * _unties(state, nxt) + float(noise[d]), nxt, p, p2)
        actions.append(dec.action)
        moves.append(dec.greedy_moves)
        state = nxt
    return actions, moves


def _knowledge(effect: float, seeds=range(6), L: int = 12) -> list[tuple]:
    """Transitions of earlier runs: per seed, a q-off run (slow growth by exploration) and a growing schedule (one
    block untied per decision until 8), sharing that seed's noise, as runs of one seed share their batches."""
    out = []
    for seed in seeds:
        noise = torch.randn(30, generator=torch.Generator().manual_seed(100 + seed)) * 0.04
        qoff = QAgent(L, _advantage(seed=seed, use_q=False), total_decisions=30)
        for schedule in ("q-off", "grow"):
            state = all_tied(L)
            for d in range(29):
                p, p2 = (d + 1) / 30, (d + 2) / 30
                if schedule == "q-off":
                    action = qoff.act(state, p).action
                else:
                    action = [i - 1 if 0 < i and state[i] == state[i - 1] else state[i] for i in range(L)]
                    tied = [i for i in range(1, L) if state[i] != i]
                    if independent_count(state) < 8 and tied:
                        action[tied[len(tied) // 2]] = tied[len(tied) // 2]
                nxt = transition(state, action)
                out.append((state, action, _trend(p) + effect * _unties(state, nxt) + float(noise[d]), nxt, p, p2))
                state = nxt
    return out


# --- the network ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["local", "any"])
def test_q_matrices_match_the_taken_entries_and_keeping_is_the_state_value(scope):
    agent = QAgent(12, _advantage(seed=0, greedy_scope=scope))
    torch.nn.init.normal_(agent.q.net[-1].weight)  # trained-looking advantages
    states = torch.tensor([[0, 0, 0, 3, 3, 3, 6, 6, 6, 6, 10, 10], [0, 1, 1, 1, 4, 4, 4, 4, 8, 8, 8, 11]])
    progress = torch.tensor([0.2, 0.7])
    actions = torch.tensor([[0, 0, 1, 3, 3, 4, 6, 6, 7, 8, 10, 10], [0, 0, 1, 2, 4, 4, 5, 6, 8, 8, 9, 11]])
    with torch.no_grad():
        q, adv, _ = agent.q.head_values(states, progress)
        taken = agent.q.q_taken(states, progress, actions)
        value = agent.q.state_value(states, progress)
    index = actions.view(2, 1, 12, 1).expand(2, agent.q.heads, 12, 1)
    assert torch.allclose(taken, q.gather(3, index).squeeze(3), atol=1e-5)
    keep = agent._keep_entries(states)
    at_keep = q.gather(3, keep.view(2, 1, 12, 1).expand(2, agent.q.heads, 12, 1)).squeeze(3)
    assert torch.allclose(at_keep, value.unsqueeze(2).expand_as(at_keep))
    above = torch.ones(12, 12, dtype=torch.bool).triu(1)
    assert torch.isneginf(q[:, :, above]).all()
    scored = torch.isfinite(q[0, 0]).sum(1)
    if scope == "local":  # keep, untie and join the group before: at most three entries a row
        assert scored.max() <= 3 and scored[1:].min() >= 2
    else:
        assert scored.tolist() == list(range(1, 13))


def test_an_untrained_advantage_agent_acts_exactly_as_q_off():
    """Its heads' mean advantage starts at exactly 0, so every greedy row keeps and every random draw is q-off's:
    the same actions, decision after decision."""
    for seed in range(3):
        agent = QAgent(24, _advantage(seed=seed), total_decisions=30)
        qoff = QAgent(24, _advantage(seed=seed, use_q=False), total_decisions=30)
        state = all_tied(24)
        for d in range(30):
            a, b = agent.act(state, d / 30), qoff.act(state, d / 30)
            assert a.action == b.action and a.greedy_moves == 0
            agent._decay_epsilon()
            qoff._decay_epsilon()
            state = transition(state, a.action)
        assert independent_count(state) > 1  # exploration moved the state: the comparison was not trivial


def test_the_state_value_follows_the_reward_level_through_training():
    """V is a least-squares fit on a basis of progress: it follows a level that rises and falls, and a constant
    level is met exactly (the ridge pulls toward the mean target, not toward 0)."""
    net = AdvantageQNetwork(_advantage())
    progress = torch.linspace(0.02, 0.98, 60)
    states = torch.zeros(60, 12, dtype=torch.long)
    x = net.value_features(states, progress)
    assert x.shape == (60, VALUE_KNOTS + 1)
    level = torch.tensor([_trend(float(p)) for p in progress])
    net.fit_value(x, level.unsqueeze(1).expand(60, net.heads), torch.ones(60, net.heads))
    assert (net.state_value(states, progress) - level.unsqueeze(1)).abs().max() < 0.02
    net.fit_value(x, torch.full((60, net.heads), 5.0), torch.ones(60, net.heads))
    assert torch.allclose(net.state_value(states[:2], torch.tensor([0.5, 0.01])), torch.tensor(5.0), atol=1e-4)


# --- what it learns ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("L", [12, 24])
def test_no_evidence_no_move_within_a_run(L):
    """Rewards that follow training progress plus noise, with no effect of any tie: the agent learns nothing that
    moves a row, so it takes q-off's actions at every decision."""
    noise = torch.randn(30, generator=torch.Generator().manual_seed(L)) * 0.04
    agent = QAgent(L, _advantage(seed=1), total_decisions=30)
    qoff = QAgent(L, _advantage(seed=1, use_q=False), total_decisions=30)
    acted, moves = _run(agent, L, 0.0, noise)
    assert moves == [0] * 29
    assert acted == _run(qoff, L, 0.0, noise)[0]


def test_the_max_td_target_values_each_head_at_its_own_best_entries():
    """td_target=max with the advantage network: each head's target is the reward plus gamma times the mean over
    rows of that head's best entry in s', and the agent trains on it through a run."""
    L = 12
    agent = QAgent(L, _advantage(seed=2, td_target="max", target_sync=1000), total_decisions=30)
    s = all_tied(L)
    for d in range(6):
        a = agent.act(s, d / 30).action
        s2 = transition(s, a)
        agent.update(s, a, 0.1 * d, s2, d / 30, (d + 1) / 30)
        s = s2
    states, progress = torch.tensor([s]), torch.tensor([0.2])
    heads = agent.target.head_values(states, progress)[0][0]  # [K, L, L]
    expected = 0.3 + agent.cfg.gamma * heads.amax(2).mean(1)
    got = agent._target(torch.tensor([0.3]), states, progress)
    assert got.shape == (1, agent.cfg.heads)
    assert torch.allclose(got[0], expected)
    assert torch.isfinite(got).all()


@pytest.mark.parametrize(("effect", "moves"), [(0.05, True), (-0.05, False)])
def test_learns_the_sign_of_a_small_tie_effect_across_runs_and_depths(effect, moves):
    """Twelve earlier 12-block runs whose rewards carry a per-untie effect under a trend 30 times larger: warm-started
    from them, the agent unties from an all-tied state (12 or 48 blocks) exactly when untying paid."""
    knowledge = _knowledge(effect)
    for L in (12, 48):
        agent = QAgent(L, _advantage(seed=2), total_decisions=30)
        agent.warm_start(knowledge)
        greedy = agent.act(all_tied(L), 0.07, greedy_only=True)
        assert (greedy.greedy_moves > 0) == moves, (L, greedy.greedy_moves)


def test_the_agent_state_round_trips_and_an_older_agent_state_loads():
    agent = QAgent(12, _advantage(seed=3), total_decisions=20)
    noise = torch.zeros(30)
    _run(agent, 12, 0.05, noise, decisions=12)
    twin = QAgent(12, _advantage(seed=3), total_decisions=20)
    twin.load_state_dict(copy.deepcopy(agent.state_dict()))  # as a checkpoint holds it: no tensor shared
    assert twin.bootstrap.get_state().equal(agent.bootstrap.get_state())
    state = [0, 0, 0, 3, 3, 3, 3, 3, 8, 8, 8, 8]
    assert twin.act(state, 0.5) == agent.act(state, 0.5)
    twin.update(state, list(state), 0.1, state, 0.5, 0.55)
    agent.update(state, list(state), 0.1, state, 0.5, 0.55)
    assert all(torch.equal(a, b) for a, b in zip(twin.q.state_dict().values(), agent.q.state_dict().values()))
    # a one-head agent saved before head masks were recorded: every transition teaches its one head
    old = QAgent(6, AgentSettings.from_preset("shared", seed=0))
    _run(old, 6, 0.0, noise, decisions=3)
    sd = old.state_dict()
    sd["replay"] = [t[:6] for t in sd["replay"]]
    del sd["bootstrap"]
    again = QAgent(6, AgentSettings.from_preset("shared", seed=0))
    again.load_state_dict(sd)
    assert [t[6].tolist() for t in again.replay] == [[1.0]] * 3


# --- runs -------------------------------------------------------------------------------------------------------


def test_a_48_block_advantage_run_warm_starts_from_12_block_runs(runner, twelve_block_runs):
    db, out, ids = twelve_block_runs
    rid = _train(runner, db, out, "--agent", "advantage", "--set", "model.n_layer=48", "--max-steps", "16",
                 "--decide-every", "4", "--agent-from", ",".join(ids), "--set", "agent.warm_updates=20",
                 "--set", "agent.updates_per_decision=2")
    assert rows(db, "SELECT status FROM runs WHERE run_id = ?", rid)[0][0] == "finished"
    log = _check_tie_log(db, rid)
    assert len(log[0][2]) == 48 and len(log) == 4
    moves = rows(db, "SELECT greedy_moves FROM decisions WHERE run_id = ? ORDER BY decision", rid)
    assert all(0 <= m <= 47 for (m,) in moves)
