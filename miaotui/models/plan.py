"""The layer plan: what compression, tensor parallelism and export read about a decoder layer
instead of hard-coding Llama's module names. Every family builds its layers from the same blocks
(layers/), so the plan follows from the config: which linears run in what order, which op
produces each linear's input (where AWQ and SmoothQuant fold their scales), how tensor parallelism
splits each part, which groups structured pruning may remove.

Not for the modules themselves (models/transformer.py) or the checkpoint names (the model files).
"""

from __future__ import annotations

from dataclasses import dataclass

from miaotui.models.config import ModelConfig

# tensor-parallel roles
COLUMN_QKV = "column_qkv"  # output rows split by attention heads (q, k and v rows of the same heads)
COLUMN_GATE_UP = "column_gate_up"  # output rows split by MLP channels (gate rows and up rows alike)
ROW = "row"  # input columns split to match the producer's rows; outputs summed across ranks
REPLICATED = "replicated"  # every rank holds all of it (an MoE router)


@dataclass(frozen=True, slots=True)
class Fold:
    """A per-input-channel scale s folded through a producer (its output divided by s) into the
    linears that read that output (their input columns multiplied by s): the function is unchanged."""

    producer: str  # a norm ('input_layernorm'), or a gate_up_proj whose up rows are divided ('mlp.gate_up_proj')
    consumers: tuple[str, ...]  # linears reading the producer's output; the first one's inputs represent all
    up_rows: bool = False  # the producer is a gated MLP's gate_up_proj: only its up half feeds the consumers
    fixed: tuple[str, ...] = ()  # consumers that stay in floating point (an MoE router): scaled, never quantized

    @property
    def quantized(self) -> tuple[str, ...]:
        return tuple(c for c in self.consumers if c not in self.fixed)


@dataclass(frozen=True, slots=True)
class LayerPlan:
    linears: tuple[str, ...]  # the quantizable linears in execution order (names inside the layer)
    folds: tuple[Fold, ...]
    mlps: tuple[str, ...]  # the gated MLPs: 'mlp', or an MoE's 'mlp.experts.E'
    router: str | None  # an MoE layer's router, or None
    tp_roles: dict[str, str]  # linear (router included) -> tensor-parallel role

    @property
    def inputs_to_capture(self) -> tuple[str, ...]:
        """Linears whose inputs calibration records: the quantized ones and each fold's representative."""
        return tuple(dict.fromkeys((*self.linears, *(f.consumers[0] for f in self.folds))))


def layer_plan(config: ModelConfig, layer: int) -> LayerPlan:
    attn = ("self_attn.qkv_proj", "self_attn.o_proj")
    moe = config.is_moe(layer)
    mlps = tuple(f"mlp.experts.{e}" for e in range(config.num_experts)) if moe else ("mlp",)
    router = "mlp.router" if moe else None
    mlp_linears = tuple(f"{m}.{p}" for m in mlps for p in ("gate_up_proj", "down_proj"))
    gate_ups = tuple(f"{m}.gate_up_proj" for m in mlps)
    folds = (
        Fold("input_layernorm", ("self_attn.qkv_proj",)),
        # (o_proj's producer, v, is shared by several query heads under grouped-query attention: no fold)
        Fold("post_attention_layernorm", ((router,) if router else ()) + gate_ups,
             fixed=(router,) if router else ()),
        *(Fold(f"{m}.gate_up_proj", (f"{m}.down_proj",), up_rows=True) for m in mlps),
    )
    roles = {attn[0]: COLUMN_QKV, attn[1]: ROW}
    roles |= {f"{m}.gate_up_proj": COLUMN_GATE_UP for m in mlps} | {f"{m}.down_proj": ROW for m in mlps}
    if router:
        roles[router] = REPLICATED
    return LayerPlan(attn + mlp_linears, folds, mlps, router, roles)


def model_linears(config: ModelConfig) -> list[str]:
    """Full names of every quantizable decoder linear, e.g. 'layers.3.mlp.experts.5.down_proj'."""
    return [f"layers.{i}.{n}" for i in range(config.num_layers) for n in layer_plan(config, i).linears]
