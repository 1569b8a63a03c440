"""Dynamic layer tying inside your own training loop, and a transformers ``TrainerCallback`` built on it.

Both run dyntie's own core -- the policies and the Q-agent (core/policies.py, core/agent.py), Eq. 1 and the
tie manager (core/ties.py), the decision step shared with ``dyntie train`` (core/decisions.py) and, when asked,
the registry writer -- so a decision made here is made exactly as in a dyntie run with the same settings.
docs/python-api.md is the user's page.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .backbone import perplexity
from .core.checkpoint import LoopState
from .core.decisions import TieDecisions
from .core.policies import make_policy
from .core.ties import TieManager, all_independent
from .errors import DyntieError, UsageError
from .settings import AgentSettings, TieSettings, Variant, validated
from .variants import spec

if TYPE_CHECKING:
    from typing_extensions import Self


@dataclass
class TieRow:
    """One ``ties`` row: the state after a decision (decision 0: the initial state), the action that led to
    it, and the distinct block storages measured from the tensors (always equal to the independent count)."""

    decision: int
    step: int
    state: list[int]
    action: list[int] | None
    independent_layers: int
    distinct_block_weights: int
    changed_blocks: int | None = None


class _Log:
    """What a run writes, kept in memory (``history``) and, with a registry, written there too."""

    def __init__(self, writer: Any | None) -> None:
        self.writer = writer
        self.ties: list[TieRow] = []
        self.decisions: list[dict[str, Any]] = []

    def tie(self, **row: Any) -> None:
        self.ties.append(TieRow(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in row.items()}))
        if self.writer is not None:
            self.writer.tie(**row)

    def decision(self, **row: Any) -> None:
        self.decisions.append(row)
        if self.writer is not None:
            self.writer.decision(**row)

    def metric(self, step: int, split: str, name: str, value: float) -> None:
        if self.writer is not None:
            self.writer.metric(step, split, name, value)


class DynamicTying:
    """Dynamic layer tying for a model's ordered ``blocks`` (identical modules: GPT-2's ``transformer.h``, a
    ViT's ``blocks`` ...) trained by ``optimizer``, which must already hold every block's parameters.

    Call :meth:`step` after each optimizer step with that step's loss (computed before the step, as any loop
    does). Every ``decide_every`` steps the policy acts, Eq. 1 gives the next state, and the tie manager makes
    it true: a tied block computes with its root's tensors and its own weights, gradients and optimizer state
    are released; an untied block gets its own copy and joins the optimizer's parameter group of its
    counterpart in block 0. The optimizer object stays the same (its ``param_groups`` are edited in place), so
    an LR scheduler keeps working. The reward is the perplexity of the ``decide_every`` losses that follow a
    decision (``agent.reward_batch`` interval, the default), of ``fresh_ppl()`` (reward_batch fresh), or of
    ``heldout_ppl()`` (reward_batch heldout: the model's perplexity on a fixed slice of training data it never
    trains on, called at the end of each decision's interval); ``agent.reward_probes`` score more kinds without
    acting on them.

    ``variant``: any variant that needs no source run: dynamic (the Q-agent), random, no-tying, a static scheme
    (static-all, static-sequence ... with ``independent`` blocks), grow or q-off. ``agent``: a named agent (default, lean, paper) and ``agent_options`` its
    field overrides (``AgentSettings``). ``initial_state``: as ``--initial-state`` (auto: all tied, or
    independent when ``pretrained``). ``db``: a DuckDB registry file to record the run in, as ``dyntie train``
    would (``dyntie report`` reads it); ``history`` always holds the tie log.
    """

    def __init__(self, blocks: Sequence[nn.Module], optimizer: torch.optim.Optimizer, *, total_steps: int,
                 decide_every: int = 10, variant: Variant = "dynamic", agent: str = "default",
                 agent_options: dict[str, Any] | None = None, initial_state: str = "auto", pretrained: bool = False,
                 independent: int = 0, tied_grad: str = "follow", untie_optim: str = "fresh", seed: int = 0,
                 db: str | Path | None = None, name: str = "custom", dataset: str = "",
                 fresh_ppl: Callable[[], float] | None = None, heldout_ppl: Callable[[], float] | None = None,
                 log_every: int = 0) -> None:
        if total_steps < 1:
            raise UsageError(f"total_steps must be at least 1, not {total_steps}.")
        kind = spec(variant)
        if kind.needs_source:
            raise UsageError(f"variant {variant} replays another run's ties; pass its state as "
                             "initial_state with variant='dynamic', or use dyntie ablate.")
        ties_cfg: TieSettings = validated(TieSettings, dict(
            decide_every=decide_every, tied_grad=tied_grad, untie_optim=untie_optim, initial_state=initial_state,
            independent=independent, **kind.fixed_in("ties")), "ties")
        agent_cfg = AgentSettings.from_preset(agent, **{**(agent_options or {}), "seed": seed,
                                                        **kind.fixed_in("agent")})
        blocks = list(blocks)
        self.total_steps, self.decide_every, self.variant = total_steps, decide_every, variant
        self.log_every = log_every
        self.policy = make_policy(variant, len(blocks), agent=agent_cfg, seed=seed, independent=independent,
                                  total_decisions=max(0, (total_steps - 1) // decide_every),
                                  initial_state=ties_cfg.initial_state, pretrained=pretrained)
        if agent_cfg.scores("fresh") and fresh_ppl is None and self.policy.wants_reward:
            raise UsageError("agent reward_batch 'fresh' scores one extra batch: pass fresh_ppl, a function that "
                             "returns the model's perplexity on a fresh training batch.")
        if agent_cfg.scores("heldout") and heldout_ppl is None and self.policy.wants_reward:
            raise UsageError("agent reward_batch 'heldout' scores a held-out slice: pass heldout_ppl, a function "
                             "that returns the model's perplexity on training data it never trains on.")
        start = self.policy.initial_state()
        # every block starts with the weights it was built with, so the optimizer holds them all; the start
        # state is applied once the optimizer is attached, so tied blocks leave it
        self.ties = TieManager(blocks, all_independent(len(blocks)), tied_grad=ties_cfg.tied_grad,
                               untie_optim=ties_cfg.untie_optim)
        self.ties.attach_optimizer(optimizer)
        self.ties.apply(start)
        self.loop = LoopState()
        writer = None
        if db is not None:
            from .results.writer import RunWriter

            writer = RunWriter(db, backbone=name)
            config = {"backbone": name, "dataset": dataset, "variant": variant, "seed": seed, "api": "DynamicTying",
                      "train": {"max_steps": total_steps}, "ties": ties_cfg.model_dump(mode="json"),
                      "agent": agent_cfg.model_dump(mode="json")}
            writer.start("api", name, dataset, variant, config, seed=seed)
        self.writer = writer
        self.log = _Log(writer)
        self.decisions = TieDecisions(self.ties, self.policy, self.log, self.loop, decide_every=decide_every,
                                      max_steps=total_steps, reward_batch=agent_cfg.reward_batch,
                                      fresh_ppl=fresh_ppl, heldout_ppl=heldout_ppl,
                                      probes=agent_cfg.reward_probes)
        self.decisions.log_state(action=self.ties.state, changed=0)  # decision 0: the initial state
        self._losses: list[float] = []
        self.finished = False

    @property
    def run_id(self) -> str | None:
        return self.writer.run_id if self.writer is not None else None

    @property
    def state(self) -> list[int]:
        return list(self.ties.state)

    @property
    def history(self) -> list[TieRow]:
        """The tie log: the initial state, then the state after each decision."""
        return self.log.ties

    def step(self, loss: float | torch.Tensor) -> bool:
        """Record one optimizer step's loss; decide when it is time. Returns whether a decision was made."""
        if self.finished:
            raise DyntieError("This DynamicTying has finished; make a new one to tie again.")
        loss = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        loop = self.loop
        loop.step += 1
        loop.indep_steps += self.ties.independent_layers
        self.decisions.collect_reward(loss)
        self._losses.append(loss)
        if self.log_every and loop.step % self.log_every == 0:
            mean = sum(self._losses) / len(self._losses)
            self.log.metric(loop.step, "train", "loss", mean)
            self.log.metric(loop.step, "train", "ppl", perplexity(mean))
            self._losses = []
        decided = loop.step % self.decide_every == 0 and loop.step < self.total_steps
        if decided:
            self.decisions.decide()
        if self.writer is not None:
            self.writer.maybe_flush()
        return decided

    def finish(self, status: str = "finished") -> None:
        """Score a decision still waiting for its reward, record the means, close the registry run."""
        if self.finished:
            return
        self.decisions.score_pending()
        steps = max(self.loop.step, 1)
        self.log.metric(self.loop.step, "train", "independent_layers_mean", self.loop.indep_steps / steps)
        self.finished = True
        if self.writer is not None:
            self.writer.finish(status)

    def materialize(self) -> None:
        """Every block gets its own copy of the weights it computes with (tied blocks: their root's) and the tie
        hooks go: the model is a plain library model again (``save_pretrained``, ``torch.save``). Ends the
        run; the copies join the optimizer."""
        self.finish()
        self.ties.apply(all_independent(self.ties.num_blocks))
        self.ties.remove_hooks()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.finish("finished" if error is None else "killed" if kind is KeyboardInterrupt else "failed")
