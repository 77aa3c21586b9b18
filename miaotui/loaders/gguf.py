"""Read a GGUF file: config from its metadata, every tensor dequantized to float32, its tokenizer.

Not for writing GGUF (export lives with quantization) or for running the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, GGUFValueType
from gguf.quants import dequantize

from miaotui.errors import MiaotuiError
from miaotui.loaders.tokenizer import Tokenizer, tokenizer_from_gguf_metadata
from miaotui.models.config import ModelConfig

GGUF_MAGIC = b"GGUF"
# GGUF architectures we read, and whether llama.cpp's converter permuted their q/k rows.
_GGUF_ARCHITECTURES = {"llama": True, "qwen2": False}

_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


def open_gguf(path: str | Path) -> GGUFReader:
    """Open and validate a GGUF file, turning every way it can be broken into a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise MiaotuiError(f"model file '{path}' does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise MiaotuiError(f"'{path}' is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # the gguf package raises assorted errors on corrupt headers
        raise MiaotuiError(f"model file '{path}' is corrupt or truncated ({type(exc).__name__}: {exc})") from None
    size = os.path.getsize(path)
    expected = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if expected > size:
        raise MiaotuiError(f"model file '{path}' is truncated (expected {expected:,} bytes, found {size:,})")
    return reader


def gguf_metadata(reader: GGUFReader) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    for key, fld in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if fld.types and fld.types[0] == GGUFValueType.ARRAY and len(fld.types) > 1 \
                and fld.types[1] == GGUFValueType.STRING:
            meta[key] = [bytes(fld.parts[i]).decode("utf-8", errors="replace") for i in fld.data]
        else:
            meta[key] = fld.contents()
    return meta


def config_from_gguf_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    arch = meta.get("general.architecture", "<missing>")
    if arch not in _GGUF_ARCHITECTURES:
        raise MiaotuiError(f"unsupported model architecture '{arch}' in GGUF file "
                           f"(miaotui reads GGUF: {', '.join(_GGUF_ARCHITECTURES)})")

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise MiaotuiError(f"GGUF metadata lacks '{arch}.{key}'")
        return value

    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    rope_scaling = None
    if meta.get(f"{arch}.rope.scaling.type") == "linear":
        rope_scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eot = meta.get("tokenizer.ggml.eot_token_id")
    eos_ids = sorted({int(i) for i in (eos, eot) if i is not None})
    return ModelConfig(
        architecture=arch,
        vocab_size=int(meta.get(f"{arch}.vocab_size") or len(meta.get("tokenizer.ggml.tokens") or [])),
        hidden_size=hidden,
        intermediate_size=int(get("feed_forward_length")),
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(meta.get(f"{arch}.attention.key_length") or hidden // heads),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        max_position_embeddings=int(get("context_length", 2048)),
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half pairs)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer]:
    """-> (config, Hugging Face-named float32 tensors, tokenizer)."""
    reader = open_gguf(path)
    meta = gguf_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = config_from_gguf_metadata(meta, names)
    permuted = _GGUF_ARCHITECTURES[config.architecture]
    if "rope_freqs.weight" in names:
        # Llama 3.1 GGUFs carry their rope scaling as per-frequency divisors.
        factors = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        config.rope_scaling = {"rope_type": "freq_factors", "factors": dequantize(factors.data, factors.tensor_type)
                               .astype(np.float32).tolist()}
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        hf_name = _hf_name(t.name)
        if hf_name is None:
            continue
        array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            array = _unpermute_rope_rows(array, config.num_heads)
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            array = _unpermute_rope_rows(array, config.num_kv_heads)
        if not (array.flags.writeable and array.flags.c_contiguous):
            array = array.copy(order="C")  # F32 tensors are read-only views of the memory map
        tensors[hf_name] = torch.from_numpy(array)
    tokenizer = tokenizer_from_gguf_metadata(meta, config.eos_token_ids)
    return config, tensors, tokenizer


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
    return None
