"""Quantization-aware training: fine-tune with fake-quantized weights, then store them packed.

Forward uses Q(W) (the exact grid the packed model will use); the straight-through estimator
passes gradients to the float W as if Q were the identity. After training, the float weights
are rounded once more (RTN) into QuantLinear layers. Not for post-training methods (apply.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from miaotui.compress.quantize.apply import QuantizationRecord, rtn_quantize_layer
from miaotui.compress.training import TrainingProgress, cosine_lr, sample_batch
from miaotui.layers.linear import Linear
from miaotui.layers.quant_formats import QuantFormat, fake_quantize
from miaotui.models.plan import layer_plan
from miaotui.models.transformer import Transformer


class FakeQuantize(nn.Module):
    """A weight parametrization: the layer sees Q(W), gradients reach W straight through."""

    def __init__(self, fmt: QuantFormat) -> None:
        super().__init__()
        self.fmt = fmt

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (fake_quantize(w, self.fmt) - w).detach()


@dataclass(slots=True)
class QATResult:
    steps: int
    seconds: float
    first_loss: float
    last_loss: float


def train_qat(model: Transformer, tokens: torch.Tensor, fmt: QuantFormat, steps: int, lr: float = 2e-5,
              batch: int = 4, seq_len: int = 256, max_seconds: float | None = None, seed: int = 0,
              progress: bool = True) -> QATResult:
    """tokens: [T] training text. Trains decoder-layer linears and norms; embeddings stay frozen."""
    fake: list[Linear] = []
    for i, layer in enumerate(model.layers):
        for name in layer_plan(model.config, i).linears:
            module = layer.get_submodule(name)
            parametrize.register_parametrization(module, "weight", FakeQuantize(fmt))  # same W, Q(W) forward
            fake.append(module)
    params = [p for layer in model.layers for p in layer.parameters()]
    model.train()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    start = time.perf_counter()
    bar = TrainingProgress("qat", steps, max_seconds=max_seconds, enabled=progress)
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, steps)
            x, y = sample_batch(tokens, batch, seq_len, generator)
            positions = torch.arange(seq_len)[None].expand(batch, -1)
            logits = model(x, positions)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(float(loss.detach()))
            if not bar.advance(loss=f"{losses[-1]:.3f}"):
                break
    finally:  # the model comes back plain even when training stops with an error
        bar.close()
        model.eval()
        for p in params:
            p.requires_grad_(False)
        for module in fake:  # back to the plain trained W (pack_after_qat rounds it onto the same grid)
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return QATResult(len(losses), time.perf_counter() - start, losses[0], sum(losses[-5:]) / len(losses[-5:]))


def pack_after_qat(model: Transformer, fmt: QuantFormat, result: QATResult, text_sha256: str) -> QuantizationRecord:
    record = QuantizationRecord("qat", fmt.to_dict(), options={
        "steps": result.steps, "seconds": result.seconds, "first_loss": result.first_loss,
        "last_loss": result.last_loss, "text_sha256": text_sha256})
    for i, layer in enumerate(model.layers):
        rtn_quantize_layer(layer, i, layer_plan(model.config, i).linears, fmt, False, record)
    return record
