"""GPTQ (Frantar et al., 2022): quantize a weight column by column, spreading each column's
rounding error over the not-yet-quantized columns through the inverse Hessian of its inputs.

Not for calibration or module swapping (apply.py); this is the per-matrix math.
"""

from __future__ import annotations

import torch

from miaotui.layers.quant_formats import QuantFormat, compute_qparams


def gptq_quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, fmt: QuantFormat, damp: float = 0.01,
                         block_size: int = 128, act_order: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] -> (codes [N, K], scale [N, groups], zero [N, groups]).

    Group parameters come from the original weight ("static groups"), so act-order's column
    permutation still yields contiguous groups in the stored layout.
    """
    w = weight.detach().float().clone()
    n, k = w.shape
    h = hessian.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    scale, zero = compute_qparams(w, fmt)  # [N, groups]
    group = k if fmt.group_size == -1 else fmt.group_size

    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(k)
    w, h = w[:, perm], h[perm][:, perm]
    h += damp * torch.mean(torch.diag(h)) * torch.eye(k)
    # Upper Cholesky factor of H^-1: row i holds the update coefficients for column i.
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.int16)
    col_scale = scale[:, perm // group]  # [N, K]: each (permuted) column's group scale / zero
    col_zero = zero[:, perm // group]
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            s, z = col_scale[:, i1 + i], col_zero[:, i1 + i]
            q = torch.round(col / s + z).clamp(fmt.qmin, fmt.qmax)
            codes[:, i1 + i] = q.to(torch.int16)
            err = (col - (q - z) * s) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    return codes, scale, zero
