"""Lossless speculative decoding inside the engine: cheap drafts for many requests at once, checked
by the target in the step that decodes them.

- Drafts: prompt lookup (n-gram matching in the context, no model; its q is one-hot), or a small
  model sharing the tokenizer (any miaotui checkpoint: quantized, pruned, distilled). The draft
  model keeps its own paged KV cache, addressed by the target's block tables, and drafts for all
  decode rows together: one packed forward per drafted position.
- Greedy: the longest prefix of the draft the target would have chosen is kept, then the target's
  own next token: the output is exactly the target's.
- Sampling: the rule of Leviathan et al. / Chen et al. (2023). A drafted token d is accepted with
  probability min(1, p(d) / q(d)); on rejection the token is drawn from norm(max(0, p − q)); if
  every drafted token is accepted, one more comes from p. The output distribution is the target's.
Not for scheduling which rows draft (llm_engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.engine.paged_cache import PagedKVCache
from miaotui.engine.request import EngineRequest
from miaotui.engine.sampler import filter_logits, greedy_pick
from miaotui.engine.sampling_params import SamplingParams
from miaotui.engine.step import PackRow, pack_rows, run_model_step

MAX_ADAPTIVE_K = 8  # a draft model's k grows after fully accepted drafts, up to this


@dataclass(slots=True)
class SpecStats:
    steps: int = 0  # target passes that verified drafted tokens
    drafted: int = 0
    accepted: int = 0
    generated: int = 0  # tokens those passes produced (accepted drafts + the target's own)

    @property
    def mean_accepted_per_step(self) -> float:
        """Tokens produced per verifying target pass."""
        return self.generated / max(self.steps, 1)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.drafted, 1)


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] -> the distribution the target samples from (temperature, top-k/p, min-p), on the
    CPU, where every sequence's torch.Generator lives."""
    return torch.softmax(filter_logits(logits.float().cpu() / params.temperature, params), -1)


class NgramProposer:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens (n from
    max_n down to min_n) and propose the tokens that followed it."""

    def __init__(self, max_n: int = 3, min_n: int = 1) -> None:
        self.max_n, self.min_n = max_n, min_n

    def propose_one(self, context: list[int], k: int) -> list[int]:
        for n in range(self.max_n, self.min_n - 1, -1):
            if len(context) <= n:
                continue
            tail = context[-n:]
            for start in range(len(context) - n - 1, -1, -1):
                if context[start:start + n] == tail:
                    follow = context[start + n:start + n + k]
                    if follow:
                        return follow
        return []

    def propose(self, rows: list[tuple[EngineRequest, int]], generators: list[torch.Generator]) -> None:
        for req, k in rows:
            req.draft, req.draft_probs = self.propose_one(req.tokens, k), None


class DraftModelProposer:
    """A small model drafting k tokens for every decode row at once, over its own paged KV cache
    (the target's block tables address it: a slot holds the draft's keys for the same token)."""

    def __init__(self, model, num_blocks: int, block_size: int, kv_cache_dtype: str = "auto") -> None:
        self.model = model
        self.block_size = block_size
        self.cache = PagedKVCache(model.config, num_blocks, block_size, model.dtype, model.device, kv_cache_dtype)

    @torch.inference_mode()
    def propose(self, rows: list[tuple[EngineRequest, int]], generators: list[torch.Generator]) -> None:
        """Set each request's draft (k tokens) and, for sampled requests, the draft's distributions."""
        feeds = {id(req): req.tokens[req.draft_computed:] for req, _ in rows}  # >= 1: the pending token
        starts = {id(req): req.draft_computed for req, _ in rows}
        for req, _ in rows:
            req.draft, req.draft_probs = [], None if req.params.greedy else []
        active = list(zip(rows, generators, strict=True))
        while active:
            pack = [PackRow(feeds[id(req)], starts[id(req)], req.table) for (req, _), _ in active]
            logits, _ = run_model_step(self.model, self.cache, pack_rows(pack, self.block_size)[0])  # [R, V]
            greedy = greedy_pick(logits)
            for i, ((req, _), gen) in enumerate(active):
                if req.params.greedy:
                    token = int(greedy[i])
                else:
                    q = target_probs(logits[i], req.params)
                    token = int(torch.multinomial(q, 1, generator=gen))
                    req.draft_probs.append(q)
                req.draft.append(token)
                starts[id(req)] += len(feeds[id(req)])
                feeds[id(req)] = [token]
            active = [(row, gen) for row, gen in active if len(row[0].draft) < row[1]]
        for req, k in rows:
            req.draft_computed = len(req.tokens) + k - 1  # fed up to d_{k-1}; d_k never was


def verify(draft: list[int], draft_probs: list[torch.Tensor] | None, logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator) -> tuple[int, int]:
    """logits [k + 1, V] at [pending token, d1, ..., dk] -> (drafts accepted, the target's next token)."""
    if params.greedy:
        picks = greedy_pick(logits[:len(draft) + 1]).tolist()
        accepted = 0
        while accepted < len(draft) and picks[accepted] == draft[accepted]:
            accepted += 1
        return accepted, picks[accepted]
    for i, d in enumerate(draft):
        p = target_probs(logits[i], params)
        q_d = 1.0 if draft_probs is None else float(draft_probs[i][d])
        if float(torch.rand((), generator=generator)) < min(1.0, float(p[d]) / max(q_d, 1e-20)):
            continue
        q = torch.nn.functional.one_hot(torch.tensor(d), p.shape[0]).float() if draft_probs is None \
            else draft_probs[i]
        residual = (p - q).clamp(min=0)
        source = residual / residual.sum() if float(residual.sum()) > 0 else p
        return i, int(torch.multinomial(source, 1, generator=generator))
    return len(draft), int(torch.multinomial(target_probs(logits[len(draft)], params), 1, generator=generator))
