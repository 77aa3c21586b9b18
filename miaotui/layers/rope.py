"""Rotary position embedding (RoPE) in the rotate-half layout: plain, linear, Llama 3, YaRN and
LongRoPE scaling, and partial rotation (the first fraction of each head).

Not for the interleaved layout: loaders convert GGUF's permuted q/k weights to rotate-half.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from miaotui.errors import MiaotuiError

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope", "freq_factors")


@dataclass(slots=True)
class RopeFrequencies:
    inv_freq: torch.Tensor  # [dim // 2] float32
    attention_factor: float = 1.0  # cos and sin are multiplied by it (YaRN, LongRoPE)
    long_inv_freq: torch.Tensor | None = None  # LongRoPE: positions >= long_from rotate with these
    long_from: int = 0


def _base_frequencies(dim: int, theta: float) -> torch.Tensor:
    # (on the CPU even inside a meta-device context: meta arithmetic imports PyTorch's reference ops, ~2 s)
    steps = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()
    return 1.0 / (theta ** (steps / dim))


def rope_frequencies(dim: int, theta: float, scaling: dict[str, Any] | None,
                     max_positions: int = 2048) -> RopeFrequencies:
    """The checkpoint's rope for `dim` rotated channels of each head, as its reference computes it."""
    inv_freq = _base_frequencies(dim, theta)
    scaling = scaling or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return RopeFrequencies(inv_freq)
    if rope_type == "freq_factors":
        # GGUF (llama.cpp) stores Llama 3.1-style scaling as one divisor per frequency.
        return RopeFrequencies(inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32, device="cpu"))
    if rope_type == "linear":
        return RopeFrequencies(inv_freq / float(scaling["factor"]))
    if rope_type == "llama3":
        return RopeFrequencies(_llama3(inv_freq, scaling))
    if rope_type == "yarn":
        return _yarn(dim, theta, scaling, max_positions)
    if rope_type in ("longrope", "su"):
        return _longrope(dim, theta, scaling, max_positions)
    raise MiaotuiError(f"unsupported rope scaling type '{rope_type}' (miaotui supports: {', '.join(ROPE_TYPES)})")


def _llama3(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, scaling: dict[str, Any], max_positions: int) -> RopeFrequencies:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are
    interpolated by `factor`, those that turn more than beta_fast times kept, a linear ramp between;
    cos/sin scaled by 0.1 ln(factor) + 1 (or the checkpoint's attention_factor / mscale pair)."""
    original = float(scaling.get("original_max_position_embeddings") or max_positions)
    factor = float(scaling.get("factor") or max_positions / original)
    attention = scaling.get("attention_factor")
    if attention is None:
        mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else _yarn_mscale(factor)
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:  # the channel that turns `rotations` times over `original`
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no division by zero
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp  # 1: keep the frequency, 0: interpolate it
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return RopeFrequencies(inv_freq, float(attention))


def _longrope(dim: int, theta: float, scaling: dict[str, Any], max_positions: int) -> RopeFrequencies:
    """LongRoPE (Phi-3/4): one divisor per frequency, the short set within the original context and
    the long set beyond it; cos/sin scaled by sqrt(1 + ln(factor) / ln(original context)). (The
    reference switches a whole sequence to the long set once it outgrows the original context; here
    each position picks its own set, so cached keys never change.)"""
    original = int(scaling.get("original_max_position_embeddings") or max_positions)
    factor = float(scaling.get("factor") or max_positions / original)
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    short = 1.0 / (torch.tensor(scaling["short_factor"], dtype=torch.float32) * theta ** shape)
    long = 1.0 / (torch.tensor(scaling["long_factor"], dtype=torch.float32) * theta ** shape)
    return RopeFrequencies(short, float(attention), long, original)


class RotaryEmbedding(nn.Module):
    """Computes cos/sin for given positions on the fly (no table: contexts can be 128k long)."""

    def __init__(self, dim: int, theta: float, scaling: dict[str, Any] | None, max_positions: int = 2048) -> None:
        super().__init__()
        self.dim, self.theta, self.scaling, self.max_positions = dim, theta, scaling, max_positions
        self.materialize("cpu")

    def materialize(self, device: str | torch.device) -> None:
        """The frequencies are derived from the config, never stored: computed again after a meta build."""
        with torch.device("cpu"):  # (also inside a meta-device build: see _base_frequencies)
            f = rope_frequencies(self.dim, self.theta, self.scaling, self.max_positions)
        self.register_buffer("inv_freq", f.inv_freq.to(device), persistent=False)
        self.register_buffer("long_inv_freq", None if f.long_inv_freq is None else f.long_inv_freq.to(device),
                             persistent=False)
        self.long_from, self.attention_factor = f.long_from, f.attention_factor

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [B, S] -> cos, sin: [B, 1, S, dim], broadcast over heads.
        freqs = positions[..., None].float() * self.inv_freq
        if self.long_inv_freq is not None:
            freqs = torch.where(positions[..., None] >= self.long_from,
                                positions[..., None].float() * self.long_inv_freq, freqs)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        if self.attention_factor != 1.0:
            return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [B, H, S, hd]; cos, sin: [.., S, rot] with rot <= hd: the first rot channels rotate (rotate-half
    # pairs (i, i + rot/2)), the rest pass through.
    rot = cos.shape[-1]
    if rot < x.shape[-1]:
        return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
    half = rot // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
