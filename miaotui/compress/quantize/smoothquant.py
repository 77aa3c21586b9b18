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


@torch.no_grad()
def smooth_layer(layer: nn.Module, plan: LayerPlan, act_abs_max: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold smoothing scales into one decoder layer in place at its plan's folds (the float function
    is unchanged). act_abs_max: max|X_j| [K] by linear name (a fold's first consumer represents it)."""
    for fold in plan.folds:
        a_max = act_abs_max.get(fold.consumers[0])
        if a_max is None or not bool(a_max.any()):  # an expert no calibration token reached
            continue
        fold_scale(layer, fold, smoothing_scales(a_max, consumer_weight(layer, fold), alpha))
