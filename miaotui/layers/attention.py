"""Grouped-query self-attention with rotary embedding over a caller-owned (paged) KV cache, with
what the families add: RMSNorm on each q and k head, a query scale, score soft-capping, a sliding
window, partial rotation.

Not for cache management: the engine allocates the cache and says where to write.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.kernels import native_op
from miaotui.layers.linear import make_linear
from miaotui.layers.norm import RMSNorm
from miaotui.layers.rope import apply_rope
from miaotui.models.config import ModelConfig
from miaotui.runtime import cpu_flags

_AMX_BF16 = "amx_bf16" in cpu_flags()  # bf16 flash attention beats the float32 upcast (_attention)


class KVView(Protocol):
    """A cache the engine manages (paged, packed rows): stores this step's k/v, runs the attention."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attention, window: int | None = None,
               scale: float | None = None, native_ok: bool = True) -> torch.Tensor: ...

    def attend_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int
                   ) -> torch.Tensor | None: ...

    def fused_qkv_args(self, heads: int) -> tuple[torch.Tensor, ...] | None: ...


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int = 0) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        # q, k and v share their input: one fused matmul instead of three.
        self.qkv_proj = make_linear(config.hidden_size, self.q_size + 2 * self.kv_size, config.qkv_bias)
        self.o_proj = make_linear(self.q_size, config.hidden_size, False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if config.qk_norm else None
        self.scale = config.query_scale if config.query_scale is not None else self.head_dim ** -0.5
        self.softcap = config.attn_softcap
        self.window = config.window(layer)
        # Llama's attention, q/k norms allowed (Qwen3): the native rope and paged attention kernels run it
        self.plain = self.scale == self.head_dim ** -0.5 and self.softcap is None \
            and self.window is None and config.rotary_dim == self.head_dim

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_view: KVView | None) -> torch.Tensor:
        # x: [B, S, D]; cos, sin: [B or 1, 1, S, rot]; kv_view: this layer's view of the engine's paged
        # cache for one packed step (B = 1), or None: causal attention over x alone (scoring, training).
        if not self.plain:
            return self._forward_general(x, cos, sin, kv_view)
        batch, seq, _ = x.shape
        qkv = self.qkv_proj(x)  # [B, S, (H + 2 KV) hd], fresh: rotated in place below
        if self.q_norm is not None:
            qkv = self._norm_heads(qkv)
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

    def _norm_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """RMSNorm over each q and each k head of the fused projection [B, S, (H + 2 KV) hd]."""
        batch, seq, _ = qkv.shape
        heads = qkv.view(batch, seq, -1, self.head_dim)
        q, k = heads[:, :, :self.num_heads], heads[:, :, self.num_heads:self.num_heads + self.num_kv_heads]
        return torch.cat([self.q_norm(q), self.k_norm(k), heads[:, :, self.num_heads + self.num_kv_heads:]],
                         dim=2).view(batch, seq, -1)

    def _forward_general(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_view: KVView | None
                         ) -> torch.Tensor:
        """The same attention with the families' additions, in PyTorch ops."""
        batch, seq, _ = x.shape
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(batch, seq, self.num_heads, self.head_dim)
        k = k.reshape(batch, seq, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:  # per head, before rope (Qwen3, Gemma 3)
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, S, hd]
        k = apply_rope(k.transpose(1, 2), cos, sin)
        v = v.reshape(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if kv_view is not None:
            out = kv_view.attend(q, k, v, self._attention, self.window, self.scale, self.softcap is None)
        elif self.window is None and self.softcap is None:
            out = self._attention(q, k, v, None, is_causal=seq > 1)
        else:
            at = torch.arange(seq, device=x.device)
            mask = at[None, :] <= at[:, None]  # [S, T]: causal
            if self.window is not None:
                mask &= at[None, :] > at[:, None] - self.window
            out = self._attention(q, k, v, mask[None, None])
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.q_size))

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                   is_causal: bool = False) -> torch.Tensor:
        """q: [B, H, S, hd], k, v: [B, KV, T, hd], mask: [B, 1, S, T] bool or None -> [B, H, S, hd]."""
        if self.softcap is not None:
            return self._softcapped(q, k, v, mask, is_causal)
        dtype = q.dtype
        if q.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and not (
                dtype == torch.bfloat16 and _AMX_BF16):
            # PyTorch's CPU flash attention is 4-15x slower in bf16 than in float32 on CPUs without
            # AMX (docs/kernels.md), and float32 scores are exact for bf16 inputs: upcast. With AMX
            # it is ~2x faster than float32 (512-token causal prefill, 9 heads: 2.6 vs 4.5 ms).
            q, k, v = q.float(), k.float(), v.float()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=self.num_heads != self.num_kv_heads,
            scale=self.scale,
        )
        return out.to(dtype)

    def _softcapped(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                    is_causal: bool) -> torch.Tensor:
        """Scores capped at +-softcap by cap * tanh(s / cap) before the softmax (Gemma 2): no fused
        kernel takes that, so the scores are formed in float32."""
        groups = self.num_heads // self.num_kv_heads
        k = k.repeat_interleave(groups, dim=1).float()  # [B, H, T, hd]
        v = v.repeat_interleave(groups, dim=1).float()
        scores = q.float() @ k.transpose(-1, -2) * self.scale  # [B, H, S, T]
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if is_causal:
            mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(dim=-1) @ v).to(q.dtype)
