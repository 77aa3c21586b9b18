"""Activation importance: for every linear layer, the mean square of each input column over
calibration text, E[x_j^2] [K]: the output error a rounding error in column j causes grows with it.
It is what llama.cpp's `llama-imatrix` collects; export-gguf weighs its block rounding by it
(loaders/gguf_kquants.py), and the head's (lm_head) is collected when the model has its own.

Not for the full second moments GPTQ needs (calibration.HessianAccumulator).
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.compress.calibration import CalibrationSet, layer_by_layer
from miaotui.models.plan import layer_plan
from miaotui.models.transformer import Transformer


class _SquareMean:
    def __init__(self, k: int) -> None:
        self.sum = torch.zeros(k, dtype=torch.float64)
        self.count = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.sum += x.pow(2).sum(0).double()
        self.count += x.shape[0]

    def mean(self) -> torch.Tensor:
        return (self.sum / max(self.count, 1)).float()


def _hooked(modules: dict[str, nn.Module]) -> tuple[dict[str, _SquareMean], list]:
    stats, handles = {}, []
    for name, module in modules.items():
        acc = stats[name] = _SquareMean(module.in_features)
        handles.append(module.register_forward_hook(lambda _m, args, _o, acc=acc: acc.add(args[0].detach())))
    return stats, handles


@torch.inference_mode()
def activation_importance(model: Transformer, calib: CalibrationSet) -> dict[str, torch.Tensor]:
    """{module name ('layers.3.mlp.down_proj', 'lm_head'): E[x_j^2] [K]} over the calibration windows,
    a decoder layer at a time (a streamed model holds one). The hooks ride on the pass layer_by_layer
    makes anyway to feed the next layer: one forward per layer."""
    out: dict[str, torch.Tensor] = {}
    pending: tuple[int, dict[str, _SquareMean], list] | None = None
    head = _SquareMean(model.config.hidden_size) if model.lm_head is not None else None

    def finish() -> None:
        i, stats, handles = pending
        for h in handles:
            h.remove()
        out.update({f"layers.{i}.{n}": acc.mean() for n, acc in stats.items() if acc.count})

    last = len(model.layers) - 1
    for i, layer, _ in layer_by_layer(model, calib, "importance", keep=False):
        if pending is not None:
            finish()
        stats, handles = _hooked({n: layer.get_submodule(n) for n in layer_plan(model.config, i).linears})
        if i == last and head is not None:  # the head's input: the final norm of the last layer's output
            handles.append(layer.register_forward_hook(lambda _m, _a, output: head.add(model.norm(output))))
        pending = (i, stats, handles)
    if pending is not None:
        finish()
    if head is not None and head.count:
        out["lm_head"] = head.mean()
    return out
