"""Predicting a run's peak memory before it starts, and whether it fits the device.

The peak of a training step is the sum of what lives through it:

* the process **baseline**: what the process holds before the model exists (libraries, data; on CUDA the bytes
  allocated before the build, the CUDA context aside);
* **parameters**, **gradients** and **optimizer state** of the blocks that are independent (a tied block has none)
  and of the always-trained parts: exact byte counts from the model built on the meta device, the state per
  parameter as ``train.optimizer`` keeps it (core/optimizers.py: AdamW two fp32 moments, adamw8bit about two
  bytes, adafactor a row and a column per matrix, galore and apollo rank-sized moments of the blocks' matrices);
* **activations**: what autograd saves for the backward pass, measured, not modelled: a real training batch goes
  forward on the run's device and precision at the model's tie state and with one more block independent, and
  every saved tensor's storage is counted once. Saved bytes grow linearly with the number of independent blocks
  (a tied block under ``tied_grad=follow`` saves less than an independent one), so the two measurements give the
  activations at any count. ``dyntie plan`` measures on a copy built lazily for the purpose (the blocks that
  start tied cost nothing); a run near the device's limit measures on its own model after its lazy build;
  With activation checkpointing a checkpointed block keeps only its inputs, and the backward pass holds one
  block's saved tensors again while it recomputes it;
* a **transient**: the gradient of the largest saved tensor, alive at the start of the backward pass (for a
  language model, the logits), or what the optimizer step holds besides its state (bitsandbytes on CPU
  dequantises a tensor's moments, galore takes an SVD), whichever is larger: the step comes after the backward
  pass has freed the activations.

On CPU the peak is resident memory, which also holds what the allocator keeps around; on CUDA it is allocated
bytes. ``docs/memory.md`` compares predictions with measured peaks.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DyntieError
from ..settings import RunSettings, TrainSettings
from ..variants import spec
from .lazy_build import build_lazily
from .memory import current_rss_bytes, release_freed_memory
from .optimizers import import_optimizer, state_bytes, step_transient_bytes
from .recompute import Every, checkpointed_blocks
from .ties import TieManager, independent_count

#: a run measures its activations before training only when its stored state alone needs more than this share of
#: the memory available (``near_limit``)
MEASURE_ABOVE = 0.5


@dataclass
class MemoryPlan:
    variant: str
    blocks: int
    independent: int  # the most blocks independent at once the plan allows for
    device: str
    baseline_bytes: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    transient_bytes: int
    step_transient_bytes: int  # what an optimizer step holds besides the state (after the activations are freed)
    peak_bytes: int
    available_bytes: int | None  # what the device can give this run; None: unknown
    fits: bool | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelCounts:
    blocks: int
    block_bytes: int  # one block's parameters
    other_bytes: int  # embeddings, norms, head: always trained
    element_bytes: int
    block_shapes: tuple[tuple[int, ...], ...] = ()  # one block's parameters, for the optimizer's state
    other_shapes: tuple[tuple[int, ...], ...] = ()

    def optimizer_bytes(self, t: TrainSettings, independent: int) -> int:
        """The optimizer's state with ``independent`` blocks independent (core/optimizers.py ``state_bytes``)."""
        def total(shapes, projected):
            return sum(state_bytes(t, shape, self.element_bytes, projected) for shape in shapes)
        return total(self.other_shapes, False) + independent * total(self.block_shapes, True)

    def step_bytes(self, t: TrainSettings) -> int:
        """What an optimizer step holds besides the stored state, at most (``step_transient_bytes``)."""
        return step_transient_bytes(t, [*((s, False) for s in self.other_shapes),
                                        *((s, True) for s in self.block_shapes)], self.element_bytes)


def model_counts(meta_model: nn.Module, blocks: list[nn.Module]) -> ModelCounts:
    """Parameter bytes and shapes of a model built on the meta device (a shared tensor counted once)."""
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    total = sum(p.numel() * p.element_size() for p in meta_model.parameters())
    block = sum(p.numel() * p.element_size() for p in blocks[0].parameters())
    element = next(iter(meta_model.parameters())).element_size()
    return ModelCounts(len(blocks), block, total - block * len(blocks), element,
                       tuple(tuple(p.shape) for p in blocks[0].parameters()),
                       tuple(tuple(p.shape) for p in meta_model.parameters() if id(p) not in in_blocks))


def saved_bytes(forward: Callable[[], Any], params: set[int]) -> tuple[int, int]:
    """Bytes of the storages autograd saves during ``forward()`` (each once, parameters excluded), and the
    largest of them."""
    saved = saved_by_block(forward, params, [])
    return saved.total, saved.largest


@dataclass
class Saved:
    """What autograd saves in one forward pass: in all, its largest storage, and per block what the block saved
    first (``blocks``) and the bytes of its inputs (``inputs``: what a checkpointed block keeps instead)."""

    total: int
    largest: int
    blocks: list[int]
    inputs: list[int]


def saved_by_block(forward: Callable[[], Any], params: set[int], blocks: list[nn.Module]) -> Saved:
    """``forward()``'s saved storages (each once, parameters excluded), each counted for the block that saved it
    first (a block's input is usually saved by its own first layer), and each block's tensor inputs."""
    seen: dict[int, int] = {}
    owner: dict[int, int] = {}
    inputs = [0] * len(blocks)
    current: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in params and key not in seen:
            seen[key] = storage.nbytes()
            if current:
                owner[key] = current[-1]
        return t

    def enter(i):
        def hook(module, args, kwargs):
            current.append(i)
            inputs[i] = sum({a.untyped_storage().data_ptr(): a.untyped_storage().nbytes()
                             for a in (*args, *kwargs.values()) if torch.is_tensor(a)}.values())
        return hook

    def leave(module, args, kwargs, output):
        current.pop()

    hooks = [h for i, b in enumerate(blocks) for h in (b.register_forward_pre_hook(enter(i), with_kwargs=True),
                                                       b.register_forward_hook(leave, with_kwargs=True))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
    finally:
        for h in hooks:
            h.remove()
    per_block = [0] * len(blocks)
    for key, i in owner.items():
        per_block[i] += seen[key]
    return Saved(sum(seen.values()), max(seen.values(), default=0), per_block, inputs)


Activations = Callable[[int], int]


Say = Callable[[str], None]


def _silent(text: str) -> None:
    return None


def checkpointed_activations(at_state: Saved, state: list[int], per_block: int, every: Every) -> Activations:
    """Saved bytes with activation checkpointing, from a pass without it: a checkpointed block keeps only its inputs
    (the segment's boundary) instead of what it saved, and the backward pass recomputes one block at a time, which
    then holds one independent block's saved tensors again. Block 0, always independent, is always checkpointed;
    the other independent blocks are counted among the blocks that are not checkpointed first (they save more), so
    the bound holds wherever they are."""
    blocks = len(state)
    chosen = set(checkpointed_blocks(blocks, every))
    tied = [at_state.blocks[i] for i, r in enumerate(state) if r != i]
    independent = [at_state.blocks[i] for i, r in enumerate(state) if r == i]
    s_tied = sum(tied) / len(tied) if tied else sum(independent) / len(independent) - per_block
    s_indep = s_tied + per_block
    outside = at_state.total - sum(at_state.blocks)
    boundaries = sum(at_state.inputs[i] for i in chosen)
    plain = blocks - len(chosen)

    def activations(n: int) -> int:
        return int(outside + boundaries + plain * s_tied + min(max(n - 1, 0), plain) * per_block + s_indep)

    return activations


def measure_on(backbone, cfg: RunSettings, data, device: torch.device, model: nn.Module, ties: TieManager,
               say: Say = _silent) -> tuple[Activations, int]:
    """Saved activation bytes as a function of the number of independent blocks, and the transient, measured
    with ``model`` on one training batch: at its tie state, and with one more block independent (then the state
    is restored exactly), without activation checkpointing; with ``train.checkpointing`` the checkpointed blocks'
    share is then replaced by their inputs (``checkpointed_activations``). Draws no number from the run's
    generators, changes no weight. ``say`` hears what it is doing (each forward pass of a large model takes a
    while)."""
    state = list(ties.state)
    blocks = len(state)
    have = independent_count(state)
    every = cfg.train.checkpointing
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.precision)
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    was_training = model.training
    ties.checkpoint("off")  # what each block saves; its recomputation is modelled from that
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model.train()
        batch = {k: v.to(device) for k, v in data.train_batch(torch.Generator().manual_seed(cfg.seed)).items()}

        def measure() -> Saved:
            params = {p.untyped_storage().data_ptr() for p in model.parameters()}
            with autocast:
                return saved_by_block(lambda: backbone.loss(model, batch), params, ties.blocks)

        forward = f"a forward pass of one training batch through all {blocks} blocks"
        say(f"measuring activations at {have} independent block{'s' if have > 1 else ''} ({forward})")
        at_state = measure()
        largest = at_state.largest
        per_block = 0
        if have < blocks:  # untie the first tied block, measure, tie it back
            first = next(i for i, r in enumerate(state) if r != i)
            more = [i if i == first else r for i, r in enumerate(state)]
            ties.apply(more)
            say(f"measuring activations at {have + 1} independent blocks (another forward pass)")
            with_one_more = measure()
            ties.apply(state)
            per_block, largest = with_one_more.total - at_state.total, max(largest, with_one_more.largest)
    ties.checkpoint(every)
    model.train(was_training)
    if every != "off":
        return checkpointed_activations(at_state, state, per_block, every), largest
    return (lambda n: at_state.total + (n - have) * per_block), largest


def measure_activations(backbone, cfg: RunSettings, data, device: torch.device, probe: list[nn.Module],
                        say: Say = _silent) -> tuple[Activations, int]:
    """``measure_on`` a model built lazily for the purpose, all blocks tied (nothing of the run's size is built,
    and the tied blocks' weights are never initialised: only the sizes of what a forward pass saves count)."""
    blocks = len(probe)
    say(f"building a copy with one block of {blocks} materialised, to measure activations on")
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        model, _ = build_lazily(lambda: backbone.build_model(cfg, data), backbone.blocks, [0] * blocks, probe,
                                same_draws=False)
        ties = TieManager(backbone.blocks(model), [0] * blocks, tied_grad=cfg.ties.tied_grad)
        model.to(device)
        ties.reinject()
        measured = measure_on(backbone, cfg, data, device, model, ties, say)
        ties.remove_hooks()
        del model, ties
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    else:
        release_freed_memory()
    return measured


def available_bytes(device: torch.device) -> int | None:
    """What the device can give a run of this process: on CUDA its free memory plus what this process already
    holds; on CPU the kernel's available memory (within a cgroup limit, if any) plus this process's RSS."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_allocated(device))
    rss = current_rss_bytes()
    candidates = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                candidates.append(int(line.split()[1]) * 1024 + rss)
    except OSError:
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
        if limit != "max":
            candidates.append(int(limit) - used + rss)
    except (OSError, ValueError):
        pass
    return min(candidates) if candidates else None


def planned_independent(cfg: RunSettings, blocks: int, variant: str) -> tuple[int, str]:
    """The most blocks ``variant`` can have independent at once, and how that was decided."""
    return spec(variant).most_independent(cfg, blocks)


def plan_memory(backbone, cfg: RunSettings, data, device: torch.device, variants: list[str], *,
                baseline: int | None = None, probe: list[nn.Module] | None = None,
                counts: ModelCounts | None = None, measured: tuple[Activations, int] | None = None,
                say: Say = _silent) -> list[MemoryPlan]:
    """The predicted peak of ``cfg`` trained as each of ``variants`` on ``device``. ``baseline``: the process's
    memory before the model exists (default: what this process holds now); ``measured``: activations already
    measured (``measure_on``; default: measured on a lazily built copy); ``(lambda n: 0, 0)`` plans the stored
    state alone. ``say`` hears what it is doing."""
    if probe is None:
        say("counting parameters on a copy built on the meta device (no memory, no initialisation)")
        meta = backbone.load_model_code(cfg, data)
        probe = backbone.blocks(meta)
        counts = model_counts(meta, probe)
    assert counts is not None
    if baseline is None:
        import_optimizer(cfg)  # its library is part of the run's baseline, as the run loads it before the model
        release_freed_memory()
        baseline = int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else current_rss_bytes()
    activations, largest = measured or measure_activations(backbone, cfg, data, device, probe, say)
    available = available_bytes(device)
    plans = []
    for variant in variants:
        n, why = planned_independent(cfg, counts.blocks, variant)
        params = counts.other_bytes + n * counts.block_bytes
        grads = params
        optimizer = counts.optimizer_bytes(cfg.train, n)
        acts = activations(n)
        step = counts.step_bytes(cfg.train)
        # the backward pass's start (activations and the largest one's gradient) or the optimizer step, after it
        peak = baseline + params + grads + optimizer + max(acts + largest, step)
        plans.append(MemoryPlan(
            variant=variant, blocks=counts.blocks, independent=n, device=str(device), baseline_bytes=baseline,
            parameter_bytes=params, gradient_bytes=grads, optimizer_bytes=optimizer, activation_bytes=acts,
            transient_bytes=largest, step_transient_bytes=step, peak_bytes=peak, available_bytes=available,
            fits=None if available is None else peak <= available, note=why,
        ))
    return plans


def near_limit(state_plan: MemoryPlan) -> bool:
    """Whether a run whose stored state is planned as ``state_plan`` should measure its activations on its own
    model before training: only near the device's limit, where a refusal matters. The measurement's forward pass
    leaves freed memory behind that the CPU allocator does not reuse (about 0.3 GiB on gpt2-wide-cpu), which
    would raise the very peak it predicts; ``dyntie plan`` measures in its own process instead."""
    available = state_plan.available_bytes
    return available is not None and state_plan.peak_bytes > MEASURE_ABOVE * available


class DoesNotFit(DyntieError):
    """A run the memory plan predicts will not fit its device (``--force`` trains it anyway)."""

    def __init__(self, plan: MemoryPlan, cfg: RunSettings) -> None:
        super().__init__(refusal(plan, cfg))
        self.plan = plan


def gib(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def refusal(plan: MemoryPlan, cfg: RunSettings) -> str:
    """One sentence for a run predicted not to fit, naming the fixes."""
    fixes = []
    ties = spec(plan.variant).ties
    if ties and plan.independent > 1:
        fixes.append(f"a smaller budget (--max-independent {max(1, plan.independent // 2)})")
    elif not ties:
        fixes.append("dynamic tying with a budget (--variant dynamic --max-independent 8)")
    batch = cfg.data.get("batch_size")
    if batch and batch > 1:
        fixes.append(f"a smaller batch (--set data.batch_size={max(1, batch // 2)})")
    fixes.append("--force to try anyway")
    return (f"This run is predicted to need {gib(plan.peak_bytes)} but {plan.device} has {gib(plan.available_bytes)} "
            f"available (parameters, gradients and optimizer state {gib(plan.parameter_bytes + plan.gradient_bytes + plan.optimizer_bytes)}, "
            f"activations {gib(plan.activation_bytes)}, baseline {gib(plan.baseline_bytes)}; `dyntie plan` shows the "
            f"parts): try {', or '.join(fixes)}.")

