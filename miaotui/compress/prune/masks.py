"""From importance scores to keep-masks: unstructured, N:M, and OWL per-layer sparsities.

A mask is a bool tensor shaped like the weight, True = keep. Not for the scores (importance.py).
"""

from __future__ import annotations

import torch

from miaotui.errors import MiaotuiError


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """'2:4' -> (2, 4): keep N of every M consecutive input weights; None/'' -> unstructured."""
    if not pattern:
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise MiaotuiError(f"pattern '{pattern}' is not N:M (e.g. 2:4)") from None
    if not 0 < n < m:
        raise MiaotuiError(f"pattern '{pattern}': need 0 < N < M")
    return n, m


def check_sparsity(sparsity: float, field: str = "sparsity") -> float:
    if not 0.0 <= sparsity < 1.0:
        raise MiaotuiError(f"{field} must be in [0, 1), got {sparsity}")
    return float(sparsity)


def unstructured_mask(score: torch.Tensor, sparsity: float, per_row: bool = True) -> torch.Tensor:
    """Drop the `sparsity` fraction of lowest scores, compared within each output row (Wanda's choice,
    which keeps every output neuron alive) or across the whole matrix."""
    check_sparsity(sparsity)
    n, k = score.shape
    if per_row:
        drop = int(k * sparsity)
        if drop == 0:
            return torch.ones_like(score, dtype=torch.bool)
        idx = torch.topk(score, drop, dim=1, largest=False).indices
        return torch.ones_like(score, dtype=torch.bool).scatter_(1, idx, False)
    drop = int(score.numel() * sparsity)
    if drop == 0:
        return torch.ones_like(score, dtype=torch.bool)
    idx = torch.topk(score.flatten(), drop, largest=False).indices
    return torch.ones(score.numel(), dtype=torch.bool).scatter_(0, idx, False).reshape(n, k)


def nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest scores in every group of m consecutive input columns."""
    rows, k = score.shape
    if k % m:
        raise MiaotuiError(f"pattern {n}:{m}: M={m} does not divide the input dimension {k}")
    groups = score.reshape(rows, k // m, m)
    idx = torch.topk(groups, m - n, dim=-1, largest=False).indices
    return torch.ones_like(groups, dtype=torch.bool).scatter_(-1, idx, False).reshape(rows, k)


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float = 0.08) -> list[float]:
    """OWL (Yin et al., 2024): layers with more outlier weights are pruned less.

    outlier_ratios: per layer, the fraction of Wanda scores above M x their mean. Sparsities span
    [target - lam, target + lam] (the layer with the most outliers gets the least) and average to target.
    """
    check_sparsity(target)
    d = torch.tensor(outlier_ratios, dtype=torch.float64)
    spread = d.max() - d.min()
    norm = (d - d.min()) / spread if spread > 0 else torch.zeros_like(d)
    sparsity = target + lam - 2 * lam * norm
    sparsity = sparsity - sparsity.mean() + target
    return [float(s) for s in sparsity.clamp(0.0, 0.99)]


def outlier_ratio(score: torch.Tensor, m: float = 5.0) -> float:
    """Fraction of scores above m times the mean score (OWL's layer-wise outlier distribution)."""
    return float((score > m * score.mean()).float().mean())


def sparsity_of(weight: torch.Tensor) -> float:
    return float((weight == 0).float().mean())
