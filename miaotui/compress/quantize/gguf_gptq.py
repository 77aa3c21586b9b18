"""GPTQ onto GGUF's own grids: each matrix rounded column by column into the exact blocks llama.cpp will
read (Q4_K's 6-bit sub-scales and mins, Q6_K's int8 scales, Q5_0's float16 scale, ...), each column's
rounding error spread over the columns not yet rounded through the inverse Hessian of its inputs.

A block's grid is chosen when GPTQ reaches the block's first column, from the weights as the error
feedback has updated them, with the same importance-weighted search export-gguf uses
(loaders/gguf_kquants.py: grid_for), weighted by diag(H) (each column's input energy); the codes
then follow GPTQ. The result is the file's bytes and the weights they decode to, which replace the
float ones so later layers calibrate on the quantized model (true-sequential, as apply.py's GPTQ).

Not for writing the file (loaders/gguf_export.py) or for miaotui's own integer formats (gptq.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from miaotui.compress.calibration import (
    CalibrationSet,
    capture_inputs,
    inverse_hessian_cholesky,
    layer_by_layer,
    prepare_weight_and_hessian,
)
from miaotui.compress.quantize.apply import AWQ_SAMPLE_ROWS
from miaotui.compress.quantize.awq import awq_scale_layer
from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.layers.quant_formats import QuantFormat
from miaotui.loaders.gguf_kquants import ENCODED, block_width, grid_for, pack
from miaotui.loaders.gguf_mixes import ExportType, matrix_type
from miaotui.models.plan import layer_plan
from miaotui.models.transformer import Transformer

AWQ_PROXY = QuantFormat(4, 32, False)  # the grid AWQ's scale search rounds against


def gptq_gguf(weight: torch.Tensor, hessian: torch.Tensor, qtype, damp: float = 0.01, act_order: bool = False
              ) -> tuple[np.ndarray, torch.Tensor]:
    """weight [N, K], hessian [K, K] -> (the GGUF bytes [N, K / block * bytes], the weights they decode to [N, K]).

    In column order, each block's grid comes from the weights as the error feedback has updated them
    when GPTQ reaches it. act_order: columns visited by decreasing Hessian diagonal (the inputs with
    most energy first), every block's grid chosen beforehand from the original weights ("static
    groups": the file's blocks stay runs of columns)."""
    w, h = prepare_weight_and_hessian(weight, hessian)
    n, k = w.shape
    block = block_width(qtype)
    if k % block:
        raise MiaotuiError(f"{qtype.name} needs rows of whole {block}-blocks, got {k}")
    importance = torch.diag(h).clone()
    grids = [grid_for(qtype, w[:, b:b + block], importance[b:b + block].expand(n, block)) for b in range(0, k, block)] \
        if act_order else [None] * (k // block)
    perm = torch.argsort(importance, descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_cholesky(h, damp)
    lazy = block * max(1, 128 // block)  # GPTQ's lazy batches (whole blocks, in column order)
    out = torch.zeros(n, k)
    codes = torch.zeros(n, k)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = int(perm[i1 + i])  # the weight's own column
            b, at = divmod(column, block)
            if grids[b] is None:  # column order: a new block's grid from the updated weights
                grids[b] = grid_for(qtype, w1[:, i:i + block], importance[column:column + block].expand(n, block))
            col = w1[:, i:i + 1]
            q = grids[b].codes(col, at)
            deq = grids[b].values(q, at)[:, 0]
            codes[:, column], out[:, column] = q[:, 0], deq
            err = (col[:, 0] - deq) / hinv1[i, i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)
            err1[:, i] = err
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)
    packed = [pack(grids[b], codes[:, b * block:(b + 1) * block]) for b in range(k // block)]
    return torch.cat(packed, dim=1).numpy(), out


# a linear (plan name) -> its GGUF pieces: (role, row range within the linear) resolved per config
def _pieces(name: str, c, fused: bool) -> list[tuple[str, slice]]:
    leaf = name.rsplit(".", 1)[-1]
    expert = ".experts." in name
    if leaf == "qkv_proj":
        if fused:
            return [("attn_qkv", slice(None))]
        q, kv = c.q_size, c.kv_size
        return [("attn_q", slice(0, q)), ("attn_k", slice(q, q + kv)), ("attn_v", slice(q + kv, q + 2 * kv))]
    if leaf == "o_proj":
        return [("attn_output", slice(None))]
    if leaf == "gate_up_proj":
        if fused:
            return [("ffn_up", slice(None))]
        suffix = "_exps" if expert else ""
        return [("ffn_gate" + suffix, "first"), ("ffn_up" + suffix, "second")]
    if leaf == "down_proj":
        return [("ffn_down_exps" if expert else "ffn_down", slice(None))]
    raise MiaotuiError(f"no GGUF tensor for '{name}'")


def gptq_gguf_model(model: Transformer, calib: CalibrationSet, kind: ExportType, fused: bool,
                    damp: float = 0.01, awq: bool = False, act_order: bool = False) -> dict[str, np.ndarray]:
    """GPTQ every decoder linear onto the type export-gguf will write it in, layer by layer, true-
    sequential; the float weights become their quantized values in place. -> {GGUF tensor name: bytes
    [N, row bytes] or stacked experts [E, N, row bytes]}, rows in miaotui's order (the writer permutes
    q/k rows for llama.cpp's 'llama' as for any tensor).
    awq: first fold AWQ's activation-aware scales into each layer (awq.py; searched against 4-bit
    groups of 32, the grid of most GGUF 4-bit blocks), as miaotui's awq-gptq does."""
    c = model.config
    tied = model.lm_head is None
    out: dict[str, np.ndarray] = {}
    experts: dict[str, dict[int, np.ndarray]] = {}
    for i, layer, forward_all in layer_by_layer(model, calib, desc="gptq (gguf)"):
        plan = layer_plan(c, i)
        if awq:
            stats = capture_inputs(layer, list(plan.inputs_to_capture), forward_all, keep_rows=AWQ_SAMPLE_ROWS)
            awq_scale_layer(layer, plan, {n: acc.samples for n, acc in stats.items()}, AWQ_PROXY)
        for name in plan.linears:
            module = layer.get_submodule(name)
            if not isinstance(module, Linear):
                raise MiaotuiError("GPTQ into GGUF types needs a float model (this one is already quantized)")
            if not name.startswith("self_attn."):  # the attention linears (first in the plan) are done
                forward_all.freeze_attention()
            found = capture_inputs(layer, [name], forward_all, stop_early=True)[name]
            if not found.count:  # an expert no calibration token reached: plain importance-free rounding
                continue
            hessian = found.hessian
            weight = module.weight.detach().float()
            new = weight.clone()
            rows = weight.shape[0]
            for role, part in _pieces(name, c, fused):
                span = slice(0, rows // 2) if part == "first" else slice(rows // 2, rows) if part == "second" \
                    else part
                piece = weight[span]
                qtype = matrix_type(kind, role, i, c.num_layers, piece.shape[1], c.num_experts, tied)
                if qtype not in ENCODED:
                    continue
                data, deq = gptq_gguf(piece, hessian, qtype, damp, act_order)
                new[span] = deq
                if role.endswith("_exps"):
                    e = int(name.split(".experts.")[1].split(".")[0])
                    experts.setdefault(f"blk.{i}.{role}.weight", {})[e] = data
                else:
                    out[f"blk.{i}.{role}.weight"] = data
            module.weight = nn.Parameter(new.to(module.weight.dtype), requires_grad=False)
    for gguf_name, by_expert in experts.items():
        if len(by_expert) == c.num_experts:  # (else every expert is written by the plain path)
            out[gguf_name] = np.stack([by_expert[e] for e in range(c.num_experts)])
    return out
