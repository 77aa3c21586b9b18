"""ModelConfig: the single source of truth for a model's shapes and hyper-parameters.

Not for loading (the model files in models/ parse config.json and GGUF metadata into it) or for
naming architectures (models/registry.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from miaotui.errors import MiaotuiError

SLIDING, FULL = "sliding_attention", "full_attention"  # layer_types entries (Hugging Face's names)


@dataclass(slots=True)
class ModelConfig:
    architecture: str  # a models/registry.py name: llama, mistral, qwen2, qwen3, gemma2, gemma3, phi3, ...
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # e.g. {"rope_type": "llama3", "factor": 8.0, ...}, {"rope_type": "yarn", ...}, {"rope_type": "longrope", ...}
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    # --- what the families beyond Llama add (defaults: Llama's) ---
    qk_norm: bool = False  # RMSNorm over each q and k head before rope (Qwen3, Gemma 3)
    hidden_act: str = "silu"  # the gated MLP's activation: "silu" (SwiGLU) or "gelu_tanh" (GeGLU, Gemma)
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs too (Gemma 2/3: four norms a layer)
    embed_scale: float | None = None  # embeddings multiplied by this (Gemma: sqrt(hidden))
    query_scale: float | None = None  # attention scores' scale (None: head_dim ** -0.5)
    attn_softcap: float | None = None  # scores -> cap * tanh(scores / cap) (Gemma 2)
    final_softcap: float | None = None  # the same on the logits (Gemma 2)
    sliding_window: int | None = None  # keys a sliding layer's query sees, itself included
    layer_types: list[str] | None = None  # SLIDING or FULL per layer; None: all SLIDING if sliding_window
    local_rope_theta: float | None = None  # sliding layers' rope base, unscaled (Gemma 3)
    partial_rotary_factor: float = 1.0  # rope on the first fraction of each head (Phi-4-mini)
    num_experts: int = 0  # > 0: a mixture-of-experts MLP (Mixtral, Qwen3-MoE)
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True  # the top-k router weights renormalised to sum to 1
    dense_layers: list[int] = field(default_factory=list)  # layers of an MoE model with a dense MLP

    def __post_init__(self) -> None:
        from miaotui.models.registry import spec_named

        spec_named(self.architecture)  # a one-line error naming what is supported
        if self.num_heads % self.num_kv_heads:
            raise MiaotuiError(
                f"num_heads ({self.num_heads}) is not a multiple of num_kv_heads ({self.num_kv_heads})"
            )
        if self.layer_types is not None and len(self.layer_types) != self.num_layers:
            raise MiaotuiError(f"layer_types names {len(self.layer_types)} layers, the model has {self.num_layers}")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def window(self, layer: int) -> int | None:
        """Keys layer `layer`'s queries see (their own included), or None: all before them."""
        if self.sliding_window is None:
            return None
        if self.layer_types is None:
            return self.sliding_window
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    def is_moe(self, layer: int) -> bool:
        return self.num_experts > 0 and layer not in self.dense_layers

    def local_rope(self, layer: int) -> bool:
        """Whether the layer rotates with the sliding layers' own rope (Gemma 3)."""
        return self.local_rope_theta is not None and self.window(layer) is not None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})
