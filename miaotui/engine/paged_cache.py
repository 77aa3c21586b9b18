"""The paged KV cache's tensors, and the per-step views attention layers read and write through.

Pool layout per layer: K and V [num_blocks, block_size, kv_heads, head_dim], so a token's slot
is block * block_size + offset in the flattened [slots, kv_heads, head_dim] view. A step's new
tokens come packed on one axis [1, N] (no padding: a decode row costs one token even when a
512-token prefill chunk shares the step). Rows with the same number of new tokens attend as one
group: their keys are gathered into [G, kv_heads, T, head_dim] (T = the group's longest
context) with a mask that hides other rows' slots and future positions.
A quantized cache (kv_cache_dtype "int8" or "fp8") holds one-byte codes in the same layout and a
float16 scale per (slot, kv head) [num_blocks, block_size, kv_heads]: value = code * scale, int8
codes in [-127, 127] with scale = absmax / 127, or fp8 e4m3 codes with scale = absmax / 448 (fp8
as storage: CPUs compute on it widened to float32). About half the bytes of a bf16 cache per token
(hd + 2 bytes per head instead of 2 hd), so the same memory holds about twice the tokens. The native
kernels read the codes in place (kernels/kv_codes.cpp); the PyTorch path widens what it gathers.
Not for block bookkeeping (block_manager.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from miaotui.engine.config import KV_CACHE_DTYPES
from miaotui.errors import MiaotuiError
from miaotui.kernels import native_op
from miaotui.models.config import ModelConfig
from miaotui.runtime import cpu_flags

NATIVE_MAX_NEW_TOKENS = 16  # groups of rows with up to this many new tokens (decode, verification) run natively
_CPU_BF16_DOT = "avx512_bf16" in cpu_flags()  # the native kernel's bf16 path (VDPBF16PS)


_CODES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
_CODE_LIMITS = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}  # the largest code: absmax maps to it


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Cache bytes per token: keys and values of every layer and kv head (codes + a float16 scale each)."""
    per_head = config.head_dim * torch.finfo(dtype).bits // 8 if kv_cache_dtype == "auto" else config.head_dim + 2
    return 2 * config.num_layers * config.num_kv_heads * per_head


def blocks_for_memory(config: ModelConfig, dtype: torch.dtype, megabytes: float, block_size: int,
                      kv_cache_dtype: str = "auto") -> int:
    """How many KV blocks fit in `megabytes` for this model's (or this rank's) layers and heads."""
    return int(megabytes * 2**20) // (block_size * kv_bytes_per_token(config, dtype, kv_cache_dtype))


def quantize_rows(x: torch.Tensor, code_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [N, KV, hd] -> (codes [N, KV, hd] code_dtype, scales [N, KV] float16). The float32 steps of
    kernels/kv_codes.cpp's store(), so both give the same bits."""
    limit = _CODE_LIMITS[code_dtype]
    x = x.float()
    scales = (x.abs().amax(-1) * (1 / limit)).to(torch.float16)
    wide = scales.float()
    inverse = torch.where(wide == 0, 0.0, wide.reciprocal())  # an all-zero head: codes 0
    y = (x * inverse[..., None]).clamp(-limit, limit)
    return (y.round().to(torch.int8) if code_dtype == torch.int8 else y.to(code_dtype)), scales


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., hd], scales [...] -> values [..., hd] in dtype."""
    return (codes.float() * scales.float()[..., None]).to(dtype)


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device, kv_cache_dtype: str = "auto") -> None:
        """dtype: the model's (queries and outputs); kv_cache_dtype: "auto" (pools in dtype), "int8" or "fp8"."""
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise MiaotuiError(f"unknown KV-cache dtype '{kv_cache_dtype}' (use {', '.join(KV_CACHE_DTYPES)})")
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.block_size = block_size
        self.kv_cache_dtype = kv_cache_dtype
        code = _CODES.get(kv_cache_dtype)
        pool_dtype = dtype if code is None else code
        self.keys = [torch.zeros(shape, dtype=pool_dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=pool_dtype, device=device) for _ in range(config.num_layers)]

        def scales() -> torch.Tensor | None:  # a quantized pool's [blocks, block_size, KV] float16; else None
            return None if code is None else torch.zeros(shape[:3], dtype=torch.float16, device=device)

        self.key_scales = [scales() for _ in range(config.num_layers)]
        self.value_scales = [scales() for _ in range(config.num_layers)]
        # the pools as flat slots [S, KV, hd] (scales [S, KV]), made once (a view per layer and step costs ~1 us)
        self._flat = [(k.view(-1, *shape[2:]), v.view(-1, *shape[2:])) for k, v in zip(self.keys, self.values,
                                                                                     strict=True)]
        self._flat_scales = [tuple(None if s is None else s.view(-1, shape[2]) for s in pair)
                             for pair in zip(self.key_scales, self.value_scales, strict=True)]
        # Few-token rows read the pool in place (kernels/cpu_kernels.cpp): built here, at start-up.
        self.native = native_op("paged_attention") if torch.device(device).type == "cpu" else None
        # bf16 decode steps: rope + pool writes + attention from the qkv projection in one op
        self.fused = native_op("paged_attention_qkv") if self.native is not None and dtype == torch.bfloat16 \
            and _CPU_BF16_DOT and config.head_dim % 32 == 0 and config.head_dim <= 256 else None

    @property
    def bytes(self) -> int:
        """What the pools and their scales hold."""
        tensors = [*self.keys, *self.values, *(s for s in self.key_scales + self.value_scales if s is not None)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def step_views(self, slots: torch.Tensor, groups: list[AttentionGroup]) -> list[PackedLayerView]:
        """slots: [N] flat slot of each new (packed) token; groups: who attends to what."""
        return [PackedLayerView(k, v, flat, slots, groups, self.native, self.fused, scales)
                for k, v, flat, scales in zip(self.keys, self.values, self._flat, self._flat_scales, strict=True)]


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
    scales: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)  # a quantized pool's [S, KV] float16

    def attend_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int) -> torch.Tensor | None:
        """A step of few-token rows, all alike (one group), from the qkv projection in one native op:
        rope, pool writes and attention, with the bits of the unfused native path. qkv: [N, (H + 2 KV)
        hd] bf16 (rotated in place); cos, sin: [N, hd] -> [N, H hd], or None: use attend()."""
        args = self.fused_qkv_args(heads)
        if args is None:
            return None
        k_pool, v_pool, slots, gather, lengths, k_scales, v_scales = args
        return self.fused(qkv, cos, sin, k_pool, v_pool, slots, gather, lengths, heads, self.k_pool.shape[3] ** -0.5,
                          k_scales, v_scales)

    def fused_qkv_args(self, heads: int) -> tuple[torch.Tensor | None, ...] | None:
        """paged_attention_qkv's cache arguments (k_pool, v_pool [S, KV, hd], slots, gather, lengths,
        k_scales, v_scales [S, KV] or None) for this step, or None where it does not run (several
        groups, long rows, no AVX512-BF16)."""
        if self.fused is None or len(self.groups) != 1:
            return None
        g = self.groups[0]
        if g.token_index.shape[1] > NATIVE_MAX_NEW_TOKENS or heads % self.k_pool.shape[2] != 0:
            return None
        return self.flat[0], self.flat[1], self.slots, g.gather, g.lengths, *self.scales

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention: Attend, window: int | None = None,
               scale: float | None = None, native_ok: bool = True) -> torch.Tensor:
        """q: [1, H, N, hd]; k, v: [1, KV, N, hd] this step's entries (stored here) -> [1, H, N, hd].
        attention(q [G, H, n, hd], keys [G, KV, T, hd], values, mask [G, 1, n, T]) runs each group.
        window: each query sees only the last `window` keys, itself included (sliding layers);
        scale: the scores' scale (None: hd ** -0.5); native_ok: False where attention() does more than
        the native kernel (soft-capping)."""
        k_flat, v_flat = self.flat
        # index_copy_/index_select, not tensor[index]: 8x faster here (advanced indexing's generic kernel).
        if self.scales[0] is None:
            k_flat.index_copy_(0, self.slots, k[0].transpose(0, 1).to(k_flat.dtype))  # [N, KV, hd]
            v_flat.index_copy_(0, self.slots, v[0].transpose(0, 1).to(v_flat.dtype))
        else:
            for pool, pool_scales, new in ((k_flat, self.scales[0], k), (v_flat, self.scales[1], v)):
                codes, code_scales = quantize_rows(new[0].transpose(0, 1), pool.dtype)  # [N, KV, hd], [N, KV]
                pool.view(torch.uint8).index_copy_(0, self.slots, codes.view(torch.uint8))  # no fp8 index_copy_
                pool_scales.index_copy_(0, self.slots, code_scales)
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
        coded = self.scales[0] is not None
        if native_ok and (not windowed or n == 1) and self._native_fits(q, k_flat, g):
            # queries [G, n, H, hd]; each one attends over its own prefix of the row's slots. bf16
            # queries and pool (or codes): on the pool in place (AVX512-BF16); else float32.
            bf16 = q.dtype == torch.bfloat16 and (coded or k_flat.dtype == torch.bfloat16) and hd % 32 == 0 \
                and hd <= 256 and _CPU_BF16_DOT
            qn = q.transpose(0, 1).to(torch.bfloat16 if bf16 else torch.float32).contiguous()
            out = self.native(qn.view(rows, n, q.shape[0], hd), k_flat, v_flat, gather, lengths, scale, *self.scales)
            return out.view(rows * n, q.shape[0], hd).transpose(0, 1).to(q.dtype)
        index = g.gather.reshape(-1)
        if coded:  # the gathered rows widened to the queries' dtype
            keys = dequantize_rows(k_flat.index_select(0, index), self.scales[0].index_select(0, index), q.dtype)
            values = dequantize_rows(v_flat.index_select(0, index), self.scales[1].index_select(0, index), q.dtype)
        else:
            keys, values = k_flat.index_select(0, index), v_flat.index_select(0, index)
        keys = keys.view(rows, t, kv, hd).transpose(1, 2)
        values = values.view(rows, t, kv, hd).transpose(1, 2)
        mask = g.mask
        if windowed:  # [G, 1, n, T]: and key position >= the query's position + 1 - window
            ctx = torch.arange(t, device=mask.device)
            mask = mask & (ctx[None, None, :] >= (g.lengths - window)[:, :, None])[:, None]
        out = attention(q.view(-1, rows, n, hd).transpose(0, 1), keys, values, mask)  # [G, H, n, hd]
        return out.transpose(0, 1).reshape(-1, rows * n, hd)
