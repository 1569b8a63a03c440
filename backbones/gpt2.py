"""GPT-2 (transformers ``GPT2LMHeadModel``, built from a config: no hub needed) for language modelling.

Blocks are ``transformer.h``. Embeddings, the final norm and the (embedding-tied) head always train.
``--init`` starts from a saved GPT-2 folder (``save_pretrained``, or ``dyntie export --format full``): its
config sets the model's shape and its tokenizer replaces the preset's; ``dyntie export`` writes the same kind of
folder (docs/export.md). What GPT-2 shares with the other causal LMs (data, loss, export, generation) is
``causal_lm.CausalLMBackbone``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from dyntie_cli.backbone import Preset, TaskData
from dyntie_cli.settings import MAX_BLOCKS, RunSettings, Section, setting

from .causal_lm import CPU_DATA, CPU_TRAIN, TINY_DATA, TINY_TRAIN, CausalLMBackbone, LMDataSettings


class GPT2Model(Section):
    """The GPT-2 shape (``--set model.KEY=VALUE``)."""

    n_layer: int = setting(12, "Transformer blocks.", ge=1, le=MAX_BLOCKS)
    n_embd: int = setting(128, "Hidden width.", ge=1)
    n_head: int = setting(4, "Attention heads (n_embd must be a multiple).", ge=1)
    dropout: float = setting(0.0, "Residual, embedding and attention dropout.", ge=0, lt=1)


#: the data section GPT-2 shares with every causal LM
GPT2Data = LMDataSettings

#: measured: docs/studies.md, "The paper's regime"
REGIME_DESCRIPTION = ("48 x 64, 2 heads, BPE 2k, the first 20k tokens of WikiText-2 for 4,800 steps (61 epochs), a "
                      "decision every 3 steps (1,599 per run): the paper's data-limited regime, where conventional "
                      "training overfits (best validation perplexity at step 400-600, 725 at the end, three "
                      "seeds); 8-21 minutes a run at one thread")

PRESETS = {
    p.name: p
    for p in [
        Preset("gpt2-tiny", "4 x 64, BPE 512, 32-token windows: seconds, for tests",
               model=dict(n_layer=4, n_embd=64, n_head=2, dropout=0.0), data=dict(TINY_DATA),
               train=dict(TINY_TRAIN), ties=dict(decide_every=5)),
        Preset("gpt2-cpu", "12 x 128, BPE 8k, 1,024 tokens a step: the embedded default, minutes on a CPU",
               model=dict(n_layer=12, n_embd=128, n_head=4, dropout=0.0), data=dict(CPU_DATA),
               train=dict(CPU_TRAIN, max_steps=1500), ties=dict(decide_every=10)),
        Preset("gpt2-deep-cpu", "48 x 128: the paper's depth at CPU width (activations dominate memory)",
               model=dict(n_layer=48, n_embd=128, n_head=4, dropout=0.0), data=dict(CPU_DATA),
               train=dict(CPU_TRAIN, max_steps=1000), ties=dict(decide_every=10)),
        Preset("gpt2-wide-cpu", "48 x 512, 64-token windows, batch 2: parameters and optimizer state dominate "
               "memory, as at the paper's 1.6B shape",
               model=dict(n_layer=48, n_embd=512, n_head=8, dropout=0.0),
               data=dict(CPU_DATA, seq_len=64, batch_size=2, eval_batch_size=8),
               train=dict(CPU_TRAIN, max_steps=300, lr=5e-4, eval_items=8192), ties=dict(decide_every=10)),
        Preset("gpt2-huge-cpu", "48 x 2048, 16 heads (about 2.4B parameters), 64-token windows, batch 2: too large "
               "to train conventionally in 24 GiB (AdamW needs about 39 GB), trains tied under a budget of 8 blocks",
               model=dict(n_layer=48, n_embd=2048, n_head=16, dropout=0.0),
               data=dict(CPU_DATA, seq_len=64, batch_size=2, eval_batch_size=4),
               train=dict(CPU_TRAIN, max_steps=30, lr=3e-4, warmup_steps=5, eval_every=0, eval_items=1024,
                          test_items=1024, log_every=2),
               ties=dict(decide_every=3)),
        Preset("gpt2-giant-cpu", "48 x 3072, 24 heads (about 5.5B parameters), 64-token windows, batch 2: the "
               "largest that trains on a 24 GiB CPU machine, tied under a budget of 8 blocks with every block "
               "checkpointed and Adafactor (conventional AdamW needs about 87 GB)",
               model=dict(n_layer=48, n_embd=3072, n_head=24, dropout=0.0),
               data=dict(CPU_DATA, seq_len=64, batch_size=2, eval_batch_size=4),
               train=dict(CPU_TRAIN, max_steps=6, lr=1e-2, warmup_steps=2, eval_every=0, eval_items=512,
                          test_items=512, log_every=1, checkpointing="all", optimizer="adafactor"),
               ties=dict(decide_every=2)),
        Preset("gpt2-regime-cpu", REGIME_DESCRIPTION,
               model=dict(n_layer=48, n_embd=64, n_head=2, dropout=0.0),
               data=dict(tokenizer="bpe:2048", seq_len=64, batch_size=4, eval_batch_size=16,
                         max_train_tokens=20_000, heldout_tokens=512),
               train=dict(lr=1e-3, warmup_steps=100, max_steps=4800, eval_every=200, eval_items=16_384,
                          test_items=0, log_every=50),
               ties=dict(decide_every=3)),
        Preset("gpt2-paper", "48 x 1600, 25 heads, GPT-2 BPE (about 1.6B parameters): the paper's shape, GPU",
               model=dict(n_layer=48, n_embd=1600, n_head=25, dropout=0.1),
               data=dict(tokenizer="gpt2", seq_len=1024, batch_size=8, eval_batch_size=8, max_train_tokens=0),
               train=dict(lr=1.5e-4, warmup_steps=500, max_steps=20000, eval_every=1000, eval_items=0,
                          precision="bf16", log_every=20),
               ties=dict(decide_every=10)),
    ]
}


class GPT2Backbone(CausalLMBackbone):
    name = "gpt2"
    description = "GPT-2 language model (transformers GPT2LMHeadModel)"
    presets = PRESETS
    default_preset = "gpt2-cpu"
    model_settings = GPT2Model
    family = "GPT-2"
    shape_keys = {"n_layer": "n_layer", "n_embd": "n_embd", "n_head": "n_head"}

    def new_config(self, cfg: RunSettings, data: TaskData) -> Any:
        from transformers import GPT2Config

        m = cfg.model
        p = m.dropout
        eos = self.eos_id(data)
        return GPT2Config(
            bos_token_id=eos, eos_token_id=eos, vocab_size=data.vocab_size, n_positions=cfg.data.seq_len,
            n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p,
            use_cache=False,
            # GPT-2's tanh-approximate GELU as one fused op: the same function as "gelu_new" (to float
            # rounding), but autograd keeps only its input instead of every intermediate of the formula --
            # about half the activation memory of a block (the design's "memory savings are real")
            activation_function="gelu_pytorch_tanh",
        )

    def set_dropout(self, config: Any, p: float) -> None:
        config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = p

    def accepts(self, model_type: str | None) -> bool:
        return model_type == "gpt2"

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        return list(model.transformer.h)
