"""Read a Hugging Face model directory: config.json, safetensors (single or sharded), tokenizer.

Not for downloading from the hub: miaotui reads local directories only.
"""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from miaotui.errors import MiaotuiError
from miaotui.loaders.hf_quant import quantized_view
from miaotui.loaders.lazy import LazyTensors
from miaotui.loaders.memory import check_fits
from miaotui.loaders.tokenizer import Tokenizer, tokenizer_from_hf_dir
from miaotui.models.config import ModelConfig
from miaotui.models.registry import has_spec_for_hf, spec_for_hf


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise MiaotuiError(f"cannot read '{path}': {exc}") from None


# A multimodal checkpoint's language model, where transformers keeps it (hub files, then newer saves)
_TEXT_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
                  ("model.language_model.", "model."))


def config_from_hf(cfg: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
    """config.json (and generation_config.json) -> ModelConfig, by the family's own parser. A
    multimodal checkpoint (Gemma 3 4B+: Gemma3ForConditionalGeneration) runs its text model: the
    config's text_config, by its model_type."""
    text = cfg.get("text_config")
    if isinstance(text, dict) and text.get("model_type") and not has_spec_for_hf(cfg):
        outer = {k: cfg[k] for k in ("eos_token_id", "bos_token_id", "tie_word_embeddings") if k in cfg}
        cfg = {k: v for k, v in text.items() if k != "architectures"} | {
            k: v for k, v in outer.items() if k not in text}
    return spec_for_hf(cfg).config_from_hf(cfg, generation)


def text_model_tensors(tensors: LazyTensors) -> LazyTensors:
    """A multimodal checkpoint's language-model tensors under a text model's names (the vision
    tower and projector left out); a text checkpoint's as they are."""
    if "model.embed_tokens.weight" in tensors:
        return tensors
    readers = {}
    for name in tensors:
        for prefix, plain in _TEXT_PREFIXES:
            if name.startswith(prefix):
                readers[plain + name.removeprefix(prefix)] = partial(tensors.__getitem__, name)
    return LazyTensors(readers, tensors.numel) if readers else tensors


def load_safetensors_dir(directory: Path) -> LazyTensors:
    """Every tensor of the (sharded) checkpoint by name, each read from its file when asked for
    (safe_open), so a load converts one tensor at a time."""
    single = directory / "model.safetensors"
    index = directory / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        weight_map = _read_json(index).get("weight_map", {})
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        raise MiaotuiError(f"'{directory}' has no model.safetensors or model.safetensors.index.json")
    readers, numel = {}, 0
    for f in files:
        if not f.is_file():
            raise MiaotuiError(f"safetensors shard '{f}' listed in the index does not exist")
        try:
            with safe_open(str(f), framework="pt") as handle:
                readers |= {name: partial(_read, f, name) for name in handle.keys()}  # noqa: SIM118
                numel += sum(math.prod(handle.get_slice(name).get_shape()) for name in handle.keys())  # noqa: SIM118
        except (SafetensorError, OSError) as exc:
            raise MiaotuiError(f"cannot read safetensors file '{f}': {exc}") from None
    return LazyTensors(readers, numel)


def _read(path: Path, name: str) -> torch.Tensor:
    """One tensor, copied out of a mapping of its file that is closed again at once: a mapping kept
    open would keep every page read so far in this process's resident memory (a 14 GB checkpoint
    read tensor by tensor would count twice)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(name)
    except (SafetensorError, OSError) as exc:
        raise MiaotuiError(f"cannot read tensor '{name}' of '{path}': {exc}") from None


def load_hf_dir(directory: str | Path, float_bytes: int = 4) -> tuple[ModelConfig, LazyTensors, Tokenizer]:
    """float_bytes: bytes per value in the model's dtype (the check that the model fits in memory)."""
    directory = Path(directory)
    if not (directory / "config.json").is_file():
        raise MiaotuiError(f"'{directory}' is not a Hugging Face model directory (no config.json)")
    cfg = _read_json(directory / "config.json")
    gen_path = directory / "generation_config.json"
    config = config_from_hf(cfg, _read_json(gen_path) if gen_path.is_file() else {})
    # a quantized checkpoint's integer layers read as their codes (hf_quant.py), never as floats
    tensors = quantized_view(text_model_tensors(load_safetensors_dir(directory)), cfg.get("quantization_config"))
    check_fits(tensors.numel * float_bytes, directory.name)
    if config.tie_word_embeddings is False and "lm_head.weight" not in tensors:
        config.tie_word_embeddings = True  # some checkpoints omit the flag but share the matrix
    tokenizer_json = directory / "tokenizer.json"
    if not tokenizer_json.is_file():
        raise MiaotuiError(f"'{directory}' has no tokenizer.json")
    tok_cfg_path = directory / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    tokenizer = tokenizer_from_hf_dir(str(tokenizer_json), tok_cfg, _chat_template(directory, tok_cfg),
                                      config.eos_token_ids)
    return config, tensors, tokenizer


def _chat_template(directory: Path, tok_cfg: dict[str, Any]) -> str | None:
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template
