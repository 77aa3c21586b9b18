"""Tokenizer: one wrapper over a `tokenizers` tokenizer, built from tokenizer.json or GGUF metadata.

Not for chat formatting rules (chat_template.py) or streaming decode (engine/detokenizer.py).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from miaotui.errors import MiaotuiError
from miaotui.loaders.chat_template import render_chat_template

# Pre-tokenizer regexes by llama.cpp's `tokenizer.ggml.pre` name.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_GPT2_PRE = {"default", "gpt2", "gpt-2", "olmo", "jais", "poro-chat"}


@dataclass
class Tokenizer:
    backend: BackendTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    gguf_pre: str = "default"  # llama.cpp's pre-tokenizer name, kept for GGUF export

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Text -> ids; add_special_tokens adds the model's BOS where its tokenizer does."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        if not self.chat_template:
            raise MiaotuiError("this model has no chat template; use plain generation (no --chat)")
        special = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or ""}
        return render_chat_template(self.chat_template, messages, add_generation_prompt, special, **extra)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
                    ) -> list[int]:
        """extra: variables for the template (tools, enable_thinking, ... : chat_template_kwargs)."""
        # The template already writes BOS where the model wants one: add no specials again.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **extra), add_special_tokens=False)


def tokenizer_from_gguf_metadata(meta: dict[str, Any], eos_token_ids: list[int]) -> Tokenizer:
    """Build the tokenizer from GGUF `tokenizer.ggml.*` metadata (gpt2 BPE or llama SentencePiece)."""
    kind = meta.get("tokenizer.ggml.model")
    tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
    if not tokens:
        raise MiaotuiError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    token_types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        backend = _gpt2_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece_bpe(tokens, meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
                                     token_types, bool(meta.get("tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True
    else:
        raise MiaotuiError(f"unsupported GGUF tokenizer model '{kind}' (miaotui reads: gpt2, llama)")
    # Control (3) and user-defined (4) tokens must match whole, never be split by BPE.
    specials = [AddedToken(tokens[i], special=(t == 3), normalized=False)
                for i, t in enumerate(token_types) if t in (3, 4)]
    backend.add_special_tokens([t for t in specials if t.special])
    backend.add_tokens([t for t in specials if not t.special])

    def token(key: str) -> str | None:
        idx = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos = token("bos")
    if bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    return Tokenizer(backend, bos_token=bos, eos_token=token("eos"), eos_token_ids=eos_token_ids,
                     chat_template=meta.get("tokenizer.chat_template"),
                     gguf_pre=meta.get("tokenizer.ggml.pre") or "default")


def _gpt2_bpe(tokens: list[str], merges: list[str], pre: str | None) -> BackendTokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merge_pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = BackendTokenizer(models.BPE(vocab, merge_pairs, ignore_merges=pre in ("llama-bpe", "llama3")))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("llama-bpe", "llama3", "qwen2", "deepseek-r1-qwen"):
        pattern = _QWEN2_PATTERN if pre.startswith(("qwen2", "deepseek")) else _LLAMA3_PATTERN
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    else:
        if pre not in _GPT2_PRE and pre is not None:
            print(f"warning: unknown GGUF pre-tokenizer '{pre}', using GPT-2's", file=sys.stderr)
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(tokens: list[str], scores: list[float], token_types: list[int],
                       add_space_prefix: bool) -> BackendTokenizer:
    """Llama/Mistral SentencePiece vocabularies: BPE whose merge order follows token scores."""
    vocab = {t: i for i, t in enumerate(tokens)}
    merges: list[tuple[str, str, float]] = []
    for piece, piece_id in vocab.items():
        if token_types[piece_id] != 1 or len(piece) < 2:
            continue
        for split in range(1, len(piece)):
            left, right = piece[:split], piece[split:]
            if left in vocab and right in vocab:
                merges.append((left, right, scores[piece_id]))
    merges.sort(key=lambda m: -m[2])
    unk = tokens[0] if token_types and token_types[0] == 2 else "<unk>"
    backend = BackendTokenizer(models.BPE(vocab, [(a, b) for a, b, _ in merges], unk_token=unk,
                                          fuse_unk=True, byte_fallback=True))
    steps = [normalizers.Replace(" ", "▁")]
    if add_space_prefix:
        steps.insert(0, normalizers.Prepend("▁"))
    backend.normalizer = normalizers.Sequence(steps)
    decode_steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode_steps)
    return backend


def tokenizer_from_hf_dir(tokenizer_json: str, tokenizer_config: dict[str, Any], chat_template: str | None,
                          eos_token_ids: list[int]) -> Tokenizer:
    backend = BackendTokenizer.from_file(tokenizer_json)

    def special(name: str) -> str | None:
        value = tokenizer_config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    return Tokenizer(backend, bos_token=special("bos_token"), eos_token=special("eos_token"),
                     eos_token_ids=eos_token_ids, chat_template=chat_template,
                     gguf_pre=tokenizer_config.get("gguf_pre") or _guess_gguf_pre(backend))


def _guess_gguf_pre(backend: BackendTokenizer) -> str:
    """llama.cpp's pre-tokenizer name for a tokenizer.json: digit-splitting (SmolLM) or GPT-2's."""
    return "smollm" if "Digits" in str(backend.pre_tokenizer) else "default"
