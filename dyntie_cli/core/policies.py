"""Tying policies: who picks the action at each decision (docs/method.md, docs/ablations.md).

* ``dynamic``  -- the Q-agent (core/agent.py).
* ``random``   -- same cadence, each row uniform over its allowed choices, no learning.
* ``fixed``    -- one state held for the whole run: ``no-tying`` (all independent), ``final-arch`` (a dynamic
  run's final state) and the static schemes of the literature.
* ``replay``   -- a recorded schedule of states, moved onto other layers by a seeded permutation.
* ``grow``     -- a fixed schedule: all tied at first, then one block untied at a steady pace (the largest
  group split at its middle) until a target number of blocks is independent.
* ``q-off``    -- the Q-agent with its Q-network ablated (``agent.use_q=false``; core/agent.py).

Every policy returns an *action*; the loop turns it into the next state with Eq. 1, so every state in the
registry follows from the logged action. A canonical state used as an action maps to itself under Eq. 1,
which is how fixed and replayed schedules are expressed.

Each variant of the table in dyntie_cli/variants.py has its policy built by the factory registered under its name
(``@builds``); ``make_policy`` looks it up.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import DyntieError
from ..settings import AgentSettings
from .agent import QAgent
from .policy_types import Decision, RewardShaper
from .ties import all_independent, all_tied, canonicalize, independent_count, permute_state, validate_state


class Policy:
    name = "policy"
    learns = False
    wants_reward = False  # compute the reward batch's perplexity at each decision
    #: settings the policy settled when it was built, recorded with the run: (dotted key, value) pairs
    resolved: tuple[tuple[str, Any], ...] = ()

    def initial_state(self) -> list[int]:
        raise NotImplementedError

    def decide(self, state: list[int], decision: int, progress: float) -> Decision:
        raise NotImplementedError

    def observe(self, state, action, ppl, next_state, independent, progress, next_progress) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


def _fixed_decision(action: list[int]) -> Decision:
    """A decision taken by no agent: epsilon and exploration are recorded as NULL."""
    return Decision(action=list(action), greedy=list(action), explored=None, epsilon=None, q_spread=0.0,
                    greedy_agreement=None)


class DynamicPolicy(Policy):
    name = "dynamic"
    learns = True
    wants_reward = True

    def __init__(self, num_blocks: int, cfg: AgentSettings, total_decisions: int,
                 start: Callable[[], list[int]] | None = None) -> None:
        self.num_blocks = num_blocks
        self.agent = QAgent(num_blocks, cfg, total_decisions=total_decisions)
        self.start = start or (lambda: all_tied(num_blocks))  # the paper: every block starts as block 0

    def initial_state(self) -> list[int]:
        return self.start()

    def decide(self, state, decision, progress):
        return self.agent.act(state, progress)

    def observe(self, state, action, ppl, next_state, independent, progress, next_progress):
        reward = self.agent.shape_reward(ppl, independent)
        out = self.agent.update(state, action, reward, next_state, progress, next_progress)
        return {"reward": reward, **out}

    def state_dict(self):
        return {"agent": self.agent.state_dict()}

    def load_state_dict(self, sd):
        self.agent.load_state_dict(sd["agent"])


class RandomPolicy(Policy):
    """Uniform random actions: block i stays independent with probability 1/(i+1), about H_L blocks."""

    name = "random"
    wants_reward = True  # the reward is logged, so random and dynamic runs can be compared decision by decision

    def __init__(self, num_blocks: int, seed: int, agent: AgentSettings,
                 start: Callable[[], list[int]] | None = None) -> None:
        self.num_blocks = num_blocks
        self.generator = torch.Generator().manual_seed(seed + 7919)
        # the reward is shaped exactly as the Q-agent's, so the two runs' rewards can be compared
        self.shaper = RewardShaper(agent, num_blocks)
        self.start = start or (lambda: all_tied(num_blocks))

    def initial_state(self):
        return self.start()

    def decide(self, state, decision, progress):
        action = [0] + [int(torch.randint(0, i + 1, (1,), generator=self.generator))
                        for i in range(1, self.num_blocks)]
        return Decision(action=action, greedy=list(action), explored=True, epsilon=1.0, q_spread=0.0,
                        greedy_agreement=None)

    def observe(self, state, action, ppl, next_state, independent, progress, next_progress):
        return {"reward": self.shaper.shape(ppl, independent)}

    def state_dict(self):
        return {"generator": self.generator.get_state(), "reward_ref": self.shaper.reward_ref}

    def load_state_dict(self, sd):
        self.generator.set_state(sd["generator"])
        self.shaper.reward_ref = sd["reward_ref"]


class FixedPolicy(Policy):
    def __init__(self, state: list[int], name: str) -> None:
        self.state = validate_state(state)
        self.name = name

    def initial_state(self):
        return list(self.state)

    def decide(self, state, decision, progress):
        return _fixed_decision(self.state)


class ReplayPolicy(Policy):
    """Replays a recorded schedule: ``schedule[d]`` is the state after decision d of the source run."""

    name = "replay"

    def __init__(self, initial: list[int], schedule: list[list[int]], perm: list[int]) -> None:
        self.perm = perm
        self.initial = permute_state(initial, perm)
        self.schedule = [permute_state(s, perm) for s in schedule]

    def initial_state(self):
        return list(self.initial)

    def decide(self, state, decision, progress):
        target = self.schedule[min(decision, len(self.schedule) - 1)] if self.schedule else self.initial
        return _fixed_decision(target)


def split_largest_group(state: list[int]) -> list[int]:
    """Untie one block: the largest group (the lowest root among equals) is split at its middle member, which
    becomes a root for itself and the members after it. Groups of consecutive blocks stay consecutive, and the
    new root starts from the weights it was computing with (an untie copies them), so the function does not jump."""
    groups: dict[int, list[int]] = {}
    for i, root in enumerate(state):
        groups.setdefault(root, []).append(i)
    members = max(groups.values(), key=len)  # max keeps the first (lowest root) of equal sizes
    if len(members) < 2:
        return list(state)
    new = list(state)
    for i in members[len(members) // 2:]:
        new[i] = members[len(members) // 2]
    return new


class GrowPolicy(Policy):
    """Progressive growth on a fixed schedule (the baseline of stacking and share-then-unshare methods): every block
    starts tied to block 0; after a decision at training progress p, ``1 + floor((target - 1) * p / until)``
    blocks are independent (``target`` from p >= until on), each new one made by splitting the largest group at its
    middle. Groups stay runs of consecutive blocks, as the default agent's local moves keep them, and the layout
    tends to equal groups (``static-sequence``), the best fixed layout of the 48-block study. Nothing is learned; the
    reward is shaped as the Q-agent's and logged, so a grow run compares with a dynamic run decision by decision."""

    name = "grow"
    wants_reward = True

    def __init__(self, num_blocks: int, target: int, until: float, agent: AgentSettings) -> None:
        self.num_blocks = num_blocks
        self.target = max(1, min(target, num_blocks))
        self.until = until
        self.shaper = RewardShaper(agent, num_blocks)

    def scheduled_count(self, progress: float) -> int:
        """Independent blocks after a decision at training progress ``progress`` (0..1)."""
        if self.until <= 0 or progress >= self.until:
            return self.target
        # the tolerance keeps a count that lands exactly on a whole number from rounding down
        return 1 + min(self.target - 1, math.floor((self.target - 1) * progress / self.until + 1e-9))

    def initial_state(self):
        return all_tied(self.num_blocks)

    def decide(self, state, decision, progress):
        target = list(state)
        while independent_count(target) < self.scheduled_count(progress):
            target = split_largest_group(target)
        return _fixed_decision(target)  # a canonical state: Eq. 1 maps it to itself

    def observe(self, state, action, ppl, next_state, independent, progress, next_progress):
        return {"reward": self.shaper.shape(ppl, independent)}

    def state_dict(self):
        return {"reward_ref": self.shaper.reward_ref}

    def load_state_dict(self, sd):
        self.shaper.reward_ref = sd["reward_ref"]


def grow_target(num_blocks: int, independent: int, source: dict[str, Any], agent: AgentSettings) -> int:
    """grow's target: ``ties.independent``, else the source run's final count, else the agent's budget, else L/4."""
    if independent:
        return independent
    if source.get("final_state"):
        return independent_count(source["final_state"])
    return agent.max_independent or max(1, num_blocks // 4)


# --------------------------------------------------------------------------------------------------
# Static schemes (Takase & Kiyono 2021; ALBERT)
# --------------------------------------------------------------------------------------------------


def state_from_assignment(unique_of_block: list[int]) -> list[int]:
    """Blocks assigned to the same unique layer share weights; the root is the first block using it."""
    first: dict[int, int] = {}
    return canonicalize([first.setdefault(u, i) for i, u in enumerate(unique_of_block)])


def static_state(scheme: str, num_blocks: int, independent: int) -> list[int]:
    L, n = num_blocks, max(1, min(independent, num_blocks))
    if scheme == "static-all":
        return all_tied(L)
    if scheme == "static-sequence":  # consecutive blocks share: 0 0 1 1 2 2
        return state_from_assignment([i * n // L for i in range(L)])
    if scheme == "static-cycle":  # 0 1 2 0 1 2
        return state_from_assignment([i % n for i in range(L)])
    if scheme == "static-cycle-rev":  # cycle, with the last n blocks in reverse order: 0 1 2 2 1 0
        return state_from_assignment([i % n if i < L - n else n - 1 - (i - (L - n)) for i in range(L)])
    raise DyntieError(f"Unknown static scheme {scheme!r}.")


def random_permutation(num_blocks: int, seed: int) -> list[int]:
    """A seeded permutation that moves the pattern: identity is rejected (it would replay onto the same
    layers) unless there is no other choice."""
    g = torch.Generator().manual_seed(seed + 104729)
    for _ in range(100):
        perm = torch.randperm(num_blocks, generator=g).tolist()
        if perm != list(range(num_blocks)) or num_blocks < 2:
            return perm
    return list(range(num_blocks))


def initial_tie_state(spec: str, num_blocks: int, *, pretrained: bool = False,
                      source: dict[str, Any] | None = None) -> list[int]:
    """The state a dynamic or random run starts from (``ties.initial_state``).

    ``auto``: all tied (the paper) when training from scratch; independent when starting from ``--init``
    weights, whose blocks differ -- tying them all to block 0 would keep one pretrained block of L.
    ``final-arch-of:RUN`` takes that run's final state (``source["initial_state"]``, read from the registry
    by the command); ``static-*:N`` a static scheme with N independent blocks; ``0,0,2,2`` that state.
    """
    L = num_blocks
    source = source or {}
    if spec == "auto":
        return all_independent(L) if pretrained else all_tied(L)
    if spec == "all-tied":
        return all_tied(L)
    if spec == "independent":
        return all_independent(L)
    if spec.startswith("final-arch-of:"):
        if source.get("initial_state") is None:
            raise DyntieError(f"--initial-state {spec} needs that run's final tie state: start the run from the "
                              "dyntie command line, which reads it from the registry.")
        state = [int(x) for x in source["initial_state"]]
        what = f"run {spec.split(':', 1)[1]}'s final state"
    elif spec.startswith("static-"):
        scheme, _, n = spec.partition(":")
        independent = 1 if scheme == "static-all" else int(n)
        if independent > L:
            raise DyntieError(f"--initial-state {spec} asks for {independent} independent blocks of {L}: use at "
                              f"most {L}.")
        return static_state(scheme, L, independent)
    else:
        state = [int(x) for x in spec.split(",")]
        what = f"the state {spec}"
    if len(state) != L:
        raise DyntieError(f"--initial-state: {what} has {len(state)} blocks but this model has {L}: pass a state "
                          f"of {L} entries.")
    return validate_state(state)


#: the parts of ``PolicyInputs.source`` a policy reads (and the source run's id): a checkpoint keeps them, so a
#: resumed final-arch or replay run rebuilds its policy from its own folder, whatever became of the source run
SOURCE_KEYS = ("run_id", "final_state", "initial", "schedule", "mean_independent", "initial_state")


@dataclass(frozen=True)
class PolicyInputs:
    """What a variant's policy is built from. ``source`` carries what a variant takes from another run:
    ``final_state`` (final-arch, grow), ``initial``/``schedule`` (replay), ``mean_independent`` (static schemes),
    ``initial_state`` (the state of ``final-arch-of:RUN``). Dynamic and random runs start from ``initial_state``
    (``initial_tie_state``; resolved when the loop asks, so a resume, which starts from its checkpoint's state,
    never needs it); ``pretrained``: the model starts from ``--init`` weights."""

    variant: str
    blocks: int
    agent: AgentSettings
    total_decisions: int
    seed: int
    independent: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    perm_seed: int = 0
    initial_state: str = "auto"
    pretrained: bool = False
    grow_until: float = 0.2

    def start(self) -> list[int]:
        return initial_tie_state(self.initial_state, self.blocks, pretrained=self.pretrained, source=self.source)


Factory = Callable[[PolicyInputs], Policy]
#: the factory of each variant of the table (dyntie_cli/variants.py), by name
FACTORIES: dict[str, Factory] = {}


def builds(*variants: str) -> Callable[[Factory], Factory]:
    """Register the decorated function as the factory of the policy of ``variants``."""

    def register(factory: Factory) -> Factory:
        for variant in variants:
            FACTORIES[variant] = factory
        return factory

    return register


def make_policy(variant: str, num_blocks: int, *, agent: AgentSettings, total_decisions: int, seed: int,
                independent: int = 0, source: dict[str, Any] | None = None, perm_seed: int = 0,
                initial_state: str = "auto", pretrained: bool = False, grow_until: float = 0.2) -> Policy:
    """Build the policy of a variant with its registered factory (``PolicyInputs`` says what each input is)."""
    if variant not in FACTORIES:
        raise DyntieError(f"Unknown variant {variant!r}.")
    return FACTORIES[variant](PolicyInputs(
        variant, num_blocks, agent, total_decisions, seed, independent=independent, source=source or {},
        perm_seed=perm_seed, initial_state=initial_state, pretrained=pretrained, grow_until=grow_until))


def _settles_independent(policy: Policy, p: PolicyInputs, count: int) -> Policy:
    """``policy``, recording the number of independent blocks it settled on when ``ties.independent`` left it open."""
    if not p.independent:
        policy.resolved = (("ties.independent", count),)
    return policy


@builds("dynamic", "q-off")  # q-off: the settings fix agent.use_q=false
def _agent_policy(p: PolicyInputs) -> Policy:
    return DynamicPolicy(p.blocks, p.agent, p.total_decisions, p.start)


@builds("random")
def _random_policy(p: PolicyInputs) -> Policy:
    return RandomPolicy(p.blocks, p.seed, p.agent, p.start)


@builds("grow")
def _grow_policy(p: PolicyInputs) -> Policy:
    policy = GrowPolicy(p.blocks, grow_target(p.blocks, p.independent, p.source, p.agent), p.grow_until, p.agent)
    return _settles_independent(policy, p, policy.target)


@builds("no-tying")
def _no_tying_policy(p: PolicyInputs) -> Policy:
    return FixedPolicy(all_independent(p.blocks), p.variant)


@builds("final-arch")
def _final_arch_policy(p: PolicyInputs) -> Policy:
    if "final_state" not in p.source:
        raise DyntieError("final-arch needs a source run: pass --from-run RUN (a dynamic run).")
    return FixedPolicy(p.source["final_state"], p.variant)


@builds("replay")
def _replay_policy(p: PolicyInputs) -> Policy:
    if "schedule" not in p.source:
        raise DyntieError("replay needs a source run: pass --from-run RUN (a dynamic run).")
    return ReplayPolicy(p.source.get("initial", all_tied(p.blocks)), p.source["schedule"],
                        random_permutation(p.blocks, p.perm_seed))


@builds("static-all", "static-sequence", "static-cycle", "static-cycle-rev")
def _static_policy(p: PolicyInputs) -> Policy:
    n = p.independent or int(p.source.get("mean_independent", 0) + 0.5) or max(1, p.blocks // 4)
    policy = FixedPolicy(static_state(p.variant, p.blocks, n), p.variant)
    return _settles_independent(policy, p, independent_count(policy.state))
