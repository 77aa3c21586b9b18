"""OpenAI request checks beyond the types (schemas.py), and the error body OpenAI clients expect.

Every bad field becomes an ApiError naming it (400), never a 422 or a traceback. Not for routes
(app.py) or generation (engine/).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from miaotui.engine.sampling_params import SamplingParams
from miaotui.engine.structured import Constraint
from miaotui.errors import MiaotuiError
from miaotui.server.schemas import SamplingRequest


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """FastAPI's validation errors -> one 400 naming the first offending field (OpenAI's shape)."""
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    field = loc[0] if loc else None
    where = ".".join(loc)
    kind = first.get("type", "")
    if kind == "json_invalid":
        return ApiError(400, "the request body is not valid JSON")
    if kind == "extra_forbidden":
        return ApiError(400, f"unrecognized request field '{where}' (this server does not implement it)", param=field)
    if kind == "missing":
        return ApiError(400, f"'{where}' is required", param=field)
    if not loc:
        return ApiError(400, "the request body must be a JSON object")
    message = str(first.get("msg", "Input should be valid")).replace("Input should be", "must be")
    return ApiError(400, f"'{where}' {message}", param=field)


def check_text(value: str, param: str) -> str:
    """A string the tokenizer can take: valid JSON may still hold a lone UTF-16 surrogate ("\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' holds text that is not valid Unicode (a lone surrogate)", param=param) from None
    return value


def _in_range(value: Any, name: str, low: float, high: float, default: Any) -> Any:
    if value is None:
        return default
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be in [{low}, {high}], got {value!r}", param=name)
    return value


@dataclass(slots=True)
class GenerationRequest:
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool
    chat: Any = None  # a chat's server.tools.ChatShape (tool calls, reasoning), set by the route


def parse_constraint(req: SamplingRequest) -> Constraint | None:
    """The request's structured output, from whichever of the accepted spellings it uses (one only)."""
    found: list[tuple[str, Constraint | None]] = []
    if req.response_format is not None:
        found.append(("response_format", _response_format(req.response_format)))
    so = req.structured_outputs
    if so is not None:
        keys = {"json": "json_schema", "regex": "regex", "choice": "choice", "grammar": "grammar"}
        given = [k for k in so if k in keys]
        unknown = sorted(set(so) - set(keys))
        if unknown or len(given) != 1:
            raise ApiError(400, "'structured_outputs' takes exactly one of json, regex, choice, grammar"
                           + (f" (unrecognized: '{unknown[0]}')" if unknown else ""), param="structured_outputs")
        spec = so[given[0]]
        found.append(("structured_outputs", Constraint(keys[given[0]], _schema(spec, "structured_outputs")
                                                       if given[0] == "json" else spec)))
    for name, kind in (("guided_json", "json_schema"), ("json_schema", "json_schema"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar"), ("grammar", "grammar")):
        value = getattr(req, name)
        if value is not None:
            found.append((name, Constraint(kind, _schema(value, name) if kind == "json_schema" else value)))
    found = [(name, c) for name, c in found if c is not None]
    if len(found) > 1:
        raise ApiError(400, f"give one structured output, not both '{found[0][0]}' and '{found[1][0]}'",
                       param=found[1][0])
    if not found:
        return None
    name, constraint = found[0]
    try:
        constraint.grammar()  # compiles now: a bad schema or grammar is this request's 400
    except MiaotuiError as exc:
        raise ApiError(400, f"'{name}': {exc}", param=name) from None
    return constraint


def _schema(value: Any, param: str) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ApiError(400, f"'{param}' is not a valid JSON schema (not JSON)", param=param) from None
    if not isinstance(value, dict):
        raise ApiError(400, f"'{param}' must be a JSON schema object", param=param)
    return value


def _response_format(fmt: dict[str, Any]) -> Constraint | None:
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json_schema", {"type": "object"})
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ApiError(400, "response_format json_schema needs {'name': ..., 'schema': {...}}",
                           param="response_format")
        return Constraint("json_schema", spec.get("schema") or {"type": "object"})
    raise ApiError(400, f"response_format type '{kind}' is not supported (use text, json_object or json_schema)",
                   param="response_format")


def parse_common(req: SamplingRequest, default_max_tokens: int | None, chat: bool) -> GenerationRequest:
    """The sampling fields every generation request shares -> SamplingParams and the response's shape."""
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > 4 or not all(stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of up to 4 of them", param="stop")
    for s in stop:
        check_text(s, "stop")
    max_tokens = req.max_tokens
    if chat and req.max_completion_tokens is not None:
        max_tokens = req.max_completion_tokens
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"'max_tokens' must be an integer >= 1, got {max_tokens}", param="max_tokens")
    logprobs: int | None
    if chat:
        logprobs = _in_range(req.top_logprobs, "top_logprobs", 0, 20, 0) if req.logprobs else None
    else:
        logprobs = _in_range(req.logprobs, "logprobs", 0, 20, None)
    bias: dict[int, float] = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.lstrip("-").isdigit():
            raise ApiError(400, f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias")
        bias[int(key)] = value
    try:
        params = SamplingParams(
            n=_in_range(req.n, "n", 1, 16, 1),
            temperature=float(_in_range(req.temperature, "temperature", 0, 2, 1.0)),
            top_p=float(req.top_p if req.top_p is not None else 1.0),
            top_k=req.top_k if req.top_k is not None else -1,
            min_p=float(req.min_p or 0.0),
            repetition_penalty=float(req.repetition_penalty if req.repetition_penalty is not None else 1.0),
            presence_penalty=float(req.presence_penalty or 0.0),
            frequency_penalty=float(req.frequency_penalty or 0.0),
            logit_bias=bias,
            min_tokens=req.min_tokens or 0,
            seed=req.seed,
            max_tokens=max_tokens if max_tokens is not None else default_max_tokens,
            stop=stop,
            stop_token_ids=list(req.stop_token_ids or []),
            ignore_eos=req.ignore_eos,
            structured=parse_constraint(req),
        )
    except MiaotuiError as exc:
        raise ApiError(400, str(exc)) from None
    options = req.stream_options
    return GenerationRequest(req.model, params, req.stream, bool(options and options.include_usage), logprobs,
                             False if chat else req.echo)


def parse_prompts(prompt: str | list[str] | list[int] | list[list[int]], param: str = "prompt"
                  ) -> list[str | list[int]]:
    """A prompt (or embeddings input): a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str):
        return [check_text(prompt, param)]
    if not prompt or any(isinstance(p, list) and not p for p in prompt):
        raise ApiError(400, f"'{param}' must not be empty", param=param)
    if all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    return [check_text(p, param) if isinstance(p, str) else list(p) for p in prompt]


MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content", "refusal"}


def parse_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat history -> the dicts the chat template reads. An assistant turn may carry tool_calls (and
    then null content); a tool turn its tool_call_id. Unknown message fields are refused."""
    out = []
    for i, m in enumerate(messages):
        if m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, f"messages[{i}] needs a 'role' of system, user, assistant, developer or tool",
                           param="messages")
        unknown = sorted(set(m) - MESSAGE_FIELDS)
        if unknown:
            raise ApiError(400, f"messages[{i}] has an unrecognized field '{unknown[0]}'", param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        if content is None and m["role"] == "assistant" and m.get("tool_calls"):
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] needs a string 'content'", param="messages")
        message: dict[str, Any] = {"role": "system" if m["role"] == "developer" else m["role"],
                                   "content": check_text(content, "messages")}
        for key in ("name", "tool_call_id", "tool_calls"):
            if m.get(key) is not None:
                message[key] = m[key]
        out.append(message)
    return out
