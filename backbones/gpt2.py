"""GPT-2 (transformers ``GPT2LMHeadModel``, built from a config: no hub needed) for language modelling.

Blocks are ``transformer.h``. Embeddings, the final norm and the (embedding-tied) head always train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dyntie_cli.backbone import Backbone, Batch, Preset, TaskData
from dyntie_cli.settings import RunSettings, Section, setting

from .text_tokenizers import DEFAULT_BPE_TRAIN_CHARS


class GPT2Model(Section):
    """The GPT-2 shape (``--set model.KEY=VALUE``)."""

    n_layer: int = setting(12, "Transformer blocks.", ge=1)
    n_embd: int = setting(128, "Hidden width.", ge=1)
    n_head: int = setting(4, "Attention heads (n_embd must be a multiple).", ge=1)
    dropout: float = setting(0.0, "Residual, embedding and attention dropout.", ge=0, lt=1)


class GPT2Data(Section):
    """Tokenizer and batches (``--set data.KEY=VALUE``)."""

    tokenizer: str = setting("bpe:8192", "bpe:N (a byte-level BPE trained on train), a local tokenizer folder, "
                                         "or a hub id such as gpt2.")
    seq_len: int = setting(128, "Tokens per training window (and the model's positions).", ge=1)
    batch_size: int = setting(8, "Windows per training step.", ge=1)
    eval_batch_size: int = setting(16, "Windows per evaluation batch.", ge=1)
    max_train_tokens: int = setting(0, "Train on the first N tokens of train (0: all).", ge=0)
    bpe_train_chars: int = setting(DEFAULT_BPE_TRAIN_CHARS, "Characters of train a bpe:N tokenizer learns from.",
                                   ge=1)


_CPU_DATA = dict(tokenizer="bpe:8192", seq_len=128, batch_size=8, eval_batch_size=16, max_train_tokens=0)
_CPU_TRAIN = dict(lr=1e-3, warmup_steps=100, eval_every=250, eval_items=32768, test_items=0, log_every=10)

PRESETS = {
    p.name: p
    for p in [
        Preset("gpt2-tiny", "4 x 64, BPE 512, 32-token windows: seconds, for tests",
               model=dict(n_layer=4, n_embd=64, n_head=2, dropout=0.0),
               data=dict(tokenizer="bpe:512", seq_len=32, batch_size=4, eval_batch_size=8,
                         max_train_tokens=100_000, bpe_train_chars=300_000),
               train=dict(max_steps=20, warmup_steps=4, lr=3e-3, eval_every=10, eval_items=1024,
                          test_items=1024, log_every=5),
               ties=dict(decide_every=5)),
        Preset("gpt2-cpu", "12 x 128, BPE 8k, 1,024 tokens a step: the embedded default, minutes on a CPU",
               model=dict(n_layer=12, n_embd=128, n_head=4, dropout=0.0), data=dict(_CPU_DATA),
               train=dict(_CPU_TRAIN, max_steps=1500), ties=dict(decide_every=10)),
        Preset("gpt2-deep-cpu", "48 x 128: the paper's depth at CPU width (activations dominate memory)",
               model=dict(n_layer=48, n_embd=128, n_head=4, dropout=0.0), data=dict(_CPU_DATA),
               train=dict(_CPU_TRAIN, max_steps=1000), ties=dict(decide_every=10)),
        Preset("gpt2-wide-cpu", "48 x 512, 64-token windows, batch 2: parameters and optimizer state dominate "
               "memory, as at the paper's 1.6B shape",
               model=dict(n_layer=48, n_embd=512, n_head=8, dropout=0.0),
               data=dict(_CPU_DATA, seq_len=64, batch_size=2, eval_batch_size=8),
               train=dict(_CPU_TRAIN, max_steps=300, lr=5e-4, eval_items=8192), ties=dict(decide_every=10)),
        Preset("gpt2-huge-cpu", "48 x 2048, 16 heads (about 2.4B parameters), 64-token windows, batch 2: too large "
               "to train conventionally in 24 GiB (AdamW needs about 39 GB), trains tied under a budget of 8 blocks",
               model=dict(n_layer=48, n_embd=2048, n_head=16, dropout=0.0),
               data=dict(_CPU_DATA, seq_len=64, batch_size=2, eval_batch_size=4),
               train=dict(_CPU_TRAIN, max_steps=30, lr=3e-4, warmup_steps=5, eval_every=0, eval_items=1024,
                          test_items=1024, log_every=2),
               ties=dict(decide_every=3)),
        Preset("gpt2-paper", "48 x 1600, 25 heads, GPT-2 BPE (about 1.6B parameters): the paper's shape, GPU",
               model=dict(n_layer=48, n_embd=1600, n_head=25, dropout=0.1),
               data=dict(tokenizer="gpt2", seq_len=1024, batch_size=8, eval_batch_size=8, max_train_tokens=0),
               train=dict(lr=1.5e-4, warmup_steps=500, max_steps=20000, eval_every=1000, eval_items=0,
                          precision="bf16", log_every=20),
               ties=dict(decide_every=10)),
    ]
}


class GPT2Backbone(Backbone):
    name = "gpt2"
    description = "GPT-2 language model (transformers GPT2LMHeadModel)"
    command = "train"
    presets = PRESETS
    default_preset = "gpt2-cpu"
    datasets = ["wikitext-2", "wikitext-103", "lambada", "lm1b", "1-billion", "text:PATH"]
    default_dataset = "wikitext-2"
    metric = "ppl"
    higher_is_better = False
    model_settings = GPT2Model
    data_settings = GPT2Data

    def load_data(self, cfg: RunSettings) -> TaskData:
        from .lm_data import load_lm_data

        d = cfg.data
        return load_lm_data(
            cfg.dataset, data_dir=cfg.data_dir, tokenizer=d.tokenizer, seq_len=d.seq_len,
            batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
            max_train_tokens=d.max_train_tokens or None, bpe_train_chars=d.bpe_train_chars,
        )

    def build_model(self, cfg: RunSettings, data: TaskData) -> nn.Module:
        from transformers import GPT2Config, GPT2LMHeadModel

        m = cfg.model
        p = m.dropout
        eos = getattr(getattr(data, "tokenizer", None), "eos_id", None)
        config = GPT2Config(
            bos_token_id=eos, eos_token_id=eos, vocab_size=data.vocab_size, n_positions=cfg.data.seq_len,
            n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
            use_cache=False,
            # GPT-2's tanh-approximate GELU as one fused op: the same function as "gelu_new" (to float
            # rounding), but autograd keeps only its input instead of every intermediate of the formula --
            # about half the activation memory of a block (the design's "memory savings are real")
            activation_function="gelu_pytorch_tanh",
        )
        return GPT2LMHeadModel(config)

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.h)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))
        return loss, labels.numel()
