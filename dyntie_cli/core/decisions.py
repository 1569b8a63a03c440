"""Tie decisions (Algorithm 1's inner part), shared by dyntie's own loop and a user's (``dyntie_cli.tying``).

Every k training steps: the policy picks an action for the current state, Eq. 1 gives the next state, the tie
manager makes it true in the model's tensors (and in the optimizer), and the registry logs the state with the
number of distinct block storages measured from the tensors. The reward of a decision is the perplexity of the
training batches that follow it (``reward_batch`` interval: the k batches; next: the first), each scored before
the optimizer used it, of one extra fresh batch right after the change (``fresh``, the paper's), or of a fixed
held-out slice of train at the end of the decision's interval (``heldout``: the same tokens at every decision, so
the batch-to-batch noise cancels between decisions; scored after the k steps the new state trained, since an
untied block is a copy of its root and changes no output at the moment it is made). The caller computes the
last two (``fresh_ppl``, ``heldout_ppl``).

``probes``: reward kinds also scored at every decision without acting on them, logged as metrics
``reward/ppl_<kind>`` beside ``reward/decision`` (the decision they score) at the step their last one was scored,
so the rewards can be compared on the same decisions (``report --table evidence``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..backbone import perplexity
from ..settings import RewardBatch

#: the kinds the caller scores with a function of its own (the others come from the training losses)
SCORED_BY_CALLER = ("fresh", "heldout")
from .checkpoint import LoopState, PendingDecision
from .distributed import Group
from .memory import release_freed_memory
from .policies import Policy
from .ties import TieManager, independent_count, transition


class TieDecisions:
    """The decisions of one run. ``loop`` is the run's ``LoopState`` (step, decision, agent time, a decision
    waiting for its reward), which the caller advances (``loop.step``) and checkpoints; ``writer`` a
    ``RunWriter`` (or anything with its ``tie``, ``decision`` and ``metric`` methods)."""

    def __init__(self, ties: TieManager, policy: Policy, writer: Any, loop: LoopState, *, decide_every: int,
                 max_steps: int, reward_batch: RewardBatch, fresh_ppl: Callable[[], float] | None = None,
                 heldout_ppl: Callable[[], float] | None = None, probes: Sequence[RewardBatch] = (),
                 group: Group | None = None, release_memory: bool = False) -> None:
        self.ties, self.policy, self.writer, self.loop = ties, policy, writer, loop
        self.decide_every, self.max_steps, self.reward_batch = decide_every, max_steps, reward_batch
        self.probes = tuple(dict.fromkeys(probes))
        #: every kind a decision is scored on, the one the policy learns from first
        self.kinds = tuple(dict.fromkeys((reward_batch, *self.probes)))
        self.scorers = {"fresh": fresh_ppl, "heldout": heldout_ppl}
        if policy.wants_reward:
            for kind in self.kinds:
                if kind in SCORED_BY_CALLER and self.scorers[kind] is None:
                    raise ValueError(f"the reward {kind!r} needs {kind}_ppl: a function that scores the model on "
                                     f"its {kind} tokens")
        self.group = group or Group()
        self.release_memory = release_memory  # on a CPU, hand a released block's pages back to the OS

    def decide(self) -> None:
        """One decision at step ``loop.step``: act, apply Eq. 1, log; reward it now (fresh) or later."""
        t0 = time.perf_counter()
        loop = self.loop
        loop.decision += 1
        state = list(self.ties.state)
        progress = loop.step / self.max_steps
        next_progress = min(1.0, (loop.step + self.decide_every) / self.max_steps)
        # rank 0 decides; every rank applies the same change
        dec = self.group.broadcast(self.policy.decide(state, loop.decision, progress) if self.group.is_main else None)
        new_state = transition(state, dec.action)
        changes = self.ties.apply(new_state)
        if changes["tied"] and self.release_memory:
            release_freed_memory()  # the released blocks' pages go back to the OS, not only to malloc
        changed = sum(a != b for a, b in zip(state, new_state))
        self.log_state(action=dec.action, changed=changed)
        pending = PendingDecision(
            decision=loop.decision, step=loop.step, state=state, action=list(dec.action),
            next_state=list(new_state), progress=progress, next_progress=next_progress, epsilon=dec.epsilon,
            explored=dec.explored, greedy_agreement=dec.greedy_agreement,
            q_spread=dec.q_spread if self.policy.learns else None, greedy_moves=dec.greedy_moves,
        )
        loop.agent_time += time.perf_counter() - t0
        if not self.group.is_main:
            return  # only rank 0's policy learns
        if not self.policy.wants_reward:
            self._log_decision(pending, None, {})
            return
        if "fresh" in self.kinds:  # right after the change
            pending.scores["fresh"] = self._score("fresh")
        # the rest is scored by the training batches that follow, before the model trains on each
        loop.pending = pending
        self._settle()

    def collect_reward(self, loss: float) -> None:
        """Feed a training batch's loss (computed before the optimizer used that batch) to the pending reward."""
        p = self.loop.pending
        if p is None:
            return
        p.losses.append(loss)
        self._settle()

    def score_pending(self) -> None:
        """Score the pending decision on the batches collected so far (at the end: an interval cut short)."""
        self._settle(final=True)

    def _settle(self, final: bool = False) -> None:
        """Score what the pending decision's batches allow (``final``: the run ends, so its interval does), reward
        the policy once its own kind is scored, and log the probes once every kind is (or the interval is over)."""
        p = self.loop.pending
        if p is None:
            return
        n = len(p.losses)
        over = (final or n >= self.decide_every) and n > 0  # a decision followed by no batch is not scored
        for kind in self.kinds:
            if kind in p.scores:
                continue
            if kind == "next" and n:
                p.scores[kind] = perplexity(p.losses[0])
            elif kind == "interval" and over:
                p.scores[kind] = perplexity(sum(p.losses) / n)  # equal-size batches: the token-weighted mean
            elif kind == "heldout" and over:
                p.scores[kind] = self._score("heldout")
        if not p.rewarded and self.reward_batch in p.scores:
            p.rewarded = True
            self._reward(p, p.scores[self.reward_batch])
        if final or over or all(kind in p.scores for kind in self.kinds):
            self.loop.pending = None
            self._log_probes(p)

    def _score(self, kind: str) -> float:
        """Reward ``kind`` scored by the caller; the time counts as the agent's only for the kind it acts on."""
        t0 = time.perf_counter()
        ppl = self.scorers[kind]()
        if kind == self.reward_batch:
            self.loop.agent_time += time.perf_counter() - t0
        return ppl

    def _log_probes(self, p: PendingDecision) -> None:
        scored = [kind for kind in self.probes if kind in p.scores]
        if not scored:
            return
        self.writer.metric(self.loop.step, "reward", "decision", p.decision)
        for kind in scored:
            self.writer.metric(self.loop.step, "reward", f"ppl_{kind}", p.scores[kind])

    def _reward(self, p: PendingDecision, ppl: float) -> None:
        if not math.isfinite(ppl):  # a NaN taught to the agent would spoil its network for the rest of the run
            self._log_decision(p, ppl, {})
            return
        t0 = time.perf_counter()
        info = self.policy.observe(p.state, p.action, ppl, p.next_state, independent_count(p.next_state),
                                   p.progress, p.next_progress)
        self.loop.agent_time += time.perf_counter() - t0
        self._log_decision(p, ppl, info)

    def _log_decision(self, p: PendingDecision, ppl: float | None, info: dict[str, Any]) -> None:
        self.writer.decision(
            decision=p.decision, step=p.step, epsilon=p.epsilon, explored=p.explored,
            reward=info.get("reward"), q_predicted=info.get("q_predicted"), q_target=info.get("q_target"),
            td_loss=info.get("td_loss"), greedy_agreement=p.greedy_agreement, q_spread=p.q_spread, ppl=ppl,
            greedy_moves=p.greedy_moves,
        )
        # at the step the reward was measured (the end of its interval for "interval"); none for a reward not taught
        if ppl is not None and "reward" in info:
            self.writer.metric(self.loop.step, "reward", "ppl", ppl)
            self.writer.metric(self.loop.step, "reward", "reward", info["reward"])

    def log_state(self, action: list[int], changed: int) -> None:
        """A ``ties`` row: the state now, the action that led to it, and the distinct block storages."""
        self.writer.tie(
            decision=self.loop.decision, step=self.loop.step, state=list(self.ties.state), action=list(action),
            independent_layers=independent_count(self.ties.state),
            distinct_block_weights=self.ties.distinct_block_weights(), changed_blocks=changed,
        )
