"""The ModelConfig fields every family shares, read from a Hugging Face config.json or from GGUF
metadata; each model file adds what its family has beyond them.

Not for choosing the family (models/registry.py).
"""

from __future__ import annotations

from typing import Any

from miaotui.errors import MiaotuiError
from miaotui.models.config import FULL, SLIDING, ModelConfig


def hf_rope(cfg: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling): transformers 5 writes them under rope_parameters, 4.x as
    rope_theta / rope_scaling."""
    params = cfg.get("rope_parameters") or {}
    theta = float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)
    scaling = cfg.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    return theta, scaling


def hf_common(cfg: dict[str, Any], generation: dict[str, Any]) -> dict[str, Any]:
    """ModelConfig keyword arguments from config.json (Llama's field names, which most families keep)."""
    try:
        heads = int(cfg["num_attention_heads"])
        theta, scaling = hf_rope(cfg)
        eos_ids: set[int] = set()
        for source in (cfg, generation):
            value = source.get("eos_token_id")
            eos_ids.update(value if isinstance(value, list) else [value] if value is not None else [])
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window", True) else None
        layer_types = cfg.get("layer_types")
        if layer_types is not None and SLIDING not in layer_types:
            window, layer_types = None, None  # (Qwen's configs name a window no layer uses)
        if window is None:
            layer_types = None
        return dict(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            intermediate_size=int(cfg.get("intermediate_size") or 0),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=sorted(eos_ids),
            sliding_window=int(window) if window else None,
            layer_types=[t if t in (SLIDING, FULL) else FULL for t in layer_types] if layer_types else None,
            partial_rotary_factor=float(cfg.get("partial_rotary_factor") or 1.0),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise MiaotuiError(f"config.json lacks or garbles a model field: {exc}") from None


def gguf_common(meta: dict[str, Any], arch: str, tensor_names: set[str]) -> dict[str, Any]:
    """ModelConfig keyword arguments from GGUF metadata (keys '<arch>.<field>', llama.cpp's names)."""

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise MiaotuiError(f"GGUF metadata lacks '{arch}.{key}'")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    rope_scaling = None
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    elif kind == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": float(get("rope.scaling.factor")),
                        "original_max_position_embeddings": int(get("rope.scaling.original_context_length"))}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // heads)
    rope_dims = meta.get(f"{arch}.rope.dimension_count")
    window = meta.get(f"{arch}.attention.sliding_window")
    return dict(
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length", 0)),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=sorted({int(i) for i in (eos, eot) if i is not None}),
        sliding_window=int(window) if window else None,
        partial_rotary_factor=int(rope_dims) / head_dim if rope_dims else 1.0,
    )


def hf_rope_out(theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    """rope_parameters as transformers 5 writes them (the inverse of hf_rope)."""
    scaling = dict(scaling or {})
    kind = scaling.pop("rope_type", scaling.pop("type", "default"))
    return {"rope_type": kind, "rope_theta": theta} | scaling


def hf_common_out(c: ModelConfig) -> dict[str, Any]:
    """config.json fields under Llama's names (the inverse of hf_common): what every family writes."""
    out: dict[str, Any] = dict(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_parameters=hf_rope_out(c.rope_theta, c.rope_scaling),
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        attention_bias=c.qkv_bias, hidden_act="silu", bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_ids[0] if len(c.eos_token_ids) == 1 else list(c.eos_token_ids) or None,
        sliding_window=c.sliding_window, use_sliding_window=c.sliding_window is not None,
    )
    if c.layer_types is not None:
        out["layer_types"] = list(c.layer_types)
    if c.partial_rotary_factor != 1.0:
        out["partial_rotary_factor"] = c.partial_rotary_factor
    return out
