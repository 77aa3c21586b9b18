"""Fold a per-input-channel scale through a producer into its consumers (models/plan.py's Fold):
the producer's output divided by s, the consumers' input columns multiplied by s, so the float
function is unchanged. AWQ and SmoothQuant choose s; this applies it.

Not for choosing s.
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.models.plan import Fold


@torch.no_grad()
def fold_scale(layer: nn.Module, fold: Fold, s: torch.Tensor) -> None:
    """s: [K], K the consumers' input width."""
    producer = layer.get_submodule(fold.producer)
    if fold.up_rows:  # a gated MLP: act(gate) * up feeds down_proj, so only the up rows carry the scale
        inter = producer.out_features // 2
        producer.weight[inter:].div_(s[:, None].to(producer.weight.dtype))
    else:  # an RMSNorm: its weight multiplies every channel
        producer.weight.div_(s.to(producer.weight.dtype))
    for name in fold.consumers:
        weight = layer.get_submodule(name).weight
        weight.mul_(s[None, :].to(weight.dtype))


def consumer_weight(layer: nn.Module, fold: Fold) -> torch.Tensor:
    """The quantized consumers' weights stacked [sum N, K]: one scale serves them all."""
    parts = [layer.get_submodule(name).weight for name in fold.quantized]
    return parts[0] if len(parts) == 1 else torch.cat(parts)
