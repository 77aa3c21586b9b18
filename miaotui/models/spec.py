"""ModelSpec: what miaotui knows about one architecture, in one record: the names it goes by
(Hugging Face classes, the GGUF architecture), how its config.json and GGUF metadata become a
ModelConfig, and how its tensors map onto miaotui's module tree.

Not for the list of specs (models/registry.py) or for the modules themselves (layers/).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from miaotui.models.config import ModelConfig
from miaotui.models.config_sources import hf_common_out
from miaotui.models.weights import Named, Tensors, global_tensors

# GGUF tensor names inside 'blk.N.' -> Hugging Face names inside 'model.layers.N.' (llama.cpp's
# convert_hf_to_gguf.py writes these for every Llama-like family)
LLAMA_GGUF_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight", "attn_k_norm.weight": "self_attn.k_norm.weight",
}
GLOBAL_GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                     "output.weight": "lm_head.weight"}


@dataclass(frozen=True)
class ModelSpec:
    name: str  # ModelConfig.architecture
    hf_classes: tuple[str, ...]  # config.json "architectures" entries (and the model_type, as a fallback)
    # (config.json, generation_config.json) -> ModelConfig
    config_from_hf: Callable[[dict[str, Any], dict[str, Any]], ModelConfig]
    # (config, Hugging Face-named tensors, layer i) -> that layer's tensors on the module tree
    layer_tensors: Callable[[ModelConfig, Tensors, int], Named]
    # (config, tensors) -> the embedding, final norm and output head on the module tree
    global_tensors: Callable[[ModelConfig, Tensors], Named] = global_tensors
    gguf_arch: str | None = None  # general.architecture in GGUF files, None: miaotui reads no GGUF of it
    # whether a GGUF file of gguf_arch is this family (None: any); for architectures llama.cpp shares
    gguf_match: Callable[[dict[str, Any]], bool] | None = None
    # (GGUF metadata, tensor names) -> ModelConfig
    config_from_gguf: Callable[[dict[str, Any], set[str]], ModelConfig] | None = None
    # GGUF names inside 'blk.N.' -> Hugging Face names inside 'model.layers.N.'; '{e}' in a name: the
    # GGUF tensor stacks one matrix per expert [E, N, K]
    gguf_layer_names: Mapping[str, str] = field(default_factory=lambda: LLAMA_GGUF_NAMES)
    gguf_rope_permuted: bool = False  # llama.cpp's converter interleaved the q/k rows (its "llama" arch)
    gguf_norm_plus_one: bool = False  # llama.cpp's converter stored (1 + w) norms (Gemma)
    # the GGUF architecture export-gguf writes it as (loaders/gguf_export.py): gguf_arch by default;
    # 'llama' for Mistral, which llama.cpp runs as a Llama
    gguf_export_as: str | None = None
    # ModelConfig -> config.json's model fields (the inverse of config_from_hf; loaders/hf_export.py)
    config_to_hf: Callable[[ModelConfig], dict[str, Any]] = hf_common_out

    def hf_config(self, config: ModelConfig) -> dict[str, Any]:
        """A config.json that transformers (and config_from_hf) read back as `config`."""
        return {"architectures": [self.hf_classes[0]], "model_type": self.hf_classes[1]} | self.config_to_hf(config)

    @property
    def gguf_export_arch(self) -> str | None:
        return self.gguf_export_as or self.gguf_arch
