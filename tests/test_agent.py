"""The Q-agent: epsilon-greedy per row, the TD update, learning on a known reward, exact state_dict."""

from __future__ import annotations

import itertools
import pickle
import random
import typing

import pytest
import torch

from dyntie_cli.core.agent import QAgent
from dyntie_cli.core.qnets import QNETWORKS, BaseQNetwork, make_qnetwork
from dyntie_cli.core.ties import all_tied, canonicalize, independent_count, transition
from dyntie_cli.errors import DyntieError
from dyntie_cli.settings import AgentSettings, QNet

L = 6


def _costs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(i + 1, generator=g).tolist() for i in range(L)]


def _act_on(monkeypatch, agent, q):
    """The agent acts on the values ``q`` [L, L] in every state, and its budget ranks by them."""
    monkeypatch.setattr(agent, "_state_values", lambda state, progress=0.0: (q.clone(),) * 2)


def _run(agent, costs, decisions, progress=False):
    s = all_tied(L)
    for d in range(decisions):
        dec = agent.act(s, d / decisions if progress else 0.0)
        r = -sum(costs[i][a] for i, a in enumerate(dec.action)) / L
        s2 = transition(s, dec.action)
        agent.update(s, dec.action, r, s2)
        s = s2
    return s


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_greedy_policy_reaches_the_best_action_on_a_known_reward(preset):
    costs = _costs()
    best = [min(range(i + 1), key=lambda j: costs[i][j]) for i in range(L)]
    # the learning machinery alone: no keep bias or bonus between the Q-network and its greedy choice
    cfg = AgentSettings.from_preset(preset, gamma=0.0, seed=3, progress_input=False, lr=3e-3, keep_bias=0.0, keep_bonus=0.0,
                       keep_trained=False)
    agent = QAgent(L, cfg, total_decisions=400)
    s = _run(agent, costs, 400 if preset == "default" else 1500)
    assert agent.act(s, greedy_only=True).greedy == best
    assert agent.epsilon == pytest.approx(cfg.epsilon_min)


def test_q_values_follow_the_paper_definitions():
    agent = QAgent(L, AgentSettings.from_preset("paper", seed=0))
    s = all_tied(L)
    a = [0, 1, 0, 3, 3, 5]
    q = agent.q_matrix(s)
    assert torch.isinf(q[2, 3]) and q[2, 3] < 0  # above the diagonal: not a choice
    s2 = transition(s, a)
    with torch.no_grad():
        pred = float(sum(q[i, a[i]] for i in range(L)) / L)
        target = 0.5 + agent.cfg.gamma * float(agent.q_matrix(s2).amax(1).mean())
    out = agent.update(s, a, 0.5, s2)
    assert out["q_predicted"] == pytest.approx(pred, rel=1e-5)
    assert out["q_target"] == pytest.approx(target, rel=1e-5)
    assert out["td_loss"] == pytest.approx((pred - target) ** 2, rel=1e-4)
    assert float(sum(agent.q_matrix(s)[i, a[i]] for i in range(L)) / L) != pytest.approx(pred)  # it learned
    assert agent.epsilon == pytest.approx(0.95)  # paper: x0.95 per decision from 1.0


def test_greedy_td_target_values_the_action_the_agent_would_take():
    """The default's target: r + gamma * mean over rows of Q_target(s') at the agent's greedy choice in s' (keep
    bonus and keep_trained included, chosen by the online network); the paper and lean agents keep the row max."""
    assert AgentSettings.from_preset("paper").td_target == "max" and AgentSettings.from_preset("lean").td_target == "max"
    agent = QAgent(L, AgentSettings.from_preset("default", seed=0, target_sync=0))
    assert agent.cfg.td_target == "greedy"
    s = all_tied(L)
    a = [0, 1, 0, 3, 3, 5]
    s2 = transition(s, a)
    q2 = agent.q_matrix(s2)
    greedy = agent.act(s2, greedy_only=True).greedy
    assert all(greedy[i] == i for i in range(L) if s2[i] == i)  # keep_trained: an independent row keeps
    target = 0.5 + agent.cfg.gamma * float(sum(q2[i, greedy[i]] for i in range(L)) / L)
    assert agent.update(s, a, 0.5, s2)["q_target"] == pytest.approx(target, rel=1e-5)
    assert target < 0.5 + agent.cfg.gamma * float(q2.amax(1).mean())  # below the row max, which it replaces


@pytest.mark.parametrize(("budget", "keep_target", "valued"), [
    (0, "previous", 5 + 6 + 7 + 8 + 9 + 10),  # no budget: every row unties
    # budget 3 with blocks 0 and 1 training: of the four rows asking to untie, the three of least gain (2, 3, 4)
    # are refused and keep their tie (following the row before: entries 0, 0.2, 0.3); row 5 unties
    (3, "previous", 5 + 6 + 0.0 + 0.2 + 0.3 + 10),
    (3, "root", 5 + 6 + 0.1 + 0.2 + 0.3 + 10),  # refused rows take their best tied entry, j = i - 1
])
def test_greedy_td_target_respects_the_budget(budget, keep_target, valued):
    """Under --max-independent the target values the action the agent would really take in s': an untie the
    budget would refuse is valued as the refused row's fallback, not as if it happened; requests of least gain
    are refused first."""
    def agent_with_fixed_q(**kw):
        agent = QAgent(L, AgentSettings.from_preset("default", seed=0, target_sync=0, max_independent=budget,
                                       keep_target=keep_target, **kw))
        out = agent.q.net[-1]
        with torch.no_grad():  # row i: 5 + i for becoming (or staying) independent, 0.1 * j for a tie to block j
            out.weight.zero_()
            out.bias.copy_(torch.tensor([5.0 + i if j == i else 0.1 * j for i in range(L) for j in range(i + 1)]))
        return agent

    s, a = all_tied(L), [0, 1, 0, 0, 0, 0]
    s2 = transition(s, a)  # blocks 0 and 1 train
    agent = agent_with_fixed_q()
    assert independent_count(transition(s2, agent.act(s2, greedy_only=True).action)) == (budget or L)
    assert agent.update(s, a, 0.5, s2)["q_target"] == pytest.approx(0.5 + agent.cfg.gamma * valued / L, rel=1e-5)
    # runs recorded before the budget entered the target keep the unbudgeted greedy choice (every row unties)
    old = agent_with_fixed_q(td_budget=False)
    assert old.update(s, a, 0.5, s2)["q_target"] == pytest.approx(0.5 + old.cfg.gamma * 45 / L, rel=1e-5)


def test_q_values_stay_bounded_over_a_long_run_with_the_greedy_target():
    """The decisions of a real 1,000-step, 48-block run (fixture), replayed into a fresh agent: with the row-max
    target the entries the policy never takes drift and feed the target, and the Q spread grows without bound
    (about doubling every 10 decisions); with the greedy target it stays small."""
    import json
    from pathlib import Path

    rec = json.loads((Path(__file__).parent / "fixtures" / "agent" / "deep1000_transitions.json").read_text())
    n, steps = len(rec["states"][0]), rec["max_steps"]
    spreads = {}
    for target in ("max", "greedy"):
        agent = QAgent(n, AgentSettings.from_preset("default", td_target=target), total_decisions=len(rec["states"]) - 1)
        for d in range(1, len(rec["states"])):
            p = rec["steps"][d] / steps
            agent.update(rec["states"][d - 1], rec["actions"][d], rec["rewards"][d], rec["states"][d], p,
                         min(1.0, p + 10 / steps))
        spreads[target] = agent.act(rec["states"][-1], 1.0, greedy_only=True).q_spread
    assert spreads["max"] > 100
    assert spreads["greedy"] < 10


def test_epsilon_floors_and_exploration_is_per_row():
    agent = QAgent(L, AgentSettings.from_preset("paper", seed=1))
    for _ in range(100):
        agent._decay_epsilon()
    assert agent.epsilon == pytest.approx(0.1)
    agent.epsilon = 1.0
    actions = [tuple(agent.act(all_tied(L)).action) for _ in range(200)]
    # with epsilon 1 every row is uniform over 0..i: row 5 takes all six values
    assert {a[5] for a in actions} == set(range(6))
    assert all(a[0] == 0 for a in actions)


@pytest.mark.parametrize("floor", [0.02, 0.0])
def test_run_schedule_decays_over_the_explore_fraction_then_holds_the_floor(floor):
    # 40 decisions, explore_fraction 0.25: epsilon falls over the first 10 and stays at the floor after
    agent = QAgent(L, AgentSettings.from_preset("default", epsilon_min=floor, explore_fraction=0.25), total_decisions=40)
    seen = []
    for _ in range(40):
        agent._decay_epsilon()
        agent.decisions += 1
        seen.append(agent.epsilon)
    assert all(a >= b for a, b in itertools.pairwise(seen))  # never rises
    assert seen[4] > 0.05  # half-way through exploring (a zero floor must not end exploration at once)
    assert seen[11:] == [floor] * len(seen[11:])


def test_update_rejects_a_transition_that_breaks_eq1():
    agent = QAgent(L, AgentSettings.from_preset("default"))
    with pytest.raises(DyntieError, match="Eq. 1"):
        agent.update(all_tied(L), [0, 1, 2, 3, 4, 5], 0.0, all_tied(L))


def test_max_independent_masks_actions():
    agent = QAgent(L, AgentSettings.from_preset("default", max_independent=2, seed=0))
    agent.epsilon = 1.0
    for _ in range(100):
        a = agent.act(all_tied(L)).action
        assert independent_count(transition(all_tied(L), a)) <= 2


def test_max_independent_refuses_new_blocks_before_dropping_trained_ones(monkeypatch):
    agent = QAgent(L, AgentSettings.from_preset("default", max_independent=2, epsilon=0.0, epsilon_min=0.0))
    q = torch.full((L, L), float("-inf"))
    for i in range(L):
        q[i, :i] = 0.0
        q[i, i] = 1.0 + 0.1 * i  # every row would rather be independent; block 1 the least
    _act_on(monkeypatch, agent, q)
    state = [0, 1, 0, 0, 0, 0]
    assert transition(state, agent.act(state, greedy_only=True).action) == state


def test_rewards_are_shaped_as_documented():
    a = QAgent(L, AgentSettings.from_preset("default", reward="neg-ppl"))
    assert a.shape_reward(250.0, 3) == -250.0
    b = QAgent(L, AgentSettings.from_preset("default", reward="neg-log-ppl", param_penalty=0.6))
    assert b.shape_reward(100.0, 3) == pytest.approx(-4.60517 - 0.3, rel=1e-5)
    c = QAgent(L, AgentSettings.from_preset("default", reward="relative"))
    assert c.shape_reward(100.0, 1) == 0.0 and c.shape_reward(50.0, 1) == pytest.approx(0.693147, rel=1e-5)


def test_unknown_agent_setting_is_a_clear_error():
    with pytest.raises(DyntieError, match="agent setting"):
        AgentSettings.from_preset("clever")
    with pytest.raises(DyntieError, match="Unknown setting agent.gama"):
        AgentSettings.from_preset("default", gama=0.3)


def test_state_dict_round_trips_bit_exactly():
    costs = _costs(1)
    a = QAgent(L, AgentSettings.from_preset("default", seed=5), total_decisions=50)
    s = _run(a, costs, 20)
    blob = pickle.dumps(a.state_dict())
    b = QAgent(L, AgentSettings.from_preset("default", seed=99), total_decisions=50)
    b.load_state_dict(pickle.loads(blob))
    for (k, p), (_, q) in zip(a.q.state_dict().items(), b.q.state_dict().items()):
        assert torch.equal(p, q), k
    assert a.epsilon == b.epsilon and a.decisions == b.decisions
    # both continue identically: same actions, same updates
    for _ in range(10):
        da, db = a.act(s), b.act(s)
        assert da.action == db.action
        r = -sum(costs[i][x] for i, x in enumerate(da.action)) / L
        s2 = transition(s, da.action)
        assert a.update(s, da.action, r, s2) == b.update(s, db.action, r, s2)
        s = s2


@pytest.mark.parametrize("scope", ["all", "independent"])
def test_keep_bonus_protects_current_ties_as_scoped(monkeypatch, scope):
    """Greedy rows move off their current target only for a gain above keep_bonus; with scope
    'independent' only an independent block (whose trained weights a tie would discard) is protected."""
    agent = QAgent(4, AgentSettings.from_preset("default", keep_bonus=0.5, keep_scope=scope, epsilon=0.0, epsilon_min=0.0,
                                   keep_trained=False))
    q = torch.full((4, 4), float("-inf"))
    for i in range(4):
        q[i, : i + 1] = 0.0
    q[1, 0], q[1, 1] = 0.0, 0.3  # block 1 is tied to 0; untying it looks a little better
    q[2, 2], q[2, 0] = 0.0, 0.3  # block 2 is independent; tying it to 0 looks a little better
    q[3, 3], q[3, 0] = 0.0, 0.9  # block 3 is independent; tying it looks much better
    _act_on(monkeypatch, agent, q)
    action = agent.act([0, 0, 2, 3], greedy_only=True).action
    assert action[2] == 2 and action[3] == 0  # a small gain never discards weights; a large one does
    assert action[1] == (0 if scope == "all" else 1)


def test_keep_trained_greedy_never_ties_a_training_block(monkeypatch):
    """keep_trained: however much the Q-network prefers tying an independent block, the greedy action keeps
    it; greedy untying of a tied block is still allowed, and exploration may still tie (rarely, keep_bias)."""
    agent = QAgent(4, AgentSettings.from_preset("default", keep_trained=True, keep_bonus=0.0, epsilon=0.0, epsilon_min=0.0))
    q = torch.full((4, 4), float("-inf"))
    for i in range(4):
        q[i, : i + 1] = 0.0
    q[1, 1] = 5.0  # tied block 1: untying it looks better
    q[2, 0] = 9.0  # independent block 2: tying it looks far better
    q[3, 2] = 9.0  # independent block 3 likewise
    _act_on(monkeypatch, agent, q)
    dec = agent.act([0, 0, 2, 3], greedy_only=True)
    assert dec.action == [0, 1, 2, 3] and dec.greedy == [0, 1, 2, 3]
    explorer = QAgent(4, AgentSettings.from_preset("default", keep_trained=True, keep_bias=0.0, epsilon=1.0))
    assert any(explorer.act([0, 0, 2, 3]).action[2] != 2 for _ in range(50))
    # the budget still binds: with room for 2 independent blocks, one of the three trained ones is tied
    capped = QAgent(4, AgentSettings.from_preset("default", keep_trained=True, max_independent=2, epsilon=0.0, epsilon_min=0.0))
    _act_on(monkeypatch, capped, q)
    assert independent_count(transition([0, 1, 2, 3], capped.act([0, 1, 2, 3], greedy_only=True).action)) == 2


def test_keep_bias_scope_independent_explores_only_tied_rows():
    agent = QAgent(6, AgentSettings.from_preset("default", keep_bias=1.0, keep_scope="independent", epsilon=1.0,
                                  explore_moves="any"))
    state = [0, 1, 0, 3, 0, 0]  # blocks 1 and 3 are independent
    seen = [agent.act(state).action for _ in range(200)]
    assert all(a[1] == 1 and a[3] == 3 for a in seen)  # exploring never discards trained weights
    assert len({a[5] for a in seen}) == 6  # a tied row explores over all its choices


def test_keep_target_previous_keeps_groups_consecutive():
    """keep_target=previous: a kept row follows the row before it when they share a root, so keeping every row
    leaves any state as it is, and untying block i splits its group at i (a sequence layout, never a hole)."""
    rng = random.Random(0)
    L = 10
    agent = QAgent(L, AgentSettings.from_preset("default", keep_target="previous", keep_bias=1.0, epsilon=1.0))
    for _ in range(50):  # every row explores and keeps: the state never changes
        s = canonicalize([rng.randint(0, i) for i in range(L)])
        assert transition(s, agent.act(s).action) == s
    s = all_tied(L)
    kept = agent.act(s).action
    assert kept[1:] == list(range(L - 1))  # each row follows the one before it
    split = list(kept)
    split[4] = 4
    assert transition(s, split) == [0] * 4 + [4] * 6
    split2 = list(agent.act([0] * 4 + [4] * 6).action)
    split2[7] = 7
    assert transition([0] * 4 + [4] * 6, split2) == [0] * 4 + [4] * 3 + [7] * 3
    # with keep_target=root the same untie leaves the rows after it on block 0
    root = QAgent(L, AgentSettings.from_preset("default", keep_target="root", keep_bias=1.0, epsilon=1.0)).act(s).action
    root[4] = 4
    assert transition(s, root) == [0] * 4 + [4] + [0] * 5


def test_local_exploration_keeps_groups_runs_of_consecutive_blocks():
    """explore_moves=local with keep_target=previous: exploring rows only untie, join the group before or keep,
    so from all-tied every state the exploration reaches has each group as one run of consecutive blocks."""
    L = 16
    agent = QAgent(L, AgentSettings.from_preset("default", keep_target="previous", explore_moves="local", keep_bias=0.7,
                                   epsilon=1.0, epsilon_min=1.0))
    s = all_tied(L)
    sizes = set()
    for _ in range(40):
        s = transition(s, agent.act(s).action)
        starts = [i for i in range(L) if i == 0 or s[i] != s[i - 1]]
        assert all(s[i] == i for i in starts)  # every run starts at its own root ...
        assert len(starts) == independent_count(s)  # ... and no root has a second run
        sizes.add(independent_count(s))
    assert len(sizes) > 3  # the exploration did move


def test_local_greedy_scope_chooses_only_keep_untie_or_the_block_before(monkeypatch):
    """greedy_scope=local: however much the Q-network prefers a far root, a greedy row keeps, unties or joins the
    group before it -- the moves local exploration makes -- so greedy moves keep groups consecutive too."""
    q = torch.full((6, 6), float("-inf"))
    for i in range(6):
        q[i, : i + 1] = 0.0
    q[5, 0] = 9.0  # block 5 (tied, following block 4): pointing at block 0 looks far better
    q[4, 4] = 1.0  # block 4 (tied): untying it looks better
    state = [0, 0, 0, 3, 3, 3]
    picks = {}
    for scope in ("any", "local"):
        agent = QAgent(6, AgentSettings.from_preset("default", greedy_scope=scope, keep_bonus=0.0, epsilon=0.0,
                                                    epsilon_min=0.0))
        _act_on(monkeypatch, agent, q)
        picks[scope] = agent.act(state, greedy_only=True).greedy
    assert picks["any"][5] == 0 and picks["any"][4] == 4
    assert picks["local"][5] in (4, 5) and picks["local"][4] == 4
    assert transition(state, picks["local"]) == [0, 0, 0, 3, 4, 4]


def test_every_qnet_setting_has_its_network():
    assert set(QNETWORKS) == set(typing.get_args(QNet))
    for name, cls in QNETWORKS.items():
        assert type(make_qnetwork(L, AgentSettings.from_preset("default", qnet=name))) is cls


class _TableQNetwork(BaseQNetwork):
    """A Q-network the agent has never heard of: one learned value per entry (i, j), whatever the state."""

    def __init__(self, cfg: AgentSettings) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(L, L))

    def forward(self, states, progress):
        above = torch.ones(L, L, dtype=torch.bool).triu(1)
        return self.table.masked_fill(above, float("-inf")).expand(states.shape[0], L, L)

    def q_taken(self, states, progress, actions):
        return self.table[torch.arange(L), actions]


def test_a_registered_network_drives_the_agent_with_no_change_to_it(monkeypatch):
    """The agent asks the network for everything that differs between networks: a new class under a new
    agent.qnet value acts, learns and round-trips its state."""
    monkeypatch.setitem(QNETWORKS, "table", _TableQNetwork)
    cfg = AgentSettings.from_preset("default", seed=1, gamma=0.0, max_independent=0).model_copy(
        update={"qnet": "table"})
    agent = QAgent(L, cfg, total_decisions=20)
    assert isinstance(agent.q, _TableQNetwork) and isinstance(agent.target, _TableQNetwork)
    s = all_tied(L)
    for _ in range(20):
        a = agent.act(s).action
        s2 = transition(s, a)
        agent.update(s, a, 1.0, s2)
        s = s2
    taken = agent.q.table.detach()[torch.arange(L), torch.tensor(a)]
    assert (taken > 0.001).all()  # a reward of 1 with gamma 0 pulled the chosen entries up from 0
    twin = QAgent(L, cfg, total_decisions=20)
    twin.load_state_dict(pickle.loads(pickle.dumps(agent.state_dict())))
    assert torch.equal(twin.q.table, agent.q.table) and twin.act(s, 0.5) == agent.act(s, 0.5)
