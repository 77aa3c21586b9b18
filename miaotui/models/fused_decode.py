"""The decode step of consecutive decoder layers as one native op (kernels/decode_layer.cpp,
decode_layers), where every part of each layer has a native few-row kernel: bf16 activations,
integer weights on linear_q_tiles or bf16 weights on linear_bf16_tiles, and the paged cache's
fused attention. The op runs the same kernels in the same order as DecoderLayer.forward, so the
bits do not change; it only removes the per-module and per-op Python overhead (~15 calls a layer,
and one call per layer), which at small model sizes costs more than streaming the weights.

Not for choosing kernels (layers/kernel_choice.py) or for prefill (long rows run the modules).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import nn

from miaotui.kernels import native_op
from miaotui.layers.attention import Attention, KVView
from miaotui.layers.kernel_choice import BF16_TILES_MAX_ROWS, KernelLog, bf16_kernel, note_kernel, this_cpu
from miaotui.layers.linear import Linear
from miaotui.layers.mlp import GatedMLP
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
    q_norm: torch.Tensor | None = None  # RMSNorm weights [hd] over each q and k head (Qwen3)
    k_norm: torch.Tensor | None = None


def _linear(module: nn.Module, rows: int) -> tuple[list[torch.Tensor], list[int]] | None:
    """(tensors, [kernel, out features, bits, group width, zero code, exponent]) of one linear, or None."""
    if _hooked(module):
        return None
    if type(module) is QuantLinear:
        if module.act_quant or module.input_order is not None or module.kernel_for(rows, torch.bfloat16) != "tiles_q":
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
    from miaotui.models.transformer import DecoderLayer

    if type(layer) is not DecoderLayer or rows > FUSED_MAX_ROWS or layer.rope_kind != "global":
        return None
    attn, mlp, ln1, ln2 = layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm
    if type(attn) is not Attention or not attn.plain or type(mlp) is not GatedMLP or mlp.act != "silu" \
            or layer.attn_out_norm is not None or type(ln1) is not RMSNorm or type(ln2) is not RMSNorm \
            or any(_hooked(m) for m in (layer, attn, mlp, ln1, ln2)):
        return None
    if ln1.weight.dtype != torch.bfloat16 or ln2.weight.dtype != torch.bfloat16 or ln1.eps != ln2.eps:
        return None
    norms = (attn.q_norm, attn.k_norm)
    if attn.q_norm is not None and any(type(n) is not RMSNorm or n.weight.dtype != torch.bfloat16 or n.eps != ln1.eps
                                       or _hooked(n) for n in norms):
        return None
    parts = [_linear(m, rows) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(p is None for p in parts) or any(m.bias is not None for m in (attn.o_proj, mlp.gate_up_proj,
                                                                          mlp.down_proj)):
        return None
    (qkv, qkv_info), (o, o_info), (gate_up, gu_info), (down, down_info) = parts
    return LayerPlan(ln1.weight, ln2.weight, ln1.eps, qkv, attn.qkv_proj.bias, o, gate_up, down,
                     qkv_info + o_info + gu_info + down_info, attn.num_heads,
                     *(None if n is None else n.weight for n in norms))


def _layout(module: nn.Module | None) -> object:
    """The kernel layout a linear's plan was made from: QuantLinear._q_tiles or Linear.tiles (plain
    attributes, read from __dict__: nn.Module.__getattr__ costs ~1 us a call)."""
    if module is None:
        return None
    attrs = module.__dict__
    return attrs["_q_tiles"] if "_q_tiles" in attrs else attrs.get("tiles")


def _sources(layer: nn.Module) -> tuple[object, ...]:
    """What a plan depends on, by identity: the layer's submodules, the layouts of the four linears
    and the norm weights. Read through the module dicts: this runs for every layer at every step."""
    mods = layer._modules
    attn, mlp = mods.get("self_attn"), mods.get("mlp")
    attn_mods = attn._modules if attn is not None else {}
    mlp_mods = mlp._modules if mlp is not None else {}
    linears = (attn_mods.get("qkv_proj"), attn_mods.get("o_proj"), mlp_mods.get("gate_up_proj"),
               mlp_mods.get("down_proj"))
    norms = (mods.get("input_layernorm"), mods.get("post_attention_layernorm"), attn_mods.get("q_norm"),
             attn_mods.get("k_norm"))
    return (attn, mlp, *linears, *(_layout(m) for m in linears),
            *(None if n is None else n._parameters.get("weight") for n in norms))


def _same(a: tuple[object, ...], b: tuple[object, ...]) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))


@dataclass(frozen=True, slots=True)
class FusedRun:
    """decode_layers' weight arguments for consecutive layers [first, first + count) (derived once)."""
    first: int
    count: int
    ln1: list[torch.Tensor]
    ln2: list[torch.Tensor]
    weights: list[torch.Tensor]
    biases: list[torch.Tensor | None]
    qk_norms: list[torch.Tensor | None]  # each layer's q and k head norms (or two Nones)
    info: list[int]
    eps: float
    heads: int


def _shape(plan: LayerPlan) -> tuple[int, ...]:
    """What the layers of one decode_layers call share: heads and each linear's out features."""
    return plan.heads, *plan.linear_info[1::6]


def _fused_run(first: int, plans: list[LayerPlan]) -> FusedRun:
    return FusedRun(first, len(plans), [p.ln1 for p in plans], [p.ln2 for p in plans],
                    [t for p in plans for t in (*p.qkv, *p.o, *p.gate_up, *p.down)],
                    [p.qkv_bias for p in plans], [n for p in plans for n in (p.q_norm, p.k_norm)],
                    [i for p in plans for i in p.linear_info], plans[0].eps,
                    plans[0].heads)


class FusedDecode:
    """The plans of one model's layers, built on first use per row count and rebuilt when a layer's
    layouts or submodules change (quantization, loading): each step compares, by identity, what
    every layer's plan was made from (~1 us a layer) and runs the derived arguments."""

    def __init__(self) -> None:
        # per row count: (each layer's sources, the step as runs of fused layers and single layers)
        self._steps: dict[int, tuple[list[tuple[object, ...]], list[FusedRun | int]]] = {}
        self._op = None

    def step_fits(self, x: torch.Tensor, cos: torch.Tensor, kv_views: list[KVView] | None) -> bool:
        """Whether this step may run fused: an engine step of few bf16 rows, no autograd."""
        if kv_views is None or x.dtype != torch.bfloat16 or x.device.type != "cpu" or x.shape[0] != 1 \
                or x.shape[1] > FUSED_MAX_ROWS or torch.is_grad_enabled() or cos.dtype != torch.bfloat16 \
                or not cos.is_contiguous():
            return False
        if self._op is None:
            self._op = native_op("decode_layers") or False
        return bool(self._op)

    def _step(self, layers: nn.ModuleList, seq: int) -> list[FusedRun | int]:
        sources = [_sources(layer) if type(layer).__name__ == "DecoderLayer" else (layer,) for layer in layers]
        cached = self._steps.get(seq)
        if cached is not None and len(cached[0]) == len(sources) and all(map(_same, cached[0], sources)):
            return cached[1]
        parts: list[FusedRun | int] = []
        run: list[LayerPlan] = []
        for i, layer in enumerate(layers):
            plan = layer_plan(layer, seq) if type(layer).__name__ == "DecoderLayer" else None
            if plan is not None and (not run or _shape(plan) == _shape(run[0])):
                run.append(plan)
                continue
            if run:
                parts.append(_fused_run(i - len(run), run))
                run = []
            if plan is not None:  # a layer of other shapes starts the next run
                run.append(plan)
                continue
            parts.append(i)
        if run:
            parts.append(_fused_run(len(layers) - len(run), run))
        self._steps[seq] = sources, parts
        return parts

    def run(self, layers: nn.ModuleList, x: torch.Tensor, ropes: dict[str, tuple[torch.Tensor, torch.Tensor]],
            kv_views: list[KVView]) -> torch.Tensor:
        """x: [1, S, D] through every layer -> [1, S, D]: runs of consecutive layers that have a plan
        in one native call each, the other layers through their modules. ropes: Transformer.rope_tables
        (fused layers rotate with the global rope: a layer with a rope of its own has no plan)."""
        seq = x.shape[1]
        cos, sin = ropes["global"]
        for part in self._step(layers, seq):
            if isinstance(part, int):
                x = layers[part](x, *ropes[layers[part].rope_kind], kv_views[part])
                continue
            caches = [kv_views[i].fused_qkv_args(part.heads) for i in range(part.first, part.first + part.count)]
            if any(c is None for c in caches):  # this step's rows do not fit the fused attention
                for i in range(part.first, part.first + part.count):
                    x = layers[i](x, cos, sin, kv_views[i])
                continue
            x = self._run_layers(x, cos, sin, part, caches)
        return x

    def _run_layers(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, part: FusedRun,
                    caches: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
        if KernelLog.active is not None:
            for _ in range(part.count):
                note_kernel("decoder layer", "fused")
        seq = x.shape[1]
        _, _, slots, gather, lengths, k_scales, _ = caches[0]
        coded = k_scales is not None  # a quantized cache: each layer's scales too
        out = self._op(x.view(seq, -1), part.ln1, part.ln2, part.eps, part.weights, part.biases, part.qk_norms,
                       part.info,
                       cos.view(seq, -1), sin.view(seq, -1), [c[0] for c in caches], [c[1] for c in caches], slots,
                       gather, lengths, part.heads, caches[0][0].shape[2] ** -0.5,
                       [c[5] for c in caches] if coded else [], [c[6] for c in caches] if coded else [])
        return out.view(x.shape)
