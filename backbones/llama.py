"""The Llama family (transformers ``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``MistralForCausalLM``, built from
a config: no hub needed) for language modelling, and any transformers causal LM whose blocks are one list.

RMSNorm, rotary positions, a SwiGLU MLP and grouped-query attention. The blocks are ``model.layers``; the
rotary embedding lives on ``model`` (``model.model.rotary_emb``), not in a block, so every block has the same
parameters and nothing else. ``model.arch`` picks Llama, Qwen2 (biases on q, k, v) or Mistral; ``model.config``
names a local transformers config of any other decoder with ``model.layers`` (SmolLM, OLMo, ...), built with
``AutoModelForCausalLM.from_config``. The data, loss, export and generation are GPT-2's
(``causal_lm.CausalLMBackbone``); this module only says how the model is made. docs/plugins.md walks through it as
the example of a backbone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import field_validator
from torch import nn

from dyntie_cli.backbone import Preset, TaskData
from dyntie_cli.errors import DyntieError
from dyntie_cli.settings import MAX_BLOCKS, RunSettings, Section, setting

from .causal_lm import CPU_DATA, CPU_TRAIN, TINY_DATA, TINY_TRAIN, CausalLMBackbone

#: ``model.arch`` -> the transformers config class that builds it
ARCHS = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig"}
#: where the blocks of every model this backbone builds live
BLOCKS = "model.layers"


class LlamaModel(Section):
    """The decoder's architecture and shape (``--set model.KEY=VALUE``); the keys are transformers' own."""

    arch: Literal["llama", "qwen2", "mistral"] = setting(
        "llama", "The transformers architecture: llama, qwen2 or mistral (model.config: any other).")
    config: str = setting("", "A local transformers config (a folder holding config.json, or the file) of a causal "
                              "LM whose blocks are model.layers, used instead of model.arch; the shape keys below "
                              "still apply over it (empty: model.arch).")
    num_hidden_layers: int = setting(12, "Decoder blocks.", ge=1, le=MAX_BLOCKS)
    hidden_size: int = setting(128, "Hidden width.", ge=1)
    intermediate_size: int = setting(352, "Width of the SwiGLU MLP.", ge=1)
    num_attention_heads: int = setting(4, "Query heads (hidden_size must be a multiple).", ge=1)
    num_key_value_heads: int = setting(2, "Key and value heads: grouped-query attention (num_attention_heads must "
                                          "be a multiple).", ge=1)
    tie_word_embeddings: bool = setting(True, "The output head shares the input embedding (as GPT-2, SmolLM and "
                                              "the small Qwen2 models do).")
    dropout: float = setting(0.0, "Attention dropout (the Llama family has no other).", ge=0, lt=1)

    @field_validator("config")
    @classmethod
    def _absolute(cls, value: str) -> str:
        """An existing path is recorded absolute, so a resume or an ablation finds it from any folder."""
        path = Path(value.strip()).expanduser()
        return str(path.resolve()) if value.strip() and path.exists() else value.strip()


def _shape(layers: int, width: int, mlp: int, heads: int, kv_heads: int) -> dict[str, Any]:
    return dict(num_hidden_layers=layers, hidden_size=width, intermediate_size=mlp, num_attention_heads=heads,
                num_key_value_heads=kv_heads)


PRESETS = {
    p.name: p
    for p in [
        Preset("llama-tiny", "4 x 64, 2 query heads sharing 1 key/value head, BPE 512, 32-token windows: seconds, "
               "for tests", model=_shape(4, 64, 176, 2, 1), data=dict(TINY_DATA), train=dict(TINY_TRAIN),
               ties=dict(decide_every=5)),
        Preset("llama-cpu", "12 x 128, 4 query and 2 key/value heads, BPE 8k, 1,024 tokens a step: minutes on a CPU",
               model=_shape(12, 128, 352, 4, 2), data=dict(CPU_DATA), train=dict(CPU_TRAIN, max_steps=1500),
               ties=dict(decide_every=10)),
        Preset("llama-deep-cpu", "48 x 128: the paper's depth at CPU width (activations dominate memory)",
               model=_shape(48, 128, 352, 4, 2), data=dict(CPU_DATA), train=dict(CPU_TRAIN, max_steps=1000),
               ties=dict(decide_every=10)),
        Preset("llama-wide-cpu", "48 x 512, 8 query and 4 key/value heads, 64-token windows, batch 2: parameters "
               "and optimizer state dominate memory", model=_shape(48, 512, 1408, 8, 4),
               data=dict(CPU_DATA, seq_len=64, batch_size=2, eval_batch_size=8),
               train=dict(CPU_TRAIN, max_steps=300, lr=5e-4, eval_items=8192), ties=dict(decide_every=10)),
    ]
}


class LlamaBackbone(CausalLMBackbone):
    name = "llama"
    description = "Llama-family decoder (transformers LlamaForCausalLM; Qwen2, Mistral or a local config)"
    presets = PRESETS
    default_preset = "llama-cpu"
    model_settings = LlamaModel
    family = "Llama-family"
    shape_keys = {key: key for key in (*_shape(0, 0, 0, 0, 0), "tie_word_embeddings")}

    def new_config(self, cfg: RunSettings, data: TaskData) -> Any:
        import transformers

        m = cfg.model
        if m.hidden_size % m.num_attention_heads or m.num_attention_heads % m.num_key_value_heads:
            raise DyntieError(f"model.hidden_size {m.hidden_size} must be a multiple of model.num_attention_heads "
                              f"{m.num_attention_heads}, and that of model.num_key_value_heads "
                              f"{m.num_key_value_heads}: change one of them.")
        eos = self.eos_id(data)
        fields = dict(_shape(m.num_hidden_layers, m.hidden_size, m.intermediate_size, m.num_attention_heads,
                             m.num_key_value_heads), vocab_size=data.vocab_size,
                      max_position_embeddings=cfg.data.seq_len, tie_word_embeddings=m.tie_word_embeddings,
                      attention_dropout=m.dropout, bos_token_id=eos, eos_token_id=eos, use_cache=False)
        if not m.config:
            return getattr(transformers, ARCHS[m.arch])(**fields)
        base = _local_config(m.config)
        values = base.to_dict()
        if values.get("num_hidden_layers") != m.num_hidden_layers:
            values.pop("layer_types", None)  # per-block attention kinds, derived again for the new depth
        return type(base)(**{**values, **fields})

    def set_dropout(self, config: Any, p: float) -> None:
        config.attention_dropout = p

    def accepts(self, model_type: str | None) -> bool:
        """Any causal LM transformers knows; ``init_settings`` and ``blocks`` refuse one whose blocks are not
        ``model.layers``."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        return model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    def init_settings(self, init: str) -> dict[str, Any]:
        out = super().init_settings(init)
        config = self.init_config(init)
        with torch.device("meta"):  # where its blocks are, before anything is read or trained
            self.blocks(self.model_class(config)(config))
        model_type = config.model_type
        # the record names the architecture the weights have
        out.update({"model.arch": model_type, "model.config": ""} if model_type in ARCHS else
                   {"model.config": str(Path(init).expanduser())})
        return out

    def blocks(self, model: nn.Module) -> list[nn.Module]:
        try:
            found = model.get_submodule(BLOCKS)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList) or not len(found):
            raise DyntieError(f"A {type(model).__name__} has no block list at {BLOCKS}: the llama backbone trains "
                              "decoders whose blocks are one list there (Llama, Qwen2, Mistral, SmolLM, ...).")
        return list(found)


def _local_config(where: str) -> Any:
    """The transformers config of ``model.config`` (a folder or a config.json), or one sentence."""
    from transformers import AutoConfig

    path = Path(where).expanduser()
    if not path.exists():
        raise DyntieError(f"model.config {where} does not exist: pass a folder holding a transformers config.json.")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as exc:
        raise DyntieError(f"model.config {where} is no transformers config ({type(exc).__name__}): pass a folder "
                          "holding a config.json with a model_type.") from exc
