"""Gradual pruning during fine-tuning (Zhu & Gupta, 2017): sparsity rises on a cubic schedule
from initial_sparsity to final_sparsity between begin_step and end_step, updated every
`frequency` steps, while the surviving weights keep training on a text file.

Not for one-shot pruning (unstructured.py).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from miaotui.compress.prune.importance import magnitude_importance, taylor_score
from miaotui.compress.prune.masks import check_sparsity, unstructured_mask
from miaotui.compress.selectors import select_modules
from miaotui.compress.training import TrainingProgress, cosine_lr, sample_batch
from miaotui.errors import MiaotuiError
from miaotui.models.transformer import Transformer


@dataclass(frozen=True, slots=True)
class GradualSchedule:
    initial_sparsity: float
    final_sparsity: float
    begin_step: int
    end_step: int
    frequency: int = 10

    def __post_init__(self) -> None:
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        check_sparsity(self.final_sparsity, "final_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise MiaotuiError(f"initial_sparsity ({self.initial_sparsity}) must not exceed final_sparsity "
                               f"({self.final_sparsity})")
        if self.begin_step < 0 or self.end_step <= self.begin_step:
            raise MiaotuiError(f"need 0 <= begin_step < end_step, got begin_step={self.begin_step}, "
                               f"end_step={self.end_step}")
        if self.frequency < 1:
            raise MiaotuiError(f"frequency must be >= 1, got {self.frequency}")

    def sparsity(self, step: int) -> float:
        """Target sparsity at `step`: 0 before begin_step; then the cubic ramp, held constant between
        updates (every `frequency` steps) and at final_sparsity from end_step on."""
        if step < self.begin_step:
            return 0.0
        t = min(self.begin_step + (step - self.begin_step) // self.frequency * self.frequency, self.end_step)
        progress = (t - self.begin_step) / (self.end_step - self.begin_step)
        return self.final_sparsity + (self.initial_sparsity - self.final_sparsity) * (1 - progress) ** 3

    def is_update(self, step: int) -> bool:
        return step == self.end_step or (self.begin_step <= step < self.end_step
                                         and (step - self.begin_step) % self.frequency == 0)


@dataclass(slots=True)
class GradualRecord:
    schedule: dict[str, Any]
    criterion: str
    steps: int
    seconds: float
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, measured sparsity) at each update
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def train_gradual(model: Transformer, tokens: torch.Tensor, schedule: GradualSchedule, steps: int,
                  criterion: str = "magnitude", lr: float = 5e-5, batch: int = 4, seq_len: int = 256,
                  targets: list[str] | None = None, ignore: list[str] | None = None, seed: int = 0,
                  progress: bool = True, max_seconds: float | None = None) -> GradualRecord:
    """Fine-tune the decoder layers on next-token loss while pruning the selected linears gradually."""
    if criterion not in ("magnitude", "taylor"):
        raise MiaotuiError(f"gradual pruning ranks by magnitude or taylor; got '{criterion}'")
    if steps <= schedule.end_step:
        raise MiaotuiError(f"steps ({steps}) must exceed end_step ({schedule.end_step}) so the final "
                           f"sparsity is reached and then fine-tuned")
    names = select_modules(model, targets, ignore)
    weights = {n: model.get_submodule(n).weight for n in names}
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    params = [p for layer in model.layers for p in layer.parameters()]
    model.train()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    record = GradualRecord(asdict(schedule), criterion, steps, 0.0)
    start = time.perf_counter()
    bar = TrainingProgress("gradual prune", steps, max_seconds=max_seconds, enabled=progress)
    try:
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(lr, step, steps, warmup=min(20, steps // 10))
            x, y = sample_batch(tokens, batch, seq_len, generator)
            logits = model(x, torch.arange(seq_len)[None].expand(batch, -1))
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if schedule.is_update(step):
                target = schedule.sparsity(step)
                with torch.no_grad():
                    for n, w in weights.items():
                        score = magnitude_importance(w) if criterion == "magnitude" else taylor_score(w, w.grad)
                        masks[n] = unstructured_mask(score * masks[n], target, per_row=False)
                record.curve.append((step, _measured(weights, masks)))
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            with torch.no_grad():
                for n, w in weights.items():
                    w.mul_(masks[n])
            record.losses.append(float(loss.detach()))
            if not bar.advance(loss=f"{record.losses[-1]:.3f}", sparsity=f"{schedule.sparsity(step):.2f}"):
                break  # the time budget is spent: the masks so far stay (the schedule may not be complete)
    finally:
        bar.close()
        model.eval()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        record.seconds = time.perf_counter() - start
    return record


def _measured(weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / total
