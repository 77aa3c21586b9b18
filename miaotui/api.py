"""The Python entry point: LLM and its generate / chat / stream methods, close to vLLM's API.
Every method runs on the one engine (engine/llm_engine.py) the server uses too.

Not for the decoding loop (engine/) or argument parsing (cli.py).
"""

from __future__ import annotations

import gc
import itertools
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch

from miaotui.engine.config import EngineConfig
from miaotui.engine.llm_engine import LLMEngine
from miaotui.engine.paged_cache import blocks_for_memory
from miaotui.engine.request import EngineOutput, EngineRequest
from miaotui.engine.sampling_params import SamplingParams
from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.loaders.load import load_model
from miaotui.loaders.memory import available_bytes
from miaotui.runtime import peak_rss_mb, release_freed_memory, resolve_dtypes

Prompt = str | list[int]
Messages = list[dict[str, Any]]
_ENGINE_OPTIONS = {f.name for f in fields(EngineConfig)}
_TILES_HEADROOM = 2 * 10**9  # bytes left free after the tile copies: KV cache, activations, the rest
# gguf_weights -> load_model's keep_quantized: a GGUF file's quantized matrices in their own bits
# (native) or dequantized (float: the float path); auto: native unless the dtype is float32.
GGUF_WEIGHTS = {"auto": None, "native": True, "float": False}


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


@dataclass(slots=True)
class StreamEvent:
    """One token's news for one sequence: the token and the text it made safe to show."""

    request_index: int  # which prompt
    sample_index: int  # which of its n samples
    token_id: int | None
    text: str
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length"
    step: int = 0  # the engine step that produced it (events of one step share it)


class LLM:
    """A loaded model ready to generate: `LLM("smollm2-135m").generate("Hello", SamplingParams())`.

    Engine options (EngineConfig's fields: max_model_len, kv_cache_mb, kv_cache_dtype, block_size, max_num_seqs,
    max_num_batched_tokens, enable_prefix_caching, speculate, draft_model, num_speculative_tokens)
    may be given as keywords or as `engine_config`; `speculative_model` is draft_model's vLLM name."""

    def __init__(self, model: str, dtype: str | torch.dtype = "auto", device: str = "cpu",
                 decode_weight_dtype: str | torch.dtype | None = "auto", gguf_weights: str = "auto",
                 tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, data_parallel_size: int = 1, speculative_model: str | None = None,
                 engine_config: EngineConfig | None = None, **engine_options: Any) -> None:
        unknown = sorted(set(engine_options) - _ENGINE_OPTIONS)
        if unknown:
            raise MiaotuiError(f"unknown LLM option '{unknown[0]}' (engine options: "
                               f"{', '.join(sorted(_ENGINE_OPTIONS))})")
        if engine_config is None:
            engine_config = EngineConfig(**{"draft_model": speculative_model, **engine_options})
        elif engine_options or speculative_model:
            raise MiaotuiError("give engine options (speculative_model included) either in engine_config or as "
                               "keywords, not both")
        if gguf_weights not in GGUF_WEIGHTS:
            raise MiaotuiError(f"gguf_weights must be one of {', '.join(GGUF_WEIGHTS)}, got '{gguf_weights}'")
        self.device = torch.device(device)
        self.dtype, self.decode_weight_dtype = resolve_dtypes(dtype, decode_weight_dtype, self.device)
        self.parallel = None
        world = tensor_parallel_size * pipeline_parallel_size * data_parallel_size
        if world > 1:
            from miaotui.distributed.launch import ParallelConfig, init_parallel

            self.parallel = init_parallel(ParallelConfig(tensor_parallel_size, pipeline_parallel_size,
                                                         data_parallel_size), device)
        self._keep_quantized = GGUF_WEIGHTS[gguf_weights]
        start = time.perf_counter()
        # one process, not float32 (the float path that compression loads): inference layouts only
        self._layout_only = world == 1 and self.dtype != torch.float32
        loaded = load_model(model, self.dtype, self.device, None if world > 1 else self.decode_weight_dtype,
                            self._keep_quantized, self._layout_only)
        self.model = loaded.model if world == 1 else self._split(loaded.model)
        self._add_kernel_layouts(self.model)
        release_freed_memory()
        self.load_seconds = time.perf_counter() - start  # reading, converting and laying out the weights
        self.load_peak_rss_mb = peak_rss_mb()  # this process's peak so far: the load's, for a fresh one
        self.tokenizer = loaded.tokenizer
        self.config = loaded.config
        self.path = loaded.path
        self.format = loaded.format
        limit = self.config.max_position_embeddings
        self.max_model_len = min(engine_config.max_model_len or limit, limit)
        self.engine_config = engine_config
        self.num_blocks = self._agree_num_blocks(engine_config)
        self._draft = self._draft_model(engine_config)
        self._engine: LLMEngine | None = None
        self._request_ids = itertools.count()

    @property
    def engine(self) -> LLMEngine:
        """The engine, built on first use (a distributed worker that only runs steps never builds one)."""
        if self._engine is None:
            self._engine = LLMEngine(self.model, self.tokenizer, self.engine_config, self.max_model_len,
                                     self._draft, self.num_blocks)
            # what is alive now (the model, the cache, the tokenizer) lives as long as the engine: out of
            # the cyclic collector's passes, which a decode step's small allocations set off every few steps
            gc.freeze()
        return self._engine

    def _agree_num_blocks(self, config: EngineConfig) -> int:
        """KV blocks for config.kv_cache_mb. The ranks of a model replica hold different shards, so
        they agree on the smallest count: every rank's cache then has the same block tables."""
        blocks = blocks_for_memory(self.model.config, self.model.dtype, config.kv_cache_mb, config.block_size,
                                   config.kv_cache_dtype)
        if self.parallel is None:
            return blocks
        import torch.distributed as dist

        agreed = torch.tensor([blocks])
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=self.parallel.model_group)
        return int(agreed)

    def _draft_model(self, config: EngineConfig):
        """The draft model for speculation (sharing the tokenizer), loaded whole on every rank."""
        if config.speculate != "model":
            return None
        draft = load_model(config.draft_model, self.dtype, self.device, self.decode_weight_dtype, self._keep_quantized,
                           self._layout_only)
        self._add_kernel_layouts(draft.model)
        if draft.tokenizer.backend.get_vocab() != self.tokenizer.backend.get_vocab():
            raise MiaotuiError("the draft model's tokenizer differs from the target's")
        if draft.config.vocab_size != self.config.vocab_size:
            raise MiaotuiError(f"the draft model's vocabulary has {draft.config.vocab_size:,} rows, the target's "
                               f"{self.config.vocab_size:,}: speculation needs the same")
        return draft.model

    def _add_kernel_layouts(self, net) -> None:
        """Inference copies of bf16 weights in 16-row tiles, where this CPU has their kernels
        (layers/linear.py); built on the final (sharded) weights."""
        if self.dtype == torch.bfloat16 and torch.device(self.device).type == "cpu":
            need = sum(m.weight.numel() * 2 for m in net.modules() if isinstance(m, Linear))
            have = available_bytes()
            if have is not None and need + _TILES_HEADROOM > have:
                # a second copy of every weight would not fit: PyTorch's bf16 GEMM reads the one copy
                print(f"note: {need / 1e9:.1f} GB of bf16 weights and {have / 1e9:.1f} GB of memory available: "
                      f"no tile copies (bf16 decode runs PyTorch's GEMM, slower)", file=sys.stderr)
                return
            net.add_bf16_tiles()

    @property
    def speculation_stats(self):
        """SpecStats (verifying passes, drafted and accepted tokens) so far, or None without speculation."""
        return self.engine.stats.speculation if self.engine.proposer is not None else None

    def _split(self, net):
        """This rank's part of the model: its tensor shard of its pipeline stage's layers."""
        from miaotui.distributed.pipeline import PipelineStage
        from miaotui.distributed.tensor_parallel import shard_tensor_parallel

        ctx = self.parallel
        if ctx.config.tp > 1:
            net = shard_tensor_parallel(net, ctx.config.tp, ctx.tp_rank, ctx.tp_group)
        if ctx.config.pp > 1:
            net = PipelineStage(net, ctx.config.pp, ctx.pp_rank, ctx.pp_ranks, ctx.pp_group)
        if self.decode_weight_dtype is not None and self.decode_weight_dtype != self.dtype:
            net.add_decode_weights(self.decode_weight_dtype)
        return net

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
        """Generate for all prompts together (continuous batching); results come back in input order.

        With data parallelism each replica generates every dp-th prompt and the results are
        gathered, in input order, on every rank."""
        prompts, params = self._normalise(prompts, sampling_params)
        if self.parallel is not None and self.parallel.config.dp > 1:
            return self._generate_data_parallel(prompts, params)
        return self._generate_here(prompts, params)

    def _generate_here(self, prompts: list[Prompt], params: list[SamplingParams]) -> list[RequestOutput]:
        ids = [self.encode_prompt(p) for p in prompts]
        results = [RequestOutput(p if isinstance(p, str) else None, i,
                                 [CompletionOutput(k) for k in range(sp.n)])
                   for p, i, sp in zip(prompts, ids, params, strict=True)]
        for event in self._run(self._requests(ids, params)):
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
        self._requests([self.encode_prompt(p) for p in prompts], params)  # every rank rejects the same, at once
        local = self._generate_here(prompts[mine::dp], params[mine::dp]) if prompts[mine::dp] else []
        gathered: list[list[RequestOutput] | None] = [None] * dp
        dist.all_gather_object(gathered, local, group=ctx.dp_group)
        return [gathered[i % dp][i // dp] for i in range(len(prompts))]

    def stream(self, prompts: Prompt | Sequence[Prompt],
               sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> Iterator[StreamEvent]:
        """Yield StreamEvents as tokens are produced (their text never splits a character). Runs on
        this process's engine (with data parallelism: this replica's)."""
        prompts, params = self._normalise(prompts, sampling_params)
        return self._run(self._requests([self.encode_prompt(p) for p in prompts], params))

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

    # -- driving the engine ----------------------------------------------------------------
    def _requests(self, ids: list[list[int]], params: list[SamplingParams]
                  ) -> list[tuple[int, int, EngineRequest]]:
        """One engine request per prompt and sample, all validated before any runs (all or none).
        The n samples of a seeded request draw from distinct, reproducible streams (seed + i)."""
        if self.engine.threaded:
            raise MiaotuiError("this LLM's engine is serving requests in its own thread: use the server's API")
        requests = []
        for r, (prompt, p) in enumerate(zip(ids, params, strict=True)):
            for s in range(p.n):
                sample = replace(p, n=1, seed=None if p.seed is None else p.seed + s)
                req = EngineRequest(f"llm-{next(self._request_ids)}", prompt, sample, sink=None)
                self.engine.validate(req)
                requests.append((r, s, req))
        return requests

    def _run(self, requests: list[tuple[int, int, EngineRequest]]) -> Iterator[StreamEvent]:
        """Step the engine until every request has finished, yielding each token as it comes."""
        engine = self.engine
        events: deque[StreamEvent] = deque()
        open_ids: set[str] = set()

        def sink_for(r: int, s: int):
            def sink(out: EngineOutput) -> None:
                events.append(StreamEvent(r, s, out.token_ids[0] if out.token_ids else None, out.text,
                                          out.finished, out.finish_reason, engine.stats.steps))
                if out.finished:
                    open_ids.discard(out.request_id)
            return sink

        try:
            for r, s, req in requests:
                req.sink = sink_for(r, s)
                open_ids.add(req.request_id)
                engine.add_request(req)
            while open_ids:
                engine.step()
                while events:
                    yield events.popleft()
            while events:
                yield events.popleft()
        finally:
            if open_ids:  # the caller stopped early (or a step failed): free what is left
                engine.abort_now(set(open_ids))
