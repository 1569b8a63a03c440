"""What a backbone supplies to dyntie's shared core (DESIGN.md section 4).

A backbone builds a model from a preset, exposes its ordered block list, loads data, computes the loss,
the evaluation metrics and the reward. Everything else -- the tie manager, the Q-agent, the loop, memory
probes, the registry writer and checkpointing -- lives in ``dyntie_cli.core`` and is shared.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

Batch = dict[str, torch.Tensor]


class TaskData(Protocol):
    """Data for one run: a random training batch on demand and deterministic evaluation batches."""

    #: which of the dataset's official splits backs the "test" role (the final score): "test", or "validation"
    #: where test labels are hidden (GLUE). It labels the result in the registry; the loop always asks
    #: ``eval_batches("test")`` for the final score. A TaskData whose final score is the official validation
    #: split must serve the "validation" role from data carved out of train, so that model selection never
    #: sees the split the final score is computed on.
    test_split: str
    #: short description of where the data came from (logged in the run's config)
    source: str

    def train_batch(self, generator: torch.Generator) -> Batch:
        """A random training batch; fresh batches for the reward come from here too (never from test)."""
        ...

    def eval_batches(self, split: str, max_items: int | None = None) -> Iterator[Batch]:
        """Deterministic batches over the role ``split``: "validation" (model selection, during training) or
        "test" (the final score, once at the end), at most ``max_items`` items (tokens for language models,
        examples for classifiers)."""
        ...

    def items_per_batch(self) -> int:
        """Tokens (or examples) in one training batch, for tokens/s."""
        ...


@dataclass
class Preset:
    """A named starting point: the model shape, data settings and overrides of the shared defaults."""

    name: str
    description: str
    #: model shape (backbone-specific keys, reachable as --set model.KEY=...)
    model: dict[str, Any]
    #: data settings (backbone-specific keys: tokenizer, sequence length, batch size ...)
    data: dict[str, Any] = field(default_factory=dict)
    #: overrides of the shared sections (dyntie_cli.config: TrainSettings, TieSettings)
    train: dict[str, Any] = field(default_factory=dict)
    ties: dict[str, Any] = field(default_factory=dict)


class Backbone:
    """Base class of a backbone plugin. Subclasses set ``name`` and ``presets`` and implement the hooks."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    #: the command that trains it: "train" (``dyntie train NAME``) or "finetune" (``dyntie finetune NAME``)
    command: ClassVar[str] = "train"
    presets: ClassVar[dict[str, Preset]] = {}
    default_preset: ClassVar[str] = ""
    #: dataset names (or GLUE tasks) this backbone understands; ``kind:PATH`` forms are listed as ``kind:PATH``
    datasets: ClassVar[list[str]] = []
    default_dataset: ClassVar[str] = ""
    #: name of the headline metric ("ppl" or "accuracy"); ``higher_is_better`` for checkpoint selection
    metric: ClassVar[str] = "ppl"
    higher_is_better: ClassVar[bool] = False

    # -- hooks -------------------------------------------------------------------------------------

    def load_data(self, cfg: Any) -> TaskData:
        """``cfg`` is the run's ``dyntie_cli.config.RunConfig`` (dataset, data_dir, seed, data, model)."""
        raise NotImplementedError

    def build_model(self, cfg: Any, data: TaskData) -> nn.Module:
        raise NotImplementedError

    def load_model_code(self, cfg: Any, data: TaskData) -> None:
        """Load the libraries ``build_model`` needs without allocating a weight or drawing a random number; the
        loop measures the process's memory baseline (``base_bytes``) right after. The default builds the model
        once on the meta device."""
        with torch.device("meta"):
            self.build_model(cfg, data)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The ordered list of transformer blocks that may be tied."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean training loss of ``batch`` and the number of items (tokens or examples) it averages over."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]:
        """Item-weighted mean loss and ``ppl = exp(loss)``; classifiers add accuracy and task metrics."""
        total, count = 0.0, 0
        for batch in batches:
            loss, n = self.loss(model, batch)
            total += float(loss) * n
            count += n
        mean = total / max(count, 1)
        return {"loss": mean, "ppl": math.exp(min(mean, 50.0))}

    @torch.no_grad()
    def reward_ppl(self, model: nn.Module, batch: Batch) -> float:
        """Perplexity of the model on one fresh batch (exp of cross-entropy): the paper's reward signal.

        Classifiers use the same quantity (exp of the classification cross-entropy), never accuracy.
        """
        loss, _ = self.loss(model, batch)
        return math.exp(min(float(loss), 50.0))
