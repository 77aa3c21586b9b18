"""Grouped-query self-attention with rotary embedding over a caller-owned (paged) KV cache.

Not for cache management: the engine allocates the cache and says where to write.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.kernels import native_op
from miaotui.layers.linear import make_linear
from miaotui.layers.rope import apply_rope
from miaotui.models.config import ModelConfig
from miaotui.runtime import cpu_flags

_AMX_BF16 = "amx_bf16" in cpu_flags()  # bf16 flash attention beats the float32 upcast (_attention)


class KVView(Protocol):
    """A cache the engine manages (paged, packed rows): stores this step's k/v, runs the attention."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention) -> torch.Tensor: ...

    def attend_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
                   ) -> torch.Tensor | None: ...

    def fused_qkv_args(self, heads: int) -> tuple[torch.Tensor, ...] | None: ...


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_view: KVView | None) -> torch.Tensor:
        # x: [B, S, D]; cos, sin: [B or 1, 1, S, hd]; kv_view: this layer's view of the engine's paged
        # cache for one packed step (B = 1), or None: causal attention over x alone (scoring, training).
        batch, seq, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, S, (H + 2 KV) hd], fresh: rotated in place below
        native = native_op("rope_bf16_") if qkv.dtype == cos.dtype == torch.bfloat16 and qkv.device.type == "cpu" \
            and qkv.is_contiguous() and not torch.is_grad_enabled() else None  # inference only: no backward
        if native is not None and kv_view is not None and batch == 1 and cos.is_contiguous():
            # A decode step: rope, cache writes and attention in one native op (paged_cache.py)
            out = kv_view.attend_qkv(qkv.view(seq, -1), cos.view(seq, -1), sin.view(seq, -1), self.num_heads)
            if out is not None:
                return self.o_proj(out.view(batch, seq, self.q_size))
        if native is not None:
            # q and k heads rotated together in one op, with apply_rope's bf16 roundings (same bits)
            heads = qkv.view(batch * seq, -1, self.head_dim)[:, :self.num_heads + self.num_kv_heads]
            rows = (batch, 1, seq, self.head_dim)
            native(heads, cos.expand(rows).reshape(batch * seq, -1).contiguous(),
                   sin.expand(rows).reshape(batch * seq, -1).contiguous())
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if native is None:
            q = apply_rope(q, cos, sin)
            k = apply_rope(k, cos, sin)
        if kv_view is not None:
            # Packed rows of an engine step (engine/paged_cache.py): it stores k/v and runs attention per group.
            out = kv_view.attend(q, k, v, self._attention)
        else:
            out = self._attention(q, k, v, None, is_causal=seq > 1)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.q_size))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool = False) -> torch.Tensor:
        """q: [B, H, S, hd], k, v: [B, KV, T, hd], mask: [B, 1, S, T] bool or None -> [B, H, S, hd]."""
        dtype = q.dtype
        if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not (
                dtype == torch.bfloat16 and _AMX_BF16):
            # PyTorch's CPU flash attention is 4-15x slower in bf16 than in float32 on CPUs without
            # AMX (docs/kernels.md), and float32 scores are exact for bf16 inputs: upcast. With AMX
            # it is ~2x faster than float32 (512-token causal prefill, 9 heads: 2.6 vs 4.5 ms).
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_heads != self.num_kv_heads
        )
        return out.to(dtype)
