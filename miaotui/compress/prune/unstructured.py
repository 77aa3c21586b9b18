"""prune_model: unstructured and N:M pruning of a model's decoder linears, in place.

Methods: magnitude (|w| / sum|w|, no data), wanda (|w| * ||x||, layer by layer), sparsegpt
(OBS saliency with weight reconstruction, layer by layer), taylor and gradient (|w * dL/dw| and
|dL/dw| from calibration gradients). Per-layer sparsity is uniform or OWL outlier-weighted.
Pruned weights are exact zeros: later stages re-derive the masks from them. Not for structured
pruning (structured.py) or gradual schedules (gradual.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from miaotui.compress.calibration import CalibrationSet, capture_inputs, layer_by_layer
from miaotui.compress.prune.importance import element_scores, wanda_score
from miaotui.compress.prune.masks import (
    check_sparsity,
    nm_mask,
    outlier_ratio,
    owl_sparsities,
    parse_pattern,
    sparsity_of,
    unstructured_mask,
)
from miaotui.compress.prune.sensitivity import calibration_gradients
from miaotui.compress.prune.sparsegpt import sparsegpt_prune_weight
from miaotui.compress.selectors import select_modules
from miaotui.compress.streamed import each_layer, layers_of
from miaotui.errors import MiaotuiError
from miaotui.models.transformer import Transformer

METHODS = ("magnitude", "wanda", "sparsegpt", "taylor", "gradient")
NEEDS_CALIBRATION = ("wanda", "sparsegpt", "taylor", "gradient")


@dataclass(slots=True)
class PruneRecord:
    method: str
    sparsity: float
    pattern: str | None
    owl: bool
    calibration: dict[str, Any] | None = None
    layer_sparsity: list[float] = field(default_factory=list)  # target per decoder layer
    modules: dict[str, float] = field(default_factory=dict)  # name -> measured sparsity

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _mask(score: torch.Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> torch.Tensor:
    return nm_mask(score, *nm) if nm is not None else unstructured_mask(score, sparsity, per_row)


def _layer_of(name: str) -> int:
    return int(name.split(".")[1])


@torch.no_grad()
def prune_model(model: Transformer, method: str, sparsity: float, pattern: str | None = None,
                calib: CalibrationSet | None = None, owl: bool = False, owl_lambda: float = 0.08,
                targets: list[str] | None = None, ignore: list[str] | None = None,
                damp: float = 0.01) -> PruneRecord:
    """Prune the selected decoder linears in place; -> what was done, with measured sparsities."""
    if method not in METHODS:
        raise MiaotuiError(f"unknown pruning method '{method}' (available: {', '.join(METHODS)})")
    nm = parse_pattern(pattern)
    if nm is None:
        check_sparsity(sparsity)
    else:
        sparsity = 1 - nm[0] / nm[1]
        if owl:
            raise MiaotuiError("owl sets a sparsity per layer; it cannot be combined with an N:M pattern")
    names = select_modules(model, targets, ignore)
    if nm is not None:
        for n in names:
            k = model.get_submodule(n).in_features
            if k % nm[1]:
                raise MiaotuiError(f"pattern {pattern}: M={nm[1]} does not divide the input dimension {k} of '{n}'")
    if method in NEEDS_CALIBRATION and calib is None:
        raise MiaotuiError(f"pruning method '{method}' needs calibration text (--calib-file)")
    record = PruneRecord(method, sparsity, pattern, owl)
    if calib is not None:
        record.calibration = {"file": calib.source, "sha256": calib.sha256, "samples": int(calib.tokens.shape[0]),
                              "seq_len": int(calib.tokens.shape[1])}
    by_layer: dict[int, list[str]] = {}
    for n in names:
        by_layer.setdefault(_layer_of(n), []).append(n)
    layer_sparsity = {i: sparsity for i in by_layer}
    if owl:
        if calib is None:
            raise MiaotuiError("owl needs calibration text (--calib-file) for its outlier statistics")
        layer_sparsity = dict(zip(by_layer, owl_sparsities(_owl_outlier_ratios(model, calib, by_layer), sparsity,
                                                           owl_lambda), strict=True))
    record.layer_sparsity = [layer_sparsity.get(i, 0.0) for i in range(len(model.layers))]

    if method in ("taylor", "gradient"):
        layers_of(model).load_all(f"pruning by {method}")  # gradients of the whole network
        grads = calibration_gradients(model, calib, names)
        for n in tqdm(names, desc=method, unit="matrix"):
            w = model.get_submodule(n).weight
            w.mul_(_mask(element_scores(method, w, grads[n]), layer_sparsity[_layer_of(n)], nm,
                         per_row=False).to(w.dtype))
    elif method == "magnitude":
        for i, layer in each_layer(model, method):
            for n in by_layer.get(i, []):
                w = layer.get_submodule(n.split(".", 2)[2]).weight
                w.mul_(_mask(element_scores(method, w, None), layer_sparsity[i], nm, per_row=False).to(w.dtype))
    else:
        for i, layer, forward_all in layer_by_layer(model, calib, desc=method):
            local = [n.split(".", 2)[2] for n in by_layer.get(i, [])]
            if not local:
                continue
            stats = capture_inputs(layer, local, forward_all)
            for n in local:
                linear = layer.get_submodule(n)
                acc = stats[n]
                if method == "wanda":
                    score = wanda_score(linear.weight, torch.diag(acc.hessian) * acc.count / 2)
                    linear.weight.mul_(_mask(score, layer_sparsity[i], nm, per_row=True).to(linear.weight.dtype))
                else:
                    linear.weight.copy_(sparsegpt_prune_weight(linear.weight, acc.hessian, layer_sparsity[i], nm,
                                                               damp=damp))
    record.modules = {n: sparsity_of(model.get_submodule(n).weight) for n in names}
    return record


def _owl_outlier_ratios(model: Transformer, calib: CalibrationSet, by_layer: dict[int, list[str]]) -> list[float]:
    """Per selected layer: the share of Wanda scores above 5x their mean (on the unpruned model)."""
    ratios = []
    for i, layer, forward_all in layer_by_layer(model, calib, desc="owl statistics", keep=False):
        local = [n.split(".", 2)[2] for n in by_layer.get(i, [])]
        if not local:
            continue
        stats = capture_inputs(layer, local, forward_all)
        scores = [wanda_score(layer.get_submodule(n).weight, torch.diag(stats[n].hessian) * stats[n].count / 2)
                  for n in local]
        ratios.append(outlier_ratio(torch.cat([s.flatten() for s in scores])))
    return ratios
