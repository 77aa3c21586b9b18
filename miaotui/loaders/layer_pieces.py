"""A decoder layer's tensors under llama.cpp's role names ('attn_q', 'ffn_down', 'ffn_up_exps', ...),
for the writers: gguf_export.py maps them to GGUF names, hf_export.py (through each family's
gguf_layer_names) to Hugging Face names. Integer layers stay their codes (QuantizedTensor), so a
writer that keeps them (compressed-tensors) never makes a float copy.

Not for GGUF's own row order or norm conventions (the writers apply those).
"""

from __future__ import annotations

import torch

from miaotui.layers.moe import MoE
from miaotui.layers.quant_formats import QuantizedTensor
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.models.config import ModelConfig

Piece = torch.Tensor | QuantizedTensor


def weight_piece(module: torch.nn.Module) -> Piece:
    """A linear layer's weight [N, K]: its codes if it is integer, else its float32 weight."""
    if isinstance(module, QuantLinear) and module.packed is not None:
        return QuantizedTensor(module.fmt, module.codes(), module.scale.float(), module.zero.float(),
                               module.act_quant, module.input_order)
    if isinstance(module, QuantLinear):  # kept in the decode kernel's layout alone
        return module.dequantized_weight()
    return module.weight.detach().float()


def dense_piece(piece: Piece) -> torch.Tensor:
    return piece.dequantize() if isinstance(piece, QuantizedTensor) else piece


def split_piece(piece: Piece, sizes: list[int]) -> list[Piece]:
    return piece.split_rows(sizes) if isinstance(piece, QuantizedTensor) else list(piece.split(sizes))


def _vector(norm: torch.nn.Module) -> torch.Tensor:
    return norm.weight.detach().float()


def layer_pieces(layer: torch.nn.Module, c: ModelConfig, fused: bool) -> dict[str, Piece | list[Piece]]:
    """One decoder layer: {role: tensor}, matrices [N, K], norms as the multipliers miaotui holds
    (Gemma's 1 + w), experts as a list of per-expert matrices. fused: q/k/v and gate/up stay one
    matrix each ('attn_qkv', and 'ffn_up' holding [gate; up]), as Phi-3 stores them."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = weight_piece(attn.qkv_proj)
    sizes = [c.q_size, c.kv_size, c.kv_size]
    out: dict[str, Piece | list[Piece]] = {}
    if fused:
        out["attn_qkv"] = qkv
    else:
        out |= dict(zip(("attn_q", "attn_k", "attn_v"), split_piece(qkv, sizes), strict=True))
    out["attn_output"] = weight_piece(attn.o_proj)
    if attn.qkv_proj.bias is not None:
        bias = attn.qkv_proj.bias.detach().float()
        out |= dict(zip(("attn_q.bias", "attn_k.bias", "attn_v.bias"), bias.split(sizes), strict=True))
    if attn.q_norm is not None:
        out |= {"attn_q_norm": _vector(attn.q_norm), "attn_k_norm": _vector(attn.k_norm)}
    if isinstance(mlp, MoE):
        halves = [split_piece(weight_piece(e.gate_up_proj), [e.down_proj.in_features] * 2) for e in mlp.experts]
        out |= {"ffn_gate_inp": dense_piece(weight_piece(mlp.router)),
                "ffn_gate_exps": [g for g, _ in halves], "ffn_up_exps": [u for _, u in halves],
                "ffn_down_exps": [weight_piece(e.down_proj) for e in mlp.experts]}
    elif fused:
        out |= {"ffn_up": weight_piece(mlp.gate_up_proj), "ffn_down": weight_piece(mlp.down_proj)}
    else:
        gate, up = split_piece(weight_piece(mlp.gate_up_proj), [mlp.down_proj.in_features] * 2)
        out |= {"ffn_gate": gate, "ffn_up": up, "ffn_down": weight_piece(mlp.down_proj)}
    out |= {"attn_norm": _vector(layer.input_layernorm), "ffn_norm": _vector(layer.post_attention_layernorm)}
    if layer.attn_out_norm is not None:
        out |= {"post_attention_norm": _vector(layer.attn_out_norm), "post_ffw_norm": _vector(layer.mlp_out_norm)}
    return out
