"""What every tying policy shares, learning or not: the record of a decision and the reward shaping, importable
without the Q-agent."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..settings import AgentSettings


@dataclass
class Decision:
    """One decision: the action taken and what the agent saw when taking it."""

    action: list[int]
    greedy: list[int]
    explored: bool | None  # None: no agent took this decision (a fixed or replayed schedule)
    epsilon: float | None
    q_spread: float
    greedy_agreement: float | None
    extra: dict[str, Any] = field(default_factory=dict)
    #: rows whose greedy choice (the Q-network's, keep bonus and keep_trained applied) would change their tie;
    #: None: no Q-network chose (a fixed or replayed schedule)
    greedy_moves: int | None = None


class RewardShaper:
    """The reward from a fresh batch's perplexity (after the tie change), as ``AgentSettings.reward`` says."""

    def __init__(self, cfg: AgentSettings, num_blocks: int) -> None:
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.reward_ref: float | None = None  # running reference log-PPL of the "relative" reward

    def shape(self, ppl: float, independent: int) -> float:
        kind = self.cfg.reward
        if kind == "neg-ppl":
            r = -ppl
        elif kind == "neg-log-ppl":
            r = -math.log(ppl)
        else:  # relative
            # -log PPL relative to a running reference: the perplexity falls all through training, so the
            # raw reward drifts; relative to its own recent level it measures what the tie change did.
            log_ppl = math.log(ppl)
            ref = self.reward_ref if self.reward_ref is not None else log_ppl
            r = ref - log_ppl
            self.reward_ref = self.cfg.reward_ema * ref + (1 - self.cfg.reward_ema) * log_ppl
        return r - self.cfg.param_penalty * independent / self.num_blocks
