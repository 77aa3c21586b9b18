"""SamplingParams: how one request is decoded (vLLM's names and meanings).

Not for the sampling math itself (sampler.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from miaotui.errors import MiaotuiError


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100..100)
    min_tokens: int = 0  # end-of-text and stop tokens are banned until this many are generated
    structured: Any = None  # an engine.structured.Constraint the output must match (JSON schema, regex, ...)
    seed: int | None = None
    max_tokens: int | None = 16  # None = up to the context length
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.n < 1:
            raise MiaotuiError(f"n must be at least 1, got {self.n}")
        if self.temperature < 0:
            raise MiaotuiError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MiaotuiError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise MiaotuiError(f"top_k must be -1 (off) or positive, got {self.top_k}")
        if not 0 <= self.min_p <= 1:
            raise MiaotuiError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise MiaotuiError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise MiaotuiError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if any(not -100.0 <= v <= 100.0 for v in self.logit_bias.values()):
            raise MiaotuiError("logit_bias values must be in [-100, 100]")
        if self.min_tokens < 0 or (self.max_tokens is not None and self.min_tokens > self.max_tokens):
            raise MiaotuiError(f"min_tokens must be in [0, max_tokens], got {self.min_tokens}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MiaotuiError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise MiaotuiError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Whether the logits change before the pick (penalties, biases, a minimum length)."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or bool(self.logit_bias) or self.min_tokens > 0 or self.structured is not None)
