"""A transformers ``TrainerCallback`` that runs dynamic layer tying (``DynamicTying``) inside a ``Trainer``.

docs/python-api.md is the user's page.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .errors import DyntieError, UsageError
from .tying import DynamicTying

#: what the callback adds to a Trainer checkpoint folder: the run's state (``DynamicTying.state_dict``), and the
#: tie map alone, readable without torch
STATE_FILE = "dyntie_state.pt"
TIES_FILE = "dyntie_ties.json"

#: where the ordered blocks of common models live (GPT-2, BERT and its kin, Llama-style decoders, timm ViT)
BLOCK_PATHS = ("transformer.h", "bert.encoder.layer", "roberta.encoder.layer", "encoder.layer", "model.layers",
               "model.decoder.layers", "layers", "blocks")


def find_blocks(model: nn.Module, path: str | None = None) -> list[nn.Module]:
    """The ordered blocks at ``path`` (a dotted attribute path such as ``transformer.h``), or at the first of
    ``BLOCK_PATHS`` that the model has."""
    return list(model.get_submodule(_blocks_path(model, path)))


def _blocks_path(model: nn.Module, path: str | None) -> str:
    for candidate in [path] if path else BLOCK_PATHS:
        try:
            found = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found):
            return candidate
    raise UsageError(f"No block list at {path!r} in {type(model).__name__}: pass blocks='dotted.path' of its "
                     "ordered transformer blocks." if path else
                     f"Cannot find the blocks of {type(model).__name__} (tried {', '.join(BLOCK_PATHS)}): pass "
                     "blocks='dotted.path'.")


class DynamicTyingCallback(TrainerCallback):
    """Dynamic tying in a transformers ``Trainer``: ``Trainer(..., callbacks=[DynamicTyingCallback()])``.

    At ``on_train_begin`` it finds the blocks (``blocks``: a dotted path, or found among ``BLOCK_PATHS``) and
    wraps the Trainer's own optimizer (accelerate's wrapper unwrapped) in a :class:`DynamicTying` with
    ``total_steps = state.max_steps`` and ``options`` (its keyword arguments). Callbacks do not see the loss,
    so a forward hook on the model collects ``outputs.loss`` of each training forward (the model must compute
    its loss: pass labels); the step's loss goes to ``step`` at ``on_step_end``, after the optimizer step, as
    in dyntie's loop. The optimizer is not rebuilt: the tie manager edits its parameter groups in place.

    Several processes (torchrun, ``accelerate launch``): the Trainer's DDP wrapper is told, before it wraps the
    model, to leave the blocks' parameters alone (it fixes its parameter set then); it averages the other
    parameters' gradients and dyntie the blocks' that train now, at the end of the same backward pass. FSDP and
    DeepSpeed are refused at construction of the Trainer.

    Checkpoints: ``on_save`` writes the run's state into the checkpoint folder (``dyntie_state.pt``, and the tie
    map as ``dyntie_ties.json``) and stores the Trainer's optimizer state in the order of a fresh optimizer (every
    block its own), so ``trainer.train(resume_from_checkpoint=...)`` continues the run with the same decisions.
    Call ``callback.tying.materialize()`` before ``save_pretrained`` for a plain model.
    """

    def __init__(self, blocks: str | None = None, **options: Any) -> None:
        self.blocks_path = blocks
        self.options = options
        self.tying: DynamicTying | None = None
        self._losses: list[float] = []
        self._items_given = False  # the Trainer passed num_items_in_batch: each micro-batch's loss is a share
        self._hook = None

    def on_init_end(self, args, state, control, model=None, **kwargs):
        _refuse_sharded(args)
        if model is not None:
            # DDP registers its gradient hooks over the parameters it finds when it wraps the model; a tie decision
            # changes the blocks' parameters, so DDP (if the Trainer wraps the model in it, even for one rank)
            # leaves them to dyntie's own averaging
            from torch.nn.parallel import DistributedDataParallel

            path = _blocks_path(model, self.blocks_path)
            names = [name for name, _ in model.named_parameters() if name.startswith(f"{path}.")]
            ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored | set(names)))

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        _refuse_sharded(args)
        blocks = find_blocks(model, self.blocks_path)
        if _world_size(args) > 1 and not getattr(model, "_ddp_params_and_buffers_to_ignore", None):
            raise DyntieError("DynamicTyingCallback must be in the Trainer's callbacks when the Trainer is made "
                              "(Trainer(..., callbacks=[DynamicTyingCallback()])), so DDP leaves the blocks to it.")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        resume = _saved_state(args, state)
        self.tying = DynamicTying(blocks, optimizer, total_steps=state.max_steps, **self.options, _resume=resume)
        averaging = self.tying.averaging
        if averaging is not None:  # DDP averages the other parameters' gradients; dyntie the blocks'
            averaging.params = self.tying.ties.owned_parameters
            averaging.wanted = _accelerate_syncs
        self._hook = model.register_forward_hook(self._collect, with_kwargs=True)

    def _collect(self, module, args, kwargs, output) -> None:
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if module.training and loss is not None:
            self._losses.append(float(loss.detach()))
            self._items_given = kwargs.get("num_items_in_batch") is not None

    def on_step_end(self, args, state, control, **kwargs):
        if self.tying is None:
            return
        if not self._losses:
            raise DyntieError("DynamicTyingCallback saw no training loss: the model must return outputs.loss "
                              "(give the Trainer batches with labels).")
        self.tying.step(self._step_loss(args))
        self._losses = []

    def _step_loss(self, args) -> float:
        """This rank's share of the step's mean loss, such that the ranks' mean is the step's mean loss. Given
        ``num_items_in_batch`` (the step's token count, over every rank when ``average_tokens_across_devices``),
        each micro-batch's loss is its summed loss over that count, so the shares add up; else each is a mean."""
        if not self._items_given:
            return sum(self._losses) / len(self._losses)
        world = _world_size(args)
        across = world > 1 and getattr(args, "average_tokens_across_devices", False)
        return sum(self._losses) * (world if across else 1)

    def on_save(self, args, state, control, **kwargs):
        if self.tying is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        saves = getattr(args, "should_save", state.is_world_process_zero)
        if not (folder.is_dir() and saves):
            return
        torch.save(self.tying.state_dict(), folder / STATE_FILE)
        (folder / TIES_FILE).write_text(json.dumps({**self.tying.ties.tie_map(), "step": state.global_step}))
        optimizer_file = folder / "optimizer.pt"
        if optimizer_file.is_file():
            saved = torch.load(optimizer_file, weights_only=False)
            laid_out = in_layout(saved, self.tying.optimizer_layout(), self.tying.built_layout)
            torch.save(laid_out, optimizer_file)

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.tying is not None:
            self.tying.finish()


def in_layout(saved: dict[str, Any], layout: list[list[str]], target: list[list[str]]) -> dict[str, Any]:
    """An optimizer state dict whose parameters are laid out as ``layout`` names them, laid out as ``target``
    does instead: the optimizer a resumed Trainer builds holds every block (as at the start), in that order, and
    loads its saved state by position. A parameter ``target`` has and ``layout`` lacks (a tied block's) gets no
    state, as it has none."""
    index = {name: i for i, name in enumerate(n for group in layout for n in group)}
    state, groups, number = {}, [], 0
    for group, names in zip(saved["param_groups"], target):
        ids = []
        for name in names:
            if name in index and index[name] in saved["state"]:
                state[number] = saved["state"][index[name]]
            ids.append(number)
            number += 1
        groups.append({**{k: v for k, v in group.items() if k != "param_names"}, "params": ids})
    return {"state": state, "param_groups": groups}


def _world_size(args) -> int:
    return int(getattr(args, "world_size", 1) or 1)


def _refuse_sharded(args) -> None:
    """FSDP shards each parameter over the ranks and DeepSpeed ZeRO partitions them and their optimizer state,
    both over the parameter set they find when they wrap the model, which a tie decision changes."""
    if getattr(args, "fsdp", None) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        raise UsageError("DynamicTyingCallback does not work with FSDP, which shards the parameters a tie decision "
                         "changes; train with plain data parallel (torchrun or accelerate launch without FSDP).")
    if getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        raise UsageError("DynamicTyingCallback does not work with DeepSpeed, whose ZeRO partitions the parameters "
                         "a tie decision changes; train with plain data parallel (torchrun or accelerate launch).")


def _accelerate_syncs() -> bool:
    """Whether this micro-batch's backward ends the step's accumulation (the Trainer sets it before each one)."""
    from accelerate.state import GradientState

    return bool(GradientState().sync_gradients)


def _saved_state(args, state) -> dict[str, Any] | None:
    """The run's state saved in the checkpoint the Trainer resumes from (None for a new run): the checkpoint of
    ``args.resume_from_checkpoint``, or the output folder's ``checkpoint-STEP`` of the step resumed at."""
    if not state.global_step:
        return None
    candidates = [Path(args.resume_from_checkpoint)] if getattr(args, "resume_from_checkpoint", None) else []
    candidates.append(Path(args.output_dir) / f"checkpoint-{state.global_step}")
    for folder in candidates:
        if (folder / STATE_FILE).is_file():
            return torch.load(folder / STATE_FILE, weights_only=False)
    raise DyntieError(f"The Trainer resumes at step {state.global_step} but {candidates[-1] / STATE_FILE} is "
                      "missing; resume from a checkpoint that DynamicTyingCallback saved, named in "
                      "TrainingArguments(resume_from_checkpoint=...) if it lies outside output_dir.")
