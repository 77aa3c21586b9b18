"""Structured outputs: a request's output held to a JSON schema, a regular expression, a list of
choices or a grammar (Lark or llama.cpp's GBNF), by llguidance's token masks. Each constrained row
gets its own matcher; at each step the rows that have one get a mask over the vocabulary (computed
together, in parallel) and the others are left alone.

Not for parsing the API's request fields (server/protocol.py) or sampling (sampler.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from miaotui.errors import MiaotuiError

KINDS = ("json_schema", "regex", "choice", "grammar")
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a request's output must match. kind: json_schema (spec: the schema, a dict), regex
    (a pattern), choice (a list of strings), grammar (Lark or GBNF text)."""

    kind: str
    spec: Any

    def grammar(self) -> str:
        """The llguidance grammar (raises MiaotuiError where the spec does not compile); compiled
        once per distinct spec (the server checks it on arrival, the engine builds its matcher)."""
        return _compile(self.kind, json.dumps(self.spec, sort_keys=True))


@lru_cache(maxsize=256)
def _compile(kind: str, spec_json: str) -> str:
    import llguidance

    spec = json.loads(spec_json)
    if kind not in KINDS:
        raise MiaotuiError(f"unknown structured output kind '{kind}' (use one of {', '.join(KINDS)})")
    if kind == "json_schema":
        # one line, OpenAI's separators: no run of whitespace for a model to loop in
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_LAYOUT)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise MiaotuiError(f"the json schema does not compile: {_one_line(exc)}") from None
        return _validated(grammar, kind)
    if kind == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise MiaotuiError("choice: a non-empty list of strings")
        text = json.dumps(spec)
    else:
        text = str(spec)
    try:
        grammar = llguidance.grammar_from(kind, text)
    except (ValueError, RuntimeError, TypeError) as exc:
        raise MiaotuiError(f"the {kind.replace('_', ' ')} does not compile: {_one_line(exc)}") from None
    return _validated(grammar, kind)


def _one_line(message: object, limit: int = 300) -> str:
    text = " ".join(str(message).split())
    return text if len(text) <= limit else text[:limit] + "..."


def _validated(grammar: str, kind: str) -> str:
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise MiaotuiError(f"the {kind.replace('_', ' ')} does not compile: {_one_line(messages[0])}")
    return grammar


class GrammarTokenizer:
    """llguidance's view of a tokenizer (built once per model: ~1 s for a large vocabulary)."""

    def __init__(self, tokenizer, vocab_size: int) -> None:
        import llguidance

        eos = list(tokenizer.eos_token_ids) or None
        self.vocab_size = vocab_size
        self.ll = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size,
                                         eos_token=eos[0] if eos and len(eos) == 1 else eos)

    def matcher(self, constraint: Constraint):
        import llguidance

        matcher = llguidance.LLMatcher(self.ll, constraint.grammar(), log_level=0)
        if matcher.is_error():
            raise MiaotuiError(f"the {constraint.kind.replace('_', ' ')} does not compile: "
                               f"{_one_line(matcher.get_error())}")
        return matcher


_EXECUTOR: list = []


def _executor():
    """One llguidance thread pool per process (as many threads as PyTorch uses)."""
    import llguidance

    if not _EXECUTOR:
        _EXECUTOR.append(llguidance.LLExecutor(num_threads=max(1, torch.get_num_threads())))
    return _EXECUTOR[0]


def compute_masks(matchers: list, vocab: int) -> torch.Tensor:
    """The tokens each matcher allows next: bool [len(matchers), vocab], computed together on
    llguidance's threads (its torch helpers are not imported: they pull in torch.compile)."""
    words = (vocab + 31) // 32
    mask = torch.full((len(matchers), words), -1, dtype=torch.int32)  # bit j of word w allows token 32 w + j
    _executor().unsafe_compute_mask_ptr(list(zip(matchers, range(len(matchers)), strict=True)), mask.data_ptr(),
                                        words * 4, len(matchers))
    bits = (mask[:, :, None] >> torch.arange(32, dtype=torch.int32)) & 1
    return bits.reshape(len(matchers), -1)[:, :vocab].bool()


def apply_allowed(logits: torch.Tensor, rows: list[int], allowed: torch.Tensor) -> None:
    """logits [B, V] float32 in place: rows[i]'s tokens outside allowed[i] at -inf."""
    index = torch.tensor(rows, dtype=torch.long)
    logits.index_copy_(0, index, logits.index_select(0, index).masked_fill(~allowed, float("-inf")))
