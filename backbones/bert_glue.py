"""BERT for GLUE (transformers ``BertForSequenceClassification``), from scratch by default as in the paper.

Blocks are ``bert.encoder.layer``. Embeddings, the pooler and the classifier always train. ``init`` (set by
``dyntie finetune --init PATH``) starts from a local pretrained folder instead (a ``save_pretrained`` folder or a
``dyntie export --format full``): its config sets the model's shape, and its blocks start independent unless
``--initial-state`` says otherwise (docs/export.md).

Metrics: ``loss`` is the mean cross-entropy and ``ppl = exp(loss)``; ``accuracy`` for every classification
task, plus ``mcc`` (CoLA) and ``f1`` (MRPC, QQP). STS-B is a regression: ``loss`` is the mean squared
error of the 0-5 similarity score, ``ppl = exp(MSE)`` (not a perplexity: the same monotone transform of the
loss that the reward uses, so lower is better everywhere), with ``pearson`` and ``spearman`` as its metrics.
The reward is the base class's ``exp(loss)`` on a fresh training batch -- never accuracy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dyntie_cli.backbone import Backbone, Baseline, Batch, EvalStep, Headline, Preset, TaskData
from dyntie_cli.errors import DyntieError
from dyntie_cli.settings import MAX_BATCH, MAX_BLOCKS, RunSettings, Section, setting

from .common import described_model, no_progress_bars, read_json_config, save_hf_tokenizer
from .glue_tasks import TASKS, GlueTask, get_task
from .metrics import accuracy, f1_binary, matthews_corrcoef, pearson, spearman


class BertModel(Section):
    """The BERT shape (``--set model.KEY=VALUE``)."""

    num_hidden_layers: int = setting(12, "Transformer blocks.", ge=1, le=MAX_BLOCKS)
    hidden_size: int = setting(128, "Hidden width.", ge=1)
    num_attention_heads: int = setting(4, "Attention heads (hidden_size must be a multiple).", ge=1)
    intermediate_size: int = setting(512, "Feed-forward width.", ge=1)
    dropout: float = setting(0.1, "Hidden and attention dropout.", ge=0, lt=1)


class GlueDataSettings(Section):
    """Tokenizer, lengths and batches (``--set data.KEY=VALUE``)."""

    tokenizer: str = setting("auto", "auto (the --init folder's, else bert-base-uncased), a local folder or "
                                     "file, or a hub id.")
    max_seq_len: int = setting(128, "Tokens per example (pairs trimmed longest first).", ge=8)
    batch_size: int = setting(32, "Examples per training step.", ge=1, le=MAX_BATCH)
    eval_batch_size: int = setting(128, "Examples per evaluation batch.", ge=1, le=MAX_BATCH)
    max_train_samples: int = setting(0, "Train on N random rows of train (0: all).", ge=0)
    val_fraction: float = setting(0.1, "Share of train held out for validation.", gt=0, lt=1)


# fmt: off
_DATA = dict(tokenizer="auto", max_seq_len=128, batch_size=32, eval_batch_size=128, max_train_samples=0,
             val_fraction=0.1)

PRESETS = {
    p.name: p
    for p in [
        Preset("bert-tiny", "4 x 64, 2 heads, 64-token inputs: seconds, for tests",
               model=dict(num_hidden_layers=4, hidden_size=64, num_attention_heads=2, intermediate_size=256,
                          dropout=0.0),
               data=dict(_DATA, max_seq_len=64, batch_size=16, eval_batch_size=64),
               train=dict(max_steps=20, warmup_steps=4, lr=1e-3, eval_every=10, eval_items=256,
                          test_items=256, log_every=5),
               ties=dict(decide_every=5)),
        Preset("bert-cpu", "12 x 128, 4 heads, 128-token inputs, batch 16: a few minutes on RTE on a CPU",
               model=dict(num_hidden_layers=12, hidden_size=128, num_attention_heads=4, intermediate_size=512,
                          dropout=0.1),
               data=dict(_DATA, batch_size=16),
               train=dict(max_steps=200, warmup_steps=20, lr=5e-4, eval_every=50, eval_items=0, test_items=0,
                          log_every=10),
               ties=dict(decide_every=10)),
        # The paper's text does not pin its BERT shape; BERT-large is the deeper of the two standard shapes,
        # and depth is where tying pays. BERT-base: --set model.num_hidden_layers=12 model.hidden_size=768
        # model.num_attention_heads=12 model.intermediate_size=3072.
        Preset("bert-paper", "24 x 1024, 16 heads (BERT-large, about 335M parameters), 128-token inputs: GPU",
               model=dict(num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
                          intermediate_size=4096, dropout=0.1),
               data=dict(_DATA),
               train=dict(max_steps=10000, warmup_steps=1000, lr=1e-4, eval_every=500, eval_items=0,
                          test_items=0, precision="bf16", log_every=20),
               ties=dict(decide_every=10)),
    ]
}
# fmt: on


class GlueBackbone(Backbone):
    name = "glue"
    description = "BERT sequence classifier on GLUE (transformers BertForSequenceClassification)"
    command = "finetune"
    presets = PRESETS
    default_preset = "bert-cpu"
    datasets = list(TASKS)
    default_dataset = "rte"
    metric = "accuracy"
    higher_is_better = True
    model_settings = BertModel
    data_settings = GlueDataSettings

    def load_data(self, cfg: RunSettings) -> TaskData:
        from .glue_data import load_glue_data

        d = cfg.data
        return load_glue_data(
            cfg.dataset,
            data_dir=cfg.data_dir,
            tokenizer=d.tokenizer,
            max_seq_len=d.max_seq_len,
            batch_size=d.batch_size,
            eval_batch_size=d.eval_batch_size,
            max_train_samples=d.max_train_samples,
            val_fraction=d.val_fraction,
            init=cfg.init,
        )

    def build_model(self, cfg: RunSettings, data: TaskData) -> nn.Module:
        task = get_task(cfg.dataset)
        init = cfg.init.strip()
        if init:
            return _pretrained(Path(init).expanduser(), task, cfg, data)
        return _from_scratch(task, cfg, data)

    def load_model_code(self, cfg: RunSettings, data: TaskData) -> nn.Module | None:
        # the same modules as a pretrained --init folder, without reading its weights
        with torch.device("meta"):
            return _from_scratch(get_task(cfg.dataset), cfg, data)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.bert.encoder.layer)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = _logits(model, batch)
        return _task_loss(logits, batch["labels"]), batch["labels"].shape[0]

    def eval_step(self, model: nn.Module, batch: Batch) -> EvalStep:
        logits = _logits(model, batch)
        labels = batch["labels"]
        return EvalStep(float(_task_loss(logits, labels)), labels.shape[0], _predictions(logits), labels)

    def task_metrics(self, model: nn.Module, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        return task_metrics(get_task(model.config.finetuning_task), predictions, labels)

    def headline(self, cfg: RunSettings) -> Headline:
        return _HEADLINES.get(get_task(cfg.dataset).name, Headline(self.metric, self.higher_is_better))

    def start_notes(self, cfg: RunSettings) -> list[str]:
        if cfg.init.strip():
            return []
        note = ("BERT starts from random weights (no --init), as in the paper: on a task as small as RTE that "
                "scores about what always answering the most frequent label does. To fine-tune pretrained BERT, "
                "pass --init DIR, a local BERT folder (`hf download bert-base-uncased --local-dir DIR` fetches one "
                "where the hub is reachable; its config sets the model's shape).")
        return [note]

    def baseline(self, cfg: RunSettings, data: TaskData, max_items: int | None) -> Baseline | None:
        task = get_task(cfg.dataset)
        labels = data.splits["test"].labels[:max_items]  # the rows eval_batches("test", max_items) serves
        if task.regression or not len(labels):
            return None
        majority = int(torch.bincount(labels, minlength=task.num_labels).argmax())
        metrics = task_metrics(task, torch.full_like(labels, majority), labels)
        return Baseline(metrics, f"always {task.labels[majority]!r}, the most frequent label of the dev split")

    # -- models in and out -------------------------------------------------------------------------

    def init_settings(self, init: str) -> dict[str, Any]:
        config = _bert_config(Path(init).expanduser())
        return {"model.num_hidden_layers": config.num_hidden_layers, "model.hidden_size": config.hidden_size,
                "model.num_attention_heads": config.num_attention_heads,
                "model.intermediate_size": config.intermediate_size}

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return _logits(model, batch)

    def export_model(self, model: nn.Module, data: TaskData, cfg: RunSettings, folder: Path) -> None:
        with no_progress_bars():
            model.save_pretrained(str(folder))
        save_hf_tokenizer(data.tokenizer.tokenizer, folder, unk_token="[UNK]", sep_token="[SEP]",
                          pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                          model_max_length=cfg.data.max_seq_len)

    def load_exported(self, folder: Path, *, weights: bool = True) -> nn.Module:
        from transformers import AutoConfig, AutoModelForSequenceClassification

        with no_progress_bars():
            if weights:
                return AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
            config = AutoConfig.from_pretrained(str(folder))
            return AutoModelForSequenceClassification.from_config(config).eval()


# -- model construction ----------------------------------------------------------------------------


def _task_settings(task: GlueTask, dropout: float) -> dict[str, Any]:
    """Config keys that make a BERT config this task's classifier; ``finetuning_task`` picks the metrics."""
    names = task.labels or ("score",)
    return dict(
        id2label=dict(enumerate(names)),
        label2id={name: i for i, name in enumerate(names)},
        finetuning_task=task.name,
        problem_type="regression" if task.regression else "single_label_classification",
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )


def _from_scratch(task: GlueTask, cfg: RunSettings, data: Any) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    m = cfg.model
    config = BertConfig(
        vocab_size=data.vocab_size,
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size,
        max_position_embeddings=cfg.data.max_seq_len,
        pad_token_id=data.tokenizer.pad_id,
        **_task_settings(task, m.dropout),
    )
    return BertForSequenceClassification(config)


_BERT_FOLDER = "a BERT folder (written by save_pretrained or dyntie export --format full)"


def _bert_config(path: Path):
    """The BERT config of an ``--init`` folder, or one sentence naming what is wrong with it."""
    from transformers import BertConfig

    raw = read_json_config(path, _BERT_FOLDER)
    if raw.get("model_type") != "bert":
        raise DyntieError(f"--init {path} holds {described_model(raw)}, not BERT: pass {_BERT_FOLDER}.")
    return BertConfig.from_pretrained(str(path))


def _pretrained(path: Path, task: GlueTask, cfg: RunSettings, data: Any) -> nn.Module:
    from transformers import BertForSequenceClassification

    config = _bert_config(path)
    m = cfg.model
    for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size"):
        have = getattr(config, key)
        if getattr(m, key) != have:
            what = "blocks" if key == "num_hidden_layers" else key
            raise DyntieError(f"The BERT model in {path} has {have} {what} but model.{key} is "
                              f"{getattr(m, key)}: drop that override (an --init folder sets the model's shape).")
    try:
        # The task settings go on the config (not as from_pretrained kwargs, which transformers 5 hands to
        # the model's __init__); a checkpoint with another label count gets a fresh classifier head.
        for key, value in _task_settings(task, cfg.model.dropout).items():
            setattr(config, key, value)
        with no_progress_bars():
            model = BertForSequenceClassification.from_pretrained(
                str(path), config=config, ignore_mismatched_sizes=True
            )
    except (OSError, ValueError) as exc:
        raise DyntieError(
            f"Could not load a BERT model from {path} ({type(exc).__name__}): pass a BERT folder."
        ) from exc
    if data.vocab_size > model.config.vocab_size:
        raise DyntieError(
            f"The tokenizer has {data.vocab_size:,} tokens but the model in {path} only "
            f"{model.config.vocab_size:,}: "
            "use the model's own tokenizer (--set data.tokenizer=auto)."
        )
    if cfg.data.max_seq_len > model.config.max_position_embeddings:
        raise DyntieError(
            f"data.max_seq_len {cfg.data.max_seq_len} exceeds the model's "
            f"{model.config.max_position_embeddings} "
            "positions: set --set data.max_seq_len to at most that."
        )
    return model


# -- forward, loss, metrics ------------------------------------------------------------------------


def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    # labels are not passed: the loss is computed here, in fp32, the same way for training and evaluation
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        token_type_ids=batch["token_type_ids"],
    )
    return out.logits.float()


def _task_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    if logits.size(-1) == 1:  # STS-B: one regression output
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def _predictions(logits: torch.Tensor) -> torch.Tensor:
    return logits.squeeze(-1) if logits.size(-1) == 1 else logits.argmax(-1)


_METRICS = {
    "accuracy": accuracy,
    "mcc": matthews_corrcoef,
    "f1": f1_binary,
    "pearson": pearson,
    "spearman": spearman,
}


# The tasks not judged by accuracy: CoLA by Matthews correlation (its official metric); STS-B, a regression, by
# exp(MSE), the transform of its loss that its perplexity column holds (lower is better).
_HEADLINES = {"cola": Headline("mcc", True), "stsb": Headline("ppl", False)}


def task_metrics(task: GlueTask, predictions: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    return {name: _METRICS[name](predictions, labels) for name in task.metrics}
