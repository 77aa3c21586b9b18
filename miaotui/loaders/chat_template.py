"""Render a model's Jinja2 chat template the way Hugging Face's apply_chat_template does.

Not for tokenization: the rendered string is encoded by the Tokenizer without extra specials.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from miaotui.errors import MiaotuiError


def _raise_exception(message: str) -> None:
    raise MiaotuiError(f"chat template error: {message}")


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Same defaults as transformers: templates rely on non-ASCII text staying readable.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise MiaotuiError(f"the model's chat template does not parse: {exc}") from None


def render_chat_template(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
                         special_tokens: dict[str, str | None], **extra: Any) -> str:
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise MiaotuiError("each chat message must be a dict with 'role' and 'content'")
    try:
        return _compile(source).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                       **special_tokens, **extra)
    except jinja2.TemplateError as exc:
        raise MiaotuiError(f"rendering the chat template failed: {exc}") from None
