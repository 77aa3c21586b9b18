"""The paged KV cache's tensors, and the per-step views attention layers read and write through.

Pool layout per layer: K and V [num_blocks, block_size, kv_heads, head_dim], so a token's slot
is block * block_size + offset in the flattened [slots, kv_heads, head_dim] view. A step's new
tokens come packed on one axis [1, N] (no padding: a decode row costs one token even when a
512-token prefill chunk shares the step). Rows with the same number of new tokens attend as one
group: their keys are gathered into [G, kv_heads, T, head_dim] (T = the group's longest
context) with a mask that hides other rows' slots and future positions.
Not for block bookkeeping (block_manager.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from miaotui.kernels import native_op
from miaotui.models.config import ModelConfig
from miaotui.runtime import cpu_flags

NATIVE_MAX_NEW_TOKENS = 16  # groups of rows with up to this many new tokens (decode, verification) run natively
_CPU_BF16_DOT = "avx512_bf16" in cpu_flags()  # the native kernel's bf16 path (VDPBF16PS)


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.kv_size * torch.finfo(dtype).bits // 8


def blocks_for_memory(config: ModelConfig, dtype: torch.dtype, megabytes: float, block_size: int) -> int:
    """How many KV blocks fit in `megabytes` for this model's (or this rank's) layers and heads."""
    return int(megabytes * 2**20) // (block_size * kv_bytes_per_token(config, dtype))


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.block_size = block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        # the pools as flat slots [S, KV, hd], made once (a view per layer and step costs ~1 us each)
        self._flat = [(k.view(-1, *shape[2:]), v.view(-1, *shape[2:])) for k, v in zip(self.keys, self.values,
                                                                                     strict=True)]
        # Few-token rows read the pool in place (kernels/cpu_kernels.cpp): built here, at start-up.
        self.native = native_op("paged_attention") if torch.device(device).type == "cpu" else None
        # bf16 decode steps: rope + pool writes + attention from the qkv projection in one op
        self.fused = native_op("paged_attention_qkv") if self.native is not None and dtype == torch.bfloat16 \
            and _CPU_BF16_DOT and config.head_dim % 32 == 0 else None

    def step_views(self, slots: torch.Tensor, groups: list[AttentionGroup]) -> list[PackedLayerView]:
        """slots: [N] flat slot of each new (packed) token; groups: who attends to what."""
        return [PackedLayerView(k, v, flat, slots, groups, self.native, self.fused)
                for k, v, flat in zip(self.keys, self.values, self._flat, strict=True)]


@dataclass(slots=True)
class AttentionGroup:
    """Rows of a packed step with the same number n of new tokens, attended as one batch."""

    token_index: torch.Tensor  # [G, n] where each row's new tokens sit on the packed axis
    gather: torch.Tensor  # [G, T] flat slot of each key position a row attends over (0 = unused)
    mask: torch.Tensor  # [G, 1, n, T] bool, True = may attend
    lengths: torch.Tensor  # [G, n] keys each new token sees: gather[g, :lengths[g, i]] (its position + 1)


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True)
class PackedLayerView:
    k_pool: torch.Tensor  # [blocks, block_size, KV, hd]
    v_pool: torch.Tensor
    flat: tuple[torch.Tensor, torch.Tensor]  # the pools as flat slots [S, KV, hd] (views made once per cache)
    slots: torch.Tensor  # [N]
    groups: list[AttentionGroup]
    native: Callable | None = None  # torch.ops.miaotui.paged_attention, or None: PyTorch ops only
    fused: Callable | None = None  # torch.ops.miaotui.paged_attention_qkv (bf16 pools), or None

    def attend_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor | None:
        """A step of few-token rows, all alike (one group), from the qkv projection in one native op:
        rope, pool writes and attention, with the bits of the unfused native path. qkv: [N, (H + 2 KV)
        hd] bf16 (rotated in place); cos, sin: [N, hd] -> [N, H hd], or None: use attend()."""
        args = self.fused_qkv_args(heads)
        return None if args is None else self.fused(qkv, cos, sin, *args, heads, self.k_pool.shape[3] ** -0.5)

    def fused_qkv_args(self, heads: int) -> tuple[torch.Tensor, ...] | None:
        """paged_attention_qkv's cache arguments (k_pool, v_pool [S, KV, hd], slots, gather, lengths)
        for this step, or None where it does not run (several groups, long rows, no AVX512-BF16)."""
        if self.fused is None or len(self.groups) != 1:
            return None
        g = self.groups[0]
        if g.token_index.shape[1] > NATIVE_MAX_NEW_TOKENS or heads % self.k_pool.shape[2] != 0:
            return None
        return self.flat[0], self.flat[1], self.slots, g.gather, g.lengths

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Attend, window: int | None = None,
               scale: float | None = None, native_ok: bool = True) -> torch.Tensor:
        """q: [1, H, N, hd]; k, v: [1, KV, N, hd] this step's entries (stored here) -> [1, H, N, hd].
        attention(q [G, H, n, hd], keys [G, KV, T, hd], values, mask [G, 1, n, T]) runs each group.
        window: each query sees only the last `window` keys, itself included (sliding layers);
        scale: the scores' scale (None: hd ** -0.5); native_ok: False where attention() does more than
        the native kernel (soft-capping)."""
        k_flat, v_flat = self.flat
        # index_copy_/index_select, not tensor[index]: 8x faster here (advanced indexing's generic kernel).
        k_flat.index_copy_(0, self.slots, k[0].transpose(0, 1).to(k_flat.dtype))  # [N, KV, hd]
        v_flat.index_copy_(0, self.slots, v[0].transpose(0, 1).to(v_flat.dtype))
        how = (window, q.shape[-1] ** -0.5 if scale is None else scale, native_ok)
        if len(self.groups) == 1:  # the rows in order, all of the same length: no reordering
            return self._attend_group(q[0], k_flat, v_flat, self.groups[0], attention, *how).reshape(q.shape)
        out = torch.empty_like(q)
        for g in self.groups:
            index = g.token_index.reshape(-1)
            out[0].index_copy_(1, index, self._attend_group(q[0].index_select(1, index), k_flat, v_flat, g,
                                                            attention, *how))
        return out

    def _native_fits(self, q: torch.Tensor, k_flat: torch.Tensor, g: AttentionGroup) -> bool:
        return (self.native is not None and g.token_index.shape[1] <= NATIVE_MAX_NEW_TOKENS
                and q.shape[0] % k_flat.shape[1] == 0)

    def _attend_group(self, q: torch.Tensor, k_flat: torch.Tensor, v_flat: torch.Tensor, g: AttentionGroup,
                      attention: Attend, window: int | None = None, scale: float | None = None,
                      native_ok: bool = True) -> torch.Tensor:
        """q: [H, G * n, hd] the group's queries, rows in order -> [H, G * n, hd]."""
        (rows, t), n = g.gather.shape, g.token_index.shape[1]
        kv, hd = k_flat.shape[1], k_flat.shape[2]
        scale = hd ** -0.5 if scale is None else scale
        # the native kernel reads each query's whole prefix: it serves a sliding layer while the
        # prefix still fits in the window, and decode rows (one query each) from a gather that
        # starts where their window does
        windowed = window is not None and int(g.lengths.max()) > window
        gather, lengths = g.gather, g.lengths
        if windowed and n == 1:
            start = (g.lengths[:, 0] - window).clamp(min=0)  # [G] each row's first key in its window
            at = (start[:, None] + torch.arange(window, device=start.device)).clamp(max=t - 1)  # [G, W]
            gather, lengths = g.gather.gather(1, at), g.lengths - start[:, None]
        if native_ok and (not windowed or n == 1) and self._native_fits(q, k_flat, g):
            # queries [G, n, H, hd]; each one attends over its own prefix of the row's slots. bf16
            # queries and pool: bf16 dot products on the pool in place (AVX512-BF16); else float32.
            bf16 = q.dtype == k_flat.dtype == torch.bfloat16 and hd % 32 == 0 and _CPU_BF16_DOT
            qn = q.transpose(0, 1).to(torch.bfloat16 if bf16 else torch.float32).contiguous()
            out = self.native(qn.view(rows, n, q.shape[0], hd), k_flat, v_flat, gather, lengths, scale)
            return out.view(rows * n, q.shape[0], hd).transpose(0, 1).to(q.dtype)
        keys = k_flat.index_select(0, g.gather.reshape(-1)).view(rows, t, kv, hd).transpose(1, 2)
        values = v_flat.index_select(0, g.gather.reshape(-1)).view(rows, t, kv, hd).transpose(1, 2)
        mask = g.mask
        if windowed:  # [G, 1, n, T]: and key position >= the query's position + 1 - window
            ctx = torch.arange(t, device=mask.device)
            mask = mask & (ctx[None, None, :] >= (g.lengths - window)[:, :, None])[:, None]
        out = attention(q.view(-1, rows, n, hd).transpose(0, 1), keys, values, mask)  # [G, H, n, hd]
        return out.transpose(0, 1).reshape(-1, rows * n, hd)
