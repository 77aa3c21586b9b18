"""quantize_model: swap a model's dense linears for QuantLinear layers, by RTN or GPTQ.

Not for file formats (loaders/miaotui_dir.py) or per-matrix math (gptq.py, layers/quant_formats.py).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from miaotui.compress.calibration import CalibrationSet, capture_inputs, layer_by_layer
from miaotui.compress.quantize.awq import awq_scale_layer
from miaotui.compress.quantize.gptq import gptq_quantize_weight
from miaotui.compress.quantize.smoothquant import smooth_layer, smooth_layer_searched
from miaotui.compress.streamed import each_layer, layers_of
from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.layers.quant_formats import QuantFormat, compute_qparams, quantize_codes
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.models.plan import layer_plan
from miaotui.models.transformer import Transformer

METHODS = ("rtn", "gptq", "awq", "awq-gptq", "smoothquant", "smoothquant-gptq")
SMOOTHQUANT = ("smoothquant", "smoothquant-gptq")  # W8A8: int8 weights per channel, int8 activations per token
AWQ_SAMPLE_ROWS = 4096  # input rows per linear kept for AWQ's grid search


@dataclass(slots=True)
class QuantizationRecord:
    """What was done, saved next to the weights so the result can be reproduced and verified."""

    method: str
    format: dict[str, Any]
    act_quant: bool = False
    calibration: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)  # module names that are QuantLinear

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def resolve_method(method: str, bits: int, group_size: int, symmetric: bool, integer_zero: bool = False
                   ) -> tuple[str, QuantFormat]:
    """User-facing method names (binary and ternary are formats, rounded by RTN) -> (algorithm, format)."""
    if method in ("binary", "ternary"):
        return "rtn", QuantFormat(2, group_size, True, method)
    if method in SMOOTHQUANT:
        return method, QuantFormat(8, -1, True)
    if method not in METHODS:
        raise MiaotuiError(f"unknown quantization method '{method}' (available: {', '.join(METHODS)}, binary, ternary)")
    return method, QuantFormat(bits, group_size, symmetric, integer_zero=integer_zero and not symmetric)


def set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def quant_linear_from_codes(dense: Linear, fmt: QuantFormat, codes: torch.Tensor, scale: torch.Tensor,
                            zero: torch.Tensor, act_quant: bool = False) -> QuantLinear:
    q = QuantLinear(dense.in_features, dense.out_features, dense.bias is not None, fmt, act_quant)
    q.set_codes(codes, scale, zero, None if dense.bias is None else dense.bias.detach())
    return q


RTN_ROW_BLOCK = 1024  # rows rounded at once: the float temporaries stay ~1024 x K (a 28672-row matrix: 3% of it)


def rtn_quantize_linear(dense: Linear, fmt: QuantFormat, act_quant: bool = False,
                        importance: torch.Tensor | None = None) -> QuantLinear:
    """Round to nearest; given input-channel importance [K], each group's clipping range is searched too.
    Rows are independent: rounded a block at a time (same codes), so the temporaries stay small."""
    weight = dense.weight.detach()
    parts = []
    for rows in weight.split(RTN_ROW_BLOCK):
        scale, zero = compute_qparams(rows, fmt, importance, clip_search=importance is not None)
        parts.append((quantize_codes(rows, scale, zero, fmt), scale, zero))
    codes, scale, zero = (torch.cat(t) for t in zip(*parts, strict=True))
    return quant_linear_from_codes(dense, fmt, codes, scale, zero, act_quant)


def rtn_quantize_layer(layer: nn.Module, index: int, linears: tuple[str, ...], fmt: QuantFormat, act_quant: bool,
                       record: QuantizationRecord, importance: dict[str, torch.Tensor] | None = None,
                       modules: Collection[str] | None = None) -> None:
    """Round the (selected) linears of one decoder layer (LayerPlan.linears), after any scaling the
    method applied, and record them."""
    for name in linears:
        if modules is not None and f"layers.{index}.{name}" not in modules:
            continue
        imp = None if importance is None else importance[name]
        set_submodule(layer, name, rtn_quantize_linear(layer.get_submodule(name), fmt, act_quant, imp))
        record.layers.append(f"layers.{index}.{name}")


def quantize_model(model: Transformer, method: str, fmt: QuantFormat, calib: CalibrationSet | None = None,
                   act_quant: bool = False, damp: float = 0.01, act_order: bool = False,
                   alpha: float = 0.5, modules: Collection[str] | None = None, alpha_search: bool = False
                   ) -> QuantizationRecord:
    """Quantize every decoder-layer linear in place (embedding and output head stay float), or only
    `modules` (full names such as 'layers.3.mlp.down_proj', from compress/selectors.py).

    smoothquant = smoothing (alpha, or searched per fold with alpha_search) + RTN int8 weights per
    channel + int8 activations per token; smoothquant-gptq rounds the smoothed int8 weights by GPTQ
    instead, each linear's Hessian from inputs that pass through the layer's already-quantized
    linears (int8 activations included), as llm-compressor's SmoothQuant + GPTQ W8A8 recipe.
    awq-gptq = AWQ's activation-aware scales folded in first, then GPTQ rounds the scaled weights.
    """
    if method in SMOOTHQUANT:
        if not (fmt.kind == "int" and fmt.bits == 8 and fmt.group_size == -1 and fmt.symmetric):
            raise MiaotuiError("smoothquant is W8A8: use --bits 8 --group-size -1 --symmetric")
        act_quant = True
    if method not in METHODS:
        raise MiaotuiError(f"unknown quantization method '{method}' (available: {', '.join(METHODS)})")
    if fmt.kind == "binary" and method != "rtn":
        raise MiaotuiError("binary weights are quantized by sign (method rtn)")
    options = {"alpha": "searched" if alpha_search else alpha} if method in SMOOTHQUANT else {}
    if method not in ("rtn", "awq", "smoothquant"):
        options |= {"damp": damp, "act_order": act_order}
    record = QuantizationRecord(method, fmt.to_dict(), act_quant, options=options)
    if method == "rtn":
        for i, layer in each_layer(model, "rtn"):
            rtn_quantize_layer(layer, i, layer_plan(model.config, i).linears, fmt, act_quant, record, modules=modules)
        return record
    if calib is None:
        raise MiaotuiError(f"method '{method}' needs calibration text (--calib-file)")
    record.calibration = {"file": calib.source, "sha256": calib.sha256, "samples": int(calib.tokens.shape[0]),
                          "seq_len": int(calib.tokens.shape[1]),
                          "compute_dtype": str(layers_of(model).calibration_dtype).removeprefix("torch.")}
    for i, layer, forward_all in layer_by_layer(model, calib, desc=method):
        keep = AWQ_SAMPLE_ROWS if method in ("awq", "awq-gptq") or (method in SMOOTHQUANT and alpha_search) else 0
        plan = layer_plan(model.config, i)
        # GPTQ re-captures each later linear's inputs anyway (below): q/k/v's are all it needs now
        first = method in ("gptq",)
        stats = capture_inputs(layer, list(plan.linears[:1] if first else plan.inputs_to_capture), forward_all,
                               keep_rows=keep, stop_early=first)
        if method in SMOOTHQUANT:
            maxima = {name: acc.abs_max for name, acc in stats.items()}
            if alpha_search:
                chosen = smooth_layer_searched(layer, plan, maxima, {name: acc.samples for name, acc in stats.items()})
                record.options.setdefault("alphas", []).append(chosen)
            else:
                smooth_layer(layer, plan, maxima, alpha)
            if method == "smoothquant":
                rtn_quantize_layer(layer, i, plan.linears, fmt, True, record, modules=modules)
                continue
        # [K, K] each; smoothing changed every input: all are captured again below
        hessians = {} if method in SMOOTHQUANT else {name: acc.hessian for name, acc in stats.items() if acc.count}
        if method in ("awq", "awq-gptq"):
            alphas, scales = awq_scale_layer(layer, plan, {name: acc.samples for name, acc in stats.items()}, fmt)
            record.options.setdefault("alphas", []).append(alphas)
            # The inputs are now x / s: H becomes diag(1/s) H diag(1/s).
            for name, s in scales.items():
                hessians[name] = hessians[name] / s[:, None] / s[None, :]
            if method == "awq":
                # E[x_j^2] of the scaled inputs weights each group's clipping search.
                rtn_quantize_layer(layer, i, plan.linears, fmt, act_quant, record,
                                   {name: torch.diag(h) / 2 for name, h in hessians.items()}, modules)
                continue
        for n, name in enumerate(plan.linears):
            if modules is not None and f"layers.{i}.{name}" not in modules:
                continue
            if not name.startswith("self_attn."):  # the attention linears (first in the plan) are done
                forward_all.freeze_attention()
            if n > 0 or name not in hessians:
                # "True sequential": a linear's Hessian comes from inputs computed with the earlier
                # linears of this layer already quantized, so it also corrects their error.
                found = capture_inputs(layer, [name], forward_all, stop_early=True)[name]
                hessians[name] = found.hessian if found.count else None
            dense = layer.get_submodule(name)
            if hessians.get(name) is None:  # an expert no calibration token was routed to: nothing to weigh by
                set_submodule(layer, name, rtn_quantize_linear(dense, fmt, act_quant))
                record.layers.append(f"layers.{i}.{name}")
                record.options.setdefault("rtn_fallback", []).append(f"layers.{i}.{name}")
                continue
            codes, scale, zero = gptq_quantize_weight(dense.weight.detach(), hessians[name], fmt, damp=damp,
                                                      act_order=act_order)
            set_submodule(layer, name, quant_linear_from_codes(dense, fmt, codes, scale, zero, act_quant))
            record.layers.append(f"layers.{i}.{name}")
    return record
