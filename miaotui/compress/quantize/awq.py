"""AWQ (Lin et al., 2024): protect the weights that see large activations by scaling them up
before rounding and folding the inverse scale into the op that produces their input.

For each input group, s = mean|X|^a / mean|W~|^(1-a) (W~: |W| normalised per quantization
group), a chosen by grid search over [0, 1] to minimise ||X W^T - X Q(W diag s)^T diag(s)^-1||.
Producers (models/plan.py's folds): RMSNorm weights (q/k/v; gate/up, with an MoE's router scaled
alongside its experts) and the up-projection rows (down_proj). o_proj is left unscaled (its
producer, v, is shared by several query heads under grouped-query attention).
The final rounding (apply.py) then searches each group's clipping range, weighting the error by
the energy of the scaled inputs E[(x_j / s_j)^2]. Not for the kernels.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.compress.quantize.folding import consumer_weight, fold_scale
from miaotui.layers.quant_formats import QuantFormat, fake_quantize
from miaotui.models.plan import LayerPlan


def _normalised_weight_mean(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """mean over rows of |W| / max|W| within each quantization group: [K]."""
    n, k = weight.shape
    g = fmt.group_width(k)
    groups = fmt.groups(k)
    w = torch.nn.functional.pad(weight.abs(), (0, groups * g - k)).reshape(n, groups, g)
    w = w / w.amax(-1, keepdim=True).clamp(min=1e-8)
    return w.reshape(n, -1)[:, :k].mean(0)


def search_scales(x: torch.Tensor, weight: torch.Tensor, fmt: QuantFormat, grid: int = 20
                  ) -> tuple[torch.Tensor, float]:
    """x: [R, K] sample inputs; weight: [N, K] -> (best scales [K], best alpha)."""
    x, weight = x.float(), weight.float()
    x_mean = x.abs().mean(0).clamp(min=1e-5)
    w_mean = _normalised_weight_mean(weight, fmt).clamp(min=1e-5)
    reference = x @ weight.t()
    best = (float("inf"), torch.ones_like(x_mean), 0.0)
    for step in range(grid + 1):
        alpha = step / grid
        s = (x_mean.pow(alpha) / w_mean.pow(1 - alpha)).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        q = fake_quantize(weight * s[None, :], fmt) / s[None, :]
        err = float((x @ q.t() - reference).pow(2).mean())
        if err < best[0]:
            best = (err, s, alpha)
    return best[1], best[2]


@torch.no_grad()
def awq_scale_layer(layer: nn.Module, plan: LayerPlan, inputs: dict[str, torch.Tensor], fmt: QuantFormat
                    ) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Search and fold AWQ scales into one decoder layer in place, at each of its plan's folds.

    inputs: sample input rows [R, K] by linear name (a fold's first consumer represents it).
    -> (chosen alpha per quantized linear, scale s [K] per quantized linear: its inputs are now x / s).
    """
    alphas, scales = {}, {}
    for fold in plan.folds:
        x = inputs.get(fold.consumers[0])
        if x is None or x.numel() == 0:  # an expert no calibration token reached: left unscaled
            continue
        s, alpha = search_scales(x, consumer_weight(layer, fold), fmt)
        fold_scale(layer, fold, s)
        for name in fold.quantized:
            alphas[name], scales[name] = alpha, s
    return alphas, scales
