"""The Python entry point: LLM and its generate / chat / stream methods, close to vLLM's API.

Not for the decoding loop (engine/generator.py) or argument parsing (cli.py).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
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
                 max_model_len: int | None = None, decode_weight_dtype: str | torch.dtype | None = "auto",
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1, data_parallel_size: int = 1,
                 speculative_model: str | None = None, speculate: str | None = None,
                 num_speculative_tokens: int = 4) -> None:
        self.device = torch.device(device)
        self.dtype, self.decode_weight_dtype = resolve_dtypes(dtype, decode_weight_dtype, self.device)
        self.parallel = None
        world = tensor_parallel_size * pipeline_parallel_size * data_parallel_size
        if world > 1:
            from miaotui.distributed.launch import ParallelConfig, init_parallel

            self.parallel = init_parallel(ParallelConfig(tensor_parallel_size, pipeline_parallel_size,
                                                         data_parallel_size), device)
        loaded = load_model(model, self.dtype, self.device, None if world > 1 else self.decode_weight_dtype)
        if world > 1:
            self._split(loaded.model)
        self.model = loaded.model
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.path = loaded.path
        self.format = loaded.format
        self.max_model_len = min(max_model_len or self.config.max_position_embeddings,
                                 self.config.max_position_embeddings)
        self._generator = BatchGenerator(self.model, self.tokenizer, self.max_model_len)
        if speculative_model or speculate:
            self._generator = self._speculative(speculative_model, speculate, num_speculative_tokens)

    def _speculative(self, draft_name: str | None, kind: str | None, k: int):
        """Speculative decoding with a draft model (sharing the tokenizer) or prompt lookup ('ngram')."""
        from miaotui.engine.speculative import ModelDraft, NgramDraft, SpeculativeGenerator

        if kind not in (None, "ngram", "model"):
            raise MiaotuiError(f"unknown speculation '{kind}' (use 'ngram', or a draft model)")
        if draft_name and kind != "ngram":
            draft = LLM(draft_name, dtype=self.dtype, device=str(self.device),
                        decode_weight_dtype=self.decode_weight_dtype)
            if draft.tokenizer.backend.get_vocab() != self.tokenizer.backend.get_vocab():
                raise MiaotuiError("the draft model's tokenizer differs from the target's")
            proposer = ModelDraft(draft.model)
        elif kind == "ngram":
            proposer = NgramDraft()
        else:
            raise MiaotuiError("speculate='model' needs speculative_model")
        return SpeculativeGenerator(self.model, self.tokenizer, self.max_model_len, proposer, k=k)

    @property
    def speculation_stats(self):
        """Steps, drafted and accepted tokens so far (None without speculative decoding)."""
        return getattr(self._generator, "stats", None)

    def _split(self, net) -> None:
        """This rank's part of the model: its tensor shard of its pipeline stage's layers."""
        from miaotui.distributed.pipeline import make_pipeline_stage
        from miaotui.distributed.tensor_parallel import shard_tensor_parallel

        ctx = self.parallel
        if ctx.config.tp > 1:
            shard_tensor_parallel(net, ctx.config.tp, ctx.tp_rank, ctx.tp_group)
        if ctx.config.pp > 1:
            make_pipeline_stage(net, ctx.config.pp, ctx.pp_rank, ctx.pp_ranks, ctx.pp_group)
        if self.decode_weight_dtype is not None and self.decode_weight_dtype != self.dtype:
            net.add_decode_weights(self.decode_weight_dtype)

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
        """Generate for all prompts together as one batch; results come back in input order.

        With data parallelism each replica generates every dp-th prompt and the results are
        gathered, in input order, on every rank."""
        prompts, params = self._normalise(prompts, sampling_params)
        if self.parallel is not None and self.parallel.config.dp > 1:
            return self._generate_data_parallel(prompts, params)
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

    def _generate_data_parallel(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        import torch.distributed as dist

        ctx = self.parallel
        dp, mine = ctx.config.dp, ctx.dp_rank
        local = self.generate_local([p for i, p in enumerate(prompts) if i % dp == mine],
                                    [sp for i, sp in enumerate(params) if i % dp == mine]) if prompts[mine::dp] \
            else []
        gathered: list[list[RequestOutput] | None] = [None] * dp
        dist.all_gather_object(gathered, local, group=ctx.dp_group)
        return [gathered[i % dp][i // dp] for i in range(len(prompts))]

    def generate_local(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        with self.this_replica_only():
            return self.generate(prompts, params)

    @contextmanager
    def this_replica_only(self) -> Iterator[None]:
        """Within: generate on this data-parallel replica alone (no sharding of prompts, no gather)."""
        saved, self.parallel = self.parallel, None
        try:
            yield
        finally:
            self.parallel = saved

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
