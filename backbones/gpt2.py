"""GPT-2 (transformers ``GPT2LMHeadModel``, built from a config: no hub needed) for language modelling.

Blocks are ``transformer.h``. Embeddings, the final norm and the (embedding-tied) head always train.
``--init`` starts from a saved GPT-2 folder (``save_pretrained``, or ``dyntie export --format full``): its
config sets the model's shape and its tokenizer replaces the preset's; ``dyntie export`` writes the same kind of
folder (docs/export.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dyntie_cli.backbone import Backbone, Batch, Preset, TaskData
from dyntie_cli.errors import DyntieError
from dyntie_cli.settings import RunSettings, Section, setting

from .common import described_model, init_location, no_progress_bars, read_json_config, save_hf_tokenizer
from .text_corpora import EOS_TOKEN
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
    heldout_tokens: int = setting(2048, "The held-out reward's slice: the last N tokens of train (after "
                                        "max_train_tokens), never trained on, carved only when the run's reward or "
                                        "its probes use it (agent.reward_batch or agent.reward_probes heldout).",
                                  ge=2)
    bpe_train_chars: int = setting(DEFAULT_BPE_TRAIN_CHARS, "Characters of train a bpe:N tokenizer learns from.",
                                   ge=1)


_CPU_DATA = dict(tokenizer="bpe:8192", seq_len=128, batch_size=8, eval_batch_size=16, max_train_tokens=0)
_CPU_TRAIN = dict(lr=1e-3, warmup_steps=100, eval_every=250, eval_items=32768, test_items=0, log_every=10)

#: measured: docs/studies.md, "The paper's regime"
REGIME_DESCRIPTION = ("48 x 64, 2 heads, BPE 2k, the first 40k tokens of WikiText-2 for 4,800 steps (31 epochs), a "
                      "decision every 3 steps (1,599 per run): the paper's data-limited regime, where conventional "
                      "training overfits")

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
        Preset("gpt2-regime-cpu", REGIME_DESCRIPTION,
               model=dict(n_layer=48, n_embd=64, n_head=2, dropout=0.0),
               data=dict(tokenizer="bpe:2048", seq_len=64, batch_size=4, eval_batch_size=16,
                         max_train_tokens=40_000, heldout_tokens=512),
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
    generates_text = True
    model_settings = GPT2Model
    data_settings = GPT2Data

    def load_data(self, cfg: RunSettings) -> TaskData:
        from .lm_data import load_lm_data

        d = cfg.data
        return load_lm_data(
            cfg.dataset, data_dir=cfg.data_dir, tokenizer=d.tokenizer, seq_len=d.seq_len,
            batch_size=d.batch_size, eval_batch_size=d.eval_batch_size,
            max_train_tokens=d.max_train_tokens or None, bpe_train_chars=d.bpe_train_chars,
            heldout_tokens=d.heldout_tokens if cfg.agent.scores("heldout") else 0,
        )

    def build_model(self, cfg: RunSettings, data: TaskData) -> nn.Module:
        if cfg.init:
            return _pretrained(cfg, data)
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

    def load_model_code(self, cfg: RunSettings, data: TaskData) -> None:
        if not cfg.init:
            return super().load_model_code(cfg, data)
        import transformers.models.gpt2.modeling_gpt2  # noqa: F401 -- the code an --init folder needs, no weights

    # -- models in and out -------------------------------------------------------------------------

    def init_settings(self, init: str) -> dict[str, Any]:
        config = _gpt2_config(init)
        out: dict[str, Any] = {"model.n_layer": config.n_layer, "model.n_embd": config.n_embd,
                               "model.n_head": config.n_head}
        folder = Path(init).expanduser()
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            out["data.tokenizer"] = str(folder)  # a pretrained model keeps its vocabulary
        return out

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], use_cache=False).logits.float()

    def export_model(self, model: nn.Module, data: TaskData, cfg: RunSettings, folder: Path) -> None:
        # every block is its own module with its own weights again, so generation may use the KV cache
        model.config.use_cache = True
        with no_progress_bars():
            model.save_pretrained(str(folder))
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer.tokenizer, folder, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                              unk_token=EOS_TOKEN, model_max_length=model.config.n_positions)

    def load_exported(self, folder: Path, *, weights: bool = True) -> nn.Module:
        from transformers import AutoConfig, AutoModelForCausalLM

        with no_progress_bars():
            if weights:
                return AutoModelForCausalLM.from_pretrained(str(folder)).eval()
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(folder))).eval()

    @torch.no_grad()
    def continuations(self, model: nn.Module, data: TaskData, prompt: str, *, max_new_tokens: int,
                      samples: int, temperature: float, top_k: int, generator: torch.Generator) -> list[str]:
        """``samples`` sampled continuations of ``prompt`` (nanoGPT's loop: the context is cropped to the
        model's positions, so a continuation may run longer than the windows it was trained on)."""
        tokenizer = data.tokenizer
        ids = tokenizer.encode(prompt).tolist() or [tokenizer.eos_id or 0]
        x = torch.tensor([ids] * samples, dtype=torch.long)
        window = model.config.n_positions
        for _ in range(max_new_tokens):
            logits = model(input_ids=x[:, -window:], use_cache=False).logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            x = torch.cat([x, nxt], dim=1)
        return [tokenizer.decode(row[len(ids):]) for row in x]


_GPT2_FOLDER = "a GPT-2 folder (written by save_pretrained or dyntie export --format full)"


def _gpt2_config(init: str):
    """The GPT-2 config of an ``--init`` folder (or hub id), or one sentence naming what is wrong with it."""
    from transformers import GPT2Config

    where = init_location(init, "transformers")
    if isinstance(where, Path):
        raw = read_json_config(where, _GPT2_FOLDER)
        if raw.get("model_type") != "gpt2":
            raise DyntieError(f"--init {init} holds {described_model(raw)}, not GPT-2: pass {_GPT2_FOLDER}.")
    try:
        return GPT2Config.from_pretrained(str(where))
    except (OSError, ValueError) as exc:
        raise DyntieError(f"Could not read a GPT-2 config from {init} ({type(exc).__name__}): pass "
                          f"{_GPT2_FOLDER}.") from exc


def _pretrained(cfg: RunSettings, data: TaskData) -> nn.Module:
    """GPT-2 from ``cfg.init``: its own shape (which the settings must not contradict), the run's dropout."""
    from transformers import GPT2LMHeadModel

    config = _gpt2_config(cfg.init)
    m = cfg.model
    for key, have in (("n_layer", config.n_layer), ("n_embd", config.n_embd), ("n_head", config.n_head)):
        if getattr(m, key) != have:
            what = "blocks" if key == "n_layer" else key
            raise DyntieError(f"The GPT-2 model in {cfg.init} has {have} {what} but model.{key} is "
                              f"{getattr(m, key)}: drop that override (an --init folder sets the model's shape).")
    if data.vocab_size > config.vocab_size:
        raise DyntieError(f"The tokenizer has {data.vocab_size:,} tokens but the model in {cfg.init} only "
                          f"{config.vocab_size:,}: use the model's own tokenizer (--set data.tokenizer={cfg.init}).")
    if cfg.data.seq_len > config.n_positions:
        raise DyntieError(f"data.seq_len {cfg.data.seq_len} exceeds the {config.n_positions} positions of the "
                          f"model in {cfg.init}: set --set data.seq_len={config.n_positions} or less.")
    p = m.dropout
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = p
    config.use_cache = False
    try:
        with no_progress_bars():
            return GPT2LMHeadModel.from_pretrained(str(init_location(cfg.init, "transformers")), config=config)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DyntieError(f"Could not load GPT-2 weights from {cfg.init} ({type(exc).__name__}): pass "
                          f"{_GPT2_FOLDER}.") from exc
