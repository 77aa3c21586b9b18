"""The OpenAI-compatible server: /v1/models, /v1/completions, /v1/chat/completions, /v1/embeddings,
/tokenize, /detokenize, /health, /metrics, /openapi.json.

The model loads in a background thread after the socket is open, so /health answers 503 until it
is ready. Requests become engine requests (one per prompt and per n); outputs flow back through
asyncio queues. A client that disconnects has its requests aborted, which frees their KV blocks.
Not for the engine (engine/llm_engine.py) or request parsing (protocol.py).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from miaotui.engine.config import EngineConfig
from miaotui.engine.llm_engine import LLMEngine
from miaotui.engine.request import EngineOutput, EngineRequest, TokenLogprob
from miaotui.engine.step import Shutdown
from miaotui.errors import MiaotuiError
from miaotui.server.metrics import ServerMetrics
from miaotui.server.protocol import (
    ApiError,
    GenerationRequest,
    check_text,
    parse_common,
    parse_messages,
    parse_prompts,
    validation_error,
)
from miaotui.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    EmbeddingRequest,
    TokenizeRequest,
)
from miaotui.server.tools import (
    THINK_OPEN,
    ChatShape,
    ReasoningStream,
    extract_tool_calls,
    parse_tools,
    split_reasoning,
    template_thinks,
    tool_constraint,
)


@dataclass(slots=True)
class ServerConfig:
    model: str
    engine: EngineConfig = field(default_factory=EngineConfig)  # batching, KV cache, speculation
    served_model_name: str | None = None
    api_key: str | None = None
    max_queue: int = 256
    max_body_bytes: int = 1 << 20
    dtype: str = "auto"
    decode_weight_dtype: str = "auto"
    gguf_weights: str = "auto"
    device: str = "cpu"
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1

    @property
    def names(self) -> list[str]:
        """The ids clients may use: --served-model-name's (comma-separated aliases; the first is the
        one responses carry), else the model argument's base name as given, and the argument itself."""
        if self.served_model_name:
            return [n.strip() for n in self.served_model_name.split(",") if n.strip()]
        base = self.model.rstrip("/").rsplit("/", 1)[-1]
        return list(dict.fromkeys([base, self.model]))

    @property
    def name(self) -> str:
        return self.names[0]


def load_llm(c: ServerConfig):
    """The model and its engine as this rank holds them (its shard or stage under tensor or
    pipeline parallelism)."""
    from miaotui.api import LLM

    return LLM(c.model, dtype=c.dtype, device=c.device, decode_weight_dtype=c.decode_weight_dtype,
               gguf_weights=c.gguf_weights,
               tensor_parallel_size=c.tensor_parallel_size, pipeline_parallel_size=c.pipeline_parallel_size,
               data_parallel_size=c.data_parallel_size, engine_config=c.engine)


class ServerState:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.metrics = ServerMetrics(config.name)
        self.model = None  # the loaded network (embeddings run it directly), single-process only
        self.model_lock = threading.Lock()
        self.engine: LLMEngine | None = None
        self.tokenizer = None
        self.max_model_len = 0
        self.load_error: str | None = None
        self.draining = False
        self.created = int(time.time())

    def load(self) -> None:
        try:
            c = self.config
            llm = load_llm(c)
            engine = llm.engine
            if llm.parallel is not None:
                from miaotui.distributed.serve_worker import DataParallelEngine, connect_replica

                connect_replica(engine, llm.parallel)
                if c.data_parallel_size > 1:
                    engine = DataParallelEngine(engine, llm.parallel)
            engine.start()
            self.metrics.bind_engine(engine)
            self.tokenizer, self.max_model_len = llm.tokenizer, llm.max_model_len
            self.model = llm.model if llm.parallel is None else None
            self.engine = engine
        except (MiaotuiError, OSError) as exc:
            self.load_error = str(exc)

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining and self.engine.fatal is None

    def shutdown(self) -> None:
        self.draining = True
        if self.engine is not None:
            self.engine.stop()
            if self.engine.remote is not None and self.engine.fatal is None:
                self.engine.remote(Shutdown())  # let the replica's other ranks exit


def create_app(config: ServerConfig, load_in_background: bool = True) -> FastAPI:
    state = ServerState(config)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        if load_in_background:
            threading.Thread(target=state.load, name="miaotui-load", daemon=True).start()
        else:
            state.load()
        yield
        state.shutdown()  # uvicorn has stopped accepting and drained in-flight requests

    app = FastAPI(title="miaotui", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.miaotui = state
    app.add_middleware(_GuardMiddleware, state=state)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(exc.status_code, str(exc.detail), kind).body(), status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        error = validation_error(exc.errors())
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(Exception)
    async def _internal(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(ApiError(500, f"internal error: {exc}", "server_error").body(), status_code=500)

    @app.get("/health")
    async def health() -> Response:
        if state.load_error or (state.engine is not None and state.engine.fatal):
            return JSONResponse({"status": "error", "error": state.load_error or state.engine.fatal},
                                status_code=503)
        if not state.ready:
            return JSONResponse({"status": "draining" if state.draining else "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": state.created, "owned_by": "miaotui",
                "root": config.model, "max_model_len": state.max_model_len,
                "vocab_size": None if state.engine is None else state.engine.model.config.vocab_size}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(config.name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        _check_model(state, model_id)
        return model_card(model_id)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        gen = parse_common(req, 16, chat=False)
        engine = _check_ready(state, gen.model)
        prompts = [state.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in parse_prompts(req.prompt)]
        return await _serve(state, engine, request, gen, prompts, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request) -> Response:
        gen = parse_common(req, None, chat=True)
        engine = _check_ready(state, gen.model)
        plan = parse_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        template_kwargs = dict(req.chat_template_kwargs or {})
        if req.tools:
            template_kwargs["tools"] = req.tools
        if plan is not None and (constraint := tool_constraint(plan)) is not None:
            if gen.params.structured is not None:
                raise ApiError(400, "a required or named tool_choice already fixes the output's shape: drop the "
                                    "structured output", param="tool_choice")
            gen.params.structured = constraint
        ids = _chat_ids(state, req.messages, template_kwargs)
        thinking = template_thinks(state.tokenizer.chat_template)
        opened = thinking and state.tokenizer.decode(ids[-8:], skip_special_tokens=False).rstrip().endswith(
            THINK_OPEN)
        gen.chat = ChatShape(plan if plan is not None and plan.parses else None, thinking, opened)
        return await _serve(state, engine, request, gen, [ids], chat=True)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        _check_ready(state, req.model)
        if state.model is None:
            raise ApiError(400, "embeddings are not served by a tensor-, pipeline- or data-parallel server",
                           param="model")
        if req.dimensions is not None:
            raise ApiError(400, "'dimensions' is not supported (the embedding is the model's hidden size)",
                           param="dimensions")
        inputs = [state.tokenizer.encode(p) if isinstance(p, str) else p for p in parse_prompts(req.input, "input")]
        vocab = state.engine.model.config.vocab_size
        for ids in inputs:
            if not ids:
                raise ApiError(400, "'input' must not be empty (an input encodes to no tokens)", param="input")
            if any(not 0 <= t < vocab for t in ids):
                raise ApiError(400, f"'input' token ids must be in [0, {vocab})", param="input")
            if len(ids) > state.max_model_len:
                raise ApiError(400, f"an input of {len(ids)} tokens exceeds the context length "
                                    f"{state.max_model_len}", param="input", code="context_length_exceeded")
        vectors = await asyncio.to_thread(_embed, state, inputs, req.pooling, req.normalize)
        data = [{"object": "embedding", "index": i, "embedding": _encode_vector(v, req.encoding_format)}
                for i, v in enumerate(vectors)]
        used = sum(len(ids) for ids in inputs)
        return {"object": "list", "data": data, "model": config.name,
                "usage": {"prompt_tokens": used, "total_tokens": used}}

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            _check_model(state, req.model)
        tokenizer = _ready_tokenizer(state)
        if (req.prompt is None) == (req.messages is None):
            raise ApiError(400, "give either 'prompt' or 'messages'", param="prompt")
        if req.prompt is not None:
            ids = tokenizer.encode(check_text(req.prompt, "prompt"), add_special_tokens=req.add_special_tokens)
        else:
            ids = _chat_ids(state, req.messages, None, req.add_generation_prompt)
        out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}
        if req.return_token_strs:
            out["token_strs"] = [tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        return out

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> dict[str, Any]:
        if req.model is not None:
            _check_model(state, req.model)
        tokenizer = _ready_tokenizer(state)
        vocab = state.engine.model.config.vocab_size
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": tokenizer.decode(req.tokens, skip_special_tokens=False)}

    return app


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model not in state.config.names:
        raise ApiError(404, f"The model `{model}` does not exist (this server serves `{state.config.name}`)",
                       param="model", code="model_not_found")


def _ready_tokenizer(state: ServerState):
    if state.tokenizer is None or state.engine is None:
        raise ApiError(503, state.load_error or "the model is still loading", "service_unavailable")
    return state.tokenizer


def _chat_ids(state: ServerState, messages: list[dict[str, Any]], template_kwargs: dict[str, Any] | None,
              add_generation_prompt: bool = True) -> list[int]:
    tokenizer = _ready_tokenizer(state)
    reserved = {"messages", "add_generation_prompt", "bos_token", "eos_token"} & set(template_kwargs or {})
    if reserved:
        raise ApiError(400, f"chat_template_kwargs may not set '{sorted(reserved)[0]}'", param="chat_template_kwargs")
    try:
        return tokenizer.encode_chat(parse_messages(messages), add_generation_prompt, **(template_kwargs or {}))
    except MiaotuiError as exc:
        raise ApiError(400, str(exc), param="messages") from None


def _embed(state: ServerState, inputs: list[list[int]], pooling: str, normalize: bool) -> list[torch.Tensor]:
    """Final (normed) hidden states pooled per input: the mean over its tokens or its last token, in
    float32, L2-normalised unless asked not to. One input at a time: no padding enters the pooling."""
    out = []
    with state.model_lock, torch.inference_mode():
        for ids in inputs:
            hidden = state.model.hidden_states(torch.tensor([ids]), torch.arange(len(ids))[None])[0].float()
            vector = hidden.mean(0) if pooling == "mean" else hidden[-1]
            out.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    return out


def _encode_vector(vector: torch.Tensor, encoding: str) -> list[float] | str:
    if encoding == "base64":  # little-endian float32, as OpenAI's client decodes it
        return base64.b64encode(vector.numpy().astype("<f4").tobytes()).decode()
    return vector.tolist()


def _check_ready(state: ServerState, model: str | None) -> LLMEngine:
    _check_model(state, model)
    if not state.ready:
        reason = ("the server is shutting down" if state.draining else
                  state.engine.fatal if state.engine is not None else state.load_error or "the model is still loading")
        raise ApiError(503, reason, "service_unavailable")
    if state.engine.num_waiting >= state.config.max_queue:
        raise ApiError(429, f"the server is busy: {state.config.max_queue} requests are already waiting; retry later",
                       "rate_limit_exceeded")
    return state.engine


class _Choice:
    """Collects one engine request's outputs (one choice of the response)."""

    def __init__(self, index: int, prompt_ids: list[int]) -> None:
        self.index, self.prompt_ids = index, prompt_ids
        self.text, self.token_ids, self.logprobs = "", [], []
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.reasoning: ReasoningStream | None = None  # streaming: the reasoning/content split so far
        self.held = ""  # streaming with tools: content held until the end


async def _serve(state: ServerState, engine: LLMEngine, request: Request, gen: GenerationRequest,
                 prompts: list[list[int]], chat: bool) -> Response:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[EngineOutput] = asyncio.Queue()

    def sink(out: EngineOutput) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, out)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening any more
            pass

    rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    choices: dict[str, _Choice] = {}
    n = gen.params.n
    index = itertools.count()
    submitted: list[str] = []
    try:
        for prompt in prompts:
            limit = state.max_model_len
            wanted = len(prompt) + (gen.params.max_tokens or 0)
            if len(prompt) >= limit or wanted > limit:
                where = "messages" if chat else "prompt"
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                    f"{wanted} tokens ({len(prompt)} in the {where}, {gen.params.max_tokens or 0} "
                                    f"in the completion). Please reduce the length of the {where} or completion.",
                               param=where, code="context_length_exceeded")
            for sample in range(n):
                seed = None if gen.params.seed is None else gen.params.seed + sample
                params = replace(gen.params, n=1, seed=seed)
                sub_id = f"{rid}-{len(submitted)}"
                choices[sub_id] = _Choice(next(index), prompt)
                engine.add_request(EngineRequest(sub_id, prompt, params, sink, logprobs=gen.logprobs,
                                                 prompt_logprobs=gen.logprobs if gen.echo and gen.logprobs is not None
                                                 else (0 if gen.echo else None)))
                submitted.append(sub_id)
    except MiaotuiError as exc:
        for sub_id in submitted:
            engine.abort(sub_id)
        raise ApiError(400, str(exc)) from None
    except ApiError:
        for sub_id in submitted:
            engine.abort(sub_id)
        raise
    tracker = _Tracker(state, time.perf_counter())
    if gen.stream:
        return StreamingResponse(_stream(state, engine, queue, choices, gen, rid, chat, tracker),
                                 media_type="text/event-stream")
    pending = set(choices)
    try:
        while pending:
            try:
                out = await asyncio.wait_for(queue.get(), timeout=0.5)
            except TimeoutError:
                if await request.is_disconnected():
                    raise asyncio.CancelledError from None
                continue
            _absorb(choices[out.request_id], out, tracker)
            if out.finished:
                pending.discard(out.request_id)
                if out.finish_reason == "error":
                    raise ApiError(500, out.error or "generation failed", "server_error")
    finally:
        for sub_id in pending:
            engine.abort(sub_id)
    tracker.done("ok")
    return JSONResponse(_full_response(state, choices.values(), gen, rid, chat))


class _Tracker:
    """Per-request latency metrics: time to first token, inter-token gaps, end to end."""

    def __init__(self, state: ServerState, start: float) -> None:
        self.metrics, self.start, self.last = state.metrics, start, None
        self.reason = "stop"  # vLLM's finished_reason label: stop or length (the last choice's)

    def tokens(self, count: int) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.metrics.ttft.observe(now - self.start)
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now
        self.metrics.generation_tokens.inc(count)

    def done(self, status: str) -> None:
        self.metrics.finished(status, self.reason if status == "ok" else None)
        self.metrics.e2e.observe(time.perf_counter() - self.start)


def _absorb(choice: _Choice, out: EngineOutput, tracker: _Tracker) -> None:
    if out.token_ids:
        tracker.tokens(len(out.token_ids))
    if out.prompt_logprobs is not None:
        choice.prompt_logprobs = out.prompt_logprobs
    choice.text += out.text
    choice.token_ids += out.token_ids
    choice.logprobs += out.logprobs
    if out.finished:
        choice.finish_reason = "length" if out.finish_reason == "length" else "stop"
        tracker.reason = choice.finish_reason
        choice.completion_tokens = out.num_output_tokens
        tracker.metrics.prompt_tokens.inc(out.num_prompt_tokens)


def _usage(choices) -> dict[str, int]:
    seen_prompts: dict[int, int] = {}
    for c in choices:
        seen_prompts[id(c.prompt_ids)] = len(c.prompt_ids)
    prompt = sum(seen_prompts.values())
    completion = sum(c.completion_tokens for c in choices)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _completion_logprobs(state: ServerState, choice: _Choice, gen: GenerationRequest, text_start: int = 0
                         ) -> dict[str, Any] | None:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    if gen.logprobs is None:
        return None
    decode = state.tokenizer.decode
    entries: list[tuple[int, float | None, list[tuple[int, float]] | None]] = []
    if gen.echo and choice.prompt_logprobs is not None:
        for token, lp in zip(choice.prompt_ids, choice.prompt_logprobs, strict=False):
            entries.append((token, None, None) if lp is None else (token, lp.logprob, lp.top))
    entries += [(lp.token_id, lp.logprob, lp.top) for lp in choice.logprobs]
    tokens, offsets, offset = [], [], text_start
    for token, _, _ in entries:
        piece = decode([token], skip_special_tokens=False)
        tokens.append(piece)
        offsets.append(offset)
        offset += len(piece)
    return {"tokens": tokens, "token_logprobs": [e[1] for e in entries],
            "top_logprobs": [None if e[2] is None else {decode([t], skip_special_tokens=False): v for t, v in e[2]}
                             for e in entries],
            "text_offset": offsets}


def _chat_logprobs(state: ServerState, logprobs: list[TokenLogprob], gen: GenerationRequest) -> dict | None:
    if gen.logprobs is None:
        return None
    decode = state.tokenizer.decode

    def item(token: int, value: float) -> dict[str, Any]:
        piece = decode([token], skip_special_tokens=False)
        return {"token": piece, "logprob": value, "bytes": list(piece.encode("utf-8"))}

    return {"content": [{**item(lp.token_id, lp.logprob), "top_logprobs": [item(t, v) for t, v in lp.top]}
                        for lp in logprobs]}


def _chat_message(gen: GenerationRequest, text: str, finish: str | None) -> tuple[dict[str, Any], str | None]:
    """A whole chat output -> (the assistant message, the finish reason): reasoning split off, tool
    calls parsed where the request has tools."""
    shape = gen.chat
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if shape is None:
        return message, finish
    content: str | None = text
    if shape.thinking:
        reasoning, content = split_reasoning(text, shape.opened)
        if reasoning is not None:
            message["reasoning_content"] = reasoning
    if shape.tools is not None:
        try:
            content, calls = extract_tool_calls(shape.tools, content or "")
        except (json.JSONDecodeError, KeyError, TypeError):  # a constrained call cut off by max_tokens
            calls = []
        if calls:
            message["tool_calls"] = calls
            finish = "tool_calls" if finish == "stop" else finish
    message["content"] = content
    return message, finish


def _full_response(state: ServerState, choices, gen: GenerationRequest, rid: str, chat: bool) -> dict[str, Any]:
    choices = sorted(choices, key=lambda c: c.index)
    base = {"id": rid, "created": int(time.time()), "model": state.config.name, "usage": _usage(choices)}
    if chat:
        out = []
        for c in choices:
            message, finish = _chat_message(gen, c.text, c.finish_reason)
            out.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(state, c.logprobs, gen),
                        "finish_reason": finish})
        return {**base, "object": "chat.completion", "choices": out}
    out = []
    for c in choices:
        prefix = state.tokenizer.decode(c.prompt_ids) if gen.echo else ""
        out.append({"index": c.index, "text": prefix + c.text, "logprobs": _completion_logprobs(state, c, gen),
                    "finish_reason": c.finish_reason})
    return {**base, "object": "text_completion", "choices": out}


async def _stream(state: ServerState, engine: LLMEngine, queue: asyncio.Queue, choices: dict[str, _Choice],
                  gen: GenerationRequest, rid: str, chat: bool, tracker: _Tracker) -> AsyncIterator[str]:
    created, name = int(time.time()), state.config.name
    obj = "chat.completion.chunk" if chat else "text_completion"
    pending = set(choices)

    def chunk(payload: list[dict[str, Any]], usage: dict | None = None) -> str:
        body = {"id": rid, "object": obj, "created": created, "model": name, "choices": payload}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    status = "aborted"
    try:
        if chat:
            yield chunk([{"index": c.index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None} for c in sorted(choices.values(), key=lambda c: c.index)])
        elif gen.echo:
            yield chunk([{"index": c.index, "text": state.tokenizer.decode(c.prompt_ids), "logprobs": None,
                          "finish_reason": None} for c in sorted(choices.values(), key=lambda c: c.index)])
        while pending:
            out: EngineOutput = await queue.get()
            choice = choices[out.request_id]
            before = len(choice.logprobs)
            _absorb(choice, out, tracker)
            if out.finish_reason == "error":
                raise ApiError(500, out.error or "generation failed", "server_error")
            finish = choice.finish_reason if out.finished else None
            if out.finished:
                pending.discard(out.request_id)
            if not out.text and not finish:
                continue
            if chat and gen.chat is not None:
                for delta, reason in _shaped_deltas(gen, choice, out.text, finish):
                    yield chunk([{"index": choice.index, "delta": delta, "logprobs": None, "finish_reason": reason}])
            elif chat:
                delta = {"content": out.text} if out.text else {}
                yield chunk([{"index": choice.index, "delta": delta,
                              "logprobs": _chat_logprobs(state, choice.logprobs[before:], gen),
                              "finish_reason": finish}])
            else:
                lp = None
                if gen.logprobs is not None:
                    sub = _Choice(choice.index, choice.prompt_ids)
                    sub.logprobs = choice.logprobs[before:]
                    lp = _completion_logprobs(state, sub, replace(gen, echo=False))
                yield chunk([{"index": choice.index, "text": out.text, "logprobs": lp, "finish_reason": finish}])
        if gen.include_usage:
            yield chunk([], _usage(list(choices.values())))
        yield "data: [DONE]\n\n"
        status = "ok"
    except ApiError as exc:
        status = "error"
        yield f"data: {json.dumps(exc.body())}\n\n"
    finally:
        for sub_id in pending:  # the client went away (or an error): free the engine's work
            engine.abort(sub_id)
        tracker.done(status)


def _shaped_deltas(gen: GenerationRequest, choice: _Choice, text: str, finish: str | None):
    """Streamed deltas of a chat with reasoning or tools: reasoning_content as it comes; content as
    it comes without tools; with tools the content is held and sent at the end, as content or as
    tool-call deltas the OpenAI client assembles (index, id, type, name, arguments)."""
    shape = gen.chat
    if choice.reasoning is None and shape.thinking:
        choice.reasoning = ReasoningStream(shape.opened)
    reasoning, content = choice.reasoning.feed(text, final=finish is not None) if choice.reasoning else ("", text)
    if reasoning:
        yield {"reasoning_content": reasoning}, None
    if shape.tools is None:
        if content or finish:
            yield ({"content": content} if content else {}), finish
        return
    choice.held += content
    if finish is None:
        return
    try:
        rest, calls = extract_tool_calls(shape.tools, choice.held)
    except (json.JSONDecodeError, KeyError, TypeError):
        rest, calls = choice.held, []
    if rest:
        yield {"content": rest}, None
    for i, call in enumerate(calls):
        yield {"tool_calls": [{"index": i, **call}]}, None
    yield {}, "tool_calls" if calls and finish == "stop" else finish


class _GuardMiddleware:
    """Pure ASGI: the API key (401) and the body size limit (413) before any route runs."""

    def __init__(self, app, state: ServerState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config = self.state.config
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if config.api_key and scope["path"].startswith("/v1"):
            if headers.get("authorization", "") != f"Bearer {config.api_key}":
                await _send_error(send, ApiError(401, "invalid or missing API key (send 'Authorization: Bearer KEY')",
                                                 "authentication_error", code="invalid_api_key"))
                return
        limit = config.max_body_bytes
        if int(headers.get("content-length", "0") or 0) > limit:
            await _send_error(send, ApiError(413, f"request body is larger than {limit} bytes",
                                             code="request_too_large"))
            return
        if scope.get("method") == "POST":
            # every POST body here is JSON: read it as such whatever Content-Type the client sent
            # (curl -d says form-urlencoded)
            scope = dict(scope, headers=[(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-type"]
                         + [(b"content-type", b"application/json")])
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise ApiError(413, f"request body is larger than {limit} bytes", code="request_too_large")
            return message

        try:
            await self.app(scope, limited_receive, send)
        except ApiError as exc:  # a chunked body that went over the limit mid-stream
            await _send_error(send, exc)


async def _send_error(send, exc: ApiError) -> None:
    body = json.dumps(exc.body()).encode()
    await send({"type": "http.response.start", "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
