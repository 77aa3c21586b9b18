"""Gemma 2 and Gemma 3 (text): four RMSNorms a layer (before and after attention and MLP), norms
that scale by (1 + w), GeGLU, embeddings scaled by sqrt(hidden), a query scale of its own,
interleaved sliding-window and global layers; Gemma 2 soft-caps attention scores and logits,
Gemma 3 normalises q and k heads and gives its sliding layers their own rope base.

miaotui keeps every (1 + w) norm as the multiplier it is (computed in float32 at load), so the
modules are plain RMSNorms: the same weights llama.cpp's converter writes to GGUF.
Not for the vision tower of Gemma 3's multimodal checkpoints.
"""

from __future__ import annotations

import math
from typing import Any

from miaotui.models.config import FULL, SLIDING, ModelConfig
from miaotui.models.config_sources import gguf_common, hf_common, hf_common_out, hf_rope, hf_rope_out
from miaotui.models.spec import LLAMA_GGUF_NAMES, ModelSpec
from miaotui.models.weights import Named, Tensors, gated_mlp, plus_one, split_qkv_attention, take

# llama.cpp's names for Gemma: Llama's, with its four norms (ffn_norm is the pre-MLP one) and no biases
GEMMA_GGUF_NAMES = {k: v for k, v in LLAMA_GGUF_NAMES.items() if not k.endswith(".bias")} | {
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight", "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
}
SLIDING_PATTERN = {"gemma2": 2, "gemma3": 6}  # every n-th layer is global, the others slide


def global_tensors(config: ModelConfig, hf: Tensors) -> Named:
    yield "embed_tokens.weight", take(hf, "model.embed_tokens.weight")
    yield "norm.weight", plus_one(take(hf, "model.norm.weight"))
    if not config.tie_word_embeddings:
        yield "lm_head.weight", take(hf, "lm_head.weight")


def layer_tensors(config: ModelConfig, hf: Tensors, i: int) -> Named:
    p, out = f"model.layers.{i}.", f"layers.{i}."
    for name, tensor in split_qkv_attention(config, hf, i, p + "self_attn."):
        yield name, plus_one(tensor) if name.endswith("norm.weight") else tensor
    yield from gated_mlp(hf, p + "mlp.", out + "mlp.")
    for ours, theirs in (("input_layernorm", "input_layernorm"), ("attn_out_norm", "post_attention_layernorm"),
                         ("post_attention_layernorm", "pre_feedforward_layernorm"),
                         ("mlp_out_norm", "post_feedforward_layernorm")):
        yield f"{out}{ours}.weight", plus_one(take(hf, f"{p}{theirs}.weight"))


def _layer_types(name: str, layers: int) -> list[str]:
    pattern = SLIDING_PATTERN[name]
    return [SLIDING if (i + 1) % pattern else FULL for i in range(layers)]


def _from_hf(name: str):
    def parse(cfg: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
        found = hf_common(cfg, generation)
        if found["sliding_window"] is not None and found["layer_types"] is None:  # transformers 4.x configs
            pattern = cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern")
            found["layer_types"] = [SLIDING if (i + 1) % pattern else FULL for i in range(found["num_layers"])] \
                if pattern else _layer_types(name, found["num_layers"])
        params = cfg.get("rope_parameters") or {}
        local_theta = None
        if name == "gemma3":
            if FULL in params:  # transformers 5: one rope per layer type
                found["rope_theta"], found["rope_scaling"] = hf_rope({"rope_parameters": params[FULL]})
                local_theta = float(params.get(SLIDING, {}).get("rope_theta", 10000.0))
            else:
                local_theta = float(cfg.get("rope_local_base_freq", 10000.0))
        found["tie_word_embeddings"] = bool(cfg.get("tie_word_embeddings", True))  # Gemma ties by default
        act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
        return ModelConfig(
            architecture=name, **found, qk_norm=name == "gemma3",
            hidden_act="gelu_tanh" if "gelu" in act else act, sandwich_norms=True,
            embed_scale=math.sqrt(found["hidden_size"]),
            query_scale=float(cfg.get("query_pre_attn_scalar") or found["head_dim"]) ** -0.5,
            attn_softcap=cfg.get("attn_logit_softcapping"), final_softcap=cfg.get("final_logit_softcapping"),
            local_rope_theta=local_theta,
        )
    return parse


def _scalar(value: float) -> int | float:
    """query_pre_attn_scalar back from its inverse square root: the integer it was, where it was one."""
    return round(value) if abs(value - round(value)) < 1e-6 * value else value


def _to_hf(c: ModelConfig) -> dict[str, Any]:
    out = hf_common_out(c) | {
        "hidden_activation": "gelu_pytorch_tanh", "hidden_act": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": _scalar((c.query_scale or c.head_dim ** -0.5) ** -2),
        "attn_logit_softcapping": c.attn_softcap, "final_logit_softcapping": c.final_softcap}
    if c.architecture == "gemma3":
        out["rope_parameters"] = {FULL: hf_rope_out(c.rope_theta, c.rope_scaling),
                                  SLIDING: hf_rope_out(c.local_rope_theta or 10000.0, None)}
    return out


def _from_gguf(name: str):
    def parse(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
        found = gguf_common(meta, name, tensor_names)
        layers, hidden, heads = found["num_layers"], found["hidden_size"], found["num_heads"]
        # llama.cpp's own rule (its converter keeps no query_pre_attn_scalar): the 27B models scale
        # by hidden / heads, the others by the head size
        big = layers == (46 if name == "gemma2" else 62)
        scale = (hidden / heads) ** -0.5 if big else found["head_dim"] ** -0.5
        softcaps = {k: meta.get(f"{name}.{k}") for k in ("attn_logit_softcapping", "final_logit_softcapping")}
        return ModelConfig(
            architecture=name, **(found | {"layer_types": _layer_types(name, layers)}),
            qk_norm=name == "gemma3", hidden_act="gelu_tanh", sandwich_norms=True, embed_scale=math.sqrt(hidden),
            query_scale=scale, attn_softcap=softcaps["attn_logit_softcapping"],
            final_softcap=softcaps["final_logit_softcapping"],
            local_rope_theta=float(meta.get(f"{name}.rope.freq_base_swa", 10000.0)) if name == "gemma3" else None,
        )
    return parse


GEMMA2 = ModelSpec("gemma2", ("Gemma2ForCausalLM", "gemma2"), _from_hf("gemma2"), layer_tensors,
                   global_tensors=global_tensors, gguf_arch="gemma2", config_from_gguf=_from_gguf("gemma2"),
                   gguf_layer_names=GEMMA_GGUF_NAMES, gguf_norm_plus_one=True, config_to_hf=_to_hf)
GEMMA3 = ModelSpec("gemma3", ("Gemma3ForCausalLM", "gemma3_text"), _from_hf("gemma3"), layer_tensors,
                   global_tensors=global_tensors, gguf_arch="gemma3", config_from_gguf=_from_gguf("gemma3"),
                   gguf_layer_names=GEMMA_GGUF_NAMES, gguf_norm_plus_one=True, config_to_hf=_to_hf)
