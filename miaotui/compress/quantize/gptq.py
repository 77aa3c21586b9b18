"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the not-yet-quantized columns through the inverse Hessian of its inputs.

Not for calibration or module swapping (apply.py); this is the per-matrix math.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from miaotui.compress.calibration import inverse_hessian_cholesky, prepare_weight_and_hessian
from miaotui.kernels import native_op
from miaotui.layers.quant_formats import QuantFormat, compute_qparams


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat, damp: float = 0.01,
                         block_size: int = 128, act_order: bool = False, clip_search: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] -> (codes [N, K], scale [N, groups], zero [N, groups]).

    Without act-order, each group's scale and zero are chosen when GPTQ reaches the group's first
    column, from the weights as updated by the error feedback so far (as in the reference code;
    per-channel scales, one group spanning the row, from the original row);
    with act-order the columns are visited out of order, so the group parameters come from the
    original weight ("static groups") and the stored layout keeps contiguous groups. With
    clip_search the range of each group is shrunk where that lowers the rounding error weighted
    by diag(H), i.e. by the energy of each column's inputs.
    """
    w, h = prepare_weight_and_hessian(weight, hessian)
    n, k = w.shape
    group = k if fmt.group_size == -1 else fmt.group_size
    groups = fmt.groups(k)
    importance = torch.diag(h).clone()
    per_group = replace(fmt, group_size=-1)  # one group's slice [N, <=G] is "per channel"

    static = act_order or group == k  # one scale per row: chosen from the whole row, before any update
    if static:
        scale, zero = compute_qparams(w, fmt, importance, clip_search)  # [N, groups]
        perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    else:
        scale, zero = torch.zeros(n, groups), torch.zeros(n, groups)
        perm = torch.arange(k)
        block_size = group * -(-block_size // group) if group < k else block_size  # groups never straddle blocks
    w, h = w[:, perm], h[perm][:, perm]
    hinv = inverse_hessian_cholesky(h, damp)

    codes = torch.zeros(n, k, dtype=torch.int16)
    groups_of = perm // group  # [K] the group of each (permuted) column
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        width = i2 - i1
        w1 = w[:, i1:i2].clone()  # [N, B]
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2].contiguous()
        block_codes = torch.zeros(n, width, dtype=torch.int16)
        if static:
            cols = groups_of[i1:i2]
            _columns(w1, hinv1, 0, width, scale[:, cols].contiguous(), zero[:, cols].contiguous(), fmt, block_codes,
                     err1)
        else:
            for c0 in range(0, width, group):  # blocks hold whole groups
                c1, g = min(c0 + group, width), (i1 + c0) // group
                s, z = compute_qparams(w1[:, c0:c1], per_group, importance[i1 + c0:i1 + c1], clip_search)  # [N, 1]
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
                _columns(w1, hinv1, c0, c1, s.expand(n, width).contiguous(), z.expand(n, width).contiguous(), fmt,
                         block_codes, err1)
        codes[:, i1:i2] = block_codes
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # in place: no [N, K - i2] temporary per block
    codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero


def _columns(w1: torch.Tensor, hinv1: torch.Tensor, c0: int, c1: int, scale: torch.Tensor, zero: torch.Tensor,
             fmt: QuantFormat, codes: torch.Tensor, err: torch.Tensor) -> None:
    """Columns [c0, c1) of a block, in order: round each with its grid (scale, zero [N, B]) into codes
    [N, B], its error scaled by the inverse Hessian's diagonal into err [N, B], and that error fed
    back into the block's later columns of w1 [N, B] (in place). kernels/gptq_columns.cpp runs the
    rows in parallel; the PyTorch ops below are the same steps."""
    op = native_op("gptq_columns") if w1.device.type == "cpu" else None
    if op is not None:
        op(w1, hinv1, c0, c1, scale, zero, fmt.qmin, fmt.qmax, codes, err)
        return
    for c in range(c0, c1):
        col, s, z = w1[:, c], scale[:, c], zero[:, c]
        q = torch.round(col / s + z).clamp(fmt.qmin, fmt.qmax)
        codes[:, c] = q.to(torch.int16)
        e = (col - (q - z) * s) / hinv1[c, c]
        w1[:, c:].addr_(e, hinv1[c, c:], alpha=-1)  # rank-1 update in place (no [N, B] temporary)
        err[:, c] = e
