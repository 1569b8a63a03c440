"""The Q-learning agent (docs/method.md, the agent section): epsilon-greedy tie actions with the keep bias and the
independent-block budget, replay, TD targets, warm starts from earlier runs, and an exact ``state_dict``. The
networks it learns with, and all that differs between them, are in ``qnets.py``."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

from ..errors import DyntieError
from ..settings import AgentSettings
from .policy_types import Decision, RewardShaper
from .qnets import BaseQNetwork, keep_entries, make_qnetwork
from .ties import transition, validate_state


def greedy_moves(state: list[int], greedy: list[int], keep: list[int]) -> int:
    """Rows whose greedy entry, taken alone (every other row keeping), would change the state: how often the
    learned part would act if nothing else did."""
    moves = 0
    for i in range(1, len(state)):
        if greedy[i] != keep[i]:
            alone = list(keep)
            alone[i] = greedy[i]
            moves += transition(state, alone) != list(state)
    return moves


def _local_entries(keep: torch.Tensor) -> torch.Tensor:
    """[B, L, L]: the entries a row may choose with ``greedy_scope=local``: its keep entry, untie (j == i) and
    join the group before (j == i - 1) -- the moves an exploring row makes with ``explore_moves=local``."""
    L = keep.shape[1]
    i = torch.arange(L, device=keep.device).view(1, L, 1)
    j = torch.arange(L, device=keep.device).view(1, 1, L)
    return (j == keep.unsqueeze(2)) | (j == i) | (j == i - 1)


def _replay_entry(state, action, reward, next_state, progress, next_progress, mask) -> tuple:
    long = torch.long
    return (torch.tensor(state, dtype=long), torch.tensor(action, dtype=long), float(reward),
            torch.tensor(next_state, dtype=long), float(progress), float(next_progress),
            torch.as_tensor(mask, dtype=torch.float32))


class QAgent:
    """Epsilon-greedy Q-learning over tie actions. Deterministic given its seed; ``state_dict`` is exact."""

    learns = True

    def __init__(self, num_blocks: int, cfg: AgentSettings, total_decisions: int | None = None) -> None:
        if num_blocks < 1:
            raise DyntieError("The agent needs at least one block.")
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.total_decisions = total_decisions
        self.generator = torch.Generator().manual_seed(cfg.seed)
        with torch.random.fork_rng():  # network init reproducible from the agent's seed, global RNG untouched
            torch.manual_seed(cfg.seed)
            self.q = make_qnetwork(num_blocks, cfg)
            self.target = make_qnetwork(num_blocks, cfg) if cfg.target_sync > 0 else None
        if self.target is not None:
            self.target.load_state_dict(self.q.state_dict())
            self.target.requires_grad_(False)
        self.optimizer = self.q.optimizer(cfg.lr)
        self.epsilon = cfg.epsilon
        self.decisions = 0
        # (state, action, reward, next state, progress, next progress, head mask); states and actions as long
        # tensors, so a minibatch is a stack, not a conversion of nested lists (most of an update's time otherwise)
        self.replay: deque[tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, float, float, torch.Tensor]] = deque(
            maxlen=max(cfg.replay_size, 1)
        )
        self.prev_greedy: list[int] | None = None
        self.shaper = RewardShaper(cfg, num_blocks)
        # which heads learn from a transition (a network with several): drawn from a stream of their own, so the
        # draws that act are those of q-off and of a one-head agent
        self.bootstrap = torch.Generator().manual_seed(cfg.seed + 104_729)

    def _mask(self, generator: torch.Generator) -> torch.Tensor:
        """Which heads learn from a new transition: each with probability 1/2, at least one."""
        heads = self.q.heads
        if heads == 1:
            return torch.ones(1)
        mask = (torch.rand(heads, generator=generator) < 0.5).float()
        if not mask.any():
            mask[int(torch.randint(0, heads, (1,), generator=generator))] = 1.0
        return mask

    # -- acting ------------------------------------------------------------------------------------

    def q_matrix(self, state: list[int], progress: float = 0.0) -> torch.Tensor:
        with torch.no_grad():
            return self.q(torch.tensor([state]), torch.tensor([progress]))[0]

    def _uniform(self, upto: int) -> int:
        return int(torch.randint(0, upto + 1, (1,), generator=self.generator))

    def _coin(self, p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=self.generator)) < p

    def act(self, state: list[int], progress: float = 0.0, *, greedy_only: bool = False) -> Decision:
        s = validate_state(state)
        L = self.num_blocks
        q, ranking = self._state_values(s, progress)
        # the rows whose current tie keep_bias and keep_bonus protect, and the action entry that keeps each
        st = torch.tensor([s])
        keep = self._keep_entries(st)[0].tolist()
        protected = self._protected(st)[0].tolist()
        if self.cfg.use_q:
            greedy = self._greedy(q.unsqueeze(0), st)[0].tolist()
        else:
            # the Q-network ablated: greedily every row keeps its tie, and the budget below ranks its refusals with
            # no values (all gains equal: the lowest rows first); q itself is only reported (q_spread)
            greedy = list(keep)
        acting_q = (ranking if self.cfg.use_q else
                    torch.zeros_like(q).masked_fill(~torch.isfinite(q), float("-inf")))
        eps = 0.0 if greedy_only else self.epsilon
        action = list(greedy)
        explored_rows: list[int] = []
        rows = list(range(1, L))
        if self.cfg.rows_per_decision and not greedy_only:
            perm = torch.randperm(L - 1, generator=self.generator).tolist()
            chosen = {rows[k] for k in perm[: self.cfg.rows_per_decision]}
            for i in rows:
                if i not in chosen:
                    action[i] = keep[i]
            rows = sorted(chosen)
        whole = self.cfg.explore == "vector" and self._coin(eps)
        for i in rows:
            if whole or (self.cfg.explore == "row" and self._coin(eps)):
                explored_rows.append(i)
                action[i] = keep[i] if protected[i] and self._coin(self.cfg.keep_bias) else self._move(i, keep[i])
        if self.cfg.max_independent:
            action = self._cap_independent(torch.tensor([action]), acting_q.unsqueeze(0), st)[0].tolist()
        finite = torch.where(torch.isfinite(q), q, torch.nan)
        spread = (finite.nan_to_num(float("-inf")).amax(1) - finite.nan_to_num(float("inf")).amin(1))[1:]
        agreement = None
        if self.prev_greedy is not None:
            agreement = sum(a == b for a, b in zip(greedy[1:], self.prev_greedy[1:])) / max(L - 1, 1)
        self.prev_greedy = greedy
        return Decision(
            action=action, greedy=greedy, explored=bool(explored_rows), epsilon=eps,
            q_spread=float(spread.mean()) if L > 1 else 0.0, greedy_agreement=agreement,
            greedy_moves=greedy_moves(s, greedy, keep),
        )

    def _move(self, i: int, keep: int) -> int:
        """An exploring row's choice when it does not keep its tie (``explore_moves``)."""
        if self.cfg.explore_moves == "any":
            return self._uniform(i)
        moves = [m for m in (i, i - 1) if m != keep]  # untie, or join the group of the block before
        return moves[self._uniform(len(moves) - 1)]

    def _keep_entries(self, states: torch.Tensor) -> torch.Tensor:
        """[B, L]: the action entry that leaves each row's tie as it is (``keep_target``)."""
        return keep_entries(states, self.cfg.keep_target)

    def _protected(self, states: torch.Tensor) -> torch.Tensor:
        """[B, L]: the rows keep_bias and keep_bonus protect (``keep_scope``)."""
        own = states == torch.arange(states.shape[1])
        return torch.ones_like(own) if self.cfg.keep_scope == "all" else own

    def _greedy(self, q: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """[B, L]: the greedy action in each state: argmax of each row, the keep entry of a protected row raised by
        the keep bonus (a newly independent block is not thrown away on a small, noisy difference in Q: the churn
        that made the paper's agent no better than chance), and with ``keep_trained`` an independent block kept."""
        keep = self._keep_entries(states)
        if self.cfg.greedy_scope == "local":
            q = q.masked_fill(~_local_entries(keep), float("-inf"))
        if self.cfg.keep_bonus:
            bonus = torch.zeros_like(q).scatter_(2, keep.unsqueeze(2), self.cfg.keep_bonus)
            q = q + bonus * self._protected(states).unsqueeze(2)
        greedy = q.argmax(dim=2)
        # a row moves only for a strictly better entry: where the best is no better than keeping, it keeps (the
        # advantage network values every choice alike until it has learned otherwise)
        no_gain = q.gather(2, greedy.unsqueeze(2)) <= q.gather(2, keep.unsqueeze(2))
        greedy = torch.where(no_gain.squeeze(2), keep, greedy)
        if self.cfg.keep_trained:
            rows = torch.arange(states.shape[1]).expand_as(states)
            greedy = torch.where(states == rows, rows, greedy)
        return greedy

    def _state_values(self, state: list[int], progress: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One state's Q matrix acted on [L, L] and the values the budget ranks its refusals by (``QValues``), from
        one pass of the network."""
        with torch.no_grad():
            values = self.q.values(torch.tensor([state]), torch.tensor([progress]))
        return values.acting[0], values.ranking[0]

    def _cap_independent(self, action: torch.Tensor, q: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """Mask actions [B, L] so Eq. 1 gives at most ``max_independent`` independent blocks (block 0 included).
        Rows asking to *become* independent are refused first (the least valuable to the Q-network first, ``q``
        [B, L, L] being the Q matrices the actions were chosen from); a block that already trains keeps its
        weights unless the budget still forces it out. A refused row takes its best tied entry, or with
        ``keep_target=previous`` stays local: a refused request keeps the row's tie and a block forced out joins
        the group before it (groups stay consecutive)."""
        cap = max(1, self.cfg.max_independent)
        n = action.shape[1]
        rows = torch.arange(n)
        own = action == rows
        own[:, 0] = False
        excess = own.sum(1) + 1 - cap
        if not bool((excess > 0).any()):
            return action
        tied_entries = q.masked_fill(rows.view(1, 1, n) >= rows.view(1, n, 1), float("-inf"))  # j < i
        gain = q.diagonal(dim1=1, dim2=2) - tied_entries.amax(2)
        trains = states == rows
        # refusal order: requests before blocks that train, then the smallest gain, then the lower row (two
        # stable sorts); rows not asking to be independent last
        order = torch.sort(gain.masked_fill(~own, float("inf")), dim=1, stable=True).indices
        group = (trains.long() + 2 * (~own).long()).gather(1, order)
        order = order.gather(1, torch.sort(group, dim=1, stable=True).indices)
        rank = torch.empty_like(order).scatter_(1, order, rows.expand_as(order))
        refuse = own & (rank < excess.unsqueeze(1))
        if self.cfg.keep_target == "previous":
            fallback = torch.where(trains, rows - 1, self._keep_entries(states))
        else:
            fallback = tied_entries.argmax(2)
        return torch.where(refuse, fallback, action)

    # -- learning ----------------------------------------------------------------------------------

    def shape_reward(self, ppl: float, independent: int) -> float:
        return self.shaper.shape(ppl, independent)

    def _target(self, reward: torch.Tensor, next_states, next_progress) -> torch.Tensor:
        """The TD target of each transition: [B], or [B, K] for each head."""
        net: BaseQNetwork = self.target if self.target is not None else self.q
        with torch.no_grad():
            values = net.values(next_states, next_progress)
            chosen = None  # td_target=max: each row's best entry
            if self.cfg.td_target == "greedy":
                # the entries the agent would choose in s' (chosen by the online network, as it acts; without a
                # target network that is the forward pass just made)
                online = values if net is self.q else self.q.values(next_states, next_progress)
                chosen = self._greedy(online.acting, next_states)
                if self.cfg.max_independent and self.cfg.td_budget:  # what the budget refuses, the agent does not do
                    chosen = self._cap_independent(chosen, online.ranking, next_states)
            return net.td_target(reward, self.cfg.gamma, values.estimates, chosen)

    def update(self, state: list[int], action: list[int], reward: float, next_state: list[int],
               progress: float = 0.0, next_progress: float = 0.0) -> dict[str, float]:
        """Store the transition and train; returns Q(s,a), its target and the TD loss for this transition."""
        if transition(state, action) != list(next_state):
            raise DyntieError("The transition does not follow Eq. 1 from the state and action given.")
        self.replay.append(_replay_entry(state, action, reward, next_state, progress, next_progress,
                                         self._mask(self.bootstrap)))
        newest = [self.replay[-1]]
        s, a, r, s2, p, p2, _ = self._stack(newest)
        with torch.no_grad():  # what the agent predicted for this transition, and the target it trains on
            pred = float(self.q.q_sa(s, p, a).mean())
        target = float(self._target(r, s2, p2).mean())
        everything = self._value_data(self._stack(list(self.replay))) if self.q.refits else None
        for _ in range(max(self.cfg.updates_per_decision, 1)):
            batch = newest + self._sample(max(self.cfg.batch_size, 1) - 1)
            self._step(self._stack(batch), everything)
        self.decisions += 1
        if self.target is not None and self.decisions % self.cfg.target_sync == 0:
            self.target.load_state_dict(self.q.state_dict())
        self._decay_epsilon()
        return {"q_predicted": pred, "q_target": target, "td_loss": (pred - target) ** 2}

    def _step(self, batch: tuple, everything: tuple | None = None) -> None:
        """One optimizer step on a stacked minibatch; a network that ``refits`` first refits on ``everything``
        (``_value_data`` of the transitions the minibatch is drawn from)."""
        if everything is not None:
            self.q.refit(*everything)
        s, a, r, s2, p, p2, mask = batch
        loss = self.q.loss(s, p, a, self._target(r, s2, p2), mask)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def _value_data(self, data: tuple) -> tuple[tuple, torch.Tensor]:
        """Stacked transitions with their TD targets: what a network that ``refits`` fits on. The targets are computed
        once for a batch of updates (a decision's, or a target-network period's of a warm start), as the target
        network is fixed."""
        _, _, r, s2, _, p2, _ = data
        return data, self._target(r, s2, p2)

    def _sample(self, n: int) -> list:
        if n <= 0 or len(self.replay) <= 1:
            return []
        idx = torch.randint(0, len(self.replay), (n,), generator=self.generator).tolist()
        return [self.replay[i] for i in idx]

    @staticmethod
    def _stack(batch):
        s, a, r, s2, p, p2, mask = zip(*batch)
        return (torch.stack(s), torch.stack(a), torch.tensor(r, dtype=torch.float32), torch.stack(s2),
                torch.tensor(p, dtype=torch.float32), torch.tensor(p2, dtype=torch.float32), torch.stack(mask))

    def _decay_epsilon(self) -> None:
        c = self.cfg
        if c.epsilon_schedule == "per-decision":
            self.epsilon = max(c.epsilon_decay * self.epsilon, c.epsilon_min)
        else:  # run
            horizon = max(1.0, c.explore_fraction * (self.total_decisions or 100))
            frac = min(1.0, self.decisions / horizon)
            if frac >= 1.0 or c.epsilon <= c.epsilon_min:
                self.epsilon = c.epsilon_min
            else:
                # geometric interpolation from epsilon to epsilon_min, reached at explore_fraction of the run;
                # toward epsilon_min == 0 (no exploration after that point) it aims at epsilon / 100 on the way
                end = c.epsilon_min if c.epsilon_min > 0 else c.epsilon / 100
                self.epsilon = max(c.epsilon * (end / c.epsilon) ** frac, c.epsilon_min)

    # -- knowledge from earlier runs ---------------------------------------------------------------

    def warm_start(self, transitions: list[tuple], weights: dict[str, Any] | None = None) -> None:
        """Start from earlier runs: the Q-network of a saved agent (``weights``: its ``state_dict``), then
        ``warm_updates`` minibatch updates on recorded ``transitions`` ``(state, action, reward, next_state,
        progress, next_progress)`` of any depth (a network that applies at ``any_depth``; another only of its
        own). Each minibatch
        is drawn from the transitions of one depth with a generator of its own, the target network follows the
        run's cadence (every ``target_sync`` decisions' worth of updates) and is synced at the end; the replay
        buffer, epsilon and the agent's random stream are left as a cold agent has them."""
        if weights is not None:
            self._load_network(weights)
        depths = sorted({len(t[0]) for t in transitions})
        if not self.q.any_depth and depths not in ([], [self.num_blocks]):
            raise DyntieError(f"A {self.cfg.qnet} Q-network of {self.num_blocks} blocks learns only from runs of as "
                              f"many blocks (these have {', '.join(map(str, depths))}); use agent.qnet=shared.")
        for t in transitions:
            if transition(t[0], t[1]) != list(t[3]):
                raise DyntieError("A recorded transition does not follow Eq. 1; the source run's ties are damaged.")
        if transitions and self.cfg.warm_updates:
            gen = torch.Generator().manual_seed(self.cfg.seed + 15_485_863)
            groups = {n: self._stack([_replay_entry(*t, self._mask(gen)) for t in transitions if len(t[0]) == n])
                      for n in depths}
            sizes = torch.tensor([len(t[0]) for t in transitions])
            batch = max(self.cfg.batch_size, 1)
            sync_every = max(self.cfg.target_sync, 1) * max(self.cfg.updates_per_decision, 1)
            value_data: dict[int, tuple] = {}  # each depth's transitions with their targets, for this period
            for u in range(self.cfg.warm_updates):
                depth = int(sizes[int(torch.randint(0, len(sizes), (1,), generator=gen))])
                group = groups[depth]
                idx = torch.randint(0, group[0].shape[0], (batch,), generator=gen)
                if self.q.refits and depth not in value_data:
                    value_data[depth] = self._value_data(group)
                self._step(tuple(part[idx] for part in group), value_data.get(depth))
                if self.target is not None and (u + 1) % sync_every == 0:
                    self.target.load_state_dict(self.q.state_dict())
                    value_data.clear()
        if self.target is not None:
            self.target.load_state_dict(self.q.state_dict())

    def _load_network(self, sd: dict[str, Any]) -> None:
        qnet = sd["cfg"].get("qnet", "matrix")
        if qnet != self.cfg.qnet:
            raise DyntieError(f"The saved agent has a {qnet} Q-network and this run a {self.cfg.qnet} one; set "
                              f"agent.qnet={qnet} or start from another run.")
        if not self.q.any_depth and sd["num_blocks"] != self.num_blocks:
            raise DyntieError(f"The saved agent's {qnet} Q-network is for {sd['num_blocks']} blocks, not "
                              f"{self.num_blocks}; only a shared network applies at another depth.")
        try:
            self.q.load_state_dict(sd["q"])
        except RuntimeError:
            raise DyntieError("The saved agent's Q-network has another shape (agent.hidden); start from a run "
                              "with the same agent settings.") from None

    # -- resume ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "cfg": self.cfg.model_dump(), "num_blocks": self.num_blocks, "total_decisions": self.total_decisions,
            "q": self.q.state_dict(), "target": self.target.state_dict() if self.target is not None else None,
            "optimizer": self.optimizer.state_dict(), "epsilon": self.epsilon, "decisions": self.decisions,
            "replay": [(s.tolist(), a.tolist(), r, s2.tolist(), p, p2, m.tolist())
                       for s, a, r, s2, p, p2, m in self.replay],
            "prev_greedy": self.prev_greedy, "reward_ref": self.shaper.reward_ref,
            "generator": self.generator.get_state(), "bootstrap": self.bootstrap.get_state(),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        if sd["num_blocks"] != self.num_blocks:
            raise DyntieError("The saved agent was made for a different number of blocks.")
        if sd["cfg"].get("qnet", "matrix") != self.cfg.qnet:
            raise DyntieError(f"The saved agent has a {sd['cfg'].get('qnet', 'matrix')} Q-network, this one a "
                              f"{self.cfg.qnet} one.")
        self.q.load_state_dict(sd["q"])
        if self.target is not None and sd["target"] is not None:
            self.target.load_state_dict(sd["target"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.epsilon = sd["epsilon"]
        self.decisions = sd["decisions"]
        # an agent saved before head masks were recorded had one head: every transition teaches it
        self.replay = deque((_replay_entry(*t) if len(t) == 7 else _replay_entry(*t, [1.0]) for t in sd["replay"]),
                            maxlen=self.replay.maxlen)
        self.prev_greedy = sd["prev_greedy"]
        self.shaper.reward_ref = sd["reward_ref"]
        self.total_decisions = sd["total_decisions"]
        self.generator.set_state(sd["generator"])
        if "bootstrap" in sd:
            self.bootstrap.set_state(sd["bootstrap"])
