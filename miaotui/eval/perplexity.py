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
from miaotui.models.transformer import Transformer


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
               score_from: int = 0, progress: bool = True, kv_cache_dtype: str | None = None) -> PerplexityResult:
    """kv_cache_dtype: None, attention over the window's own keys and values; else each window is one
    engine prefill step through a paged KV cache of that dtype ("auto", "int8", "fp8"), every
    position attending over the cache's keys and values (llama-perplexity's -ctk / -ctv)."""
    stride = stride or ctx
    plan = window_plan(len(token_ids), ctx, stride, score_from)
    if not plan:
        raise MiaotuiError(f"text too short to score: {len(token_ids)} tokens")
    ids = torch.tensor(token_ids, dtype=torch.long, device=model.device)
    through_cache = None if kv_cache_dtype is None else _window_through_cache(model, ctx, kv_cache_dtype)
    total_nll, total_count = 0.0, 0
    start = time.perf_counter()
    for begin, end, first in tqdm(plan, desc="perplexity", unit="window", disable=not progress):
        window = ids[begin:end][None]  # [1, L]
        positions = torch.arange(end - begin, device=model.device)[None]
        if through_cache is not None:
            hidden = through_cache(token_ids[begin:end])
        else:
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


def _window_through_cache(model: Transformer, ctx: int, kv_cache_dtype: str):
    """-> a function: a window's token ids -> hidden states [1, L, D] from one prefill step that
    writes the window's keys and values into a paged cache and attends over what the cache holds."""
    from miaotui.engine.paged_cache import PagedKVCache
    from miaotui.engine.step import PackRow, pack_rows

    block_size = 16
    table = list(range(-(-ctx // block_size)))
    cache = PagedKVCache(model.config, len(table), block_size, model.dtype, model.device, kv_cache_dtype)

    def run(window: list[int]) -> torch.Tensor:
        step, _, _ = pack_rows([PackRow(window, 0, table)], block_size)
        views = cache.step_views(step.slots.to(model.device), step.groups)
        return model.hidden_states(step.tokens.to(model.device), step.positions.to(model.device), views)

    return run


@torch.inference_mode()
def decode_perplexity(model: Transformer, token_ids: list[int], ctx: int = 512, score_from: int | None = None,
                      max_windows: int | None = None, progress: bool = True, kv_cache_dtype: str = "auto"
                      ) -> PerplexityResult:
    """Perplexity as the engine's decode steps compute it: each window's unscored head is one
    prefill step into a paged KV cache, then every scored token is one single-row decode step (the
    few-row kernels, the fused decode layer, the decode head), teacher-forced. Same windows and
    targets as perplexity(..., score_from=score_from) (default ctx // 2: llama.cpp's protocol), so
    the two measure the same predictions through the prefill and the decode kernels.
    kv_cache_dtype: the paged cache's ("auto", "int8", "fp8")."""
    from miaotui.engine.paged_cache import PagedKVCache
    from miaotui.engine.step import PackRow, pack_rows, run_model_step

    score_from = ctx // 2 if score_from is None else score_from
    plan = window_plan(len(token_ids), ctx, ctx, score_from)[:max_windows]
    if not plan:
        raise MiaotuiError(f"text too short to score: {len(token_ids)} tokens")
    block_size = 16
    table = list(range(-(-ctx // block_size)))
    cache = PagedKVCache(model.config, len(table), block_size, model.dtype, model.device, kv_cache_dtype)
    total_nll, total_count = 0.0, 0
    start = time.perf_counter()
    steps = sum(end - first for _, end, first in plan)
    with tqdm(total=steps, desc="decode perplexity", unit="token", disable=not progress) as bar:
        for begin, end, first in plan:
            window = token_ids[begin:end]
            pos = first - begin  # the first target's index: predicted from the token before it
            rows = [PackRow(window[:pos], 0, table)] + [PackRow([window[t]], t, table)
                                                        for t in range(pos, end - begin - 1)]
            for t, row in enumerate(rows):
                step, _, _ = pack_rows([row], block_size)
                logits, _ = run_model_step(model, cache, step)  # [1, V] float32
                total_nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor([window[pos + t]])))
                total_count += 1
                bar.update(1)
    seconds = time.perf_counter() - start
    mean = total_nll / total_count
    return PerplexityResult(math.exp(mean), total_count, seconds, mean, len(plan), ctx, ctx, score_from)


@dataclass(slots=True)
class Fidelity:
    """A model scored against a reference on the same windows: perplexity in both protocols (all of
    each window after its first token; llama.cpp's second half) and the mean KL divergence from the
    reference's next-token distribution, KL(P_ref || P_model) in nats, over the same targets
    (what `llama-perplexity --kl-divergence` reports over its second halves)."""
    ppl_full: float
    ppl_half: float
    kl_full: float
    kl_half: float
    tokens_full: int
    tokens_half: int
    top1_agree_half: float  # share of second-half positions where both pick the same next token

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def reference_log_probs(reference: Transformer, token_ids: list[int], ctx: int = 512, progress: bool = True
                        ) -> list[torch.Tensor]:
    """The reference's next-token log-probabilities per window of ctx tokens (no overlap): [L-1, V]
    float16 each, computed once for scoring many models against it (fidelity)."""
    plan = window_plan(len(token_ids), ctx, ctx, 0)
    if not plan:
        raise MiaotuiError(f"text too short to score: {len(token_ids)} tokens")
    ids = torch.tensor(token_ids, dtype=torch.long)
    out = []
    for begin, end, _ in tqdm(plan, desc="reference", unit="window", disable=not progress):
        window = ids[begin:end][None].to(reference.device)
        positions = torch.arange(end - begin, device=reference.device)[None]
        out.append(torch.log_softmax(reference(window, positions)[0, :-1].float().cpu(), -1).half())
    return out


@torch.inference_mode()
def fidelity(model: Transformer, reference: list[torch.Tensor], token_ids: list[int], ctx: int = 512,
             progress: bool = True) -> Fidelity:
    """model scored against the reference's log-probabilities (reference_log_probs over the same
    token_ids and ctx): one forward per window scores both protocols at once."""
    plan = window_plan(len(token_ids), ctx, ctx, 0)
    if len(plan) != len(reference):
        raise MiaotuiError(f"the reference holds {len(reference)} windows, the text gives {len(plan)}")
    ids = torch.tensor(token_ids, dtype=torch.long)
    sums = {"nll_full": 0.0, "nll_half": 0.0, "kl_full": 0.0, "kl_half": 0.0, "agree": 0.0}
    n_full = n_half = 0
    half = ctx // 2
    for (begin, end, _), ref in tqdm(list(zip(plan, reference, strict=True)), desc="fidelity", unit="window",
                                     disable=not progress):
        window = ids[begin:end][None]
        positions = torch.arange(end - begin)[None]
        # [L-1, V] log-probabilities of the next token, float32
        logp = torch.log_softmax(model(window.to(model.device), positions.to(model.device))[0, :-1].float().cpu(), -1)
        ref = ref.float()
        targets = ids[begin + 1:end]
        nll = -logp.gather(1, targets[:, None])[:, 0]  # [L-1]
        kl = (ref.exp() * (ref - logp)).sum(-1)  # [L-1]
        second = slice(half, None)  # predictions from position ctx/2 on: llama-perplexity's targets
        sums["nll_full"] += float(nll.sum())
        sums["kl_full"] += float(kl.sum())
        sums["nll_half"] += float(nll[second].sum())
        sums["kl_half"] += float(kl[second].sum())
        sums["agree"] += float((logp[second].argmax(-1) == ref[second].argmax(-1)).sum())
        n_full += nll.numel()
        n_half += nll[second].numel()
    return Fidelity(math.exp(sums["nll_full"] / n_full), math.exp(sums["nll_half"] / n_half),
                    sums["kl_full"] / n_full, sums["kl_half"] / n_half, n_full, n_half, sums["agree"] / n_half)
