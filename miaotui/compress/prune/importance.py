"""Importance criteria: how much each weight (or channel, head, layer) matters.

Every function maps a weight W [N, K] (and what it needs: gradients, input statistics) to a
score of the same shape where a higher score means "keep". Not for turning scores into masks
(masks.py) or for collecting gradients and activations (calibration.py, sensitivity.py).
"""

from __future__ import annotations

import torch

CRITERIA = ("magnitude", "gradient", "taylor", "wanda", "sparsegpt")


def magnitude_importance(weight: torch.Tensor) -> torch.Tensor:
    """i = |w| / sum|w| over the whole matrix: comparable across matrices of different scale."""
    w = weight.detach().float().abs()
    return w / w.sum().clamp(min=1e-12)


def gradient_sensitivity(grad: torch.Tensor) -> torch.Tensor:
    """s = |dL/dw|: how fast the loss moves when the weight moves (grad accumulated over calibration)."""
    return grad.detach().float().abs()


def taylor_score(weight: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """|w * dL/dw|: first-order Taylor estimate of the loss change when w is set to 0."""
    return (weight.detach().float() * grad.detach().float()).abs()


def wanda_score(weight: torch.Tensor, input_sq_sum: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al., 2023): |w_ij| * ||x_j||_2, with input_sq_sum [K] = sum over tokens of x_j^2."""
    return weight.detach().float().abs() * input_sq_sum.float().clamp(min=0).sqrt()[None, :]


def sparsegpt_saliency(weight: torch.Tensor, hinv_diag: torch.Tensor) -> torch.Tensor:
    """SparseGPT / OBS (Frantar & Alistarh, 2023): w^2 / [H^-1]_jj^2, the loss increase of removing w
    (with hinv_diag [K] the diagonal of the inverse Hessian, or of its Cholesky factor as in the paper)."""
    return weight.detach().float().pow(2) / hinv_diag.float().pow(2)[None, :]


def element_scores(criterion: str, weight: torch.Tensor, grad: torch.Tensor | None = None,
                   input_sq_sum: torch.Tensor | None = None) -> torch.Tensor:
    """One score per weight [N, K] under a named criterion (sparsegpt needs the Hessian: see sparsegpt.py)."""
    if criterion == "magnitude":
        return magnitude_importance(weight)
    if criterion == "gradient":
        return gradient_sensitivity(grad)
    if criterion == "taylor":
        return taylor_score(weight, grad)
    if criterion == "wanda":
        return wanda_score(weight, input_sq_sum)
    raise ValueError(f"no element-wise score for criterion '{criterion}'")
