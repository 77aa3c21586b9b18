"""Structured pruning: remove whole MLP channels, attention heads, experts (a mixture of experts'
MLPs) or decoder layers, so the model becomes an ordinary, physically smaller model (a new
ModelConfig). Which groups a layer has comes from its plan (models/plan.py).

Each structure is ranked by the sum of its weights' element scores under a criterion
(magnitude, wanda, taylor, gradient; importance.py). Every layer keeps the same shape (the
config is uniform): channels and heads are removed in equal numbers from each layer, and heads
in equal numbers from each grouped-query group so that every key/value head keeps its queries.
Not for unstructured masks (unstructured.py).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from miaotui.compress.calibration import CalibrationSet
from miaotui.compress.prune.importance import element_scores
from miaotui.compress.prune.masks import check_sparsity
from miaotui.compress.prune.sensitivity import calibration_gradients, input_sq_sums
from miaotui.compress.selectors import decoder_linears
from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.models.plan import layer_plan
from miaotui.models.transformer import Transformer

STRUCTURES = ("channels", "heads", "experts", "layers")
CRITERIA = ("magnitude", "wanda", "taylor", "gradient")
CHANNEL_MULTIPLE = 32  # kept MLP width is rounded to a multiple of this (friendlier GEMM shapes)


@dataclass(slots=True)
class StructuredRecord:
    structure: str
    criterion: str
    sparsity: float
    params_before: int
    params_after: int
    removed: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scores(model: Transformer, criterion: str, calib: CalibrationSet | None) -> dict[str, torch.Tensor]:
    """Element scores for every decoder linear: {name: [N, K]}."""
    names = decoder_linears(model)
    if any(not isinstance(model.get_submodule(n), Linear) for n in names) or not names:
        raise MiaotuiError("structured pruning needs a dense (unquantized) model: prune first, then quantize")
    grads, norms = {}, {}
    if criterion in ("taylor", "gradient", "wanda") and calib is None:
        raise MiaotuiError(f"criterion '{criterion}' needs calibration text (--calib-file)")
    if criterion in ("taylor", "gradient"):
        grads = calibration_gradients(model, calib, names)
    if criterion == "wanda":
        norms = input_sq_sums(model, calib, names)
    return {n: element_scores(criterion, model.get_submodule(n).weight, grads.get(n), norms.get(n)) for n in names}


def channel_scores(scores: dict[str, torch.Tensor], mlp: str, inter: int) -> torch.Tensor:
    """[I] for the gated MLP named `mlp` ('layers.3.mlp', 'layers.3.mlp.experts.5'): gate row j + up
    row j + down column j."""
    gu = scores[f"{mlp}.gate_up_proj"].sum(1)  # [2I]
    return gu[:inter] + gu[inter:] + scores[f"{mlp}.down_proj"].sum(0)


def head_scores(scores: dict[str, torch.Tensor], layer: int, heads: int, head_dim: int) -> torch.Tensor:
    """[H]: a query head's rows of q and its columns of o."""
    q = scores[f"layers.{layer}.self_attn.qkv_proj"][: heads * head_dim].sum(1).reshape(heads, head_dim).sum(1)
    o = scores[f"layers.{layer}.self_attn.o_proj"].sum(0).reshape(heads, head_dim).sum(1)
    return q + o


def layer_scores(scores: dict[str, torch.Tensor], layers: int) -> torch.Tensor:
    return torch.stack([sum(s.sum() for n, s in scores.items() if n.startswith(f"layers.{i}.")) for i in range(layers)])


@torch.no_grad()
def prune_structured(model: Transformer, structure: str, sparsity: float, criterion: str = "magnitude",
                     calib: CalibrationSet | None = None) -> tuple[Transformer, StructuredRecord]:
    """-> (a new, smaller model, what was removed). `sparsity` = the share of the structure removed."""
    if structure not in STRUCTURES:
        raise MiaotuiError(f"unknown structure '{structure}' (available: {', '.join(STRUCTURES)})")
    if criterion not in CRITERIA:
        raise MiaotuiError(f"structured pruning ranks by {', '.join(CRITERIA)}; got '{criterion}'")
    check_sparsity(sparsity)
    c = model.config
    scores = _scores(model, criterion, calib)
    state = {k: v for k, v in model.state_dict().items()}
    before = model.num_parameters()
    removed: dict[str, Any] = {}
    if structure == "channels":
        config, removed = _prune_channels(c, scores, state, sparsity)
    elif structure == "heads":
        per_group = c.num_heads // c.num_kv_heads
        drop = round(per_group * sparsity)
        if drop < 1 or drop >= per_group:
            raise MiaotuiError(f"sparsity {sparsity} removes {drop} of the {per_group} query heads per key/value "
                               f"group; it must remove at least 1 and keep at least 1")
        keep_per_group = per_group - drop
        for i in range(c.num_layers):
            hs = head_scores(scores, i, c.num_heads, c.head_dim).reshape(c.num_kv_heads, per_group)
            kept_in_group = torch.topk(hs, keep_per_group, dim=1).indices.sort(dim=1).values
            heads = (kept_in_group + torch.arange(c.num_kv_heads)[:, None] * per_group).flatten()
            rows = (heads[:, None] * c.head_dim + torch.arange(c.head_dim)).flatten()  # q rows / o columns kept
            kv_rows = torch.arange(c.q_size, c.q_size + 2 * c.kv_size)
            for suffix in ("weight", "bias"):
                name = f"layers.{i}.self_attn.qkv_proj.{suffix}"
                if name in state:
                    state[name] = state[name][torch.cat([rows, kv_rows])]
            o = f"layers.{i}.self_attn.o_proj.weight"
            state[o] = state[o][:, rows]
        removed = {"num_heads": [c.num_heads, keep_per_group * c.num_kv_heads]}
        config = replace(c, num_heads=keep_per_group * c.num_kv_heads)
    elif structure == "experts":
        config, removed = _prune_experts(c, scores, state, sparsity)
    else:
        drop = round(c.num_layers * sparsity)
        if drop < 1 or drop >= c.num_layers:
            raise MiaotuiError(f"sparsity {sparsity} removes {drop} of {c.num_layers} layers; "
                               f"it must remove at least 1 and keep at least 1")
        kept = torch.topk(layer_scores(scores, c.num_layers), c.num_layers - drop).indices.sort().values.tolist()
        renamed = {}
        for k, v in state.items():
            if k.startswith("layers."):
                _, idx, rest = k.split(".", 2)
                if int(idx) in kept:
                    renamed[f"layers.{kept.index(int(idx))}.{rest}"] = v
            else:
                renamed[k] = v
        state = renamed
        removed = {"layers": sorted(set(range(c.num_layers)) - set(kept))}
        config = replace(c, num_layers=len(kept),
                         layer_types=None if c.layer_types is None else [c.layer_types[k] for k in kept],
                         dense_layers=[kept.index(d) for d in c.dense_layers if d in kept])
    smaller = rebuild(config, state, model)
    return smaller, StructuredRecord(structure, criterion, sparsity, before, smaller.num_parameters(), removed)


def _kept_width(width: int, sparsity: float) -> int:
    keep = max(CHANNEL_MULTIPLE, round(width * (1 - sparsity) / CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE)
    return min(keep, width)


def _prune_channels(c, scores: dict[str, torch.Tensor], state: dict[str, torch.Tensor], sparsity: float
                    ) -> tuple[Any, dict[str, Any]]:
    """The same number of channels removed from every gated MLP of a kind (dense, or experts)."""
    keep_dense, keep_moe = _kept_width(c.intermediate_size, sparsity), _kept_width(c.moe_intermediate_size, sparsity)
    for i in range(c.num_layers):
        width, keep = (c.moe_intermediate_size, keep_moe) if c.is_moe(i) else (c.intermediate_size, keep_dense)
        for mlp in layer_plan(c, i).mlps:
            name = f"layers.{i}.{mlp}"
            kept = torch.topk(channel_scores(scores, name, width), keep).indices.sort().values
            gu = f"{name}.gate_up_proj.weight"
            state[gu] = torch.cat([state[gu][kept], state[gu][width + kept]])
            state[f"{name}.down_proj.weight"] = state[f"{name}.down_proj.weight"][:, kept]
    removed: dict[str, Any] = {}
    if any(not c.is_moe(i) for i in range(c.num_layers)):
        removed["intermediate_size"] = [c.intermediate_size, keep_dense]
    if c.num_experts:
        removed["moe_intermediate_size"] = [c.moe_intermediate_size, keep_moe]
    return replace(c, intermediate_size=keep_dense, moe_intermediate_size=keep_moe), removed


def _prune_experts(c, scores: dict[str, torch.Tensor], state: dict[str, torch.Tensor], sparsity: float
                   ) -> tuple[Any, dict[str, Any]]:
    """The same number of experts removed from every MoE layer, the lowest-scored of each; their
    router rows go with them, and top-k shrinks where fewer experts than k remain."""
    drop = round(c.num_experts * sparsity)
    if c.num_experts == 0 or drop < 1 or drop >= c.num_experts:
        raise MiaotuiError(f"sparsity {sparsity} removes {drop} of the {c.num_experts} experts per layer; "
                           f"it must remove at least 1 and keep at least 1" if c.num_experts
                           else "structure 'experts' needs a mixture-of-experts model")
    keep = c.num_experts - drop
    removed: dict[str, Any] = {}
    for i in range(c.num_layers):
        if not c.is_moe(i):
            continue
        p = f"layers.{i}.mlp"
        totals = torch.stack([scores[f"{p}.experts.{e}.gate_up_proj"].sum() + scores[f"{p}.experts.{e}.down_proj"].sum()
                              for e in range(c.num_experts)])
        kept = torch.topk(totals, keep).indices.sort().values.tolist()
        removed[f"layers.{i}"] = sorted(set(range(c.num_experts)) - set(kept))
        moved = {}
        for k in [k for k in state if k.startswith(f"{p}.experts.")]:
            e, rest = k.removeprefix(f"{p}.experts.").split(".", 1)
            tensor = state.pop(k)
            if int(e) in kept:
                moved[f"{p}.experts.{kept.index(int(e))}.{rest}"] = tensor
        state |= moved
        state[f"{p}.router.weight"] = state[f"{p}.router.weight"][kept]
    return replace(c, num_experts=keep, experts_per_token=min(c.experts_per_token, keep)), {"experts": removed}


def rebuild(config, state: dict[str, torch.Tensor], like: Transformer) -> Transformer:
    """A Transformer of `config` holding `state` (no random init), on like's device and dtype."""
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict({k: v.contiguous().clone() for k, v in state.items()}, assign=True, strict=True)
    model.materialize_rotary(like.device)
    model.stages = list(getattr(like, "stages", []))
    return model.eval().requires_grad_(False)
