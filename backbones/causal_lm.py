"""What every causal language model backbone shares: GPT-2 and the Llama family are subclasses of
``CausalLMBackbone``.

The data (a text corpus, a tokenizer, next-token windows: ``lm_data``), the loss, the logits an export compares,
the start from a transformers folder (``--init``), the export as a ``save_pretrained`` folder with the run's
tokenizer, and sampled continuations live here once. A subclass says how to make its transformers config from
the run's settings (``new_config``), which settings keys an ``--init`` folder fixes (``shape_keys``), how its
dropout is set and where its blocks are.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from dyntie_cli.backbone import Backbone, Batch, TaskData
from dyntie_cli.errors import DyntieError
from dyntie_cli.settings import INT32_MAX, MAX_BATCH, RunSettings, Section, setting

from .common import described_model, init_location, no_progress_bars, read_json_config, save_hf_tokenizer
from .text_corpora import EOS_TOKEN
from .text_tokenizers import DEFAULT_BPE_TRAIN_CHARS


class LMDataSettings(Section):
    """Tokenizer and batches (``--set data.KEY=VALUE``)."""

    tokenizer: str = setting("bpe:8192", "bpe:N (a byte-level BPE trained on train), a local tokenizer folder, "
                                         "or a hub id such as gpt2.")
    seq_len: int = setting(128, "Tokens per training window (and the model's positions).", ge=1)
    batch_size: int = setting(8, "Windows per training step.", ge=1, le=MAX_BATCH)
    eval_batch_size: int = setting(16, "Windows per evaluation batch.", ge=1, le=MAX_BATCH)
    max_train_tokens: int = setting(0, "Train on the first N tokens of train (0: all).", ge=0)
    heldout_tokens: int = setting(2048, "The held-out reward's slice: the last N tokens of train (after "
                                        "max_train_tokens), never trained on, carved only when the run's reward or "
                                        "its probes use it (agent.reward_batch or agent.reward_probes heldout).",
                                  ge=2, le=INT32_MAX)
    bpe_train_chars: int = setting(DEFAULT_BPE_TRAIN_CHARS, "Characters of train a bpe:N tokenizer learns from.",
                                   ge=1)


#: the data and training settings of the CPU presets of every causal LM: 8 windows of 128 tokens a step
CPU_DATA = dict(tokenizer="bpe:8192", seq_len=128, batch_size=8, eval_batch_size=16, max_train_tokens=0)
CPU_TRAIN = dict(lr=1e-3, warmup_steps=100, eval_every=250, eval_items=32768, test_items=0, log_every=10)
#: the tiny presets' data and training: seconds, for tests
TINY_DATA = dict(tokenizer="bpe:512", seq_len=32, batch_size=4, eval_batch_size=8, max_train_tokens=100_000,
                 bpe_train_chars=300_000)
TINY_TRAIN = dict(max_steps=20, warmup_steps=4, lr=3e-3, eval_every=10, eval_items=1024, test_items=1024,
                  log_every=5)


def causal_lm_class(config: Any) -> type[nn.Module]:
    """The transformers causal-LM class of a config (importing its modelling code, no weights)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise DyntieError(f"transformers has no causal language model for {config.model_type} configs: pass the "
                          "config of a decoder such as Llama, Qwen2 or Mistral.") from None


class CausalLMBackbone(Backbone):
    """A transformers causal LM trained on next-token windows of a text corpus (``LMData``)."""

    command = "train"
    datasets = ["wikitext-2", "wikitext-103", "lambada", "lm1b", "1-billion", "text:PATH"]
    default_dataset = "wikitext-2"
    metric = "ppl"
    higher_is_better = False
    generates_text = True
    data_settings = LMDataSettings
    #: how a sentence names the model family ("GPT-2")
    family: ClassVar[str] = ""
    #: the ``model`` settings an ``--init`` folder fixes -> the config attribute each reads
    shape_keys: ClassVar[dict[str, str]] = {}

    # -- what a subclass says ----------------------------------------------------------------------

    def new_config(self, cfg: RunSettings, data: TaskData) -> Any:
        """The transformers config of a model trained from scratch with ``cfg``."""
        raise NotImplementedError

    def set_dropout(self, config: Any, p: float) -> None:
        """Set the run's dropout on a loaded config (a start from ``--init`` keeps everything else)."""
        raise NotImplementedError

    def accepts(self, model_type: str | None) -> bool:
        """Whether an ``--init`` folder of this ``model_type`` (its config.json) is one this backbone starts from."""
        raise NotImplementedError

    def model_class(self, config: Any) -> type[nn.Module]:
        return causal_lm_class(config)

    @property
    def folder_words(self) -> str:
        return f"a {self.family} folder (written by save_pretrained or dyntie export --format full)"

    # -- training ----------------------------------------------------------------------------------

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
            return self._pretrained(cfg, data)
        config = self.new_config(cfg, data)
        return self.model_class(config)(config)

    def load_model_code(self, cfg: RunSettings, data: TaskData) -> nn.Module | None:
        if not cfg.init:
            return super().load_model_code(cfg, data)
        self.model_class(self.init_config(cfg.init))  # the code an --init folder needs, no weights
        return None

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=batch["input_ids"], use_cache=False).logits
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), labels.reshape(-1))
        return loss, labels.numel()

    def outputs(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(input_ids=batch["input_ids"], use_cache=False).logits.float()

    @staticmethod
    def eos_id(data: TaskData) -> int | None:
        return getattr(getattr(data, "tokenizer", None), "eos_id", None)

    # -- models in and out -------------------------------------------------------------------------

    def init_config(self, init: str) -> Any:
        """The config of an ``--init`` folder (or hub id), or one sentence naming what is wrong with it."""
        from transformers import AutoConfig

        where = init_location(init, "transformers")
        if isinstance(where, Path):
            raw = read_json_config(where, self.folder_words)
            if not self.accepts(raw.get("model_type")):
                raise DyntieError(f"--init {init} holds {described_model(raw)}, not {self.family}: pass "
                                  f"{self.folder_words}.")
        try:
            config = AutoConfig.from_pretrained(str(where))
        except (OSError, ValueError, KeyError) as exc:
            raise DyntieError(f"Could not read a {self.family} config from {init} ({type(exc).__name__}): pass "
                              f"{self.folder_words}.") from exc
        if not self.accepts(config.model_type):
            raise DyntieError(f"--init {init} holds a transformers {config.model_type} model, not {self.family}: "
                              f"pass {self.folder_words}.")
        return config

    def init_settings(self, init: str) -> dict[str, Any]:
        config = self.init_config(init)
        out: dict[str, Any] = {f"model.{key}": getattr(config, attr) for key, attr in self.shape_keys.items()}
        folder = Path(init).expanduser()
        if (folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file():
            out["data.tokenizer"] = str(folder)  # a pretrained model keeps its vocabulary
        return out

    def _pretrained(self, cfg: RunSettings, data: TaskData) -> nn.Module:
        """The model of ``cfg.init``: its own shape (which the settings must not contradict), the run's dropout."""
        config = self.init_config(cfg.init)
        for key, attr in self.shape_keys.items():
            have, want = getattr(config, attr), getattr(cfg.model, key)
            if want != have:
                what = f"{have} blocks" if attr in ("n_layer", "num_hidden_layers") else f"{key} {have}"
                raise DyntieError(f"The {self.family} model in {cfg.init} has {what} but model.{key} is {want}: "
                                  "drop that override (an --init folder sets the model's shape).")
        if data.vocab_size > config.vocab_size:
            raise DyntieError(f"The tokenizer has {data.vocab_size:,} tokens but the model in {cfg.init} only "
                              f"{config.vocab_size:,}: use the model's own tokenizer (--set data.tokenizer="
                              f"{cfg.init}).")
        positions = config.max_position_embeddings
        if cfg.data.seq_len > positions:
            raise DyntieError(f"data.seq_len {cfg.data.seq_len} exceeds the {positions} positions of the model in "
                              f"{cfg.init}: set --set data.seq_len={positions} or less.")
        self.set_dropout(config, cfg.model.dropout)
        config.use_cache = False
        try:
            with no_progress_bars():
                return self.model_class(config).from_pretrained(str(init_location(cfg.init, "transformers")),
                                                                config=config)
        except (OSError, ValueError, RuntimeError) as exc:
            raise DyntieError(f"Could not load {self.family} weights from {cfg.init} ({type(exc).__name__}): pass "
                              f"{self.folder_words}.") from exc

    def export_model(self, model: nn.Module, data: TaskData, cfg: RunSettings, folder: Path) -> None:
        # every block is its own module with its own weights again, so generation may use the KV cache
        model.config.use_cache = True
        with no_progress_bars():
            model.save_pretrained(str(folder))
        tokenizer = getattr(data, "tokenizer", None)
        if tokenizer is not None:
            save_hf_tokenizer(tokenizer.tokenizer, folder, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN,
                              unk_token=EOS_TOKEN, model_max_length=model.config.max_position_embeddings)

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
        window = model.config.max_position_embeddings
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
