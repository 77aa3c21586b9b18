"""Static-batch generation: a batch of prompts of different lengths decoded together.

Prompts are left-padded so every row writes its KV entries at the same cache slot; a key
mask hides the padding. Rows leave the batch as they finish. Not for continuous batching
(requests joining mid-flight) — that belongs to the serving engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from miaotui.engine.detokenizer import IncrementalDetokenizer
from miaotui.engine.sampler import Sampler
from miaotui.engine.sampling_params import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.llama import Transformer

_CACHE_GROWTH = 256  # tokens of KV cache added at a time beyond the longest prompt


@dataclass(slots=True)
class StreamEvent:
    """One step's news for one sequence: the new token and the text it made safe to show."""

    request_index: int  # which prompt
    sample_index: int  # which of its n samples
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length"


@dataclass(slots=True)
class _Sequence:
    request_index: int
    sample_index: int
    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    detokenizer: IncrementalDetokenizer
    stop_ids: set[int]
    output_ids: list[int] = field(default_factory=list)


def validate_prompt(prompt_ids: list[int], params: SamplingParams, max_model_len: int) -> int:
    """-> the number of new tokens this request may produce, or a clear error."""
    if not prompt_ids:
        raise MiaotuiError("prompt is empty")
    if len(prompt_ids) >= max_model_len:
        raise MiaotuiError(f"prompt is {len(prompt_ids)} tokens, but the model's context length is "
                           f"{max_model_len} tokens")
    if params.max_tokens is None:
        return max_model_len - len(prompt_ids)
    if len(prompt_ids) + params.max_tokens > max_model_len:
        raise MiaotuiError(f"this model's maximum context length is {max_model_len} tokens, but the prompt "
                           f"({len(prompt_ids)} tokens) plus max_tokens ({params.max_tokens}) exceed it")
    return params.max_tokens


def append_token_text(detok: IncrementalDetokenizer, token: int, stop_ids: set[int], produced: int,
                      max_new_tokens: int) -> tuple[str, str | None]:
    """The stop rules every decoder shares: -> (text made safe to show, finish reason or None)."""
    if token in stop_ids:
        return detok.finish(), "stop"
    text = detok.add_token(token)
    if detok.stopped_by is not None:
        return text, "stop"
    if produced >= max_new_tokens:
        return text + detok.finish(), "length"
    return text, None


class BatchGenerator:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_model_len: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len

    def _sequences(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[_Sequence]:
        seqs = []
        for req, (ids, p) in enumerate(zip(prompts, params, strict=True)):
            max_new = validate_prompt(ids, p, self.max_model_len)
            stop_ids = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.tokenizer.eos_token_ids))
            for sample in range(p.n):
                detok = IncrementalDetokenizer(self.tokenizer, p.skip_special_tokens, p.stop)
                seqs.append(_Sequence(req, sample, list(ids), p, max_new, detok, stop_ids))
        return seqs

    @torch.inference_mode()
    def stream(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[StreamEvent]:
        seqs = self._sequences(prompts, params)
        if not seqs:
            return
        model, device = self.model, self.model.device
        sampler = Sampler()
        for i, s in enumerate(seqs):
            # n samples of one seeded request draw from distinct, reproducible streams.
            sampler.add_sequence(i, None if s.params.seed is None else s.params.seed + s.sample_index)

        lengths = torch.tensor([len(s.prompt_ids) for s in seqs], device=device)
        prompt_len = int(lengths.max())
        pads = prompt_len - lengths  # [B] left padding per row
        tokens = torch.zeros(len(seqs), prompt_len, dtype=torch.long, device=device)
        for row, s in enumerate(seqs):
            tokens[row, int(pads[row]):] = torch.tensor(s.prompt_ids, device=device)
        positions = (torch.arange(prompt_len, device=device)[None] - pads[:, None]).clamp(min=0)
        capacity = min(prompt_len + _CACHE_GROWTH, prompt_len + max(s.max_new_tokens for s in seqs))
        caches = model.allocate_kv_cache(len(seqs), capacity)
        # key_valid[b, j]: cache slot j holds a real token of row b (not padding).
        key_valid = torch.arange(capacity, device=device)[None] >= pads[:, None]
        padded = bool((pads > 0).any())
        mask = None
        if padded:
            causal = torch.ones(prompt_len, prompt_len, dtype=torch.bool, device=device).tril()
            # Padding queries attend to themselves only, so no row is fully masked (NaN-free).
            mask = (causal[None] & key_valid[:, None, :prompt_len]) | torch.eye(
                prompt_len, dtype=torch.bool, device=device)[None]
            mask = mask[:, None]
        seen = None
        if any(s.params.repetition_penalty != 1.0 for s in seqs):
            seen = torch.zeros(len(seqs), model.config.vocab_size, dtype=torch.bool, device=device)
            for row, s in enumerate(seqs):
                seen[row, s.prompt_ids] = True

        logits = model(tokens, positions, caches, 0, mask, last_only=True)  # [B, V]
        active = list(range(len(seqs)))  # seqs index of each batch row
        next_pos = positions[:, -1] + 1  # [B]
        cur = prompt_len
        while active:
            next_tokens = sampler.sample(logits, active, [seqs[i].params for i in active], seen)
            keep: list[int] = []
            for row, seq_index in enumerate(active):
                s = seqs[seq_index]
                token = int(next_tokens[row])
                s.output_ids.append(token)
                if seen is not None:
                    seen[row, token] = True
                text, reason = append_token_text(s.detokenizer, token, s.stop_ids, len(s.output_ids),
                                                 s.max_new_tokens)
                if reason is None:
                    keep.append(row)
                else:
                    sampler.remove_sequence(seq_index)
                yield StreamEvent(s.request_index, s.sample_index, token, text, reason is not None, reason)
            if not keep:
                return
            if len(keep) < len(active):
                rows = torch.tensor(keep, device=device)
                caches = [(k.index_select(0, rows), v.index_select(0, rows)) for k, v in caches]
                key_valid, next_pos, next_tokens = key_valid[rows], next_pos[rows], next_tokens[rows]
                seen = seen[rows] if seen is not None else None
                padded = bool((~key_valid[:, :cur]).any())
                active = [active[r] for r in keep]
            if cur + 1 > caches[0][0].shape[2]:
                caches, key_valid = _grow(caches, key_valid, self.max_model_len)
            step_mask = key_valid[:, None, None, :cur + 1] if padded else None
            logits = model(next_tokens[:, None], next_pos[:, None], caches, cur, step_mask, last_only=True)
            next_pos = next_pos + 1
            cur += 1


def _grow(caches, key_valid: torch.Tensor, limit: int):
    """Enlarge every layer's cache by _CACHE_GROWTH slots (copying: amortised over the slots)."""
    old = caches[0][0].shape[2]
    extra = min(_CACHE_GROWTH, max(limit - old, 1))

    def widen(t: torch.Tensor) -> torch.Tensor:
        pad = t.new_empty(t.shape[0], t.shape[1], extra, t.shape[3])
        return torch.cat([t, pad], dim=2)

    caches = [(widen(k), widen(v)) for k, v in caches]
    key_valid = torch.cat([key_valid, key_valid.new_ones(key_valid.shape[0], extra)], dim=1)
    return caches, key_valid
