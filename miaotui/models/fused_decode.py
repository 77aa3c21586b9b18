"""The decode step of consecutive decoder layers as one native op (kernels/decode_layer.cpp,
decode_layers), where every part of each layer has a native few-row kernel: bf16 activations,
integer weights on linear_q_tiles or bf16 weights on linear_bf16_tiles, and the paged cache's
fused attention. The op runs the same kernels in the same order as DecoderLayer.forward, so the
bits do not change; it only removes the per-module and per-op Python overhead (~15 calls a layer,
and one call per layer), which at small model sizes costs more than streaming the weights.

Not for choosing kernels (layers/kernel_choice.py) or for prefill (long rows run the modules).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from miaotui.kernels import native_op
from miaotui.layers.attention import Attention, KVView
from miaotui.layers.kernel_choice import BF16_TILES_MAX_ROWS, bf16_kernel, note_kernel, this_cpu
from miaotui.layers.linear import Linear
from miaotui.layers.norm import RMSNorm
from miaotui.layers.quantized_linear import QuantLinear

Q_TILES, BF16_TILES = 0, 1  # kernel ids of decode_layers' linear_info
FUSED_MAX_ROWS = BF16_TILES_MAX_ROWS  # the lowest row limit of the kernels the op runs (q tiles: 40, attention: 16)


@dataclass(frozen=True, slots=True)
class LayerPlan:
    """decode_layer's weight arguments for one layer and row count."""
    ln1: torch.Tensor
    ln2: torch.Tensor
    eps: float
    qkv: list[torch.Tensor]
    qkv_bias: torch.Tensor | None
    o: list[torch.Tensor]
    gate_up: list[torch.Tensor]
    down: list[torch.Tensor]
    linear_info: list[int]
    heads: int


def _linear(module: nn.Module, rows: int) -> tuple[list[torch.Tensor], list[int]] | None:
    """(tensors, [kernel, out features, bits, group width, zero code, exponent]) of one linear, or None."""
    if _hooked(module):
        return None
    if type(module) is QuantLinear:
        if module.act_quant or module.kernel_for(rows, torch.bfloat16) != "tiles_q":
            return None
        fmt = module.fmt
        tiles = module._q_tiles
        return tiles.tensors(), [Q_TILES, module.out_features, fmt.storage_bits, fmt.group_width(module.in_features),
                                 tiles.zero_code, tiles.exponent]
    if type(module) is Linear:
        if module.tiles is None or bf16_kernel(rows, module.in_features, torch.bfloat16, module.weight.dtype,
                                               this_cpu()) != "tiles_bf16":
            return None
        return [module.tiles], [BF16_TILES, module.out_features, 16, 0, 0, 0]
    return None


def _hooked(module: nn.Module) -> bool:
    """Forward hooks (tensor parallelism's all-reduce) must run: such layers keep the modules."""
    return bool(module._forward_hooks or module._forward_pre_hooks)


def layer_plan(layer: nn.Module, rows: int) -> LayerPlan | None:
    """The plan for a decode step of `rows` rows, or None where the layer must run its modules."""
    from miaotui.models.llama import DecoderLayer, SwiGLU

    if type(layer) is not DecoderLayer or rows > FUSED_MAX_ROWS:
        return None
    attn, mlp, ln1, ln2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
    if type(attn) is not Attention or type(mlp) is not SwiGLU or type(ln1) is not RMSNorm \
            or type(ln2) is not RMSNorm or any(_hooked(m) for m in (layer, attn, mlp, ln1, ln2)):
        return None
    if ln1.weight.dtype != torch.bfloat16 or ln2.weight.dtype != torch.bfloat16 or ln1.eps != ln2.eps:
        return None
    parts = [_linear(m, rows) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(p is None for p in parts) or any(m.bias is not None for m in (attn.o_proj, mlp.gate_up_proj,
                                                                          mlp.down_proj)):
        return None
    (qkv, qkv_info), (o, o_info), (gate_up, gu_info), (down, down_info) = parts
    return LayerPlan(ln1.weight, ln2.weight, ln1.eps, qkv, attn.qkv_proj.bias, o, gate_up, down,
                     qkv_info + o_info + gu_info + down_info, attn.num_heads)


def _sources(layer: nn.Module) -> tuple[object, ...]:
    """What a plan depends on, by identity: the layouts of the four linears and the norm weights."""
    attn, mlp = layer.self_attn, layer.mlp
    return tuple(getattr(m, "_q_tiles", None) if type(m) is QuantLinear else getattr(m, "tiles", None)
                 for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)) \
        + (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)


class FusedDecode:
    """The plans of one model's layers, built on first use per row count and rebuilt when a layer's
    layouts change (quantization, loading)."""

    def __init__(self) -> None:
        self._plans: dict[tuple[int, int], tuple[tuple[object, ...], LayerPlan | None]] = {}
        self._op = None
        # decode_layers' weight arguments for a run of plans, by the plans' identities (derived once)
        self._flat: dict[tuple[int, ...], tuple[list, ...]] = {}

    def step_fits(self, x: torch.Tensor, cos: torch.Tensor, kv_views: list[KVView] | None) -> bool:
        """Whether this step may run fused: an engine step of few bf16 rows, no autograd."""
        if kv_views is None or x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[0] != 1 \
                or x.shape[1] > FUSED_MAX_ROWS or torch.is_grad_enabled() or cos.dtype != torch.bfloat16 \
                or not cos.is_contiguous():
            return False
        if self._op is None:
            self._op = native_op("decode_layers") or False
        return bool(self._op)

    def _plan(self, index: int, layer: nn.Module, seq: int) -> LayerPlan | None:
        if type(layer).__name__ != "DecoderLayer":
            return None
        sources = _sources(layer)
        cached = self._plans.get((index, seq))
        if cached is None or any(a is not b for a, b in zip(cached[0], sources, strict=True)):
            cached = self._plans[index, seq] = sources, layer_plan(layer, seq)
        return cached[1]

    def run(self, layers: nn.ModuleList, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            kv_views: list[KVView]) -> torch.Tensor:
        """x: [1, S, D] through every layer -> [1, S, D]: runs of consecutive layers that have a plan
        in one native call each, the other layers through their modules."""
        seq = x.shape[1]
        run: list[tuple[LayerPlan, tuple[torch.Tensor, ...]]] = []
        for i, layer in enumerate(layers):
            plan = self._plan(i, layer, seq)
            cache = None if plan is None else kv_views[i].fused_qkv_args(plan.heads)
            if cache is not None:
                run.append((plan, cache))
                continue
            x = self._run_layers(x, cos, sin, run)
            run = []
            x = layer(x, cos, sin, kv_views[i])
        return self._run_layers(x, cos, sin, run)

    def _run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                    run: list[tuple[LayerPlan, tuple[torch.Tensor, ...]]]) -> torch.Tensor:
        if not run:
            return x
        for _ in run:
            note_kernel("decoder layer", "fused")
        seq = x.shape[1]
        plans = [plan for plan, _ in run]
        key = tuple(id(p) for p in plans)
        flat = self._flat.get(key)
        if flat is None or any(a is not b for a, b in zip(flat[0], plans, strict=True)):
            flat = self._flat[key] = (plans, [p.ln1 for p in plans], [p.ln2 for p in plans],
                                      [t for p in plans for t in (*p.qkv, *p.o, *p.gate_up, *p.down)],
                                      [p.qkv_bias for p in plans], [i for p in plans for i in p.linear_info])
        _, ln1, ln2, weights, biases, info = flat
        first, (_, _, slots, gather, lengths) = plans[0], run[0][1]
        out = self._op(x.view(seq, -1), ln1, ln2, first.eps, weights, biases, info, cos.view(seq, -1),
                       sin.view(seq, -1), [c[0] for _, c in run], [c[1] for _, c in run], slots, gather, lengths,
                       first.heads, run[0][1][0].shape[2] ** -0.5)
        return out.view(x.shape)
