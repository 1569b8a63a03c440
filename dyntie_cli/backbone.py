"""The backbone contract: what a backbone (built-in or plugin) supplies to dyntie's shared core.

A backbone declares its settings (``model_settings``, ``data_settings``: ``Section`` subclasses) and presets,
builds a model, exposes its ordered block list, loads data, and computes the loss, the evaluation metrics and
the reward. Everything else -- the tie manager, the Q-agent, the loop, memory probes, the results writer and
checkpointing -- lives in ``dyntie_cli.core`` and is shared. ``docs/plugins.md`` walks through writing one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Protocol

import torch
from torch import nn

from .errors import DyntieError
from .settings import RunSettings, Section

Batch = dict[str, torch.Tensor]

#: perplexity is exp(loss) capped here: a diverged loss reports a huge number, never an overflow
_MAX_LOG_PPL = 50.0


def perplexity(loss: float) -> float:
    """``exp(loss)``, capped at ``exp(50)`` so a diverged run still records a number."""
    return math.exp(min(loss, _MAX_LOG_PPL))


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
    """A named starting point: the model shape, data settings and overrides of the shared sections (each a
    partial dict of that section's keys: ``TrainSettings``, ``TieSettings``)."""

    name: str
    description: str
    model: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    ties: dict[str, Any] = field(default_factory=dict)


class Headline(NamedTuple):
    """The metric a run is judged by and whether higher is better. It is recorded with the run
    (``runs.metric``, ``runs.higher_is_better``), so reports of a registry read it without the backbone's code."""

    metric: str
    higher_is_better: bool


class Baseline(NamedTuple):
    """What a trivial predictor scores on the final split: its metrics, and how it predicts in words ('always
    'entailment', the most frequent label of GLUE's dev split')."""

    metrics: dict[str, float]
    how: str


@dataclass
class EvalStep:
    """One evaluation batch: its mean loss, its item count, and (for classifiers) predictions and labels."""

    loss: float
    items: int
    predictions: torch.Tensor | None = None
    labels: torch.Tensor | None = None


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
    #: the headline metric (a name ``evaluate`` returns: "ppl", "accuracy", ...) and its direction, recorded with
    #: each run and read by reports, studies and plots; ``headline`` may choose per run (GLUE: per task)
    metric: ClassVar[str] = "ppl"
    higher_is_better: ClassVar[bool] = False
    #: whether ``continuations`` samples text from a trained model (``dyntie generate``)
    generates_text: ClassVar[bool] = False
    #: the typed ``model`` and ``data`` sections; None: inferred from the presets' keys and values
    model_settings: ClassVar[type[Section] | None] = None
    data_settings: ClassVar[type[Section] | None] = None

    # -- hooks -------------------------------------------------------------------------------------

    def load_data(self, cfg: RunSettings) -> TaskData:
        raise NotImplementedError

    def build_model(self, cfg: RunSettings, data: TaskData) -> nn.Module:
        raise NotImplementedError

    def load_model_code(self, cfg: RunSettings, data: TaskData) -> nn.Module | None:
        """Load the libraries ``build_model`` needs without allocating a weight or drawing a random number, and
        return the model built on the meta device (or None). The loop measures the process's memory baseline
        (``base_bytes``) right after, and reads the depth from this model's blocks, so that the real build can
        leave the blocks that start tied unmaterialised. The default builds the model on the meta device."""
        with torch.device("meta"):
            return self.build_model(cfg, data)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        """The ordered list of transformer blocks that may be tied."""
        raise NotImplementedError

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Mean training loss of ``batch`` and the number of items (tokens or examples) it averages over."""
        raise NotImplementedError

    def eval_step(self, model: nn.Module, batch: Batch) -> EvalStep:
        """One evaluation batch; classifiers return their predictions and labels for ``task_metrics``."""
        loss, n = self.loss(model, batch)
        return EvalStep(float(loss), n)

    def task_metrics(self, model: nn.Module, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """Metrics beyond loss and perplexity from all predictions and labels of a split (accuracy, ...)."""
        return {}

    def headline(self, cfg: RunSettings) -> Headline:
        """The metric run ``cfg`` is judged by; the default is the class's ``metric`` and ``higher_is_better``."""
        return Headline(self.metric, self.higher_is_better)

    def start_notes(self, cfg: RunSettings) -> list[str]:
        """What a person should know of how run ``cfg`` starts, said when it starts and in its summary (GLUE: BERT
        from random weights, and how to start from pretrained ones). None by default."""
        return []

    def baseline(self, cfg: RunSettings, data: TaskData, max_items: int | None) -> Baseline | None:
        """What always answering the same thing scores on the final split's first ``max_items`` items, the ones
        the run's final score is computed on (a classifier: its most frequent label), shown beside the run's own
        score: a floor any model that learned something clears. None (the default): no such floor."""
        return None

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterator[Batch]) -> dict[str, float]:
        """Item-weighted mean loss, ``ppl = exp(loss)``, and the task metrics of the predictions."""
        total, count = 0.0, 0
        predictions, labels = [], []
        for batch in batches:
            step = self.eval_step(model, batch)
            total += step.loss * step.items
            count += step.items
            if step.predictions is not None:
                predictions.append(step.predictions.cpu())
                labels.append(step.labels.cpu())
        mean = total / max(count, 1)
        out = {"loss": mean, "ppl": perplexity(mean)}
        if count and predictions:
            out.update(self.task_metrics(model, torch.cat(predictions), torch.cat(labels)))
        return out

    @torch.no_grad()
    def reward_ppl(self, model: nn.Module, batch: Batch) -> float:
        """Perplexity of the model on one fresh batch (exp of cross-entropy): the paper's reward signal.

        Classifiers use the same quantity (exp of the classification cross-entropy), never accuracy.
        """
        loss, _ = self.loss(model, batch)
        return perplexity(float(loss))

    # -- models in and out (docs/export.md) ---------------------------------------------------------

    def init_settings(self, init: str) -> dict[str, Any]:
        """What a start from ``init`` (``--init``) fixes, as dotted settings keys -- the model's shape, its
        tokenizer -- applied over the preset (a recipe, flags and ``--set`` still override, and ``build_model``
        then refuses a shape the weights do not have). One sentence (``DyntieError``) for weights this backbone
        cannot start from. ``build_model`` reads ``cfg.init`` and loads the weights. The default refuses."""
        raise DyntieError(f"Backbone {self.name} cannot start from --init weights; train it from scratch.")

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """The model's raw outputs (logits) on ``batch``, in fp32: what an export's round trip compares."""
        raise DyntieError(f"Backbone {self.name} cannot export: it does not implement outputs() "
                          "(docs/plugins.md).")

    def export_model(self, model: nn.Module, data: TaskData, cfg: RunSettings, folder: Path) -> None:
        """Write ``model`` -- a plain model: every block owns its weights, no tie hooks -- to ``folder`` in its
        library's own format: a ``config.json`` (a JSON object, which dyntie adds its keys to), the weights
        as ``*.safetensors``, and what a user needs to feed it (the tokenizer, the preprocessing), so that
        the library alone loads it offline. The default refuses."""
        raise DyntieError(f"Backbone {self.name} cannot export: it does not implement export_model "
                          "(docs/plugins.md).")

    def load_exported(self, folder: Path, *, weights: bool = True) -> nn.Module:
        """The model of an ``export_model`` folder, loaded by the library alone, in eval mode; with
        ``weights=False`` only its architecture (freshly initialised), which ``load_tied`` fills."""
        raise DyntieError(f"Backbone {self.name} cannot load exports: it does not implement load_exported "
                          "(docs/plugins.md).")

    # -- text out (``dyntie generate``; a backbone that implements it sets ``generates_text``) -------------

    def continuations(self, model: nn.Module, data: TaskData, prompt: str, *, max_new_tokens: int, samples: int,
                      temperature: float, top_k: int, generator: torch.Generator) -> list[str]:
        """``samples`` continuations of ``prompt``, each ``max_new_tokens`` tokens sampled at ``temperature``
        among the ``top_k`` likeliest (0: all; temperature 0: greedy), drawn from ``generator``, decoded with
        the run's tokenizer (``data``), without the prompt. The default refuses."""
        raise DyntieError(f"Backbone {self.name} does not generate text: it does not implement continuations() "
                          "(docs/plugins.md).")
