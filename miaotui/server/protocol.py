"""OpenAI request parsing and validation, and the error body OpenAI clients expect.

Every bad field becomes an ApiError naming it (400), never a 422 or a traceback. Not for routes
(app.py) or generation (engine/).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from miaotui.engine.sampling_params import SamplingParams
from miaotui.errors import MiaotuiError


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any, check=None, what: str = "") -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        raise ApiError(400, f"'{name}' must be {what or ' or '.join(k.__name__ for k in kinds)}, got {value!r}",
                       param=name)
    if check is not None and not check(value):
        raise ApiError(400, f"'{name}' must be {what}, got {value!r}", param=name)
    return value


@dataclass(slots=True)
class GenerationRequest:
    model: str
    params: SamplingParams
    stream: bool
    include_usage: bool
    logprobs: int | None
    echo: bool


def parse_common(body: dict[str, Any], default_max_tokens: int | None, chat: bool) -> GenerationRequest:
    model = _get(body, "model", (str,), None)
    if model is None:
        raise ApiError(400, "'model' is required", param="model")
    for name in ("presence_penalty", "frequency_penalty"):
        if _get(body, name, (int, float), 0) != 0:
            raise ApiError(400, f"'{name}' is not supported; use 'repetition_penalty'", param=name)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them", param="stop")
    max_key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, max_key, (int,), default_max_tokens, lambda v: v >= 1, "an integer >= 1")
    logprobs: int | None
    if chat:
        logprobs = None
        if _get(body, "logprobs", (bool,), False):
            logprobs = _get(body, "top_logprobs", (int,), 0, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
    else:
        logprobs = _get(body, "logprobs", (int,), None, lambda v: 0 <= v <= 20, "an integer in [0, 20]")
    stream_options = _get(body, "stream_options", (dict,), {})
    try:
        params = SamplingParams(
            n=_get(body, "n", (int,), 1, lambda v: 1 <= v <= 16, "an integer in [1, 16]"),
            temperature=float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "in [0, 2]")),
            top_p=float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "in (0, 1]")),
            top_k=_get(body, "top_k", (int,), -1),
            min_p=float(_get(body, "min_p", (int, float), 0.0)),
            repetition_penalty=float(_get(body, "repetition_penalty", (int, float), 1.0)),
            seed=_get(body, "seed", (int,), None),
            max_tokens=max_tokens,
            stop=stop or [],
            ignore_eos=bool(_get(body, "ignore_eos", (bool,), False)),
        )
    except MiaotuiError as exc:
        raise ApiError(400, str(exc)) from None
    return GenerationRequest(model, params, bool(_get(body, "stream", (bool,), False)),
                             bool(stream_options.get("include_usage", False)), logprobs,
                             bool(_get(body, "echo", (bool,), False)) if not chat else False)


def parse_prompts(body: dict[str, Any]) -> list[str | list[int]]:
    """Completions' prompt: a string, a list of strings, a list of token ids, or a list of those."""
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
            return [prompt]
        if all(isinstance(p, str) for p in prompt):
            return list(prompt)
        if all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompt):
            return list(prompt)
    raise ApiError(400, "'prompt' must be a string, a list of strings, or a list of token ids", param="prompt")


def parse_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer", "tool"):
            raise ApiError(400, f"messages[{i}] needs a 'role' of system, user, assistant, developer or tool",
                           param="messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(part, dict) and part.get("type") == "text" for part in content):
                raise ApiError(400, f"messages[{i}]: only text content parts are supported", param="messages")
            content = "".join(str(part.get("text", "")) for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] needs a string 'content'", param="messages")
        role = "system" if m["role"] == "developer" else m["role"]
        out.append({"role": role, "content": content})
    return out
