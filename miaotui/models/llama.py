"""The Llama family: Llama 2/3, Mistral (sliding window), SmolLM, Qwen2 (q/k/v bias), Qwen3 (RMSNorm
on each q and k head before rope). One decoder layer: RMSNorm, attention, RMSNorm, SwiGLU MLP.

Not for the modules (layers/, models/transformer.py) or the lookup by name (models/registry.py).
"""

from __future__ import annotations

from typing import Any

from miaotui.models.config import ModelConfig
from miaotui.models.config_sources import gguf_common, hf_common
from miaotui.models.spec import ModelSpec
from miaotui.models.weights import Named, Tensors, gated_mlp, split_qkv_attention, take


def layer_tensors(config: ModelConfig, hf: Tensors, i: int) -> Named:
    """Decoder layer i's tensors, named 'layers.{i}.<module>.<leaf>', q/k/v and gate/up fused."""
    p = f"model.layers.{i}."
    yield from split_qkv_attention(config, hf, i, p + "self_attn.")
    yield from gated_mlp(hf, p + "mlp.", f"layers.{i}.mlp.")
    yield f"layers.{i}.input_layernorm.weight", take(hf, p + "input_layernorm.weight")
    yield f"layers.{i}.post_attention_layernorm.weight", take(hf, p + "post_attention_layernorm.weight")


def _from_hf(name: str, **fixed: Any):
    def parse(cfg: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
        return ModelConfig(architecture=name, **(hf_common(cfg, generation) | fixed))
    return parse


def _from_gguf(name: str, gguf_arch: str, **fixed: Any):
    def parse(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
        return ModelConfig(architecture=name, **(gguf_common(meta, gguf_arch, tensor_names) | fixed))
    return parse


LLAMA = ModelSpec("llama", ("LlamaForCausalLM", "llama"), _from_hf("llama"), layer_tensors,
                  gguf_arch="llama", config_from_gguf=_from_gguf("llama", "llama"), gguf_rope_permuted=True)
# (llama.cpp converts Mistral to 'llama', without its sliding window: a GGUF file never says "mistral")
MISTRAL = ModelSpec("mistral", ("MistralForCausalLM", "mistral"), _from_hf("mistral"), layer_tensors,
                    gguf_export_as="llama")
QWEN2 = ModelSpec("qwen2", ("Qwen2ForCausalLM", "qwen2"), _from_hf("qwen2", qkv_bias=True), layer_tensors,
                  gguf_arch="qwen2", config_from_gguf=_from_gguf("qwen2", "qwen2"))
QWEN3 = ModelSpec("qwen3", ("Qwen3ForCausalLM", "qwen3"), _from_hf("qwen3", qk_norm=True), layer_tensors,
                  gguf_arch="qwen3", config_from_gguf=_from_gguf("qwen3", "qwen3", qk_norm=True))
