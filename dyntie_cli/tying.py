"""Dynamic layer tying inside your own training loop, and a transformers ``TrainerCallback`` built on it.

Both run dyntie's own core -- the policies and the Q-agent (core/policies.py, core/agent.py), Eq. 1 and the
tie manager (core/ties.py), the decision step shared with ``dyntie train`` (core/decisions.py) and, when asked,
the registry writer -- so a decision made here is made exactly as in a dyntie run with the same settings.
docs/python-api.md is the user's page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .backbone import perplexity
from .core.checkpoint import LoopState
from .core.decisions import TieDecisions
from .core.distributed import BackwardAverage, Group
from .core.policies import make_policy
from .core.ties import TieManager, all_independent
from .errors import DyntieError, UsageError
from .settings import AgentSettings, TieSettings, TrainSettings, Variant, validated
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
    """What a run writes, kept in memory (``history``) and, with a registry, written there too. The registry
    run begins at the first step (``begin``), so a run continued from a checkpoint (``load_state_dict``) never
    records a new run first; the rows logged before it wait in memory."""

    def __init__(self, writer: Any | None, start: Callable[[], None] | None = None) -> None:
        self.writer, self._start = writer, start
        self.ties: list[TieRow] = []
        self.decisions: list[dict[str, Any]] = []
        self._early: list[tuple[str, tuple, dict[str, Any]]] = []

    def begin(self) -> None:
        if self._start is None:
            return
        self._start()
        self._start = None
        for method, args, row in self._early:
            getattr(self.writer, method)(*args, **row)
        self._early = []

    @property
    def started(self) -> bool:
        return self.writer is not None and self._start is None

    def resumed(self) -> None:
        """The writer continues a recorded run: what was logged before is that run's already."""
        self._start, self._early = None, []

    def _write(self, method: str, *args: Any, **row: Any) -> None:
        if self.writer is None:
            return
        if self._start is not None:
            self._early.append((method, args, row))
        else:
            getattr(self.writer, method)(*args, **row)

    def tie(self, **row: Any) -> None:
        self.ties.append(TieRow(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in row.items()}))
        self._write("tie", **row)

    def decision(self, **row: Any) -> None:
        self.decisions.append(row)
        self._write("decision", **row)

    def metric(self, step: int, split: str, name: str, value: float) -> None:
        self._write("metric", step, split, name, value)


#: the version of ``DynamicTying.state_dict``'s format
STATE_FORMAT = 1


def refuse_sharded(blocks: Sequence[nn.Module]) -> None:
    """FSDP and DeepSpeed ZeRO-3 shard the blocks' parameters over the parameter set they found when they wrapped
    the model, and a tie decision changes that set: refused, naming what works instead."""
    # by name: importing FSDP after the process group exists would tie the group's life to the interpreter's
    wrapped = {"FSDPModule", "FullyShardedDataParallel"}
    params = [p for b in blocks for p in b.parameters()]
    sharded = (any(c.__name__ in wrapped for b in blocks for c in type(b).__mro__)
               or any(type(p).__name__ == "DTensor" or hasattr(p, "ds_id") for p in params))
    if sharded:
        raise UsageError("DynamicTying cannot tie blocks that FSDP or DeepSpeed shard (they fix the parameter set a "
                         "tie decision changes); train with plain data parallel: every rank a whole, unwrapped model.")


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
    independent when ``pretrained``). ``checkpointing``: activation checkpointing of the blocks, off, all or
    every n-th (``train.checkpointing``; a tied block recomputes with its root's tensors). ``db``: a DuckDB registry file to record the run in, as ``dyntie train``
    would (``dyntie report`` reads it); ``history`` always holds the tie log.

    Under torchrun (or any launcher that started a process group) every rank makes one: rank 0's weights go to
    every rank, rank 0 decides and every rank applies the same change, and each backward pass ends with the
    gradients of every parameter the optimizer holds now averaged over the ranks (``no_sync`` skips it for a
    pass that only accumulates). Rank 0 records the run. :meth:`state_dict` and :meth:`load_state_dict` carry a
    run through a checkpoint of the caller's loop.
    """

    def __init__(self, blocks: Sequence[nn.Module], optimizer: torch.optim.Optimizer, *, total_steps: int,
                 decide_every: int = 10, variant: Variant = "dynamic", agent: str = "default",
                 agent_options: dict[str, Any] | None = None, initial_state: str = "auto", pretrained: bool = False,
                 independent: int = 0, tied_grad: str = "follow", untie_optim: str = "fresh", seed: int = 0,
                 db: str | Path | None = None, name: str = "custom", dataset: str = "",
                 fresh_ppl: Callable[[], float] | None = None, heldout_ppl: Callable[[], float] | None = None,
                 log_every: int = 0, checkpointing: str | int = "off",
                 _resume: Mapping[str, Any] | None = None) -> None:
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
        every = validated(TrainSettings, {"checkpointing": checkpointing}, "train").checkpointing
        blocks = list(blocks)
        refuse_sharded(blocks)
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
        self.group = Group.joined(next(blocks[0].parameters()).device)
        # every block starts with the weights it was built with, so the optimizer holds them all; the start
        # state is applied once the optimizer is attached, so tied blocks leave it
        self.ties = TieManager(blocks, all_independent(len(blocks)), tied_grad=ties_cfg.tied_grad,
                               untie_optim=ties_cfg.untie_optim)
        self.ties.attach_optimizer(optimizer)
        self.optimizer = optimizer
        #: the optimizer's parameters as built (every block its own), named as ``optimizer_layout`` names them
        self.built_layout = self.optimizer_layout()
        self.ties.checkpoint(every)
        self.loop = LoopState()
        self._db, self._config = db, None
        writer = None
        if db is not None and self.group.is_main:
            from .results.writer import RunWriter

            writer = RunWriter(db, backbone=name)
            self._config = {"backbone": name, "dataset": dataset, "variant": variant, "seed": seed,
                            "api": "DynamicTying", "train": {"max_steps": total_steps},
                            "ties": ties_cfg.model_dump(mode="json"), "agent": agent_cfg.model_dump(mode="json")}
            if self.group.active:
                self._config["world_size"] = self.group.world
        self.writer = writer
        self.log = _Log(writer, self._start_run if writer is not None else None)
        self.decisions = TieDecisions(self.ties, self.policy, self.log, self.loop, decide_every=decide_every,
                                      max_steps=total_steps, reward_batch=agent_cfg.reward_batch,
                                      fresh_ppl=fresh_ppl, heldout_ppl=heldout_ppl,
                                      probes=agent_cfg.reward_probes, group=self.group)
        self._losses: list[float] = []
        self.finished = False
        self.averaging = None
        if self.group.active:
            self.averaging = BackwardAverage(self.group, blocks[0], self._trained_parameters)
        if _resume is not None:
            self._restore(_resume, reorder=False)
            return
        if self.group.active:
            self.group.broadcast_parameters(self._trained_parameters())  # the same start on every rank, as DDP's
        self.ties.apply(self.policy.initial_state())
        self.decisions.log_state(action=self.ties.state, changed=0)  # decision 0: the initial state

    def _start_run(self) -> None:
        assert self.writer is not None and self._config is not None
        c = self._config
        self.writer.start("api", c["backbone"], c["dataset"], c["variant"], c, seed=c["seed"])

    def _trained_parameters(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def run_id(self) -> str | None:
        """The registry's id of the run (on rank 0, with ``db``)."""
        return self.writer.run_id if self.writer is not None else None

    @property
    def state(self) -> list[int]:
        return list(self.ties.state)

    @property
    def history(self) -> list[TieRow]:
        """The tie log: the initial state, then the state after each decision."""
        return self.log.ties

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Backward passes inside accumulate gradients without averaging them over the ranks (DDP's
        ``no_sync``): the pass after the block averages what all of them accumulated."""
        if self.averaging is None:
            yield
            return
        wanted, self.averaging.wanted = self.averaging.wanted, lambda: False
        try:
            yield
        finally:
            self.averaging.wanted = wanted

    def step(self, loss: float | torch.Tensor) -> bool:
        """Record one optimizer step's loss; decide when it is time. Returns whether a decision was made.
        On several ranks, the loss recorded and rewarded is the ranks' mean."""
        if self.finished:
            raise DyntieError("This DynamicTying has finished; make a new one to tie again.")
        loss = float(loss.detach()) if torch.is_tensor(loss) else float(loss)
        loss = self.group.mean(loss)
        self.log.begin()
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
        """Score a decision still waiting for its reward, record the means, close the registry run. On several
        ranks, a run that finished checks that every rank holds the same weights (every rank calls this)."""
        if self.finished:
            return
        self.log.begin()
        self.decisions.score_pending()
        steps = max(self.loop.step, 1)
        self.log.metric(self.loop.step, "train", "independent_layers_mean", self.loop.indep_steps / steps)
        self.finished = True
        if self.averaging is not None:
            self.averaging.remove()
        if status == "finished":
            self.group.check_identical(self._trained_parameters())
        if self.writer is not None:
            self.writer.finish(status)

    # -- checkpoints -------------------------------------------------------------------------------

    def optimizer_layout(self) -> list[list[str]]:
        """The optimizer's parameters, group by group in its order, named without the model: ``block:I:NAME`` for
        block I's parameter NAME, ``other:G:J`` for the J-th other parameter of group G."""
        owner = {id(p): f"block:{i}:{name}" for i, own in enumerate(self.ties._own) if own is not None
                 for name, p in zip(self.ties.names, own)}
        layout = []
        for g, group in enumerate(self.optimizer.param_groups):
            others = iter(range(len(group["params"])))
            layout.append([owner.get(id(p)) or f"other:{g}:{next(others)}" for p in group["params"]])
        return layout

    def state_dict(self) -> dict[str, Any]:
        """Everything a checkpoint of the caller's loop needs to continue this run exactly, besides the model's
        and the optimizer's own state dicts: the tie state, the loop's counters (a decision waiting for its
        reward included), the policy (the agent's networks, replay, exploration and random streams), the tie
        log, the order of the optimizer's parameters, and the registry run with the rows it has not written."""
        return {
            "format": STATE_FORMAT, "ties": self.ties.tie_map(), "loop": self.loop.to_dict(),
            "policy": self.policy.state_dict(), "losses": list(self._losses),
            "history": [asdict(row) for row in self.log.ties], "decisions": list(self.log.decisions),
            "optimizer_layout": self.optimizer_layout(), "world_size": self.group.world,
            "run_id": self.run_id if self.log.started else None,
            "registry_rows": self.writer.pending() if self.log.started else None,
        }

    def load_state_dict(self, saved: Mapping[str, Any]) -> None:
        """Continue the run ``saved`` (a :meth:`state_dict`) was taken from: its tie state is applied to the
        model and the optimizer (whose parameters take the saved order), so load it right after making this
        ``DynamicTying`` with the same arguments, and *before* ``model.load_state_dict`` and
        ``optimizer.load_state_dict`` (a tied block owns no parameters, so the model's keys follow the ties)."""
        if self.loop.step:
            raise DyntieError("load_state_dict continues a run from its checkpoint: call it before the first step.")
        self._restore(saved, reorder=True)

    def _restore(self, saved: Mapping[str, Any], *, reorder: bool) -> None:
        if saved.get("format") != STATE_FORMAT:
            raise DyntieError(f"This DynamicTying state has format {saved.get('format')!r}, not {STATE_FORMAT}; "
                              "continue it with the dyntie version that saved it.")
        if saved["world_size"] != self.group.world:
            raise DyntieError(f"This run was trained by {saved['world_size']} process(es); continue it with as many "
                              f"(torchrun --nproc_per_node {saved['world_size']}, or no torchrun for 1).")
        state = saved["ties"]["state"]
        if len(state) != self.ties.num_blocks or saved["ties"]["names"] != self.ties.names:
            raise DyntieError("The saved tie state is for other blocks; continue the run with the model it trained.")
        self.ties.apply(state)
        if reorder:
            self._reorder_optimizer(saved["optimizer_layout"])
        self.policy.load_state_dict(saved["policy"])
        self.loop = LoopState.from_dict(saved["loop"])
        if not self.group.is_main:
            self.loop.pending = None  # only rank 0's policy learns
        self.decisions.loop = self.loop
        self._losses = list(saved["losses"])
        self.log.ties = [TieRow(**row) for row in saved["history"]]
        self.log.decisions = list(saved["decisions"])
        if self.writer is not None and saved.get("run_id"):
            self.log.resumed()
            self.writer.resume(saved["run_id"])
            pending = self.loop.pending
            self.writer.truncate_after(self.loop.step, decisions_from=pending.decision if pending else None,
                                       carried=saved.get("registry_rows"))

    def _reorder_optimizer(self, layout: list[list[str]]) -> None:
        """Put the optimizer's parameters in the order ``layout`` names them (a saved optimizer state refers to
        parameters by position)."""
        current = self.optimizer_layout()
        if len(layout) != len(current) or any(sorted(a) != sorted(b) for a, b in zip(layout, current)):
            raise DyntieError("The saved optimizer layout does not match this optimizer's parameters; make the "
                              "model, the optimizer and the DynamicTying as the saved run did.")
        for group, names, want in zip(self.optimizer.param_groups, current, layout):
            by_name = dict(zip(names, group["params"]))
            group["params"] = [by_name[name] for name in want]

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
