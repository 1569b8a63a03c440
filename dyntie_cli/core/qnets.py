"""The agent's Q-networks (docs/method.md): each maps tie states to a value for every action entry (i, j), a
lower-triangular L x L matrix per state, and carries what sets it apart -- how it is built from the settings, the
values the agent acts on and the budget ranks by, how a TD target values the next state, its loss, its optimizer
settings and any fitting step of its own. ``register`` names each class after its ``agent.qnet`` value;
``make_qnetwork`` builds the one the settings name."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from ..settings import AgentSettings


def tril_index(num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tril_indices(num_blocks, num_blocks)


def _above(L: int, device: torch.device) -> torch.Tensor:
    """[L, L]: the entries above the diagonal (no row may choose a later block)."""
    return torch.ones(L, L, dtype=torch.bool, device=device).triu(1)


def keep_entries(states: torch.Tensor, keep_target: str) -> torch.Tensor:
    """[B, L]: the action entry that leaves each row's tie as it is (``keep_target``)."""
    keep = states.clone()
    if keep_target == "previous":
        rows = torch.arange(states.shape[1], device=states.device)
        # a tied row in the same group as the row before it keeps following that row
        follows = torch.zeros_like(states, dtype=torch.bool)
        follows[:, 1:] = (states[:, 1:] != rows[1:]) & (states[:, 1:] == states[:, :-1])
        keep = torch.where(follows, (rows - 1).expand_as(states), keep)
    return keep


class QValues(NamedTuple):
    """What one forward pass of a Q-network gives the agent."""

    #: the Q matrices [B, L, L] the agent acts on; -inf where a row may not choose
    acting: torch.Tensor
    #: the values [B, L, L] the budget ranks its refusals by
    ranking: torch.Tensor
    #: the estimates of Q a TD target values the next state by: [B, L, L], or [B, K, L, L] with K heads
    estimates: torch.Tensor


class BaseQNetwork(nn.Module):
    """What the agent asks of a Q-network; the defaults are those of one estimate of Q trained through
    ``Q(s, a)``, the mean over rows of the chosen entries."""

    #: estimates of Q, each taught by its own bootstrap draw of the transitions (the agent draws the masks)
    heads: int = 1
    #: Adam's epsilon
    adam_eps: float = 1e-8
    #: learns from, and loads the weights of, agents of another depth
    any_depth: bool = True
    #: fits part of itself on every transition the agent holds before each optimizer step (``refit``)
    refits: bool = False

    @classmethod
    def from_settings(cls, num_blocks: int, cfg: AgentSettings) -> BaseQNetwork:
        """The network of an agent of ``num_blocks`` blocks (a network of ``any_depth`` needs only ``cfg``)."""
        return cls(cfg)

    def q_taken(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q of each row's action, [B, L] (or [B, K, L])."""
        raise NotImplementedError

    def values(self, states: torch.Tensor, progress: torch.Tensor) -> QValues:
        """One forward pass; one estimate of Q is what the agent acts on, ranks by and values s' by."""
        q = self(states, progress)
        return QValues(q, q, q)

    def q_sa(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q(s, a), the mean over rows of the chosen entries: [B], or [B, K] for each head."""
        return self.q_taken(states, progress, actions).mean(-1)

    def loss(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor, target: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """MSE(Q(s, a), y) over a minibatch; ``mask`` [B, K] gives each head its transitions."""
        return nn.functional.mse_loss(self.q_sa(states, progress, actions), target)

    def td_target(self, reward: torch.Tensor, gamma: float, estimates: torch.Tensor,
                  chosen: torch.Tensor | None) -> torch.Tensor:
        """``reward + gamma * V(s')``, V(s') the mean over rows of ``estimates`` (``QValues.estimates`` of s') at
        the entries ``chosen`` [B, L], or with ``chosen=None`` at each row's best entry (``td_target=max``)."""
        if chosen is None:
            return reward + gamma * estimates.amax(2).mean(1)
        return reward + gamma * estimates.gather(2, chosen.unsqueeze(2)).squeeze(2).mean(1)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam([p for p in self.parameters() if p.requires_grad], lr=lr, eps=self.adam_eps)

    def refit(self, data: tuple, targets: torch.Tensor) -> None:
        """Fit what is not trained by gradient on stacked transitions ``data`` and their TD ``targets``
        (``refits``)."""


#: ``agent.qnet`` -> its network
QNETWORKS: dict[str, type[BaseQNetwork]] = {}


def register(name: str) -> Callable[[type[BaseQNetwork]], type[BaseQNetwork]]:
    """Class decorator: the network of ``agent.qnet=name`` (a value of ``settings.QNet``)."""

    def add(cls: type[BaseQNetwork]) -> type[BaseQNetwork]:
        QNETWORKS[name] = cls
        return cls

    return add


def make_qnetwork(num_blocks: int, cfg: AgentSettings) -> BaseQNetwork:
    return QNETWORKS[cfg.qnet].from_settings(num_blocks, cfg)


@register("matrix")
class QNetwork(BaseQNetwork):
    """The paper's network: the encoded state to all L(L+1)/2 entries; its size grows with L squared, so it
    applies to one depth only."""

    any_depth = False

    @classmethod
    def from_settings(cls, num_blocks: int, cfg: AgentSettings) -> QNetwork:
        return cls(num_blocks, cfg)

    def __init__(self, num_blocks: int, cfg: AgentSettings) -> None:
        super().__init__()
        self.num_blocks = num_blocks
        self.encoding = cfg.encoding
        self.progress_input = cfg.progress_input
        n_in = num_blocks if cfg.encoding == "normalized" else num_blocks * (num_blocks + 1) // 2
        n_in += 1 if cfg.progress_input else 0
        n_out = num_blocks * (num_blocks + 1) // 2
        self.net = nn.Sequential(
            nn.Linear(n_in, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, n_out),
        )
        rows, cols = tril_index(num_blocks)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        # the outputs are the lower triangle row by row: entry (i, j) is output i(i+1)/2 + j
        i = torch.arange(num_blocks)
        self.register_buffer("row_start", i * (i + 1) // 2, persistent=False)

    def encode(self, states: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """``states``: [B, L] long; ``progress``: [B] float in 0..1."""
        L = self.num_blocks
        if self.encoding == "normalized":
            x = states.float() / max(L - 1, 1)
        else:  # onehot
            x = (states[:, self.rows] == self.cols).float()
        if self.progress_input:
            x = torch.cat([x, progress.float().unsqueeze(1)], dim=1)
        return x

    def forward(self, states: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """Q matrices [B, L, L]; entries above the diagonal (not allowed) are -inf."""
        flat = self.net(self.encode(states, progress))
        L = self.num_blocks
        q = flat.new_full((flat.shape[0], L, L), float("-inf"))
        q[:, self.rows, self.cols] = flat
        return q

    def q_taken(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q of each row's action, [B, L]: the outputs ``forward`` would place at (i, actions[:, i])."""
        return self.net(self.encode(states, progress)).gather(1, self.row_start + actions)


#: the features of entry (i, j) of the shared Q-network, each a function of the state and training progress only
#: (so a replayed transition and the TD target see what the agent saw), and each meaning the same at any depth
SHARED_FEATURES: tuple[str, ...] = (
    "i / (L-1): the block's relative depth",
    "j / (L-1): the candidate root's relative depth",
    "(i - j) / (L-1): how far back the candidate is",
    "j == i: become (or stay) independent",
    "j == s[i]: keep pointing at the current root",
    "j == i - 1: follow the block before",
    "j == the keep entry (keep_target): leave the tie as it is",
    "s[i] == i: block i trains now",
    "size of i's group / L",
    "i's rank within its group / (size - 1)",
    "s[j] == j: the candidate trains now",
    "s[j] == s[i]: the candidate is in i's group",
    "size of j's group / L",
    "independent blocks / L",
    "training progress (0 without progress_input)",
)


@register("shared")
class SharedQNetwork(BaseQNetwork):
    """One small network scoring every allowed entry (i, j) of any depth from ``SHARED_FEATURES``; the same
    weights for every row and every L. Every row of a transition is a training row: its chosen entry is regressed
    toward the transition's target."""

    def __init__(self, cfg: AgentSettings) -> None:
        super().__init__()
        self.keep_target = cfg.keep_target
        self.progress_input = cfg.progress_input
        self.net = nn.Sequential(
            nn.Linear(len(SHARED_FEATURES), cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, 1),
        )

    def features(self, states: torch.Tensor, progress: torch.Tensor, i: torch.Tensor, j: torch.Tensor
                 ) -> torch.Tensor:
        """``states`` [B, L] long, ``progress`` [B], entries ``(i, j)`` as two [B, N] long tensors (j <= i):
        their features, [B, N, F]."""
        B, L = states.shape
        norm = float(max(L - 1, 1))
        blocks = torch.arange(L, device=states.device)
        own = states == blocks  # [B, L]: the blocks that train
        same = states.unsqueeze(2) == states.unsqueeze(1)  # [B, L, L]: n and m share a root
        size = same.sum(2).float()  # [B, L]: the size of each block's group
        rank = (same & (blocks.view(1, 1, L) < blocks.view(1, L, 1))).sum(2).float()  # its members before it
        keep = keep_entries(states, self.keep_target)

        def at(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # x [B, L] read at idx [B, N]
            return x.gather(1, idx)

        root_i, root_j = at(states, i), at(states, j)
        size_i = at(size, i)
        frac = (own.sum(1).float() / L).unsqueeze(1).expand_as(i)
        prog = progress.float() if self.progress_input else torch.zeros(B, device=states.device)
        feats = [
            i.float() / norm, j.float() / norm, (i - j).float() / norm, (j == i).float(), (j == root_i).float(),
            (j == i - 1).float(), (j == at(keep, i)).float(), at(own, i).float(), size_i / L,
            at(rank, i) / (size_i - 1).clamp(min=1), at(own, j).float(), (root_j == root_i).float(),
            at(size, j) / L, frac, prog.unsqueeze(1).expand_as(frac),
        ]
        return torch.stack(feats, dim=2)

    def forward(self, states: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """Q matrices [B, L, L]; entries above the diagonal (not allowed) are -inf. Only the lower triangle is
        scored."""
        B, L = states.shape
        rows, cols = tril_index(L)
        values = self.net(self.features(states, progress, rows.expand(B, -1), cols.expand(B, -1))).squeeze(2)
        q = values.new_full((B, L, L), float("-inf"))
        q[:, rows, cols] = values
        return q

    def q_taken(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Q of each row's action, [B, L]."""
        rows = torch.arange(states.shape[1]).expand_as(actions)
        return self.net(self.features(states, progress, rows, actions)).squeeze(2)

    def loss(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor, target: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """mean_i (Q[i, a_i] - y)^2, averaged over the minibatch."""
        taken = self.q_taken(states, progress, actions)
        return ((taken - target.unsqueeze(1)) ** 2).mean()


#: knots of the state value's progress basis: one every 2.5% of training
VALUE_KNOTS = 41
#: the inputs of the advantage network's state value, each meaning the same at any depth
VALUE_FEATURES: tuple[str, ...] = (
    (f"training progress on a basis of {VALUE_KNOTS} hat functions, one every 2.5% of training (all at 0 "
     "without progress_input)"),
    "independent blocks / L",
)


@register("advantage")
class AdvantageQNetwork(SharedQNetwork):
    """The shared network as ``heads`` estimates of ``Q_k[i, j] = V_k(s) + A_k(i, j) - A_k(i, keep_i)``: a state
    value and each entry's advantage over keeping the row's tie.

    * ``A_k`` is the shared entry network (``SHARED_FEATURES``) with one output per head, zero at the start, so an
      untrained agent values every choice of a row alike and keeps (exactly what ``q-off`` does): a row moves
      greedily only once the agent has learned an advantage for the move.
    * ``V_k`` (``VALUE_FEATURES``) carries what every row of a decision shares: the reward's level, which follows
      training progress far more than any tie does. Its progress basis lets it follow that curve decision by
      decision, so a transition's reward is credited to the rows that moved only for what V does not explain
      (trained through ``Q(s, a)``, the mean of the rows' entries, as the matrix network).
    * The heads learn from different bootstrap draws of the same transitions (``QAgent``), so where they disagree
      the data does not settle the question. ``forward`` gives the values the agent acts on: the heads' mean less
      ``confidence`` times their standard deviation, for each entry's advantage; keeping has no spread, so a row
      moves only where the evidence for the move clears its own uncertainty.
    """

    # the least-squares V leaves residuals near float rounding where it fits its few transitions exactly; with
    # Adam's usual epsilon those would be normalised up to full steps and move the advantages without evidence
    # (1e-4 is the order Rainbow uses)
    adam_eps = 1e-4
    refits = True

    def __init__(self, cfg: AgentSettings) -> None:
        super().__init__(cfg)
        self.heads, self.confidence = cfg.heads, cfg.confidence
        self.local = cfg.greedy_scope == "local"
        self.net[-1] = nn.Linear(cfg.hidden, cfg.heads)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        # V is linear in its features, refit by least squares at every update (``fit_value``), not by gradient:
        # it must follow a reward level that moves by more than any tie's effect, and a slow V would hand what it
        # has not caught up with to the advantages of whatever rows moved
        self.value = nn.Parameter(torch.zeros(cfg.heads, VALUE_KNOTS + 1), requires_grad=False)
        self.register_buffer("knots", torch.linspace(0, 1, VALUE_KNOTS), persistent=False)
        # a fixed random network per pair of heads, added to one and subtracted from the other: the heads' mean
        # advantage starts at exactly 0, their spread is large wherever no transition has pinned them down
        self.prior_scale = cfg.prior_scale
        pairs = max(cfg.heads // 2, 1)
        self.prior = nn.Sequential(
            nn.Linear(len(SHARED_FEATURES), cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, cfg.hidden), nn.ReLU(),
            nn.Linear(cfg.hidden, pairs),
        ).requires_grad_(False)

    def _entry_heads(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's A(i, j) for entry features [..., F], [..., K]: what it has learned, and that with its prior.
        The priors cancel in the heads' mean, which is therefore taken over the learned parts alone (exactly 0 before
        any update, not 0 up to rounding)."""
        learned = self.net(feats)
        if not (self.prior_scale and self.heads > 1):
            return learned, learned
        p = self.prior(feats)
        signed = torch.cat([p, -p], dim=-1)[..., : self.heads]
        if signed.shape[-1] < self.heads:  # an odd head has no prior
            signed = torch.cat([signed, torch.zeros_like(learned[..., :1])], dim=-1)
        return learned, learned + self.prior_scale * signed

    def value_features(self, states: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """[B, VALUE_KNOTS + 1]."""
        prog = progress.float() if self.progress_input else torch.zeros(states.shape[0], device=states.device)
        hats = (1 - (prog.unsqueeze(1) - self.knots).abs() * (VALUE_KNOTS - 1)).clamp(min=0)
        frac = (states == torch.arange(states.shape[1], device=states.device)).float().mean(1, keepdim=True)
        return torch.cat([hats, frac], dim=1)

    def state_value(self, states: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """V_k(s), [B, K]."""
        return self.value_features(states, progress) @ self.value.T

    @torch.no_grad()
    def fit_value(self, x: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, ridge: float = 1e-3) -> None:
        """Fit each head's V to ``target`` [N, K] (what the advantages of the taken actions leave of the TD target)
        on features ``x`` [N, F] of every transition its ``mask`` [N, K] gives it: least squares, with a small ridge
        for the knots no transition has reached."""
        eye = torch.eye(x.shape[1])
        for k in range(self.heads):
            w = mask[:, k]
            # the ridge pulls toward the mean target, not toward 0: the hats sum to 1 at any progress, so adding the
            # mean to every hat's coefficient adds it to V
            level = (w * target[:, k]).sum() / w.sum().clamp(min=1.0)
            coef = torch.linalg.solve(x.T @ (w.unsqueeze(1) * x) + ridge * eye, x.T @ (w * (target[:, k] - level)))
            coef[:VALUE_KNOTS] += level
            self.value[k] = coef

    def head_values(self, states: torch.Tensor, progress: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every head's Q matrices [B, K, L, L], its advantages over keeping [B, K, L, L], and the heads' mean
        advantage [B, L, L]. Entries a row may not choose (above the diagonal; with ``greedy_scope=local`` also
        those beyond keep, untie and join the group before) are -inf in Q and 0 in the advantages."""
        B, L, K = *states.shape, self.heads
        keep = keep_entries(states, self.keep_target)
        if self.local:
            # only the entries a row may choose (keep, untie, join the group before) are scored
            blocks = torch.arange(L, device=states.device).expand(B, L)
            cols = torch.stack([keep, blocks, (blocks - 1).clamp(min=0)], dim=2)  # [B, L, 3], keep first
            rows = blocks.unsqueeze(2).expand(B, L, 3)
            a = torch.cat(self._entry_heads(self.features(states, progress, rows.reshape(B, -1),
                                                          cols.reshape(B, -1))), dim=-1).view(B, L, 3, 2 * K)
            adv = torch.zeros(B, L, L, 2 * K, device=states.device).scatter_(
                2, cols.unsqueeze(3).expand(B, L, 3, 2 * K), a - a[:, :, :1])
            scored = torch.zeros(B, L, L, dtype=torch.bool, device=states.device).scatter_(2, cols, True)
        else:
            rows, cols = tril_index(L)
            a = states.new_zeros((B, L, L, 2 * K), dtype=torch.float32)
            a[:, rows, cols] = torch.cat(self._entry_heads(self.features(states, progress, rows.expand(B, -1),
                                                                         cols.expand(B, -1))), dim=-1)
            adv = a - a.gather(2, keep.view(B, L, 1, 1).expand(B, L, 1, 2 * K))
            scored = ~_above(L, states.device).expand(B, L, L)
        adv = adv.permute(0, 3, 1, 2).masked_fill(~scored.unsqueeze(1), 0.0)  # [B, 2K, L, L]: learned, with prior
        q = self.state_value(states, progress).view(B, K, 1, 1) + adv[:, K:]
        return q.masked_fill(~scored.unsqueeze(1), float("-inf")), adv[:, K:], adv[:, :K].mean(1)

    def values(self, states: torch.Tensor, progress: torch.Tensor) -> QValues:
        """The values the agent acts on: mean V plus, for each entry, the heads' mean advantage less ``confidence``
        times its standard deviation over heads; the mean values, no spread taken off, which the budget ranks its
        refusals by (the spread decides whether a row moves, not which request the budget refuses first; all alike
        before any update, so an untrained agent refuses as q-off does); every head's Q matrices [B, K, L, L]."""
        q, adv, mean = self.head_values(states, progress)
        blocked = torch.isneginf(q[:, 0])
        ranked = self.state_value(states, progress).mean(1).view(-1, 1, 1) + mean
        acting = ranked - self.confidence * adv.std(1) if self.heads > 1 and self.confidence else ranked
        return QValues(acting.masked_fill(blocked, float("-inf")), ranked.masked_fill(blocked, float("-inf")), q)

    def forward(self, states: torch.Tensor, progress: torch.Tensor) -> torch.Tensor:
        """The Q matrices the agent acts on [B, L, L] (``values``)."""
        return self.values(states, progress).acting

    def taken_parts(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's V(s) [B, K] and advantage of each row's action over keeping [B, K, L]."""
        B, L = actions.shape
        rows = torch.arange(L).expand_as(actions)
        keep = keep_entries(states, self.keep_target)
        a = self._entry_heads(self.features(states, progress, torch.cat([rows, rows], 1),
                                            torch.cat([actions, keep], 1)))[1]
        return self.state_value(states, progress), (a[:, :L] - a[:, L:]).permute(0, 2, 1)

    def q_taken(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Every head's Q of each row's action, [B, K, L]."""
        value, adv = self.taken_parts(states, progress, actions)
        return value.unsqueeze(2) + adv

    def loss(self, states: torch.Tensor, progress: torch.Tensor, actions: torch.Tensor, target: torch.Tensor,
             mask: torch.Tensor) -> torch.Tensor:
        """MSE(Q(s, a), y) of every head, over the transitions its bootstrap ``mask`` [B, K] gives it."""
        err = (self.q_sa(states, progress, actions) - target) ** 2  # [B, K]
        return (err * mask).sum() / mask.sum().clamp(min=1.0)

    def td_target(self, reward: torch.Tensor, gamma: float, estimates: torch.Tensor,
                  chosen: torch.Tensor | None) -> torch.Tensor:
        """Each head's target [B, K]: each head at its own best entry of each row, or valued at the action the agent
        would take in s' (``chosen``)."""
        if chosen is None:
            return reward.unsqueeze(1) + gamma * estimates.amax(3).mean(2)
        index = chosen.view(chosen.shape[0], 1, -1, 1).expand(-1, estimates.shape[1], -1, 1)
        return reward.unsqueeze(1) + gamma * estimates.gather(3, index).squeeze(3).mean(2)

    @torch.no_grad()
    def refit(self, data: tuple, targets: torch.Tensor) -> None:
        """V of every head by least squares on all of ``data``, toward what the current advantages of the taken
        actions leave of the TD ``targets``: V carries all of the reward's level it can, the advantages the rest."""
        s, a, _, _, p, _, mask = data
        left = targets - self.taken_parts(s, p, a)[1].mean(2)
        self.fit_value(self.value_features(s, p), left, mask)
