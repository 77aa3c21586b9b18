"""SamplingParams: how one request is decoded (vLLM's names and meanings).

Not for the sampling math itself (sampler.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miaotui.errors import MiaotuiError


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the prompt or output
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
        if self.max_tokens is not None and self.max_tokens < 1:
            raise MiaotuiError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise MiaotuiError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
