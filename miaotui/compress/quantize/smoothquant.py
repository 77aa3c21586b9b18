"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

Per input channel j: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X / s is easier to quantize
per token, W * s stays easy per channel. The 1/s is folded into the op that produces X
(models/plan.py's folds): the RMSNorm weight (q/k/v and gate/up inputs) or the up-projection rows
(down_proj's input, act(gate) * up). o_proj's input has no foldable producer here and is quantized unsmoothed.
Not for the int8 kernels (layers/quantized_linear.py).
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.compress.quantize.folding import consumer_weight, fold_scale
from miaotui.models.plan import LayerPlan


def smoothing_scales(act_abs_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """act_abs_max: [K]; weight: [N, K] -> s: [K] (clamped away from 0 and inf)."""
    w_max = weight.abs().amax(0).clamp(min=1e-5)
    a_max = act_abs_max.clamp(min=1e-5)
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5, max=1e5)


def _fake_int8(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Symmetric int8 rounding along dim's maximum (per token: dim -1 of x; per channel: dim -1 of W)."""
    scale = t.abs().amax(dim, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(t / scale).clamp(-127, 127) * scale


def search_alpha(x: torch.Tensor, act_abs_max: torch.Tensor, weight: torch.Tensor,
                 grid: tuple[float, ...] = tuple(i / 20 for i in range(4, 19))) -> tuple[torch.Tensor, float]:
    """The migration strength whose W8A8 output on sample inputs x [R, K] is closest to the float
    output x W^T (SmoothQuant's per-layer search): -> (scales s [K], alpha)."""
    x, weight = x.float(), weight.float()
    reference = x @ weight.t()
    best = (float("inf"), None, 0.5)
    for alpha in grid:
        s = smoothing_scales(act_abs_max, weight, alpha)
        out = _fake_int8(x / s, -1) @ _fake_int8(weight * s, -1).t()
        err = float((out - reference).pow(2).mean())
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def smooth_layer_searched(layer: nn.Module, plan: LayerPlan, act_abs_max: dict[str, torch.Tensor],
                          samples: dict[str, torch.Tensor]) -> dict[str, float]:
    """smooth_layer with each fold's alpha searched on sample input rows [R, K] by linear name;
    -> the alpha chosen per fold (by its first consumer's name)."""
    chosen = {}
    for fold in plan.folds:
        a_max, x = act_abs_max.get(fold.consumers[0]), samples.get(fold.consumers[0])
        if a_max is None or x is None or not bool(a_max.any()) or x.numel() == 0:
            continue
        s, alpha = search_alpha(x, a_max, consumer_weight(layer, fold))
        fold_scale(layer, fold, s)
        chosen[fold.consumers[0]] = alpha
    return chosen


@torch.no_grad()
def smooth_layer(layer: nn.Module, plan: LayerPlan, act_abs_max: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold smoothing scales into one decoder layer in place at its plan's folds (the float function
    is unchanged). act_abs_max: max|X_j| [K] by linear name (a fold's first consumer represents it)."""
    for fold in plan.folds:
        a_max = act_abs_max.get(fold.consumers[0])
        if a_max is None or not bool(a_max.any()):  # an expert no calibration token reached
            continue
        fold_scale(layer, fold, smoothing_scales(a_max, consumer_weight(layer, fold), alpha))
