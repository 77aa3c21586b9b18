"""Shared pieces of miaotui's short CPU fine-tuning loops (QAT, gradual pruning, distillation):
reading a text file into training windows, the learning-rate schedule, and keeping pruned
weights at zero. Not for any loss (each trainer owns its own).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from miaotui.data import default_skip, read_text, text_path
from miaotui.errors import MiaotuiError
from miaotui.loaders.tokenizer import Tokenizer

SPARSE_WEIGHT_THRESHOLD = 0.1  # a weight with at least this fraction of exact zeros counts as pruned


def load_training_tokens(path: str | Path | None, tokenizer: Tokenizer, skip_tokens: int | None = None,
                         min_tokens: int = 1024) -> torch.Tensor:
    """The whole file as one token stream [T] (after skip_tokens, to keep it apart from evaluation).
    path None: the bundled WikiText-2 test split (miaotui/data), past its evaluated tokens."""
    path = text_path(path)
    skip_tokens = default_skip(path, skip_tokens)
    ids = tokenizer.encode(read_text(path), add_special_tokens=False)
    ids = ids[skip_tokens:]
    if len(ids) < min_tokens:
        raise MiaotuiError(f"text file '{path}' is too short: {len(ids):,} tokens after skipping {skip_tokens:,}, "
                           f"need at least {min_tokens:,}")
    return torch.tensor(ids)


def sample_batch(tokens: torch.Tensor, batch: int, seq_len: int, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random non-overlapping-aligned windows: inputs x [B, L] and next-token targets y [B, L]."""
    windows = (tokens.numel() - 1) // seq_len
    if windows < 1:
        raise MiaotuiError(f"training text has {tokens.numel()} tokens, fewer than one window of {seq_len + 1}")
    starts = (torch.randint(0, windows, (batch,), generator=generator) * seq_len).tolist()
    x = torch.stack([tokens[i:i + seq_len] for i in starts])
    y = torch.stack([tokens[i + 1:i + seq_len + 1] for i in starts])
    return x, y


def cosine_lr(base: float, step: int, steps: int, warmup: int = 0) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def sparse_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep-masks (weight != 0) of every 2-D weight that has been pruned, by parameter name."""
    masks = {}
    for name, p in model.named_parameters():
        if p.dim() == 2 and "embed" not in name and float((p == 0).float().mean()) >= SPARSE_WEIGHT_THRESHOLD:
            masks[name] = p.detach() != 0
    return masks


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Re-zero pruned weights (after an optimizer step) so masks stay applied through training."""
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        params[name].mul_(mask)


class TrainingProgress:
    """A training loop's progress bar. With a time budget it counts the budget's seconds, so its
    time left is the budget's rest (the step count may end the loop sooner); else it counts steps."""

    def __init__(self, desc: str, steps: int, start_step: int = 0, max_seconds: float | None = None,
                 enabled: bool = True) -> None:
        self.steps, self.step, self.max_seconds = steps, start_step, max_seconds
        self.started = time.perf_counter()
        if max_seconds is None:
            self.bar = tqdm(total=steps, initial=start_step, desc=desc, unit="step", disable=not enabled)
        else:
            self.bar = tqdm(total=round(max_seconds), desc=f"{desc}, {max_seconds / 60:g}-min budget", unit="s",
                            disable=not enabled, bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} s "
                                                            "[{elapsed}<{remaining}{postfix}]")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def advance(self, **postfix: str) -> bool:
        """One step done; -> False once the time budget is spent."""
        self.step += 1
        if self.max_seconds is None:
            self.bar.update(1)
            self.bar.set_postfix(postfix)
            return True
        elapsed = self.elapsed
        self.bar.update(min(elapsed, self.max_seconds) - self.bar.n)
        self.bar.set_postfix({"step": f"{self.step}/{self.steps}", **postfix})
        return elapsed <= self.max_seconds

    def close(self) -> None:
        self.bar.close()
