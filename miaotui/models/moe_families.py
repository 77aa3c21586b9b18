"""The mixture-of-experts families: Mixtral (every layer's MLP is 8 experts, top-2, a sliding
window in v0.1) and Qwen3-MoE (Qwen3's attention, 128 experts, top-8, optionally dense layers).
Each expert becomes a GatedMLP under layers.N.mlp.experts.E, the router layers.N.mlp.router.

Not for the routing itself (layers/moe.py).
"""

from __future__ import annotations

from typing import Any

from miaotui.models.config import ModelConfig
from miaotui.models.config_sources import gguf_common, hf_common, hf_common_out
from miaotui.models.spec import LLAMA_GGUF_NAMES, ModelSpec
from miaotui.models.weights import Named, Tensors, gated_mlp, split_qkv_attention, take


def _layer_tensors(block: str, router: str, expert_names: tuple[str, str, str]):
    def layer_tensors(config: ModelConfig, hf: Tensors, i: int) -> Named:
        p, out = f"model.layers.{i}.", f"layers.{i}."
        yield from split_qkv_attention(config, hf, i, p + "self_attn.")
        if config.is_moe(i):
            yield out + "mlp.router.weight", take(hf, f"{p}{block}.{router}.weight")
            for e in range(config.num_experts):
                yield from gated_mlp(hf, f"{p}{block}.experts.{e}.", f"{out}mlp.experts.{e}.", expert_names)
        else:
            yield from gated_mlp(hf, p + "mlp.", out + "mlp.")
        yield out + "input_layernorm.weight", take(hf, p + "input_layernorm.weight")
        yield out + "post_attention_layernorm.weight", take(hf, p + "post_attention_layernorm.weight")
    return layer_tensors


def mixtral_from_hf(cfg: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
    found = hf_common(cfg, generation)
    return ModelConfig(architecture="mixtral", **found, num_experts=int(cfg["num_local_experts"]),
                       experts_per_token=int(cfg["num_experts_per_tok"]),
                       moe_intermediate_size=found["intermediate_size"], norm_topk_prob=True)


def qwen3_moe_from_hf(cfg: dict[str, Any], generation: dict[str, Any]) -> ModelConfig:
    found = hf_common(cfg, generation)
    layers, step = found["num_layers"], int(cfg.get("decoder_sparse_step") or 1)
    only_mlp = set(cfg.get("mlp_only_layers") or [])
    dense = [i for i in range(layers) if i in only_mlp or (i + 1) % step]
    return ModelConfig(architecture="qwen3_moe", **found, qk_norm=True,
                       num_experts=int(cfg.get("num_experts") or cfg["num_local_experts"]),
                       experts_per_token=int(cfg["num_experts_per_tok"]),
                       moe_intermediate_size=int(cfg["moe_intermediate_size"]),
                       norm_topk_prob=bool(cfg.get("norm_topk_prob", False)), dense_layers=dense)


def mixtral_to_hf(c: ModelConfig) -> dict[str, Any]:
    return hf_common_out(c) | {"num_local_experts": c.num_experts, "num_experts_per_tok": c.experts_per_token,
                               "intermediate_size": c.moe_intermediate_size}


def qwen3_moe_to_hf(c: ModelConfig) -> dict[str, Any]:
    return hf_common_out(c) | {"num_experts": c.num_experts, "num_experts_per_tok": c.experts_per_token,
                               "moe_intermediate_size": c.moe_intermediate_size, "norm_topk_prob": c.norm_topk_prob,
                               "decoder_sparse_step": 1, "mlp_only_layers": list(c.dense_layers)}


def _gguf_names(block: str, router: str, expert_names: tuple[str, str, str]) -> dict[str, str]:
    """llama.cpp's names: the router as ffn_gate_inp, each projection's experts stacked [E, N, K]."""
    gate, up, down = expert_names
    dense = {k: v for k, v in LLAMA_GGUF_NAMES.items() if not k.startswith("ffn_") or k.startswith("ffn_norm")}
    return dense | {"ffn_gate_inp.weight": f"{block}.{router}.weight",
                    "ffn_gate_exps.weight": f"{block}.experts.{{e}}.{gate}.weight",
                    "ffn_up_exps.weight": f"{block}.experts.{{e}}.{up}.weight",
                    "ffn_down_exps.weight": f"{block}.experts.{{e}}.{down}.weight"}


def _from_gguf(name: str, arch: str, **fixed: Any):
    def parse(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
        found = gguf_common(meta, arch, tensor_names)
        expert_width = meta.get(f"{arch}.expert_feed_forward_length") or found["intermediate_size"]
        return ModelConfig(architecture=name, **found, num_experts=int(meta[f"{arch}.expert_count"]),
                           experts_per_token=int(meta[f"{arch}.expert_used_count"]),
                           moe_intermediate_size=int(expert_width), norm_topk_prob=True, **fixed)
    return parse


MIXTRAL = ModelSpec("mixtral", ("MixtralForCausalLM", "mixtral"), mixtral_from_hf,
                    _layer_tensors("block_sparse_moe", "gate", ("w1", "w3", "w2")),
                    # llama.cpp writes Mixtral as a 'llama' with experts (and without its sliding window)
                    gguf_arch="llama", gguf_match=lambda meta: bool(meta.get("llama.expert_count")),
                    config_from_gguf=_from_gguf("mixtral", "llama"),
                    gguf_layer_names=_gguf_names("block_sparse_moe", "gate", ("w1", "w3", "w2")),
                    gguf_rope_permuted=True, config_to_hf=mixtral_to_hf)
QWEN3_MOE = ModelSpec("qwen3_moe", ("Qwen3MoeForCausalLM", "qwen3_moe"), qwen3_moe_from_hf,
                      _layer_tensors("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
                      gguf_arch="qwen3moe", config_from_gguf=_from_gguf("qwen3_moe", "qwen3moe", qk_norm=True),
                      gguf_layer_names=_gguf_names("mlp", "gate", ("gate_proj", "up_proj", "down_proj")),
                      config_to_hf=qwen3_moe_to_hf)
