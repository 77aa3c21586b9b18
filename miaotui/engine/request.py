"""One request's state inside the engine, what the engine hands back for it, and the rules every
request follows: prompt validation and when to stop.

Not for scheduling (llm_engine.py) or for sampling (sampler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from miaotui.engine.detokenizer import IncrementalDetokenizer
from miaotui.engine.sampling_params import SamplingParams
from miaotui.errors import MiaotuiError


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the k most likely tokens at this position


@dataclass(slots=True)
class EngineOutput:
    """What one step produced for one request."""

    request_id: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # once, when the prompt is scored
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort | error
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0


@dataclass(slots=True)
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    sink: Callable[[EngineOutput], None]
    logprobs: int | None = None  # top-k log-probs per generated token; None = off
    prompt_logprobs: int | None = None  # score the prompt too (completions' echo + logprobs)
    # -- state, owned by the engine thread ------------------------------------------------
    seq_id: int = 0
    max_new_tokens: int = 0
    output_ids: list[int] = field(default_factory=list)
    table: list[int] = field(default_factory=list)  # KV blocks (the draft model's cache uses the same)
    computed: int = 0  # tokens whose keys/values are in the cache
    draft_computed: int = 0  # ... in the draft model's cache
    detok: IncrementalDetokenizer | None = None
    stop_ids: set[int] = field(default_factory=set)
    matcher: Any = None  # llguidance's matcher of a structured output (engine/structured.py), or None
    arrival: float = field(default_factory=time.perf_counter)
    prompt_scores: list[TokenLogprob | None] = field(default_factory=list)
    draft: list[int] = field(default_factory=list)  # this step's speculative tokens
    draft_probs: list | None = None  # the draft's distribution for each (sampled drafts), else None
    spec_k: int = 0  # tokens to draft next (a draft model's k adapts)

    @property
    def tokens(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.output_ids)


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
    """The stop rule: -> (text made safe to show, finish reason or None)."""
    if token in stop_ids:
        return detok.finish(), "stop"
    text = detok.add_token(token)
    if detok.stopped_by is not None:
        return text, "stop"
    if produced >= max_new_tokens:
        return text + detok.finish(), "length"
    return text, None
