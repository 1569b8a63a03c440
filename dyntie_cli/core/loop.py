"""Algorithm 1 over any backbone: train, decide every k steps, reward on fresh batches, learn, log.

The loop knows a backbone only through the contract (``dyntie_cli.backbone.Backbone``); it owns the tie
manager, the policy, the optimizer, memory probes, checkpoints and the results writer. A ``Trainer`` trains one
``Job``; runner/jobs.py builds it and listens to its events (for the progress bar), and holds no training logic.
"""

from __future__ import annotations

import math
import random
import signal
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbone import perplexity
from ..errors import DyntieError
from ..kill_points import kill_point
from ..results.db import RegistryLockedError
from ..results.writer import MAYBE_FLUSH_TIMEOUT_S
from ..settings import RunSettings, revised
from . import checkpoint as ckpt
from .checkpoint import LoopState
from .decisions import TieDecisions
from .distributed import Group
from .lazy_build import BuildReport, build_lazily
from .memory import MemoryProbe, base_bytes, gradient_bytes, release_memory_at_once, trainable_parameters
from .optimizers import build_optimizer, check_optimizer, import_optimizer
from .plan import DoesNotFit, MemoryPlan, measure_on, model_counts, near_limit, plan_memory
from .policies import SOURCE_KEYS, DynamicPolicy, Policy, make_policy
from .ties import TieManager
from .turns import Turns


@dataclass(frozen=True)
class Job:
    """A run to train: its settings and what the registry records beside them."""

    settings: RunSettings
    command: str = "train"  # how the registry records it: train, finetune, ablate, bench, study
    parent_run_id: str | None = None
    source: dict[str, Any] | None = None  # what a run-dependent variant takes from its source run
    labels: dict[str, Any] = field(default_factory=dict)  # kept in runs.config: a bench round, a study
    record: dict[str, Any] | None = None  # a resume that changes the run (a longer --max-steps): its runs.config

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: how a job is handed to another process."""
        return {"settings": self.settings.to_dict(), "command": self.command, "parent_run_id": self.parent_run_id,
                "source": self.source, "labels": self.labels}


@dataclass
class RunResult:
    run_id: str
    status: str
    step: int
    final: dict[str, float] = field(default_factory=dict)  # the final score (split named by test_split)
    validation: dict[str, float] = field(default_factory=dict)
    test_split: str = "test"
    mean_independent: float = 0.0
    end_independent: int = 0
    mean_trainable: float = 0.0
    end_trainable: int = 0
    conventional_params: int = 0  # trainable parameters of the same model with every block independent
    checkpoint: str | None = None
    best_metric: str | None = None  # the headline metric, its best validation figure and the step of it (None:
    best_validation: float | None = None  # never validated on it)
    best_step: int | None = None
    tested_step: int = 0  # the step of the model ``final`` scored: best_step where the run selects its best
    wall_time_s: float = 0.0  # the training loop, evaluations and checkpoints (a resumed run's earlier parts too)
    baseline: dict[str, float] = field(default_factory=dict)  # a trivial predictor's score on the same items
    baseline_how: str = ""  # how that predictor answers, in words
    notes: list[str] = field(default_factory=list)  # what the backbone says of how the run started


Event = dict[str, Any]


class RunStopped(DyntieError):
    """A run stopped by a signal at a step boundary, checkpointed there, or interrupted by a second Ctrl-C (its last
    checkpoint kept); marked killed either way. ``resume_with`` names the command that continues it."""

    def __init__(self, run_id: str, step: int, command: str, *, exit_code: int, interrupted: bool = False,
                 checkpoint: int | None = None) -> None:
        self.run_id, self.step, self.command, self.interrupted = run_id, step, command, interrupted
        self.checkpoint = checkpoint
        super().__init__(self.resume_with(f"dyntie train --resume {run_id}"), exit_code=exit_code)

    def resume_with(self, resume: str) -> str:
        """The message, naming ``resume`` as the command that continues the run."""
        if self.interrupted and self.checkpoint is None:
            return (f"Run {self.run_id} was interrupted at step {self.step}; it has no checkpoint yet, so it cannot "
                    "be resumed: start it again.")
        if self.interrupted:
            return (f"Run {self.run_id} was interrupted at step {self.step}; resume it from its last checkpoint "
                    f"(step {self.checkpoint}) with `{resume}`.")
        return f"Run {self.run_id} was stopped at step {self.step}; resume it with `{resume}`."


_RANK_SEED_STRIDE = 1_000_003  # rank r of a torchrun launch draws its batches from seed + r * stride


class Diverged(DyntieError):
    """Training produced a loss (or, ``train.max_bad_steps`` steps in a row, a gradient norm) that is not a finite
    number: the run stops as ``diverged`` and its last checkpoint, taken before, is kept."""

    def __init__(self, run_id: str, step: int, what: str, fix: str, checkpoint: int | None) -> None:
        self.reason = f"diverged at step {step}: {what}"
        kept = (f"its last checkpoint (step {checkpoint}) is kept" if checkpoint is not None
                else "it had no checkpoint yet")
        super().__init__(f"Run {run_id} {self.reason}; {fix}; {kept}.")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DyntieError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu.")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise DyntieError(f"Unknown device {name!r}; use cpu, cuda or auto.")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(cfg: RunSettings) -> Callable[[int], float]:
    t = cfg.train

    def f(step: int) -> float:
        if t.warmup_steps and step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        span = max(1, t.max_steps - t.warmup_steps)
        progress = min(1.0, (step - t.warmup_steps) / span)
        return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def _finite(model: nn.Module) -> bool:
    """Whether every weight of ``model`` is a finite number (one device sync)."""
    checks = [torch.isfinite(p).all() for p in model.parameters()]
    return bool(torch.stack(checks).all()) if checks else True


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@contextmanager
def stop_signals_to(handler: Callable[[int, Any], None]):
    """``handler`` receives SIGTERM and SIGINT while the block runs; the previous handlers come back after it (not
    in the main thread, where no handler can be set, nothing changes)."""
    try:
        previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    except ValueError:  # not the main thread: no handlers
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def _stop_on_signals(trainer: Trainer):
    """SIGTERM and the first Ctrl-C ask the loop to stop at the next step boundary, where it checkpoints and
    marks the run 'killed' (so a resume continues exactly); a second Ctrl-C interrupts at once."""

    def handler(signum, frame):
        if trainer.stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        trainer.stop_signal = signum

    with stop_signals_to(handler):
        yield


class Trainer:
    """One run: ``job`` says what to train, ``writer`` records it, its checkpoints go under ``out_dir``;
    ``resume``: continue the job's run from its last checkpoint."""

    def __init__(self, backbone, job: Job, writer, *, out_dir: Path, resume: bool = False,
                 events: Callable[[Event], None] | None = None, group: Group | None = None,
                 check_memory: bool = True, turns: Turns | None = None) -> None:
        self.backbone = backbone
        self.turns = turns or Turns()  # beside other runs in turns (core/turns.py), or alone
        self.job = job
        self.group = group or Group()  # the ranks of a torchrun launch; one process by default
        self.check_memory = check_memory  # refuse a run the memory plan predicts will not fit (--force: try)
        self.plan: MemoryPlan | None = None  # the full prediction, when the run measured its activations
        self.state_plan: MemoryPlan | None = None  # the stored state's, before the build
        self.cfg = job.settings  # the job's settings with what the run resolves (_make_policy)
        self.writer = writer
        self.out_dir = Path(out_dir)
        self.source = job.source or {}  # what a variant takes from another run (final state, schedule)
        self.resume = resume
        self.events = events or (lambda e: None)
        self.stop_signal: int | None = None
        self.checkpoint_at: int | None = None  # the step of the run's checkpoint in place, if any
        self.last_validation: dict[str, float] = {}

    # -- setup -------------------------------------------------------------------------------------

    def _setup(self) -> None:
        cfg = self.cfg
        seed_everything(cfg.seed)
        self.device = self.group.device or resolve_device(cfg.device)
        check_optimizer(cfg)  # before any data loads
        with self.group.main_first():  # rank 0 fills the token cache, the other ranks read it
            self.data = self.backbone.load_data(cfg)
        if cfg.agent.scores("heldout") and not hasattr(self.data, "heldout_batches"):
            raise DyntieError(f"Backbone {cfg.backbone} has no held-out slice of train to score the heldout reward "
                              "(its data serves no heldout_batches(), as GPT-2's does); use agent.reward_batch and "
                              "agent.reward_probes interval, next or fresh.")
        self.checkpoint_dir = self.out_dir / self.writer.run_id / "checkpoint"
        self.best_dir = self.out_dir / self.writer.run_id / "best"  # the model of the best validation figure
        self._build_model()
        if self.group.active:
            self.group.broadcast_parameters(self.model)  # the same start on every rank (the seed gives it too)
            if not self.group.is_main:
                torch.manual_seed(cfg.seed + _RANK_SEED_STRIDE * self.group.rank)  # its own dropout
        self.conventional_params = self._conventional_params()
        if self.resume:
            ckpt.load_model_weights(self.checkpoint_dir, self.model)
        self.optimizer = build_optimizer(self.model, cfg, projected=self.ties.owned_parameters())
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        # each rank its own batches; rank 0 (and a single process) the run's seed
        self.train_gen = torch.Generator().manual_seed(cfg.seed + _RANK_SEED_STRIDE * self.group.rank)
        self.reward_gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.loop = LoopState()
        self.grad_bytes = 0
        if self.resume:
            self._restore()
        self.ties.attach_optimizer(self.optimizer)
        self.decisions = TieDecisions(
            self.ties, self.policy, self.writer, self.loop, decide_every=cfg.ties.decide_every,
            max_steps=cfg.train.max_steps, reward_batch=cfg.agent.reward_batch, fresh_ppl=self._fresh_ppl,
            heldout_ppl=self._heldout_ppl, probes=cfg.agent.reward_probes, group=self.group, release_memory=self.device.type == "cpu")
        self.probe = MemoryProbe(self.device)  # training peaks from here on; the setup peak is kept apart
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
        use_scaler = cfg.train.precision == "fp16" and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None

    def _build_model(self) -> None:
        """The policy first (it says which blocks start tied), then the model with those blocks never
        materialised, then the tie manager, then the move to the device (after the tied blocks are released, so
        the device never holds them either)."""
        cfg = self.cfg
        # what the process holds before any model exists (libraries, data): no tie state can save it. The
        # backbone first loads the code its model needs (transformers' modelling code alone is ~0.2 GiB). Only a
        # measurement: a model whose code cannot load that way is measured without it, and any real fault
        # surfaces in the build just below
        probe, meta = None, None
        with suppress(Exception):
            meta = self.backbone.load_model_code(cfg, self.data)
            probe = self.backbone.blocks(meta)
        import_optimizer(cfg)  # a library, like transformers: part of the baseline
        self.base_bytes = base_bytes(self.device)

        def build() -> nn.Module:
            return self.backbone.build_model(cfg, self.data)

        if probe:
            self.num_blocks = len(probe)
            self._make_policy()
            initial = self._initial_state()
            self._check_memory(meta, probe)
            if cfg.init:  # pretrained weights: loaded in full
                model, self.build_report = build(), BuildReport(False, 0, "weights loaded from --init")
            else:
                model, self.build_report = build_lazily(build, self.backbone.blocks, initial, probe)
        else:
            model = build()
            self.build_report = BuildReport(False, 0, "the backbone's model does not build on the meta device")
            self.num_blocks = len(self.backbone.blocks(model))
            self._make_policy()
            initial = self._initial_state()
        self.model = model
        self.ties = TieManager(self.backbone.blocks(model), initial, tied_grad=cfg.ties.tied_grad,
                               untie_optim=cfg.ties.untie_optim)
        self.ties.checkpoint(cfg.train.checkpointing)
        self.model.to(self.device)
        self.ties.reinject()  # .to() moved the roots' storage; the tied blocks' views must follow
        self._check_activations()

    def _check_memory(self, meta: nn.Module, probe: list[nn.Module]) -> None:
        """Before the model is built: refuse a run whose stored state alone (parameters, gradients, optimizer
        state at the most independent blocks it may have) cannot fit, unless told to try anyway (docs/memory.md).
        Only rank 0 of a torchrun launch plans (the ranks are alike)."""
        self.counts = model_counts(meta, probe)
        if self.group.is_main:
            self.state_plan = plan_memory(self.backbone, self.cfg, self.data, self.device, [self.cfg.variant],
                                          baseline=self.base_bytes, probe=probe, counts=self.counts,
                                          measured=(lambda n: 0, 0))[0]
            if self.check_memory and self.state_plan.fits is False:
                raise DoesNotFit(self.state_plan, self.cfg)
        release = self.cfg.train.release_memory
        near = self.state_plan is not None and near_limit(self.state_plan)  # only rank 0 has a plan
        if self.device.type == "cpu" and (release == "on" or (release == "auto" and near)):
            release_memory_at_once()  # freed tensors leave the process: its peak is the live peak

    def _check_activations(self) -> None:
        """After the (lazy) build, for a run near the device's limit (``plan.near_limit``): the full prediction,
        activations measured on the run's own model; refuse a run that will not fit unless told to try anyway."""
        if not self.group.is_main or self.state_plan is None or not near_limit(self.state_plan):
            return
        measured = measure_on(self.backbone, self.cfg, self.data, self.device, self.model, self.ties)
        self.plan = plan_memory(self.backbone, self.cfg, self.data, self.device, [self.cfg.variant],
                                baseline=self.base_bytes, probe=[], counts=self.counts, measured=measured)[0]
        if self.check_memory and self.plan.fits is False:
            raise DoesNotFit(self.plan, self.cfg)

    def _initial_state(self) -> list[int]:
        return ckpt.load_tie_map(self.checkpoint_dir)["state"] if self.resume else self.policy.initial_state()

    def _make_policy(self) -> None:
        cfg = self.cfg
        self.total_decisions = max(0, (cfg.train.max_steps - 1) // cfg.ties.decide_every)
        self.policy: Policy = make_policy(
            cfg.variant, self.num_blocks, agent=cfg.agent, total_decisions=self.total_decisions, seed=cfg.seed,
            independent=cfg.ties.independent, source=self.source, perm_seed=cfg.ties.perm_seed,
            initial_state=cfg.ties.initial_state, pretrained=bool(cfg.init), grow_until=cfg.ties.grow_until,
        )
        knowledge = self.source.get("agent")
        if knowledge and not self.resume and isinstance(self.policy, DynamicPolicy):
            # what the agent starts from (a resume restores the agent it had instead)
            weights = None
            if knowledge.get("weights_dir"):
                weights = ckpt.load_trainer_state(Path(knowledge["weights_dir"]))["policy"].get("agent")
                if weights is None:
                    raise DyntieError(f"Run {knowledge['weights_run']} has no agent in its checkpoint to start from.")
            self.policy.agent.warm_start(knowledge.get("transitions", []), weights)
        if self.policy.resolved:  # what the policy settled (a static scheme's count) is the run's setting from here on
            self.cfg = revised(cfg, self.policy.resolved)

    def _resumables(self) -> dict[str, tuple[Callable[[], Any], Callable[[Any], Any]]]:
        """Every part of the run a checkpoint saves and a resume restores by name (besides the loop state,
        the model, the optimizer and the RNGs): one list for both directions."""
        return {
            "scheduler": (self.scheduler.state_dict, self.scheduler.load_state_dict),
            "policy": (self.policy.state_dict, self.policy.load_state_dict),
            "train_gen": (self.train_gen.get_state, self.train_gen.set_state),
            "reward_gen": (self.reward_gen.get_state, self.reward_gen.set_state),
        }

    def _restore(self) -> None:
        saved = ckpt.load_trainer_state(self.checkpoint_dir)
        saved_world = saved.get("world_size", 1)
        if saved_world != self.group.world:
            raise DyntieError(f"Run {self.writer.run_id} was trained by {saved_world} process(es); resume it with "
                              f"as many (torchrun --nproc_per_node {saved_world}, or no torchrun for 1).")
        if self.group.active:
            saved.update(saved["ranks"][self.group.rank])  # this rank's batches and RNG
        ckpt.restore_optimizer(self.model, self.optimizer, saved)
        for name, (_, load) in self._resumables().items():
            load(saved[name])
        self.loop = LoopState.from_dict(saved)
        self.checkpoint_at = self.loop.step
        if self.loop.step > self.cfg.train.max_steps:
            raise DyntieError(f"Run {self.writer.run_id}'s checkpoint is at step {self.loop.step}, past --max-steps "
                              f"{self.cfg.train.max_steps}; give at least {self.loop.step}.")
        if not self.group.is_main:
            self.loop.pending = None  # only rank 0's policy learns
        ckpt.restore_rng(saved)

    def _conventional_params(self) -> int:
        """Trainable parameters of the same model with every block independent (the paper's baseline)."""
        always = trainable_parameters(self.model) - self.ties.block_numel() * self.ties.independent_layers
        return always + self.ties.block_numel() * self.num_blocks

    def _mean_trainable(self, steps: int) -> float:
        """Trainable parameters averaged over steps: the always-trained ones plus one block per independent
        block (a tie manager invariant), so the mean follows from the mean number of independent blocks."""
        always = self.conventional_params - self.ties.block_numel() * self.num_blocks
        return always + self.ties.block_numel() * self.loop.indep_steps / steps

    def _autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # -- the loop ----------------------------------------------------------------------------------

    def run(self) -> RunResult:
        self._setup()
        cfg = self.cfg
        w = self.writer
        if self.resume:
            w.resume(w.run_id, headline=self.backbone.headline(cfg), config=self.job.record)
            # a decision still waiting for its reward at the checkpoint is logged again once it is scored; the
            # rows the checkpoint carries (not yet written when it was taken) are written where they are missing
            pending = self.loop.pending
            w.truncate_after(self.loop.step, decisions_from=pending.decision if pending and not pending.rewarded
                             else None, carried=ckpt.load_registry_rows(self.checkpoint_dir))
        else:
            config = cfg.to_dict() | self.job.labels | {"setup": self.build_report.label()}
            if self.group.active:
                config["world_size"] = self.group.world
            w.start(self.job.command, cfg.backbone, cfg.dataset, cfg.variant, config,
                    parent_run_id=self.job.parent_run_id, preset=cfg.preset, seed=cfg.seed,
                    out_dir=str(self.out_dir / w.run_id), test_split=self.data.test_split,
                    headline=self.backbone.headline(cfg))
            self.decisions.log_state(action=self.ties.state, changed=0)  # decision 0: the initial state
            w.metric(0, "train", "setup_peak_bytes", self.probe.setup_peak)
            w.metric(0, "train", "base_bytes", self.base_bytes)
            if self.plan is not None:  # the prediction, beside what the run then measures
                w.metric(0, "train", "planned_peak_bytes", self.plan.peak_bytes)
            w.flush()
        self.events({"type": "start", "run_id": w.run_id, "total": cfg.train.max_steps, "step": self.loop.step,
                     "blocks": self.num_blocks, "source": getattr(self.data, "source", ""),
                     "command": self.job.command, "variant": cfg.variant, "parent_run_id": self.job.parent_run_id,
                     "notes": self.backbone.start_notes(cfg)})
        try:
            with _stop_on_signals(self):
                result = self._loop()
        except KeyboardInterrupt:
            self._finish("killed")
            raise RunStopped(w.run_id, self.loop.step, self.job.command, interrupted=True, exit_code=130,
                             checkpoint=self.checkpoint_at) from None
        except Diverged as e:
            self._finish("diverged", error=e.reason)
            raise
        except BaseException as e:
            self._finish("failed", error=f"{type(e).__name__}: {e}")
            raise
        finally:
            self.probe.close()
            self.turns.close()  # the other runs in turns go on without this one
        if result is None:  # stopped by a signal at a step boundary, checkpointed
            self._finish("killed")
            self.group.wait_for_all()  # no rank exits (torchrun would then end the rest) before rank 0 has recorded it
            raise RunStopped(w.run_id, self.loop.step, self.job.command,
                             exit_code=128 + int(self.stop_signal or signal.SIGTERM))
        self._finish("finished")
        self.group.wait_for_all()
        return result

    def _finish(self, status: str, error: str | None = None) -> None:
        """Record how the run ended. A registry that another process held past ``train.registry_wait_s`` fails
        this with every row kept: they go into the checkpoint folder, where a resume writes them."""
        try:
            self.writer.finish(status, error=error)
        except RegistryLockedError:
            if self.checkpoint_at is not None:
                ckpt.save_registry_rows(self.checkpoint_dir, self.writer.pending())
            raise

    def _loop(self) -> RunResult | None:
        t, w = self.cfg.train, self.writer
        items = self.data.items_per_batch() * self.group.world  # tokens (examples) per step over all ranks
        self.loop_start = time.perf_counter()
        if t.eval_at_start and self.loop.step == 0:
            with self.turns.turn():
                self._validate()  # the starting model's score, at step 0
        self.model.train()
        if self.resume and (self.loop.step >= t.max_steps or self.loop.stopped_early):
            # resumed from a checkpoint at the end of training: the killed process may have logged (and written)
            # some of the end's rows at this step already, and the end now logs them again
            w.write_missing_only()
        while self.loop.step < t.max_steps and not self.loop.stopped_early:
            with self.turns.turn():  # beside other runs in turns (a bench), one iteration at a time
                if not self._iteration(items):
                    return None
        with self.turns.turn():
            return self._end()

    def _iteration(self, items: int) -> bool:
        """One step and what follows it (a decision, a validation, a checkpoint); False: stopped by a signal here,
        checkpointed."""
        t, w = self.cfg.train, self.writer
        loss, dt = self._train_step()
        loss = self.group.mean(loss)  # the ranks' mean loss, for the logs and the rewards
        self.loop.step += 1
        kill_point("step")
        self.loop.losses.append(loss)
        self.loop.step_times.append(dt)
        self.loop.indep_steps += self.ties.independent_layers
        self.decisions.collect_reward(loss)
        self.events({"type": "step", "step": self.loop.step, "loss": loss})
        if self.loop.step % t.log_every == 0 or self.loop.step == t.max_steps:
            self._log_train(self.loop.losses, self.loop.step_times, items)
            self.loop.losses, self.loop.step_times = [], []
        if self.loop.step % self.cfg.ties.decide_every == 0 and self.loop.step < t.max_steps:
            self.decisions.decide()
        eval_now = t.eval_every and self.loop.step % t.eval_every == 0 and self.loop.step < t.max_steps
        if eval_now:
            self._validate()
            # only rank 0 validates: it says whether patience ran out, before the checkpoint that records it
            self.loop.stopped_early = self.group.any(bool(t.patience) and self.loop.since_best >= t.patience)
            if not t.checkpoint_every:
                self._phase("checkpoint")
                self._save_checkpoint()
        if t.checkpoint_every and self.loop.step % t.checkpoint_every == 0:
            self._phase("checkpoint")
            self._save_checkpoint()
        w.maybe_flush()
        # a stop asked of any rank stops every rank at this step (a signal landing after this point is
        # seen at the next step: the ranks must agree on where they stop)
        if self.group.any(self.stop_signal is not None):
            self._save_checkpoint()
            return False
        return True

    def _end(self) -> RunResult:
        """The end of training: the last validation, checkpoint, best model and test score, the run's totals."""
        cfg, t, w = self.cfg, self.cfg.train, self.writer
        self.decisions.score_pending()  # a last interval cut short by the end of the run
        self.group.check_identical(self.model)
        # the end of a run can take minutes (a whole test split, a checkpoint): each part is announced. A run
        # that stopped early (or resumes here) validated at this step already
        validation = self._validate(final=True) if self.loop.validated_step != self.loop.step \
            else self.last_validation
        # the last model's checkpoint (what a resume, an export and --agent-weights read), before the test
        # split may score another model
        self._phase("checkpoint", final=True)
        path = self._save_checkpoint()
        self._record_best()
        end_independent, end_trainable = self.ties.independent_layers, trainable_parameters(self.model)
        tested_step = self._model_for_test()
        self._phase("test", final=True)
        final = self._evaluate("test", t.test_items)
        for name, value in final.items():
            w.metric(self.loop.step, "test", name, value)
        baseline = self.backbone.baseline(cfg, self.data, t.test_items or None) if self.group.is_main else None
        n = max(self.loop.step, 1)
        w.metric(self.loop.step, "train", "independent_layers_mean", self.loop.indep_steps / n)
        w.metric(self.loop.step, "train", "trainable_params_mean", self._mean_trainable(n))
        w.metric(self.loop.step, "train", "conventional_params", self.conventional_params)
        # the whole process's peak, the test scoring and the checkpoint included (the memory rows end earlier)
        w.metric(self.loop.step, "train", "process_peak_bytes", self.probe.process_peak_now())
        self.events({"type": "end", "final": final, "split": self.data.test_split})
        return RunResult(
            run_id=w.run_id, status="finished", step=self.loop.step, final=final, validation=validation,
            test_split=self.data.test_split, mean_independent=self.loop.indep_steps / n,
            end_independent=end_independent, mean_trainable=self._mean_trainable(n),
            end_trainable=end_trainable, conventional_params=self.conventional_params,
            checkpoint=str(path), best_metric=self.backbone.headline(cfg).metric,
            best_validation=self.loop.best_value, best_step=self.loop.best_step,
            tested_step=tested_step, wall_time_s=self._wall_time(),
            baseline=dict(baseline.metrics) if baseline else {}, baseline_how=baseline.how if baseline else "",
            notes=self.backbone.start_notes(cfg),
        )

    def _phase(self, name: str, *, final: bool = False) -> None:
        """Tell the listener what the run does between steps: validation, test (the final score), checkpoint."""
        self.events({"type": "phase", "phase": name, "final": final, "step": self.loop.step,
                     "split": self.data.test_split})

    def _train_step(self) -> tuple[float, float]:
        t0 = time.perf_counter()
        batch = _to(self.data.train_batch(self.train_gen), self.device)
        with self._autocast():
            loss, _ = self.backbone.loss(self.model, batch)
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        # before unscaling, as DDP does: an overflow on one rank reaches every rank's scaler, which all skip the step
        self.group.average_gradients(self.model)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if self.cfg.train.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, self.cfg.train.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        # the step's one device sync, before the optimizer: a non-finite loss or gradient never reaches the weights
        value, norm_value = torch.stack([loss.detach().float(), norm.detach().float()]).tolist()
        if self._step_is_bad(value, norm_value):
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            return value, time.perf_counter() - t0
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if (self.loop.step + 1) % self.cfg.train.log_every == 0 or self.loop.step + 1 == self.cfg.train.max_steps:
            self.grad_bytes = gradient_bytes(self.model)  # gradients exist only until zero_grad, just below
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return value, time.perf_counter() - t0

    def _step_is_bad(self, loss: float, grad_norm: float) -> bool:
        """Whether this step must leave the weights as they are: its gradient norm is not finite (counted;
        ``train.max_bad_steps`` in a row stop the run). A loss that is not finite stops the run at once: the
        model or the data already holds NaN. Every rank decides alike. With an fp16 gradient scaler, an
        overflowing gradient is the scaler's to skip (it lowers its scale)."""
        step = self.loop.step + 1
        if self.group.any(not math.isfinite(loss)):
            raise self._diverged(step, f"the training loss is {loss}",
                                 f"lower train.lr (now {self.cfg.train.lr:g}) or check the data for NaN")
        if self.scaler is not None or not self.group.any(not math.isfinite(grad_norm)):
            self.loop.bad_grad_steps = 0
            return False
        self.loop.bad_grad_steps += 1
        if self.loop.bad_grad_steps >= self.cfg.train.max_bad_steps:
            clip = " or set train.grad_clip" if not self.cfg.train.grad_clip else ""
            raise self._diverged(step, f"the gradient norm was not finite for {self.loop.bad_grad_steps} steps in a row",
                                 f"lower train.lr (now {self.cfg.train.lr:g}){clip}")
        return True

    def _diverged(self, step: int, what: str, fix: str) -> Diverged:
        return Diverged(self.writer.run_id, step, what, fix, self.checkpoint_at)

    def _fresh_ppl(self) -> float:
        """The paper's reward: perplexity on one extra fresh training batch, after the change (never test)."""
        batch = _to(self.data.train_batch(self.reward_gen), self.device)
        self.model.eval()
        with self._autocast():
            ppl = self.backbone.reward_ppl(self.model, batch)
        self.model.train()
        return ppl

    def _heldout_ppl(self) -> float:
        """The held-out reward: perplexity of the fixed slice carved from the end of train (never trained on,
        never validation or test), the same tokens at every decision."""
        self.model.eval()
        with self._autocast():
            out = self.backbone.evaluate(self.model, (_to(b, self.device) for b in self.data.heldout_batches()))
        self.model.train()
        return out["ppl"]

    def _log_train(self, losses: list[float], step_times: list[float], items: int) -> None:
        w = self.writer
        loss = sum(losses) / len(losses)
        step_time = statistics.median(step_times)
        w.metric(self.loop.step, "train", "loss", loss)
        w.metric(self.loop.step, "train", "ppl", perplexity(loss))
        w.metric(self.loop.step, "train", "step_time_s", step_time)
        w.metric(self.loop.step, "train", "tokens_per_s", items / step_time if step_time > 0 else 0.0)
        w.metric(self.loop.step, "train", "lr", self.scheduler.get_last_lr()[0])
        w.metric(self.loop.step, "train", "agent_time_s", self.loop.agent_time)
        w.metric(self.loop.step, "train", "wall_time_s", self._wall_time())
        m = self.probe.read(self.model, self.optimizer, grad_bytes=self.grad_bytes)
        w.memory(step=self.loop.step, device=m.device, peak_bytes=m.peak_bytes, current_bytes=m.current_bytes,
                 param_bytes=m.param_bytes, grad_bytes=m.grad_bytes, optimizer_bytes=m.optimizer_bytes,
                 trainable_params=m.trainable_params, process_peak_bytes=m.process_peak_bytes)
        self.events({"type": "log", "step": self.loop.step, "loss": loss, "ppl": perplexity(loss),
                     "independent": self.ties.independent_layers, "blocks": self.num_blocks,
                     "peak_bytes": m.peak_bytes, "trainable": m.trainable_params})

    def _evaluate(self, split: str, budget: int) -> dict[str, float]:
        # the data decides what backs "test" (GLUE: the dev split); data.test_split only labels it
        if not self.group.is_main:
            return {}  # rank 0 evaluates; the others wait for it at the next step's all-reduce
        self.model.eval()
        with self._autocast():
            out = self.backbone.evaluate(self.model, (_to(b, self.device) for b in
                                                      self.data.eval_batches(split, budget or None)))
        self.model.train()
        return out

    def _validate(self, *, final: bool = False) -> dict[str, float]:
        self._phase("validation", final=final)
        out = self._evaluate("validation", self.cfg.train.eval_items)
        for name, value in out.items():
            self.writer.metric(self.loop.step, "validation", name, value)
        self.loop.validated_step = self.loop.step
        self.last_validation = out
        self._keep_if_best(out)
        self.events({"type": "eval", "step": self.loop.step, "metrics": out})
        return out

    # -- model selection (transformers' load_best_model_at_end) ----------------------------------------------

    def _keep_if_best(self, out: dict[str, float]) -> None:
        """A validation figure of the run's headline metric better than every one before: its step and value go
        into the loop state and, where the run selects its best model, the model into ``best/``. Only rank 0
        validates (the others see an empty ``out``); the test split never reaches this."""
        metric, higher = self.backbone.headline(self.cfg)
        if metric not in out:
            return
        value, loop = out[metric], self.loop
        better = not math.isnan(value) and (
            loop.best_value is None or (value > loop.best_value if higher else value < loop.best_value))
        if not better:
            loop.since_best += 1
            return
        loop.best_value, loop.best_step, loop.since_best = value, loop.step, 0
        if self.cfg.train.select_best:
            ckpt.save_model(self.best_dir, model=self.model, ties_map=self.ties.tie_map(),
                            info={"step": loop.step, "metric": metric, "value": value})

    def _record_best(self) -> None:
        """The best validation figure and its step, as metrics rows at the last step (named best_*, so they are
        never read as end-of-run figures)."""
        loop = self.loop
        if loop.best_step is None or not self.group.is_main:
            return
        metric, _ = self.backbone.headline(self.cfg)
        self.writer.metric(loop.step, "validation", f"best_{metric}", loop.best_value)
        self.writer.metric(loop.step, "validation", "best_step", loop.best_step)

    def _model_for_test(self) -> int:
        """Make the model the test split scores the best validation figure's (train.select_best: its tie state
        through the tie manager, then its weights, from ``best/``); returns the step of the model it scores."""
        loop = self.loop
        if not self.cfg.train.select_best or loop.best_step in (None, loop.step) or not self.group.is_main:
            return loop.step
        info = ckpt.load_model_info(self.best_dir)
        if info is None or info.get("step") != loop.best_step:
            raise DyntieError(f"The model of run {self.writer.run_id}'s best validation (step {loop.best_step}) is "
                              f"not in {self.best_dir}; train the run again, or with --set train.select_best=false "
                              "to score its last model.")
        self.ties.apply(ckpt.load_tie_map(self.best_dir)["state"])
        ckpt.load_model_weights(self.best_dir, self.model)
        return loop.best_step

    def _save_checkpoint(self) -> Path:
        if not _finite(self.model):  # a checkpoint of NaN weights would replace the last good one (every rank alike)
            raise self._diverged(self.loop.step, "the weights are no longer finite numbers",
                                 f"lower train.lr (now {self.cfg.train.lr:g})")
        # every rank's batch stream and RNG, gathered on all ranks (a collective: every rank calls this)
        ranks = self.group.gather({"train_gen": self.train_gen.get_state(), "rng": ckpt.rng_state()})
        if not self.group.is_main:
            return self.checkpoint_dir
        loop = replace(self.loop, wall_time=self._wall_time())
        trainer = {
            **loop.to_dict(), **{name: save() for name, (save, _) in self._resumables().items()},
            "config": self.cfg.to_dict(), "world_size": self.group.world,
            **({"ranks": ranks} if self.group.active else {}),
        }
        source = {key: self.source[key] for key in SOURCE_KEYS if key in self.source}
        # the rows not yet written travel with the checkpoint: a kill before they reach the registry loses none
        path = ckpt.save_checkpoint(self.checkpoint_dir, model=self.model, ties_map=self.ties.tie_map(),
                                    optimizer=self.optimizer, trainer=trainer, registry_rows=self.writer.pending(),
                                    run={"step": self.loop.step, "source": source})
        self.checkpoint_at = self.loop.step
        self.writer.flush(timeout_s=MAYBE_FLUSH_TIMEOUT_S)  # a held registry: the rows wait, training goes on
        return path

    def _wall_time(self) -> float:
        """Seconds of the loop so far, the earlier processes of a resumed run included; in turns, less the waits
        for the other runs' turns."""
        return self.loop.wall_time + time.perf_counter() - self.loop_start - self.turns.waited_s
