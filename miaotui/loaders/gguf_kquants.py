"""GGUF block encoders with importance-weighted rounding: the k-quants (Q3_K, Q4_K, Q5_K, Q6_K) and the
legacy 32-blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), byte for byte as llama.cpp lays them out.

The gguf package quantizes the legacy types by plain rounding and cannot write k-quants at all. Here
each block's scales are chosen to minimise the squared error weighted per weight, as llama.cpp's
quantizer does with an importance matrix: weight = importance[column] * sqrt(sigma^2 + w^2), where
importance is the mean square of the inputs that column multiplies (E[x_j^2] over calibration text;
compress/importance.py), or 1 without calibration. Scales are searched over a grid of candidate
rounding ranges with the least-squares scale (and offset) fitted to each candidate's codes; the
sub-block scales of the k-quants are then rounded to their 6 or 8 bits and the codes chosen again
under the rounded scales. All blocks of a matrix are encoded at once (torch, vectorised).

Not for reading GGUF blocks (gguf_quant.py) or for choosing the type per tensor (gguf_export.py).
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

QK_K = 256
ENCODED = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    """float32 [..] -> float16 bytes [.., 2] (uint8), and the value as float16 stores it."""
    return x.to(torch.float16).view(torch.uint8).reshape(*x.shape, 2)


def _as16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _weights(x: torch.Tensor, importance: torch.Tensor | None) -> torch.Tensor:
    """Per-weight error weights for blocks x [B, n] (importance [B, n] or None): llama.cpp's rule."""
    sigma2 = 2 * x.pow(2).mean(-1, keepdim=True)
    base = torch.sqrt(sigma2 + x * x)
    return base if importance is None else importance * base


# -- scale searches --------------------------------------------------------------------------------

def symmetric_scales(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 9) -> torch.Tensor:
    """Signed codes in [-nmax, nmax - 1], w ~= s * q: the best s per row of x [R, n] (weights w),
    over candidate rounding ranges around the one that puts the largest |x| on -nmax."""
    idx = x.abs().argmax(-1, keepdim=True)
    extreme = torch.gather(x, -1, idx)  # [R, 1], signed
    best_s = torch.zeros_like(extreme)
    best_score = torch.full_like(extreme, -1.0)
    safe = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    for step in range(-steps, steps + 1):
        iscale = -(nmax + 0.1 * step) / safe
        q = torch.round(x * iscale).clamp(-nmax, nmax - 1)
        sumlx, suml2 = (w * x * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True)
        score = torch.where(suml2 > 0, sumlx * sumlx / suml2.clamp(min=1e-30), torch.zeros_like(sumlx))
        better = score > best_score
        best_score = torch.where(better, score, best_score)
        best_s = torch.where(better, sumlx / suml2.clamp(min=1e-30), best_s)
    return torch.where(extreme == 0, torch.zeros_like(best_s), best_s).squeeze(-1)


def affine_scales(x: torch.Tensor, w: torch.Tensor, nmax: int, steps: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Unsigned codes in [0, nmax], w ~= s * q - m with m >= 0 (the range includes 0): the best (s, m)
    per row of x [R, n], each candidate's codes refitted by weighted least squares."""
    lo = x.amin(-1, keepdim=True).clamp(max=0)
    hi = x.amax(-1, keepdim=True)
    span = (hi - lo).clamp(min=1e-30)
    sw, swx = w.sum(-1, keepdim=True), (w * x).sum(-1, keepdim=True)
    best_s, best_m = span / nmax, -lo
    best_err = torch.full_like(lo, float("inf"))
    for step in range(-steps, steps + 1):
        iscale = (nmax + 0.9 * step / steps) / span
        q = torch.round((x - lo) * iscale).clamp(0, nmax)
        swl, swl2, swxl = (w * q).sum(-1, keepdim=True), (w * q * q).sum(-1, keepdim=True), \
            (w * x * q).sum(-1, keepdim=True)
        det = sw * swl2 - swl * swl
        ok = det > 1e-30
        s = torch.where(ok, (sw * swxl - swx * swl) / det.clamp(min=1e-30), span / nmax)
        offset = torch.where(ok, (swl2 * swx - swl * swxl) / det.clamp(min=1e-30), lo)  # x ~= s q + offset
        positive = offset > 0  # the offset must not exceed 0 (m >= 0): refit s alone with offset 0
        s = torch.where(positive, swxl / swl2.clamp(min=1e-30), s)
        offset = torch.where(positive, torch.zeros_like(offset), offset)
        err = (w * (s * q + offset - x).pow(2)).sum(-1, keepdim=True)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, -offset, best_m)
    return best_s.squeeze(-1).clamp(min=0), best_m.squeeze(-1).clamp(min=0)


def _round_subscales(values: torch.Tensor, weight: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values [B, S] as d * l with l in 0..levels and one d per block: the d,
    among candidates near max/levels, that keeps the weighted squared error least. -> (d [B], l [B, S])."""
    top = values.amax(-1, keepdim=True)
    safe = torch.where(top > 0, top, torch.ones_like(top))
    best_d, best_l = top / levels, torch.zeros_like(values)
    best_err = torch.full_like(top, float("inf"))
    for step in range(-4, 5):
        d = _as16(safe / (levels + 0.25 * step))
        d = torch.where(d > 0, d, safe / levels)
        level = torch.round(values / d).clamp(0, levels)
        err = (weight * (d * level - values).pow(2)).sum(-1, keepdim=True)
        better = err < best_err
        best_err, best_d, best_l = (torch.where(better, err, best_err), torch.where(better, d, best_d),
                                    torch.where(better, level, best_l))
    best_d = torch.where(top > 0, best_d, torch.zeros_like(best_d))
    return best_d.squeeze(-1), best_l


def _signed_subscales(scales: torch.Tensor, low: int, high: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed sub-block scales [B, S] as d * l, l in [low, high]: the largest |scale| lands on `low`
    (as llama.cpp rounds Q6_K's and Q3_K's scales). -> (d [B] as float16 holds it, l [B, S])."""
    idx = scales.abs().argmax(-1, keepdim=True)
    extreme = torch.gather(scales, -1, idx)
    safe = torch.where(extreme == 0, torch.ones_like(extreme), extreme)
    d = _as16(safe / low)
    d = torch.where(extreme == 0, torch.zeros_like(d), d)
    level = torch.where(d != 0, torch.round(scales / torch.where(d == 0, torch.ones_like(d), d)),
                        torch.zeros_like(scales)).clamp(low, high)
    return d.squeeze(-1), level


# -- bit packing -----------------------------------------------------------------------------------

def _pack_bits(q: torch.Tensor, width: int, shifts: int) -> torch.Tensor:
    """q [B, shifts, width] small integers -> bytes [B, width]: byte l holds q[:, s, l] << (8/shifts * s)."""
    bits = 8 // shifts
    out = torch.zeros(q.shape[0], width, dtype=torch.int32)
    for s in range(shifts):
        out |= (q[:, s, :].to(torch.int32) & ((1 << bits) - 1)) << (bits * s)
    return out.to(torch.uint8)


def _kscales(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K/Q5_K's 12 bytes for 8 six-bit scales and mins [B, 8] (gguf's get_scale_min, inverted)."""
    sc, m = sc.to(torch.int32), m.to(torch.int32)
    b = torch.zeros(sc.shape[0], 12, dtype=torch.int32)
    b[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    b[:, 4:8] = (m[:, :4] & 63) | ((m[:, 4:] >> 4) << 6)
    b[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    return b.to(torch.uint8)


# -- the encoders ----------------------------------------------------------------------------------

def _encode_k_affine(x: torch.Tensor, imp: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Q4_K (bits 4) / Q5_K (bits 5): 8 sub-blocks of 32, w = d * sc * q - dmin * m."""
    b = x.shape[0]
    nmax = (1 << bits) - 1
    w = _weights(x, imp)
    xs, ws = x.reshape(b * 8, 32), w.reshape(b * 8, 32)
    s, m = affine_scales(xs, ws, nmax)
    s, m = s.reshape(b, 8), m.reshape(b, 8)
    sub_weight = ws.sum(-1).reshape(b, 8)
    d, ls = _round_subscales(s, sub_weight, 63)
    dmin, lm = _round_subscales(m, sub_weight, 63)
    d16, dmin16 = _as16(d), _as16(dmin)
    eff_s = (d16[:, None] * ls).repeat_interleave(32, 1)  # [B, 256]
    eff_m = (dmin16[:, None] * lm).repeat_interleave(32, 1)
    q = torch.where(eff_s > 0, torch.round((x + eff_m) / torch.where(eff_s > 0, eff_s, 1)), 0).clamp(0, nmax)
    q = q.to(torch.int32)
    low = q & 15
    qs = _pack_bits(low.reshape(b, 4, 2, 32).reshape(b * 4, 2, 32), 32, 2).reshape(b, 128)
    parts = [_fp16(d).reshape(b, 2), _fp16(dmin).reshape(b, 2), _kscales(ls, lm)]
    if bits == 5:
        qh = _pack_bits((q >> 4).reshape(b, 8, 32), 32, 8)
        parts.append(qh)
    parts.append(qs)
    return torch.cat(parts, dim=1)


def _encode_q6_k(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """16 sub-blocks of 16, w = d * sc * (q - 32), sc int8."""
    b = x.shape[0]
    w = _weights(x, imp)
    s = symmetric_scales(x.reshape(b * 16, 16), w.reshape(b * 16, 16), 32).reshape(b, 16)
    d, ls = _signed_subscales(s, -128, 127)
    eff = (d[:, None] * ls).repeat_interleave(16, 1)
    q = torch.where(eff != 0, torch.round(x / torch.where(eff != 0, eff, 1)), 0).clamp(-32, 31).to(torch.int32) + 32
    # element h*128 + s*64 + l: low nibble in ql[h*64 + l] at bits 4s; h*128 + s*32 + l: high 2 bits in qh[h*32 + l]
    ql = _pack_bits((q & 15).reshape(b * 2, 2, 64), 64, 2).reshape(b, 128)
    qh = _pack_bits((q >> 4).reshape(b * 2, 4, 32), 32, 4).reshape(b, 64)
    return torch.cat([ql, qh, ls.to(torch.int8).view(torch.uint8), _fp16(d).reshape(b, 2)], dim=1)


def _encode_q3_k(x: torch.Tensor, imp: torch.Tensor | None) -> torch.Tensor:
    """16 sub-blocks of 16, w = d * (sc - 32) * q with q in -4..3 and sc 6-bit."""
    b = x.shape[0]
    w = _weights(x, imp)
    s = symmetric_scales(x.reshape(b * 16, 16), w.reshape(b * 16, 16), 4).reshape(b, 16)
    d, ls = _signed_subscales(s, -32, 31)
    eff = (d[:, None] * ls).repeat_interleave(16, 1)
    q = torch.where(eff != 0, torch.round(x / torch.where(eff != 0, eff, 1)), 0).clamp(-4, 3).to(torch.int32) + 4
    hmask = _pack_bits((q >> 2).reshape(b, 8, 32), 32, 8)  # element j*32 + l: bit j of hmask[l]
    qs = _pack_bits((q & 3).reshape(b * 2, 4, 32), 32, 4).reshape(b, 64)
    u = (ls + 32).to(torch.int32)  # 0..63
    sc = torch.zeros(b, 12, dtype=torch.int32)
    sc[:, :8] = (u[:, :8] & 15) | ((u[:, 8:] & 15) << 4)
    for t in range(4):
        sc[:, 8:12] |= ((u[:, 4 * t:4 * t + 4] >> 4) & 3) << (2 * t)
    return torch.cat([hmask, qs, sc.to(torch.uint8), _fp16(d).reshape(b, 2)], dim=1)


def _encode_legacy(x: torch.Tensor, imp: torch.Tensor | None, qtype: T) -> torch.Tensor:
    """The 32-weight blocks: Q4_0 / Q5_0 / Q8_0 (w = d * q, signed) and Q4_1 / Q5_1 (w = d * q + m)."""
    b = x.shape[0]
    w = _weights(x, imp)
    if qtype in (T.Q4_1, T.Q5_1):
        nmax = 15 if qtype == T.Q4_1 else 31
        s, m = affine_scales(x, w, nmax)
        d16, m16 = _as16(s)[:, None], _as16(-m)[:, None]
        q = torch.where(d16 > 0, torch.round((x - m16) / torch.where(d16 > 0, d16, 1)), 0)
        q = q.clamp(0, nmax).to(torch.int32)
        head = [_fp16(s).reshape(b, 2), _fp16(-m).reshape(b, 2)]
    else:
        nmax = {T.Q4_0: 8, T.Q5_0: 16, T.Q8_0: 128}[qtype]
        s = symmetric_scales(x, w, nmax) if qtype != T.Q8_0 else x.abs().amax(-1) / 127
        d16 = _as16(s)
        d16 = d16[:, None]
        q = torch.where(d16 != 0, torch.round(x / torch.where(d16 != 0, d16, 1)), 0)
        if qtype == T.Q8_0:
            return torch.cat([_fp16(s).reshape(b, 2), q.clamp(-127, 127).to(torch.int8).view(torch.uint8)], dim=1)
        q = q.clamp(-nmax, nmax - 1).to(torch.int32) + nmax
        head = [_fp16(s).reshape(b, 2)]
    # element l (< 16): low nibble of qs[l]; element 16 + l: high nibble
    qs = _pack_bits((q & 15).reshape(b, 2, 16), 16, 2)
    if qtype in (T.Q5_0, T.Q5_1):
        qh = torch.zeros(b, dtype=torch.int64)
        for j in range(32):
            qh |= ((q[:, j] >> 4) & 1).to(torch.int64) << j
        head.append(qh.to(torch.int32).view(torch.uint8).reshape(b, 4))
    return torch.cat([*head, qs], dim=1)


def encode(matrix: torch.Tensor, qtype: T, importance: torch.Tensor | None = None) -> np.ndarray:
    """matrix [N, K] (K a multiple of the type's block) -> the GGUF bytes [N, K / block * bytes] (uint8).
    importance: [K], the mean square of each column's input (None: every column alike)."""
    n, k = matrix.shape
    block = QK_K if qtype in (T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K) else 32
    if k % block:
        raise ValueError(f"{qtype.name} needs rows of whole {block}-blocks, got {k}")
    x = matrix.detach().float().reshape(-1, block)
    imp = None if importance is None else \
        importance.float().clamp(min=0).reshape(1, k).expand(n, k).reshape(-1, block)
    rows = []
    chunk = max(1, 2 ** 16 // block) * 16  # blocks per pass: bounded temporaries
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk]
        ims = None if imp is None else imp[start:start + chunk]
        if qtype in (T.Q4_K, T.Q5_K):
            rows.append(_encode_k_affine(xs, ims, 4 if qtype == T.Q4_K else 5))
        elif qtype == T.Q6_K:
            rows.append(_encode_q6_k(xs, ims))
        elif qtype == T.Q3_K:
            rows.append(_encode_q3_k(xs, ims))
        else:
            rows.append(_encode_legacy(xs, ims, qtype))
    return torch.cat(rows).reshape(n, -1).numpy()
