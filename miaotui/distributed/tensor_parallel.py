"""Tensor parallelism in the Megatron layout, applied to a loaded model in place of its layers.

- The layer plan's roles (models/plan.py): q/k/v and gate/up are column-parallel (each rank keeps
  some output rows), o and down are row-parallel (each rank keeps the matching input columns), and
  their outputs are summed by an all-reduce. Each expert of a mixture splits like a dense MLP (its
  channels), the router is replicated, and one all-reduce sums the mixture's output. The embedding
  and the tied or untied output head are vocabulary-parallel.
- Grouped-query heads: when tp divides both the query and the key/value heads, each rank takes
  whole groups. Otherwise each rank takes a contiguous, as-even-as-possible share of query heads
  and a private copy of the key/value head of each one (multi-head locally): always correct, at
  the cost of duplicated key/value work.
- Packed integer weights are split, never re-quantized: column splits cut output rows; row
  splits cut input columns at quantization-group boundaries (an error otherwise).
Not for process groups or launching (launch.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from miaotui.distributed.wrapped_model import WrappedModel
from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.layers.quant_formats import QuantFormat
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.models.config import ModelConfig
from miaotui.models.plan import COLUMN_GATE_UP, COLUMN_QKV, ROW, layer_plan
from miaotui.models.transformer import Transformer


def even_split(total: int, parts: int, rank: int) -> tuple[int, int]:
    """[start, end) of rank's share of `total` items, the first (total % parts) ranks one larger."""
    base, extra = divmod(total, parts)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def head_plan(num_heads: int, num_kv_heads: int, tp: int, rank: int) -> tuple[list[int], list[int]]:
    """-> (query heads, key/value head for each local kv slot) of this rank."""
    per_group = num_heads // num_kv_heads
    if num_heads % tp == 0 and num_kv_heads % tp == 0:
        kv = list(range(*even_split(num_kv_heads, tp, rank)))
        return [g * per_group + j for g in kv for j in range(per_group)], kv
    q = list(range(*even_split(num_heads, tp, rank)))
    if not q:
        raise MiaotuiError(f"tensor parallel size {tp} exceeds the {num_heads} attention heads")
    return q, [h // per_group for h in q]  # one private kv head per query head


class VocabParallelEmbedding(nn.Module):
    """Rows [start, end) of the embedding; tokens outside give zeros, and an all-reduce sums the shards."""

    def __init__(self, weight: torch.Tensor, start: int, group=None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.start, self.end, self.group = start, start + weight.shape[0], group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = (ids >= self.start) & (ids < self.end)
        local = torch.where(inside, ids - self.start, torch.zeros_like(ids))
        out = F.embedding(local, self.weight) * inside[..., None].to(self.weight.dtype)
        dist.all_reduce(out, group=self.group)
        return out


def _rows(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """Column-parallel: keep output rows `index` of a Linear or QuantLinear."""
    if isinstance(module, QuantLinear):
        q = QuantLinear(module.in_features, len(index), module.bias is not None, module.fmt, module.act_quant)
        q.set_codes(module.codes()[index], module.scale[index], module.zero[index],
                    None if module.bias is None else module.bias[index])
        q.set_input_order(module.input_order)
        return q
    lin = Linear(module.in_features, len(index), module.bias is not None)
    lin.weight = nn.Parameter(module.weight.detach()[index].clone(), requires_grad=False)
    if module.bias is not None:
        lin.bias = nn.Parameter(module.bias.detach()[index].clone(), requires_grad=False)
    return lin


def _cols(module: nn.Module, index: torch.Tensor) -> nn.Module:
    """Row-parallel: keep input columns `index` (contiguous) of a Linear or QuantLinear (no bias)."""
    if isinstance(module, QuantLinear):
        fmt: QuantFormat = module.fmt
        if module.input_order is not None:
            raise MiaotuiError("cannot split activation-ordered groups (a GPTQ act-order checkpoint) across "
                               "tensor-parallel ranks: run it in one process, or re-quantize with static groups")
        start, width = int(index[0]), len(index)
        g = fmt.group_width(module.in_features)
        if fmt.group_size != -1 and (start % g or (width % g and start + width != module.in_features)):
            raise MiaotuiError(f"cannot split {fmt.bits}-bit group-{fmt.group_size} weights at input column "
                               f"{start} (+{width}) for tensor parallelism: use per-channel or a group size that "
                               f"divides each rank's share")
        local_fmt = fmt if fmt.group_size == -1 or width >= g else replace(fmt, group_size=-1)
        groups = slice(None) if fmt.group_size == -1 else slice(start // g, -(-(start + width) // g))
        q = QuantLinear(width, module.out_features, False, local_fmt, module.act_quant)
        q.set_codes(module.codes()[:, index], module.scale[:, groups], module.zero[:, groups], None)
        return q
    lin = Linear(len(index), module.out_features, False)
    lin.weight = nn.Parameter(module.weight.detach()[:, index].clone(), requires_grad=False)
    return lin


def _share(total: int, tp: int, rank: int) -> int:
    start, end = even_split(total, tp, rank)
    return end - start


def _all_reduce_output(group):
    def hook(_module, _args, output):
        dist.all_reduce(output, group=group)
        return output
    return hook


class TensorParallelModel(WrappedModel):
    """A rank's tensor shard: its layers compute their share; the logits are gathered from the
    vocabulary shards, so every rank sees the full [..., V] logits."""

    def __init__(self, shard: Transformer, config: ModelConfig, vocab_sizes: list[int], group=None) -> None:
        super().__init__(shard, config)
        self.vocab_sizes = vocab_sizes  # each rank's vocabulary rows, in rank order
        self.group = group

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = self.inner.logits(hidden).contiguous()  # [..., V_local]
        # Shards may differ by one row: pad to the largest and trim after the gather.
        width = max(self.vocab_sizes)
        if local.shape[-1] < width:
            local = F.pad(local, (0, width - local.shape[-1]))
        parts = [torch.empty_like(local) for _ in self.vocab_sizes]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat([p[..., :n] for p, n in zip(parts, self.vocab_sizes, strict=True)], dim=-1)


@torch.no_grad()
def shard_tensor_parallel(model: Transformer, tp: int, rank: int, group=None) -> TensorParallelModel:
    """This rank's shard: the model's linears and embedding are replaced by their shards (in place),
    and the result is wrapped so its logits come whole."""
    c = model.config
    q_heads, kv_heads = head_plan(c.num_heads, c.num_kv_heads, tp, rank)
    hd = c.head_dim
    q_rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in q_heads])
    k_rows = torch.cat([c.q_size + torch.arange(g * hd, (g + 1) * hd) for g in kv_heads])
    v_rows = k_rows + c.kv_size
    for i, layer in enumerate(model.layers):
        plan = layer_plan(c, i)
        attn = layer.self_attn
        for name, role in plan.tp_roles.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = layer.get_submodule(owner_name)
            if role == COLUMN_QKV:
                attn.qkv_proj = _rows(attn.qkv_proj, torch.cat([q_rows, k_rows, v_rows]))
            elif role == COLUMN_GATE_UP:  # (its down_proj, ROW, is split to match below)
                width = owner.intermediate_size
                inter = torch.arange(*even_split(width, tp, rank))
                owner.gate_up_proj = _rows(owner.gate_up_proj, torch.cat([inter, width + inter]))
                owner.down_proj = _cols(owner.down_proj, inter)
                owner.intermediate_size = len(inter)
            elif role == ROW and leaf == "o_proj":
                attn.o_proj = _cols(attn.o_proj, q_rows)
        attn.num_heads, attn.num_kv_heads = len(q_heads), len(kv_heads)
        attn.q_size, attn.kv_size = len(q_heads) * hd, len(kv_heads) * hd
        attn.o_proj.register_forward_hook(_all_reduce_output(group))
        # each rank's MLP output is a partial sum over its channels (of every expert it ran): one
        # all-reduce per MLP block, after an MoE's weighted sum over experts
        (layer.mlp if plan.router else layer.mlp.down_proj).register_forward_hook(_all_reduce_output(group))
    vocab = [even_split(c.vocab_size, tp, r) for r in range(tp)]
    v0, v1 = vocab[rank]
    embed = model.embed_tokens.weight.detach()
    if model.lm_head is not None:
        model.lm_head = _rows(model.lm_head, torch.arange(v0, v1))
    model.embed_tokens = VocabParallelEmbedding(embed[v0:v1].clone(), v0, group)
    # The KV cache holds this rank's kv heads only.
    local = replace(c, num_heads=len(q_heads), num_kv_heads=len(kv_heads),
                    intermediate_size=_share(c.intermediate_size, tp, rank),
                    moe_intermediate_size=_share(c.moe_intermediate_size, tp, rank))
    return TensorParallelModel(model, local, [b - a for a, b in vocab], group)
