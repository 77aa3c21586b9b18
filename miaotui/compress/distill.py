"""Knowledge distillation: train a student to match a teacher's next-token distribution.

loss = (1 - alpha) * T^2 * KL(softmax(z_t / T) || softmax(z_s / T))      soft labels
     + alpha * CE(z_s, next token)                                        hard labels
     + hidden_weight * MSE(final hidden states)  (only when the hidden sizes match)

CPU-friendly: optional bf16 autocast (used by default only where bf16 is native), gradient
accumulation, a checkpoint every N steps that a later run resumes from, and pruned weights kept
at zero. Not for pruning or quantization.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from miaotui.compress.training import TrainingProgress, apply_masks, cosine_lr, sample_batch, sparse_masks
from miaotui.errors import MiaotuiError
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.transformer import Transformer
from miaotui.runtime import cpu_has_fast_bf16

CHECKPOINT_FILE = "distill_state.pt"


@dataclass(slots=True)
class DistillConfig:
    steps: int
    lr: float = 1e-4
    batch: int = 4
    seq_len: int = 256
    grad_accum: int = 1
    temperature: float = 2.0
    alpha: float = 0.1  # weight of the hard-label cross-entropy
    hidden_weight: float = 0.0
    autocast: str = "auto"  # "auto" | "bf16" | "none"
    checkpoint_every: int = 50
    max_seconds: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise MiaotuiError(f"steps must be >= 1, got {self.steps}")
        if self.temperature <= 0:
            raise MiaotuiError(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.alpha <= 1:
            raise MiaotuiError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.grad_accum < 1 or self.batch < 1 or self.seq_len < 2:
            raise MiaotuiError("batch and grad_accum must be >= 1 and seq_len >= 2")
        if self.autocast not in ("auto", "bf16", "none"):
            raise MiaotuiError(f"autocast must be auto, bf16 or none, got '{self.autocast}'")


@dataclass(slots=True)
class DistillResult:
    steps: int
    seconds: float
    resumed_from: int
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["first_loss"], d["last_loss"] = (self.losses[0], self.losses[-1]) if self.losses else (None, None)
        del d["losses"]
        return d


def check_same_tokenizer(teacher: Tokenizer, student: Tokenizer) -> None:
    t, s = teacher.backend.get_vocab(), student.backend.get_vocab()
    if t != s:
        diff = next((tok for tok in t if s.get(tok) != t[tok]), None)
        raise MiaotuiError(f"teacher and student tokenizers differ (vocab {len(t)} vs {len(s)} tokens"
                           f"{f', e.g. {diff!r}' if diff is not None else ''}): distillation needs a shared tokenizer")


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 temperature: float, alpha: float) -> torch.Tensor:
    """logits [B, L, V], targets [B, L] -> scalar."""
    v = student_logits.shape[-1]
    s = student_logits.float().reshape(-1, v)
    t = teacher_logits.float().reshape(-1, v)
    soft = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                    reduction="batchmean") * temperature**2
    hard = F.cross_entropy(s, targets.reshape(-1))
    return (1 - alpha) * soft + alpha * hard


def _use_bf16(mode: str) -> bool:
    return mode == "bf16" or (mode == "auto" and cpu_has_fast_bf16())


def distill(teacher: Transformer, student: Transformer, tokens: torch.Tensor, cfg: DistillConfig,
            checkpoint_dir: str | Path | None = None, progress: bool = True) -> DistillResult:
    """Train `student` in place. tokens: [T] training text. Resumes from checkpoint_dir if it holds a
    checkpoint of the same run (same student shapes and text)."""
    hidden = cfg.hidden_weight > 0 and teacher.config.hidden_size == student.config.hidden_size
    masks = sparse_masks(student)
    params = [p for layer in student.layers for p in layer.parameters()] + list(student.norm.parameters())
    student.train()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(cfg.seed)
    run_id = hashlib.sha256(repr((student.config.to_dict(), tokens.numel(), int(tokens[:4096].sum()), cfg.batch,
                                  cfg.seq_len, cfg.seed)).encode()).hexdigest()[:16]
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir else None
    start_step, losses = 0, []
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, weights_only=False)
        if state.get("run_id") == run_id:
            student.load_state_dict(state["student"], strict=True)
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            start_step, losses = state["step"], state["losses"]
    use_bf16 = _use_bf16(cfg.autocast)
    started = time.perf_counter()
    bar = TrainingProgress("distill", cfg.steps, start_step, cfg.max_seconds, progress)
    step = start_step
    try:
        for step in range(start_step, cfg.steps):
            for group in optimizer.param_groups:
                group["lr"] = cosine_lr(cfg.lr, step, cfg.steps, warmup=min(20, cfg.steps // 10))
            optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for _ in range(cfg.grad_accum):
                x, y = sample_batch(tokens, cfg.batch, cfg.seq_len, generator)
                positions = torch.arange(cfg.seq_len)[None].expand(cfg.batch, -1)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                    with torch.no_grad():
                        t_hidden = teacher.hidden_states(x, positions)
                        t_logits = teacher.logits(t_hidden)
                    s_hidden = student.hidden_states(x, positions)
                    s_logits = student.logits(s_hidden)
                    loss = distill_loss(s_logits, t_logits, y, cfg.temperature, cfg.alpha)
                    if hidden:
                        loss = loss + cfg.hidden_weight * F.mse_loss(s_hidden.float(), t_hidden.float())
                (loss / cfg.grad_accum).backward()
                total += float(loss.detach()) / cfg.grad_accum
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            apply_masks(student, masks)
            losses.append(total)
            within_budget = bar.advance(loss=f"{total:.3f}")
            if ckpt is not None and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save_checkpoint(ckpt, run_id, step + 1, student, optimizer, generator, losses)
            if not within_budget:
                step += 1
                break
        else:
            step = cfg.steps
    except KeyboardInterrupt:
        if ckpt is not None:
            _save_checkpoint(ckpt, run_id, len(losses), student, optimizer, generator, losses)
        raise
    finally:
        bar.close()
        student.eval()
        for p in params:
            p.requires_grad_(False)
            p.grad = None
    return DistillResult(step, time.perf_counter() - started, start_step, losses)


def _save_checkpoint(path: Path, run_id: str, step: int, student: Transformer, optimizer: torch.optim.Optimizer,
                     generator: torch.Generator, losses: list[float]) -> None:
    """Atomic: a half-written checkpoint never replaces a good one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"run_id": run_id, "step": step, "student": student.state_dict(), "optimizer": optimizer.state_dict(),
                "generator": generator.get_state(), "losses": losses}, tmp)
    os.replace(tmp, path)
