"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the not-yet-quantized columns through the inverse Hessian of its inputs.

Not for calibration or module swapping (apply.py); this is the per-matrix math.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from miaotui.compress.calibration import inverse_hessian_cholesky, prepare_weight_and_hessian
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
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            column = i1 + i
            g = int(perm[column]) // group
            if not static and column % group == 0:
                end = min(column + group, k)
                s, z = compute_qparams(w1[:, i:i + end - column], per_group, importance[column:end], clip_search)
                scale[:, g], zero[:, g] = s[:, 0], z[:, 0]
            col = w1[:, i]
            s, z = scale[:, g], zero[:, g]
            q = torch.round(col / s + z).clamp(fmt.qmin, fmt.qmax)
            codes[:, column] = q.to(torch.int16)
            err = (col - (q - z) * s) / hinv1[i, i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)  # rank-1 update in place (no [N, B] temporary)
            err1[:, i] = err
        w[:, i2:].addmm_(err1, hinv[i1:i2, i2:], alpha=-1)  # in place: no [N, K - i2] temporary per block
    codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero
