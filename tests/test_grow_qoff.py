"""The baselines that ask what the learned policy adds: grow (a fixed growth schedule) and q-off (the default agent
with its Q-network ablated)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch

from dyntie_cli.core.agent import QAgent
from dyntie_cli.core.policies import GrowPolicy, split_largest_group, static_state
from dyntie_cli.core.ties import all_tied, independent_count, is_canonical, transition
from dyntie_cli.settings import AgentSettings
from tests.conftest import invoke, rows

TRANSITIONS = Path(__file__).parent / "fixtures" / "agent" / "deep1000_transitions.json"


def _groups_are_consecutive(state: list[int]) -> bool:
    """Every group (blocks sharing a root) is one run of consecutive blocks."""
    return all(state[i] in (i, state[i - 1]) for i in range(1, len(state)))


def _check_tie_log(db: Path, run_id: str) -> list[tuple]:
    """The run's tie log obeys Eq. 1 and its weight storages match its states; returns the log."""
    log = rows(db, "SELECT decision, step, state, action, independent_layers, distinct_block_weights FROM ties "
                   "WHERE run_id = ? ORDER BY decision", run_id)
    assert [d for d, *_ in log] == list(range(len(log)))
    for (_, _, before, *_), (_, _, state, action, independent, storages) in itertools.pairwise(log):
        assert list(state) == transition(list(before), list(action))
        assert independent == independent_count(state) and storages == independent
    return log


# --- grow ---------------------------------------------------------------------------------------------------


def test_splitting_the_largest_group_halves_it_and_keeps_groups_consecutive():
    state = all_tied(48)
    seen = [state]
    while independent_count(state) < 48:
        state = split_largest_group(state)
        assert is_canonical(state) and _groups_are_consecutive(state)
        seen.append(state)
    # one untie per split; at a power of two the groups are equal: the static-sequence layout
    assert [independent_count(s) for s in seen] == list(range(1, 49))
    assert seen[7] == static_state("static-sequence", 48, 8)
    assert seen[1] == [0] * 24 + [24] * 24
    assert split_largest_group(list(range(4))) == list(range(4))  # nothing left to split


@pytest.mark.parametrize(("target", "until"), [(8, 0.2), (5, 0.5), (3, 0.0), (48, 0.3)])
def test_grow_reaches_its_target_on_schedule(target, until):
    cfg = AgentSettings.from_preset("default")
    policy = GrowPolicy(48, target, until, cfg)
    state, max_steps, k = policy.initial_state(), 300, 10
    assert state == all_tied(48)
    for decision in range(1, (max_steps - 1) // k + 1):
        progress = decision * k / max_steps
        action = policy.decide(state, decision, progress).action
        new = transition(state, action)
        assert new == action  # the scheduled state itself, which Eq. 1 maps to itself
        grown = independent_count(new) - independent_count(state)
        assert grown >= 0 and _groups_are_consecutive(new)
        # the steady pace: the count after a decision at progress p, the target from p >= until on
        want = target if progress >= until else 1 + math.floor((target - 1) * progress / until + 1e-9)
        assert independent_count(new) == want
        state = new
    assert independent_count(state) == target


def test_grow_run_obeys_eq1_and_reaches_its_target_on_schedule(runner, tmp_path):
    db = tmp_path / "g.duckdb"
    r = invoke(runner, "ablate", "--variant", "grow", "--backbone", "gpt2", "--preset", "gpt2-tiny", "--independent",
               "4", "--max-steps", "24", "--decide-every", "2", "--set", "ties.grow_until=0.5", "--db", db, "--out",
               tmp_path / "runs", "--quiet")
    assert r.exit_code == 0, r.stderr
    (run_id, config), = rows(db, "SELECT run_id, config FROM runs")
    assert json.loads(config)["ties"]["independent"] == 4
    log = _check_tie_log(db, run_id)
    counts = [(step / 24, independent) for _, step, _, _, independent, _ in log[1:]]
    # one block every (0.5 / 3) of training: 2 at progress 1/6, 3 at 2/6, all 4 from progress 0.5 on
    assert all(n == (4 if p >= 0.5 else 1 + math.floor(3 * p / 0.5 + 1e-9)) for p, n in counts)
    assert [n for p, n in counts if p >= 0.5] == [4] * sum(p >= 0.5 for p, _ in counts)
    # rewards are logged as the agent's would be, with no agent behind them
    rewards = rows(db, "SELECT reward, epsilon FROM decisions WHERE run_id = ? AND decision > 0", run_id)
    assert len(rewards) == len(log) - 1 and all(r is not None and e is None for r, e in rewards)


# --- q-off --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keep_bonus", [2.0, 0.0])
def test_q_off_acts_as_the_default_agent_wherever_its_q_network_would_keep(keep_bonus):
    """Both agents follow the default agent's trajectory over 60 recorded rewards of a 48-block run. Where the
    default's greedy choice keeps a row's tie, q-off takes the same action for it; decisions where the greedy choice
    kept every row are identical. (No budget here: with several requests over it, the default refuses those its
    Q-network values least, q-off the lowest rows first.)"""
    rec = json.loads(TRANSITIONS.read_text())
    rewards, steps, max_steps = rec["rewards"][1:61], rec["steps"][1:61], rec["max_steps"]
    # fewer Q updates per decision than the default (the claim holds for any): the test runs in seconds
    cfg = AgentSettings.from_preset("default", seed=0, keep_bonus=keep_bonus, max_independent=0,
                                    updates_per_decision=2, explore_fraction=0.5)
    default = QAgent(48, cfg, total_decisions=len(rewards))
    q_off = QAgent(48, cfg.model_copy(update={"use_q": False}), total_decisions=len(rewards))
    state = all_tied(48)
    identical = moved = 0
    for reward, step in zip(rewards, steps):
        progress, next_progress = step / max_steps, min(1.0, (step + 10) / max_steps)
        d, o = default.act(state, progress), q_off.act(state, progress)
        keep = default._keep_entries(torch.tensor([state]))[0].tolist()
        kept = [g == k for g, k in zip(d.greedy, keep)]
        assert o.greedy == keep
        assert d.q_spread == o.q_spread  # the same network: both trained on the same transitions and draws
        assert all(a == b for a, b, same in zip(d.action, o.action, kept) if same)
        if all(kept):
            assert o.action == d.action
            identical += 1
        else:
            moved += 1
        new = transition(state, d.action)
        default.update(state, d.action, reward, new, progress, next_progress)
        q_off.update(state, d.action, reward, new, progress, next_progress)
        state = new
    # the default's greedy choice moved rows at some decisions (at every one without the keep bonus), and kept all
    # of them at the others, where the two agents' actions were the same
    assert moved > 0 and (identical > 0 if keep_bonus else identical == 0)


def test_q_off_run_records_its_agent_and_obeys_eq1(runner, tmp_path):
    db = tmp_path / "q.duckdb"
    r = invoke(runner, "train", "gpt2", "--preset", "gpt2-tiny", "--max-steps", "24", "--decide-every", "2",
               "--variant", "q-off", "--set", "agent.keep_bias=0", "--db", db, "--out", tmp_path / "runs", "--quiet")
    assert r.exit_code == 0, r.stderr
    (run_id, config), = rows(db, "SELECT run_id, config FROM runs")
    assert json.loads(config)["agent"]["use_q"] is False and json.loads(config)["variant"] == "q-off"
    log = _check_tie_log(db, run_id)
    assert any(independent > 1 for *_, independent, _ in log)  # exploration alone moved it
    assert all(_groups_are_consecutive(list(state)) for _, _, state, *_ in log)
