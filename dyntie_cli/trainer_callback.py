"""A transformers ``TrainerCallback`` that runs dynamic layer tying (``DynamicTying``) inside a ``Trainer``.

docs/python-api.md is the user's page.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn
from transformers import TrainerCallback

from .errors import DyntieError, UsageError
from .tying import DynamicTying

#: where the ordered blocks of common models live (GPT-2, BERT and its kin, Llama-style decoders, timm ViT)
BLOCK_PATHS = ("transformer.h", "bert.encoder.layer", "roberta.encoder.layer", "encoder.layer", "model.layers",
               "model.decoder.layers", "layers", "blocks")


def find_blocks(model: nn.Module, path: str | None = None) -> list[nn.Module]:
    """The ordered blocks at ``path`` (a dotted attribute path such as ``transformer.h``), or at the first of
    ``BLOCK_PATHS`` that the model has."""
    for candidate in [path] if path else BLOCK_PATHS:
        try:
            found = model.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(found, (nn.ModuleList, nn.Sequential)) and len(found):
            return list(found)
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
    its loss: pass labels); the mean over the step's micro-batches goes to ``step`` at ``on_step_end``, after the
    optimizer step, as in dyntie's loop. The optimizer is not rebuilt: the tie manager edits its parameter
    groups in place. Checkpoints the Trainer saves hold the independent blocks only; the callback writes the
    tie state beside them (``dyntie_ties.json``). Call ``callback.tying.materialize()`` before
    ``save_pretrained`` for a plain model. One process only (no DDP, FSDP or DeepSpeed).
    """

    def __init__(self, blocks: str | None = None, **options: Any) -> None:
        self.blocks_path = blocks
        self.options = options
        self.tying: DynamicTying | None = None
        self._losses: list[float] = []
        self._hook = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if state.is_world_process_zero is False or getattr(args, "world_size", 1) > 1:
            raise DyntieError("DynamicTyingCallback runs in one process; launch the Trainer without torchrun.")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        self.tying = DynamicTying(find_blocks(model, self.blocks_path), optimizer, total_steps=state.max_steps,
                                  **self.options)
        self._hook = model.register_forward_hook(self._collect)

    def _collect(self, module, inputs, output) -> None:
        loss = getattr(output, "loss", None) if not isinstance(output, dict) else output.get("loss")
        if module.training and loss is not None:
            self._losses.append(float(loss.detach()))

    def on_step_end(self, args, state, control, **kwargs):
        if self.tying is None:
            return
        if not self._losses:
            raise DyntieError("DynamicTyingCallback saw no training loss: the model must return outputs.loss "
                              "(give the Trainer batches with labels).")
        loss = sum(self._losses) / len(self._losses)
        self._losses = []
        self.tying.step(loss)

    def on_save(self, args, state, control, **kwargs):
        if self.tying is None:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if folder.is_dir():
            tie_map = {**self.tying.ties.tie_map(), "step": state.global_step}
            (folder / "dyntie_ties.json").write_text(json.dumps(tie_map))

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self.tying is not None:
            self.tying.finish()
