"""The registry: every architecture miaotui runs, by its own name, its Hugging Face class names and
its GGUF architecture name. Adding a family is one model file plus an entry in SPECS
(docs/adding-a-model.md).

Not for what a spec holds (models/spec.py).
"""

from __future__ import annotations

from miaotui.errors import MiaotuiError
from miaotui.models.config import ModelConfig
from miaotui.models.gemma import GEMMA2, GEMMA3
from miaotui.models.llama import LLAMA, MISTRAL, QWEN2, QWEN3
from miaotui.models.moe_families import MIXTRAL, QWEN3_MOE
from miaotui.models.phi3 import PHI3
from miaotui.models.spec import ModelSpec
from miaotui.models.weights import Named, Tensors

# (MIXTRAL before LLAMA: both are 'llama' in GGUF, told apart by MIXTRAL.gguf_match)
SPECS: tuple[ModelSpec, ...] = (MIXTRAL, LLAMA, MISTRAL, QWEN2, QWEN3, GEMMA2, GEMMA3, PHI3, QWEN3_MOE)
_BY_NAME = {s.name: s for s in SPECS}
_BY_HF = {hf: s for s in SPECS for hf in s.hf_classes}
_GGUF_ARCHS = sorted({s.gguf_arch for s in SPECS if s.gguf_arch is not None})


def spec_named(name: str) -> ModelSpec:
    if name not in _BY_NAME:
        raise MiaotuiError(f"unsupported model architecture '{name}' (miaotui runs: {', '.join(_BY_NAME)})")
    return _BY_NAME[name]


def has_spec_for_hf(cfg: dict) -> bool:
    return any(name in _BY_HF for name in cfg.get("architectures") or [cfg.get("model_type")])


def spec_for_hf(cfg: dict) -> ModelSpec:
    """The spec of a config.json: by its "architectures" class names, or its model_type where it names none."""
    names = cfg.get("architectures") or [cfg.get("model_type")]
    for name in names:
        if name in _BY_HF:
            return _BY_HF[name]
    shown = next((n for n in names if n), "<missing>")
    supported = ", ".join(hf for s in SPECS for hf in s.hf_classes if hf[0].isupper())
    raise MiaotuiError(f"unsupported model architecture '{shown}' (miaotui runs: {supported})")


def spec_for_gguf(arch: str, meta: dict | None = None) -> ModelSpec:
    """The spec of a GGUF file's general.architecture; where several families share one (llama.cpp
    writes Mixtral as 'llama' with experts), the first whose gguf_match accepts the metadata."""
    for spec in SPECS:
        if spec.gguf_arch == arch and (spec.gguf_match is None or spec.gguf_match(meta or {})):
            return spec
    raise MiaotuiError(f"unsupported model architecture '{arch}' in GGUF file "
                       f"(miaotui reads GGUF: {', '.join(_GGUF_ARCHS)})")


def model_tensors(config: ModelConfig, hf: Tensors) -> Named:
    """A checkpoint's tensors (Hugging Face names) mapped onto miaotui's module tree, one at a time
    (hf may read each tensor when asked)."""
    spec = spec_named(config.architecture)
    yield from spec.global_tensors(config, hf)
    for i in range(config.num_layers):
        yield from spec.layer_tensors(config, hf, i)
