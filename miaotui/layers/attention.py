"""Grouped-query self-attention with rotary embedding over a caller-owned KV cache.

Not for cache management: the engine allocates the cache and says where to write.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.layers.linear import make_linear
from miaotui.layers.rope import apply_rope
from miaotui.models.config import ModelConfig


class KVView(Protocol):
    """A cache the engine manages (e.g. paged): takes this step's k/v, returns all keys/values."""

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        # q, k and v share their input: one fused matmul instead of three.
        self.qkv_proj = make_linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias)
        self.o_proj = make_linear(self.q_size, config.hidden_size, False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor] | KVView | None,
        cache_start: int,
        attn_mask: torch.Tensor | None,
        is_causal: bool,
    ) -> torch.Tensor:
        # x: [B, S, D]; kv_cache: ([B, KV, T_max, hd], [B, KV, T_max, hd]), a paged view, or None;
        # attn_mask: [B, 1, S, T] bool (True = may attend) or None.
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if kv_cache is not None and not isinstance(kv_cache, tuple):
            # A paged view (engine/paged_cache.py): writes the new entries, returns each row's keys.
            k, v = kv_cache.update(k, v)
        elif kv_cache is not None:
            k_cache, v_cache = kv_cache
            end = cache_start + seq
            k_cache[:, :, cache_start:end] = k
            v_cache[:, :, cache_start:end] = v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.q_size))
