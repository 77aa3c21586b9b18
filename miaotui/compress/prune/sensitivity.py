"""What pruning criteria need from calibration text: loss gradients, and input norms per linear.

Not for the criteria themselves (importance.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from miaotui.compress.calibration import CalibrationSet, capture_inputs, layer_by_layer
from miaotui.models.transformer import Transformer


def calibration_gradients(model: Transformer, calib: CalibrationSet, names: list[str], batch: int = 2
                          ) -> dict[str, torch.Tensor]:
    """dL/dW of the next-token loss over the calibration samples (mean over batches), per module name."""
    params = {n: model.get_submodule(n).weight for n in names}
    grads = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for p in params.values():
        p.requires_grad_(True)
    tokens = calib.tokens
    steps = 0
    try:
        for i in tqdm(range(0, tokens.shape[0], batch), desc="gradients", unit="batch"):
            x = tokens[i:i + batch]
            positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
            with torch.enable_grad():
                logits = model(x[:, :-1], positions[:, :-1])
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
                loss.backward()
            for n, p in params.items():
                grads[n] += p.grad.float()
                p.grad = None
            steps += 1
    finally:
        for p in params.values():
            p.requires_grad_(False)
    return {n: g / max(steps, 1) for n, g in grads.items()}


def input_sq_sums(model: Transformer, calib: CalibrationSet, names: list[str]) -> dict[str, torch.Tensor]:
    """sum over calibration tokens of x_j^2 for the inputs of each named decoder linear: {name: [K]}
    (Wanda's ||x_j||_2 squared), on the model as it is (one layer-by-layer pass, nothing modified)."""
    by_layer: dict[int, list[str]] = {}
    for n in names:
        by_layer.setdefault(int(n.split(".")[1]), []).append(n.split(".", 2)[2])
    out = {}
    for i, layer, forward_all in layer_by_layer(model, calib, desc="input norms"):
        if i not in by_layer:
            continue
        stats = capture_inputs(layer, by_layer[i], forward_all)
        for local, acc in stats.items():
            out[f"layers.{i}.{local}"] = torch.diag(acc.hessian) * acc.count / 2
    return out
