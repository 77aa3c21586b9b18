"""EngineConfig: every option of the engine, typed once, from the CLI and the server to LLMEngine.

Not for model loading (dtype, device, parallelism: api.py) or HTTP limits (server/app.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.errors import MiaotuiError

SPECULATION_KINDS = ("ngram", "model")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")  # engine/paged_cache.py


@dataclass(slots=True)
class EngineConfig:
    max_model_len: int | None = None  # None: the model's context length
    kv_cache_mb: float = 512  # memory for the paged KV cache (the draft model's cache comes on top)
    kv_cache_dtype: str = "auto"  # "auto" (the model's dtype), "int8" or "fp8": codes + a scale per token and head
    block_size: int = 16  # tokens per KV-cache block
    max_num_seqs: int = 64  # requests decoded together at most
    max_num_batched_tokens: int = 512  # tokens per step: decode rows + prefill chunks
    enable_prefix_caching: bool = True
    speculate: str | None = None  # None, "ngram" (prompt lookup) or "model" (needs draft_model)
    draft_model: str | None = None  # a model sharing the target's tokenizer; implies speculate="model"
    num_speculative_tokens: int = 4  # drafted tokens per step (a draft model's k adapts, from 1 up to
    # max(8, num_speculative_tokens))

    def __post_init__(self) -> None:
        if self.draft_model and self.speculate is None:
            self.speculate = "model"
        if self.speculate not in (None, *SPECULATION_KINDS):
            raise MiaotuiError(f"unknown speculation '{self.speculate}' (use 'ngram', or a draft model)")
        if self.speculate == "model" and not self.draft_model:
            raise MiaotuiError("speculation by a draft model needs the draft model (draft_model, or --draft PATH)")
        if self.speculate == "ngram" and self.draft_model:
            raise MiaotuiError("give either prompt-lookup speculation or a draft model, not both")
        for name in ("block_size", "max_num_seqs", "max_num_batched_tokens", "num_speculative_tokens"):
            if getattr(self, name) < 1:
                raise MiaotuiError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise MiaotuiError(f"unknown KV-cache dtype '{self.kv_cache_dtype}' (use {', '.join(KV_CACHE_DTYPES)})")
        if self.kv_cache_mb <= 0:
            raise MiaotuiError(f"kv_cache_mb must be > 0, got {self.kv_cache_mb}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise MiaotuiError(f"max_model_len must be at least 2, got {self.max_model_len}")

    @property
    def speculative_tokens(self) -> int:
        """Tokens drafted per step, 0 without speculation."""
        return self.num_speculative_tokens if self.speculate else 0
