"""Write any loaded model as a GGUF file that llama.cpp runs and the gguf reader reads back.

Weights are (re)quantized with the gguf package: linear weights to the chosen type; for 4-bit
types the token embedding goes to Q8_0 (as llama.cpp's own quantizer does); norms stay F32.
Quantized miaotui models are dequantized first. The header is written from the modules' shapes,
then the data a decoder layer at a time, so a streamed model (compress/streamed.py) is exported
holding one float32 layer. Not for reading GGUF (gguf.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from miaotui.compress.streamed import layers_of
from miaotui.errors import MiaotuiError
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.config import ModelConfig
from miaotui.models.transformer import Transformer

EXPORT_TYPES = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                "bf16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                "q4_0": gguf.GGMLQuantizationType.Q4_0, "q4_1": gguf.GGMLQuantizationType.Q4_1}
_FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
               "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
               "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}


def _weight(module: torch.nn.Module) -> np.ndarray:
    w = module.dequantized_weight() if isinstance(module, QuantLinear) else module.weight.detach().float()
    return w.cpu().numpy()


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """rotate-half rows -> llama.cpp's interleaved layout (inverse of the loader's un-permute)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_fields(tokenizer: Tokenizer) -> tuple[list[str], list[int], list[str]]:
    spec = json.loads(tokenizer.backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise MiaotuiError("GGUF export supports byte-level BPE tokenizers (GPT-2 style) only")
    vocab: dict[str, int] = dict(model["vocab"])
    for added in spec.get("added_tokens", []):
        vocab.setdefault(added["content"], added["id"])
    tokens = [""] * (max(vocab.values()) + 1)
    for text, idx in vocab.items():
        tokens[idx] = text
    types = [1] * len(tokens)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = 3 if added.get("special") else 4
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def export_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, type_name: str) -> Path:
    if type_name not in EXPORT_TYPES:
        raise MiaotuiError(f"unknown GGUF type '{type_name}' (use one of {', '.join(EXPORT_TYPES)})")
    c = model.config
    arch = "qwen2" if c.architecture == "qwen2" else "llama"
    if c.rope_scaling and c.rope_scaling.get("rope_type") not in (None, "default", "linear"):
        raise MiaotuiError(f"GGUF export of rope scaling '{c.rope_scaling.get('rope_type')}' is not supported")
    tokens, types, merges = _tokenizer_fields(tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"miaotui export ({type_name})")
    w.add_file_type(_FILE_TYPES[type_name])
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    if c.rope_scaling and c.rope_scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(c.rope_scaling["factor"]))
    w.add_vocab_size(c.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer.gguf_pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        w.add_bos_token_id(tokenizer.bos_token_id)
    if c.eos_token_ids:
        w.add_eos_token_id(c.eos_token_ids[0])
    w.add_add_bos_token(tokenizer.backend.post_processor is not None and tokenizer.bos_token is not None
                        and tokenizer.encode("a")[:1] == [tokenizer.bos_token_id])
    if tokenizer.chat_template:
        w.add_chat_template(tokenizer.chat_template)

    main_type = EXPORT_TYPES[type_name]
    embed_type = gguf.GGMLQuantizationType.Q8_0 if type_name in ("q4_0", "q4_1") else main_type
    plan = _tensor_plan(model, arch, main_type, embed_type)
    for name, shape, qtype, _ in plan:  # every tensor's name, type and size first: the header
        w.add_tensor_info(name, *_info(shape, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    # then the data, a decoder layer at a time (a streamed model reads each from its checkpoint)
    store = layers_of(model)
    by_layer: dict[int, list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, Any]]] = {}
    for entry in plan:
        by_layer.setdefault(entry[3][0], []).append(entry)
    for index in tqdm(sorted(by_layer), desc=f"export {type_name}", unit="layer"):
        layer = store.load(index) if index >= 0 else None
        arrays = _layer_arrays(layer, c, arch) if layer is not None else None
        for _name, shape, qtype, (_, get) in by_layer[index]:
            array = np.ascontiguousarray(get(model) if arrays is None else arrays[get], dtype=np.float32)
            assert array.shape == shape
            w.write_tensor_data(_encode(array, qtype))
        if layer is not None:
            store.release(index)
    w.close()
    tmp.replace(path)
    return path


def _info(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, bytes) for GGUFWriter.add_tensor_info, as `_encode` will write the tensor."""
    n = int(np.prod(shape))
    if qtype == gguf.GGMLQuantizationType.F32:
        return shape, np.dtype(np.float32), n * 4
    if qtype == gguf.GGMLQuantizationType.F16:
        return shape, np.dtype(np.float16), n * 2
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    return gguf.quants.quantize(array, qtype).view(np.uint8)


def _tensor_plan(model: Transformer, arch: str, main_type: gguf.GGMLQuantizationType,
                 embed_type: gguf.GGMLQuantizationType) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType,
                                                                    tuple[int, Any]]]:
    """(GGUF name, numpy shape, type, (layer index or -1, how to get it)) for every tensor, in file
    order, from the modules' shapes alone (a streamed model's layers are not read yet)."""
    c, f32 = model.config, gguf.GGMLQuantizationType.F32
    d = c.hidden_size
    plan = [("token_embd.weight", (c.vocab_size, d), embed_type, (-1, lambda m: m.embed_tokens.weight.detach().float()
                                                                  .numpy())),
            ("output_norm.weight", (d,), f32, (-1, lambda m: m.norm.weight.detach().float().numpy()))]
    if model.lm_head is not None:
        plan.append(("output.weight", (c.vocab_size, d), embed_type, (-1, lambda m: _weight(m.lm_head))))
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        inter = mlp.down_proj.in_features
        shapes = {"attn_q": (c.q_size, d), "attn_k": (c.kv_size, d), "attn_v": (c.kv_size, d),
                  "attn_output": (d, attn.o_proj.in_features), "ffn_gate": (inter, d), "ffn_up": (inter, d),
                  "ffn_down": (d, inter)}
        for name, shape in shapes.items():
            plan.append((f"blk.{i}.{name}.weight", shape, main_type, (i, name)))
        if attn.qkv_proj.bias is not None:
            for name, size in (("attn_q", c.q_size), ("attn_k", c.kv_size), ("attn_v", c.kv_size)):
                plan.append((f"blk.{i}.{name}.bias", (size,), f32, (i, name + ".bias")))
        plan.append((f"blk.{i}.attn_norm.weight", (d,), f32, (i, "attn_norm")))
        plan.append((f"blk.{i}.ffn_norm.weight", (d,), f32, (i, "ffn_norm")))
    return plan


def _layer_arrays(layer: torch.nn.Module, c: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """One decoder layer's tensors under their GGUF names (q/k rows in llama.cpp's rope order)."""
    attn, mlp = layer.self_attn, layer.mlp
    q, k, v = np.split(_weight(attn.qkv_proj), [c.q_size, c.q_size + c.kv_size])
    if arch == "llama":
        q, k = _permute_rope_rows(q, c.num_heads), _permute_rope_rows(k, c.num_kv_heads)
    gate, up = np.split(_weight(mlp.gate_up_proj), 2)
    out = {"attn_q": q, "attn_k": k, "attn_v": v, "attn_output": _weight(attn.o_proj), "ffn_gate": gate,
           "ffn_up": up, "ffn_down": _weight(mlp.down_proj),
           "attn_norm": layer.input_layernorm.weight.detach().float().numpy(),
           "ffn_norm": layer.post_attention_layernorm.weight.detach().float().numpy()}
    if attn.qkv_proj.bias is not None:
        qb, kb, vb = np.split(attn.qkv_proj.bias.detach().float().numpy(), [c.q_size, c.q_size + c.kv_size])
        if arch == "llama":
            qb, kb = _permute_rope_rows(qb, c.num_heads), _permute_rope_rows(kb, c.num_kv_heads)
        out |= {"attn_q.bias": qb, "attn_k.bias": kb, "attn_v.bias": vb}
    return out
