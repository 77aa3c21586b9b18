"""Perplexity of a causal LM over a token stream, in sliding windows.

Two protocols share one loop: Hugging Face's (score every token of each window, `score_from=0`)
and llama.cpp's (`llama-perplexity` scores only the second half: `score_from=ctx // 2`).
Not for tokenization or file reading beyond what the caller passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from miaotui.errors import MiaotuiError
from miaotui.models.llama import Transformer


@dataclass(slots=True)
class PerplexityResult:
    ppl: float
    tokens: int  # tokens scored
    seconds: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    windows: int
    ctx: int
    stride: int
    score_from: int

    def to_dict(self) -> dict:
        return asdict(self)


def window_plan(n_tokens: int, ctx: int, stride: int, score_from: int) -> list[tuple[int, int, int]]:
    """-> [(begin, end, first_target)]: window [begin, end), scoring targets [first_target, end).

    A target at position t is predicted from position t - 1. Within a window, predictions start
    at index `score_from`; with overlapping windows (stride < ctx) no target is scored twice.
    """
    if ctx < 2:
        raise MiaotuiError(f"ctx must be at least 2, got {ctx}")
    if not 1 <= stride <= ctx:
        raise MiaotuiError(f"stride must be in [1, ctx={ctx}], got {stride}")
    if not 0 <= score_from < ctx - 1:
        raise MiaotuiError(f"score_from must be in [0, ctx - 1), got {score_from}")
    plan, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        first = max(prev_end, begin + score_from + 1)
        if first < end:
            plan.append((begin, end, first))
        prev_end = end
        if end == n_tokens:
            break
    return plan


@torch.inference_mode()
def perplexity(model: Transformer, token_ids: list[int], ctx: int = 512, stride: int | None = None,
               score_from: int = 0, progress: bool = True) -> PerplexityResult:
    stride = stride or ctx
    plan = window_plan(len(token_ids), ctx, stride, score_from)
    if not plan:
        raise MiaotuiError(f"text too short to score: {len(token_ids)} tokens")
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.device)
    total_nll, total_count = 0.0, 0
    start = time.perf_counter()
    for begin, end, first in tqdm(plan, desc="perplexity", unit="window", disable=not progress):
        window = ids[begin:end][None]  # [1, L]
        positions = torch.arange(end - begin, device=model.device)[None]
        hidden = model.hidden_states(window, positions)  # [1, L, D]
        # Only the predicting positions need the (large) vocabulary projection.
        pred_from = first - 1 - begin
        logits = model.logits(hidden[0, pred_from:end - begin - 1])  # [T, V] float32
        targets = ids[first:end]
        nll = torch.nn.functional.cross_entropy(logits, targets, reduction="sum")
        total_nll += float(nll)
        total_count += targets.numel()
    seconds = time.perf_counter() - start
    mean = total_nll / total_count
    return PerplexityResult(math.exp(mean), total_count, seconds, mean, len(plan), ctx, stride, score_from)
