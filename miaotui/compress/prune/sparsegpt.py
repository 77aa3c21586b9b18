"""SparseGPT (Frantar & Alistarh, 2023): prune a weight and rebuild the survivors in one pass.

Columns are visited left to right in blocks; in each block the mask is chosen by the OBS saliency
w^2 / [H^-1]_jj^2, and each pruned (or kept) column's error is pushed onto the columns to its
right through the Cholesky factor of H^-1, as in GPTQ. Not for calibration (calibration.py).
"""

from __future__ import annotations

import torch

from miaotui.compress.calibration import inverse_hessian_cholesky, prepare_weight_and_hessian


def sparsegpt_prune_weight(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                           nm: tuple[int, int] | None = None, damp: float = 0.01, block_size: int = 128
                           ) -> torch.Tensor:
    """weight [N, K], hessian [K, K] -> pruned and reconstructed weight [N, K] (exact zeros where pruned)."""
    w, h = prepare_weight_and_hessian(weight, hessian)
    n, k = w.shape
    hinv = inverse_hessian_cholesky(h, damp)
    if nm is not None:
        block_size = nm[1] * -(-block_size // nm[1])  # N:M groups never straddle blocks
    pruned = torch.zeros(n, k, dtype=torch.bool)

    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(hinv1)
        if nm is None:
            saliency = w1.pow(2) / d[None, :].pow(2)  # [N, block]
            drop = int(saliency.numel() * sparsity)
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
            if drop:
                mask1.view(-1)[torch.topk(saliency.flatten(), drop, largest=False).indices] = True
        else:
            mask1 = torch.zeros_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                m = nm[1]
                saliency = w1[:, i:i + m].pow(2) / d[i:i + m][None, :].pow(2)
                idx = torch.topk(saliency, m - nm[0], dim=1, largest=False).indices
                mask1.scatter_(1, i + idx, True)
            col = w1[:, i]
            q = torch.where(mask1[:, i], torch.zeros_like(col), col)
            err = (col - q) / hinv1[i, i]
            w1[:, i:] -= err[:, None] @ hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = err
        w[:, i1:i2] = w1
        pruned[:, i1:i2] = mask1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    w[pruned] = 0.0
    return w.to(weight.dtype)
