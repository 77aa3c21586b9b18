"""The Python entry point: LLM and its generate / chat / stream methods, close to vLLM's API.

Not for the decoding loop (engine/generator.py) or argument parsing (cli.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from miaotui.engine.generator import BatchGenerator, StreamEvent
from miaotui.engine.sampling_params import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.loaders.load import load_model
from miaotui.runtime import resolve_dtypes

Prompt = str | list[int]
Messages = list[dict[str, Any]]


@dataclass(slots=True)
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(slots=True)
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    """A loaded model ready to generate: `LLM("smollm2-135m").generate("Hello", SamplingParams())`."""

    def __init__(self, model: str, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 max_model_len: int | None = None, decode_weight_dtype: str | torch.dtype | None = "auto") -> None:
        self.device = torch.device(device)
        self.dtype, self.decode_weight_dtype = resolve_dtypes(dtype, decode_weight_dtype, self.device)
        loaded = load_model(model, self.dtype, self.device, self.decode_weight_dtype)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.path = loaded.path
        self.format = loaded.format
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self._generator = BatchGenerator(self.model, self.tokenizer, self.max_model_len)

    # -- prompts -------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt)
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            vocab = self.config.vocab_size
            if any(not 0 <= t < vocab for t in prompt):
                raise MiaotuiError(f"prompt token ids must be in [0, {vocab})")
            return list(prompt)
        raise MiaotuiError("a prompt must be a string or a list of token ids")

    def _normalise(self, prompts: Prompt | Sequence[Prompt],
                   sampling_params: SamplingParams | Sequence[SamplingParams] | None
                   ) -> tuple[list[Prompt], list[SamplingParams]]:
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params = [sampling_params] * len(prompts)
        else:
            params = list(sampling_params)
            if len(params) != len(prompts):
                raise MiaotuiError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        return prompts, params

    # -- generation ------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Generate for all prompts together as one batch; results come back in input order."""
        prompts, params = self._normalise(prompts, sampling_params)
        ids = [self.encode_prompt(p) for p in prompts]
        results = [RequestOutput(p if isinstance(p, str) else None, i,
                                 [CompletionOutput(k) for k in range(sp.n)])
                   for p, i, sp in zip(prompts, ids, params, strict=True)]
        for event in self._generator.stream(ids, params):
            out = results[event.request_index].outputs[event.sample_index]
            out.text += event.text
            if event.token_id is not None:
                out.token_ids.append(event.token_id)
            if event.finished:
                out.finish_reason = event.finish_reason
        return results

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Yield StreamEvents as tokens are produced (their text never splits a character)."""
        prompts, params = self._normalise(prompts, sampling_params)
        return self._generator.stream([self.encode_prompt(p) for p in prompts], params)

    def chat(self, messages: Messages | Sequence[Messages],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             add_generation_prompt: bool = True) -> list[RequestOutput]:
        """Render each conversation with the model's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        ids = [self.tokenizer.encode_chat(c, add_generation_prompt) for c in conversations]
        return self.generate(ids, sampling_params)

    def stream_chat(self, messages: Messages, sampling_params: SamplingParams | None = None
                    ) -> Iterator[StreamEvent]:
        return self.stream(self.tokenizer.encode_chat(messages), sampling_params)
