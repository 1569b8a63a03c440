"""Tie decisions (Algorithm 1's inner part), shared by dyntie's own loop and a user's (``dyntie_cli.tying``).

Every k training steps: the policy picks an action for the current state, Eq. 1 gives the next state, the tie
manager makes it true in the model's tensors (and in the optimizer), and the registry logs the state with the
number of distinct block storages measured from the tensors. The reward of a decision is the perplexity of the
training batches that follow it (``reward_batch`` interval: the k batches; next: the first), each scored before
the optimizer used it, or of one extra fresh batch right after the change (``fresh``, the paper's), which the
caller computes (``fresh_ppl``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

from ..backbone import perplexity
from ..settings import RewardBatch
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
                 group: Group | None = None, release_memory: bool = False) -> None:
        self.ties, self.policy, self.writer, self.loop = ties, policy, writer, loop
        self.decide_every, self.max_steps, self.reward_batch = decide_every, max_steps, reward_batch
        self.fresh_ppl = fresh_ppl
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
        elif self.reward_batch == "fresh":
            if self.fresh_ppl is None:
                raise ValueError("reward_batch 'fresh' needs fresh_ppl: a function scoring one fresh batch")
            t1 = time.perf_counter()
            ppl = self.fresh_ppl()
            loop.agent_time += time.perf_counter() - t1
            self._reward(pending, ppl)
        else:
            loop.pending = pending  # scored by the next training batch(es), before the model trains on them

    def collect_reward(self, loss: float) -> None:
        """Feed a training batch's loss (computed before the optimizer used that batch) to the pending reward."""
        p = self.loop.pending
        if p is None:
            return
        p.losses.append(loss)
        if len(p.losses) >= (1 if self.reward_batch == "next" else self.decide_every):
            self.score_pending()

    def score_pending(self) -> None:
        """Reward the pending decision on the batches collected so far (at the end: an interval cut short)."""
        p, self.loop.pending = self.loop.pending, None
        if p is None or not p.losses:
            return
        mean = sum(p.losses) / len(p.losses)  # equal-size batches: the token-weighted mean
        self._reward(p, perplexity(mean))

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
