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
from miaotui.layers.moe import MoE
from miaotui.layers.rope import rope_frequencies
from miaotui.loaders.gguf_kquants import ENCODED, encode
from miaotui.loaders.gguf_mixes import EXPORT_TYPES, ExportType, matrix_type
from miaotui.loaders.layer_pieces import dense_piece, layer_pieces, weight_piece
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.config import ModelConfig
from miaotui.models.registry import spec_named
from miaotui.models.transformer import Transformer


def _weight(module: torch.nn.Module) -> np.ndarray:
    return dense_piece(weight_piece(module)).cpu().numpy()


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


def export_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, type_name: str,
                importance: dict[str, torch.Tensor] | None = None, encoded: dict[str, np.ndarray] | None = None
                ) -> Path:
    """type_name: a single type or a named mix (gguf_mixes.EXPORT_TYPES). importance: {module name:
    E[x_j^2] [K]} (compress/importance.py): block rounding weighted by it, as with llama.cpp's imatrix.
    encoded: {GGUF name: bytes} already in the file's type (compress/quantize/gguf_gptq.py), rows in
    miaotui's order; written as they are."""
    if type_name not in EXPORT_TYPES:
        raise MiaotuiError(f"unknown GGUF type '{type_name}' (use one of {', '.join(EXPORT_TYPES)})")
    c = model.config
    arch = spec_named(c.architecture).gguf_export_arch
    if arch is None:
        raise MiaotuiError(f"GGUF export of architecture '{c.architecture}' is not supported (llama.cpp has no "
                           f"such architecture)")
    if arch == "gemma2" and model.lm_head is not None:
        raise MiaotuiError("GGUF export of a Gemma 2 with an untied output head is not supported (llama.cpp's "
                           "gemma2 reads the embedding as its head)")
    rope_type = (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type"))
    if rope_type not in (None, "default", "linear", "yarn", "llama3", "freq_factors", "longrope", "su"):
        raise MiaotuiError(f"GGUF export of rope scaling '{rope_type}' is not supported")
    tokens, types, merges = _tokenizer_fields(tokenizer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    w = gguf.GGUFWriter(str(tmp), arch)
    w.add_name(f"miaotui export ({type_name})")
    kind = EXPORT_TYPES[type_name]
    w.add_file_type(kind.file_type)
    _add_model_fields(w, c, arch, rope_type)
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

    plan = _tensor_plan(model, arch, kind)
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
        for name, shape, qtype, (_, get) in by_layer[index]:
            if encoded is not None and name in encoded:
                w.write_tensor_data(_given(encoded[name], name, shape, qtype, c, arch))
                continue
            array = np.ascontiguousarray(get(model) if arrays is None else arrays[get], dtype=np.float32)
            assert array.shape == shape
            w.write_tensor_data(_encode(array, qtype, _importance_of(importance, index, name, get)))
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


# a GGUF role -> the module whose input its columns multiply (experts: '{e}')
_IMPORTANCE_MODULE = {"attn_q": "self_attn.qkv_proj", "attn_k": "self_attn.qkv_proj", "attn_v": "self_attn.qkv_proj",
                      "attn_qkv": "self_attn.qkv_proj", "attn_output": "self_attn.o_proj",
                      "ffn_gate": "mlp.gate_up_proj", "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj",
                      "ffn_gate_exps": "mlp.experts.{e}.gate_up_proj", "ffn_up_exps": "mlp.experts.{e}.gate_up_proj",
                      "ffn_down_exps": "mlp.experts.{e}.down_proj"}


def _importance_of(importance: dict[str, torch.Tensor] | None, index: int, name: str, get: Any
                   ) -> list[torch.Tensor | None] | torch.Tensor | None:
    """The importance vector(s) of one planned tensor: per expert for stacked experts."""
    if importance is None:
        return None
    if index < 0:
        return importance.get("lm_head") if name == "output.weight" else None
    module = _IMPORTANCE_MODULE.get(get)
    if module is None:
        return None
    if "{e}" in module:
        found = []
        e = 0
        while f"layers.{index}.{module.format(e=e)}" in importance:
            found.append(importance[f"layers.{index}.{module.format(e=e)}"])
            e += 1
        return found or None
    return importance.get(f"layers.{index}.{module}")


def _given(data: np.ndarray, name: str, shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType, c: ModelConfig,
           arch: str) -> np.ndarray:
    """Bytes encoded elsewhere, checked against the plan; q/k rows into llama.cpp's order for its 'llama'."""
    expected = _info(shape, qtype)[0]
    if tuple(data.shape) != tuple(expected):
        raise MiaotuiError(f"'{name}': encoded data is {tuple(data.shape)}, the file's {qtype.name} needs {expected}")
    role = name.split(".")[2] if name.startswith("blk.") else ""
    if arch == "llama" and role in ("attn_q", "attn_k"):
        data = _permute_rope_rows(data, c.num_heads if role == "attn_q" else c.num_kv_heads)
    return np.ascontiguousarray(data)


def _encode(array: np.ndarray, qtype: gguf.GGMLQuantizationType,
            importance: list[torch.Tensor | None] | torch.Tensor | None = None) -> np.ndarray:
    if qtype == gguf.GGMLQuantizationType.F32:
        return array
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    legacy = qtype in (gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q4_1)
    if qtype not in ENCODED or (legacy and importance is None):
        return gguf.quants.quantize(array, qtype).view(np.uint8)
    matrices = array.reshape(-1, *array.shape[-2:])  # stacked experts [E, N, K]: one matrix each
    weights = importance if isinstance(importance, list) else [importance] * len(matrices)
    out = [encode(torch.from_numpy(m), qtype, imp) for m, imp in zip(matrices, weights, strict=True)]
    return np.stack(out).reshape(*array.shape[:-1], -1) if array.ndim == 3 else out[0]


def _add_model_fields(w: gguf.GGUFWriter, c: ModelConfig, arch: str, rope_type: str | None) -> None:
    """The hyper-parameters under llama.cpp's keys for `arch`."""
    w.add_block_count(c.num_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)  # (Mixtral's: its experts' width)
    w.add_head_count(c.num_heads)
    w.add_head_count_kv(c.num_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.rotary_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_theta)
    scaling = c.rope_scaling or {}
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(scaling["factor"]))
    elif rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(scaling["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings")
                                            or c.max_position_embeddings))
    elif rope_type in ("longrope", "su"):  # the factors themselves are tensors (rope_factors_*)
        rope = rope_frequencies(c.rotary_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(rope.long_from)
        w.add_rope_scaling_attn_factors(rope.attention_factor)
    if c.num_experts:
        w.add_expert_count(c.num_experts)
        w.add_expert_used_count(c.experts_per_token)
        if arch != "llama":
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
    if c.sliding_window is not None and arch != "llama":  # (llama.cpp's 'llama' has no window: Mistral's is lost)
        w.add_sliding_window(c.sliding_window)
    if c.attn_softcap is not None:
        w.add_attn_logit_softcapping(c.attn_softcap)
    if c.final_softcap is not None:
        w.add_final_logit_softcapping(c.final_softcap)
    if c.local_rope_theta is not None:
        w.add_rope_freq_base_swa(c.local_rope_theta)


def _rope_tensors(c: ModelConfig, rope_type: str | None) -> list[tuple[str, np.ndarray]]:
    """Rope scaling llama.cpp reads from tensors: per-frequency divisors (Llama 3.1's rope_freqs),
    LongRoPE's short and long divisors (Phi-3's rope_factors_*)."""
    scaling = c.rope_scaling or {}
    if rope_type in ("llama3", "freq_factors"):
        base = rope_frequencies(c.rotary_dim, c.rope_theta, None).inv_freq
        scaled = rope_frequencies(c.rotary_dim, c.rope_theta, c.rope_scaling, c.max_position_embeddings).inv_freq
        return [("rope_freqs.weight", (base / scaled).numpy())]
    if rope_type in ("longrope", "su"):
        return [(f"rope_factors_{kind}.weight", np.asarray(scaling[f"{kind}_factor"], dtype=np.float32))
                for kind in ("long", "short")]
    return []


def _layer_shapes(layer: torch.nn.Module, c: ModelConfig, arch: str) -> dict[str, tuple[int, ...]]:
    """A decoder layer's GGUF tensors (names inside 'blk.N.', without '.weight' for matrices and
    norms) and numpy shapes, from its modules' shapes alone (a streamed layer is not read yet)."""
    attn, d = layer.self_attn, c.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if arch == "phi3":  # llama.cpp keeps Phi-3's fused projections fused
        shapes["attn_qkv"] = (c.q_size + 2 * c.kv_size, d)
    else:
        shapes |= {"attn_q": (c.q_size, d), "attn_k": (c.kv_size, d), "attn_v": (c.kv_size, d)}
    shapes["attn_output"] = (d, attn.o_proj.in_features)
    if attn.qkv_proj.bias is not None:
        shapes |= {"attn_q.bias": (c.q_size,), "attn_k.bias": (c.kv_size,), "attn_v.bias": (c.kv_size,)}
    if attn.q_norm is not None:
        shapes |= {"attn_q_norm": (c.head_dim,), "attn_k_norm": (c.head_dim,)}
    mlp = layer.mlp
    if isinstance(mlp, MoE):
        n, inter = len(mlp.experts), mlp.experts[0].down_proj.in_features
        shapes |= {"ffn_gate_inp": (n, d), "ffn_gate_exps": (n, inter, d), "ffn_up_exps": (n, inter, d),
                   "ffn_down_exps": (n, d, inter)}
    elif arch == "phi3":
        shapes |= {"ffn_up": (2 * mlp.down_proj.in_features, d), "ffn_down": (d, mlp.down_proj.in_features)}
    else:
        inter = mlp.down_proj.in_features
        shapes |= {"ffn_gate": (inter, d), "ffn_up": (inter, d), "ffn_down": (d, inter)}
    shapes |= {"attn_norm": (d,), "ffn_norm": (d,)}
    if layer.attn_out_norm is not None:
        shapes |= {"post_attention_norm": (d,), "post_ffw_norm": (d,)}
    return shapes


def _tensor_plan(model: Transformer, arch: str, kind: ExportType
                 ) -> list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType, tuple[int, Any]]]:
    """(GGUF name, numpy shape, type, (layer index or -1, how to get it)) for every tensor, in file
    order, from the modules' shapes alone (a streamed model's layers are not read yet)."""
    c, f32 = model.config, gguf.GGMLQuantizationType.F32
    d = c.hidden_size
    rope_type = (c.rope_scaling or {}).get("rope_type", (c.rope_scaling or {}).get("type"))
    n, experts, tied = c.num_layers, c.num_experts, model.lm_head is None

    def pick(role: str, shape: tuple[int, ...], layer: int = 0) -> gguf.GGMLQuantizationType:
        return matrix_type(kind, role, layer, n, shape[-1], experts, tied)

    plan = [("token_embd.weight", (c.vocab_size, d), pick("token_embd", (c.vocab_size, d)),
             (-1, lambda m: m.embed_tokens.weight.detach().float().numpy())),
            ("output_norm.weight", (d,), f32, (-1, lambda m: m.norm.weight.detach().float().numpy()))]
    plan += [(name, array.shape, f32, (-1, lambda m, a=array: a)) for name, array in _rope_tensors(c, rope_type)]
    if model.lm_head is not None:
        plan.append(("output.weight", (c.vocab_size, d), pick("output", (c.vocab_size, d)),
                     (-1, lambda m: _weight(m.lm_head))))
    for i, layer in enumerate(model.layers):
        for name, shape in _layer_shapes(layer, c, arch).items():
            qtype = pick(name, shape, i) if len(shape) >= 2 and name != "ffn_gate_inp" else f32
            # (the router stays F32)
            full = f"blk.{i}.{name}" if name.endswith(".bias") else f"blk.{i}.{name}.weight"
            plan.append((full, shape, qtype, (i, name)))
    return plan


def _layer_arrays(layer: torch.nn.Module, c: ModelConfig, arch: str) -> dict[str, np.ndarray]:
    """One decoder layer's tensors under their GGUF names (_layer_shapes' keys; q/k rows in
    llama.cpp's rope order where its architecture interleaves them)."""
    out: dict[str, np.ndarray] = {}
    for role, piece in layer_pieces(layer, c, fused=arch == "phi3").items():
        # (Gemma's norms are kept as their multipliers 1 + w: what llama.cpp's converter writes too)
        array = np.stack([dense_piece(p).numpy() for p in piece]) if isinstance(piece, list) \
            else dense_piece(piece).numpy()
        if arch == "llama" and role.startswith(("attn_q", "attn_k")) and "norm" not in role:
            # llama.cpp's converter interleaves q/k rows for its "llama" only
            array = _permute_rope_rows(array, c.num_heads if role.startswith("attn_q") else c.num_kv_heads)
        out[role] = array
    return out
