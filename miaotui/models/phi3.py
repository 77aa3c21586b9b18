"""Phi-3 and Phi-4 (Phi3ForCausalLM): Llama's layer with q/k/v and gate/up stored fused, LongRoPE
scaling, an optional sliding window and partial rotation (Phi-4-mini).

Not for Phi-1/2 (LayerNorm, parallel blocks) or Phi-3.5-MoE.
"""

from __future__ import annotations

from typing import Any

from miaotui.models.config import ModelConfig
from miaotui.models.config_sources import gguf_common, hf_common, hf_common_out
from miaotui.models.spec import ModelSpec
from miaotui.models.weights import Named, Tensors, take


def layer_tensors(config: ModelConfig, hf: Tensors, i: int) -> Named:
    p, out = f"model.layers.{i}.", f"layers.{i}."
    yield out + "self_attn.qkv_proj.weight", take(hf, p + "self_attn.qkv_proj.weight")  # [q; k; v] rows
    if config.qkv_bias:
        yield out + "self_attn.qkv_proj.bias", take(hf, p + "self_attn.qkv_proj.bias")
    yield out + "self_attn.o_proj.weight", take(hf, p + "self_attn.o_proj.weight")
    yield out + "mlp.gate_up_proj.weight", take(hf, p + "mlp.gate_up_proj.weight")  # [gate; up] rows
    yield out + "mlp.down_proj.weight", take(hf, p + "mlp.down_proj.weight")
    yield out + "input_layernorm.weight", take(hf, p + "input_layernorm.weight")
    yield out + "post_attention_layernorm.weight", take(hf, p + "post_attention_layernorm.weight")


def config_from_hf(cfg: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
    found = hf_common(cfg, generation)
    scaling = found["rope_scaling"]
    if scaling is not None and cfg.get("original_max_position_embeddings"):
        # transformers 4.x keeps LongRoPE's original context beside rope_scaling, not in it
        scaling = {"original_max_position_embeddings": int(cfg["original_max_position_embeddings"])} | scaling
    return ModelConfig(architecture="phi3", **(found | {"rope_scaling": scaling}))


def config_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = hf_common_out(c)
    original = (c.rope_scaling or {}).get("original_max_position_embeddings")
    if original:  # (Phi-3's config keeps LongRoPE's original context beside its rope parameters too)
        out["original_max_position_embeddings"] = original
    return out


def config_from_gguf(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """(LongRoPE's factors are tensors in the file: loaders/gguf.py reads them into rope_scaling.)"""
    return ModelConfig(architecture="phi3", **gguf_common(meta, "phi3", tensor_names))


# llama.cpp keeps Phi-3's fused projections fused
PHI3_GGUF_NAMES = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
                   "attn_qkv.weight": "self_attn.qkv_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
                   "ffn_up.weight": "mlp.gate_up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight"}
PHI3 = ModelSpec("phi3", ("Phi3ForCausalLM", "phi3"), config_from_hf, layer_tensors, gguf_arch="phi3",
                 config_from_gguf=config_from_gguf, gguf_layer_names=PHI3_GGUF_NAMES,
                 config_to_hf=config_to_hf)
