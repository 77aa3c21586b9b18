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

from dataclasses import dataclass

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


# -- the grids -------------------------------------------------------------------------------------

@dataclass
class Grid:
    """The rounding grid of a set of blocks [R, B]: w ~= scale[:, j // sub] * q + offset[:, j // sub] with
    integer q in [lo, hi]; scale and offset [R, B / sub] as the file's own (rounded) fields give them.
    fields: what packing the blocks needs besides the codes."""
    qtype: T
    scale: torch.Tensor
    offset: torch.Tensor
    lo: int
    hi: int
    sub: int
    fields: dict[str, torch.Tensor]

    def codes(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Nearest codes for values x [R, n] of columns start .. start + n of the blocks."""
        cols = torch.arange(start, start + x.shape[1]) // self.sub
        s, o = self.scale[:, cols], self.offset[:, cols]
        q = torch.where(s != 0, torch.round((x - o) / torch.where(s != 0, s, torch.ones_like(s))), 0)
        return q.clamp(self.lo, self.hi)

    def values(self, q: torch.Tensor, start: int = 0) -> torch.Tensor:
        cols = torch.arange(start, start + q.shape[1]) // self.sub
        return q * self.scale[:, cols] + self.offset[:, cols]


def block_width(qtype: T) -> int:
    return QK_K if qtype in (T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K) else 32


def grid_for(qtype: T, x: torch.Tensor, imp: torch.Tensor | None = None) -> Grid:
    """The grid llama.cpp's decoder will read for blocks x [R, block_width] (importance [R, block] or None)."""
    b = x.shape[0]
    w = _weights(x, imp)
    if qtype in (T.Q4_K, T.Q5_K):  # 8 sub-blocks of 32, w = d * sc * q - dmin * m
        nmax = 15 if qtype == T.Q4_K else 31
        ws = w.reshape(b * 8, 32)
        s, m = affine_scales(x.reshape(b * 8, 32), ws, nmax)
        sub_weight = ws.sum(-1).reshape(b, 8)
        d, ls = _round_subscales(s.reshape(b, 8), sub_weight, 63)
        dmin, lm = _round_subscales(m.reshape(b, 8), sub_weight, 63)
        return Grid(qtype, _as16(d)[:, None] * ls, -_as16(dmin)[:, None] * lm, 0, nmax, 32,
                    {"d": d, "dmin": dmin, "ls": ls, "lm": lm})
    if qtype in (T.Q6_K, T.Q3_K):  # 16 sub-blocks of 16, w = d * sc * q
        nmax, low, high = (32, -128, 127) if qtype == T.Q6_K else (4, -32, 31)
        s = symmetric_scales(x.reshape(b * 16, 16), w.reshape(b * 16, 16), nmax).reshape(b, 16)
        d, ls = _signed_subscales(s, low, high)
        scale = d[:, None] * ls
        return Grid(qtype, scale, torch.zeros_like(scale), -nmax, nmax - 1, 16, {"d": d, "ls": ls})
    if qtype in (T.Q4_1, T.Q5_1):  # w = d * q + m
        nmax = 15 if qtype == T.Q4_1 else 31
        s, m = affine_scales(x, w, nmax)
        d16, m16 = _as16(s)[:, None], _as16(-m)[:, None]
        return Grid(qtype, d16, m16, 0, nmax, 32, {"d": s, "m": -m})
    if qtype == T.Q8_0:
        s = x.abs().amax(-1) / 127
        return Grid(qtype, _as16(s)[:, None], torch.zeros(b, 1), -127, 127, 32, {"d": s})
    nmax = {T.Q4_0: 8, T.Q5_0: 16}[qtype]  # w = d * q
    s = symmetric_scales(x, w, nmax)
    return Grid(qtype, _as16(s)[:, None], torch.zeros(b, 1), -nmax, nmax - 1, 32, {"d": s})


def pack(grid: Grid, q: torch.Tensor) -> torch.Tensor:
    """Codes q [R, block] on `grid` -> the blocks' bytes [R, bytes per block] (uint8)."""
    b, f, qtype = q.shape[0], grid.fields, grid.qtype
    q = q.to(torch.int32)
    if qtype in (T.Q4_K, T.Q5_K):
        # element c*64 + s*32 + l: nibble s of qs[c*32 + l]; Q5_K's fifth bit of element j*32 + l: bit j of qh[l]
        qs = _pack_bits((q & 15).reshape(b * 4, 2, 32), 32, 2).reshape(b, 128)
        parts = [_fp16(f["d"]).reshape(b, 2), _fp16(f["dmin"]).reshape(b, 2), _kscales(f["ls"], f["lm"])]
        if qtype == T.Q5_K:
            parts.append(_pack_bits((q >> 4).reshape(b, 8, 32), 32, 8))
        return torch.cat([*parts, qs], dim=1)
    if qtype == T.Q6_K:
        u = q + 32
        # element h*128 + s*64 + l: low nibble in ql[h*64 + l] at bits 4s; h*128 + s*32 + l: high 2 bits in qh[h*32 + l]
        ql = _pack_bits((u & 15).reshape(b * 2, 2, 64), 64, 2).reshape(b, 128)
        qh = _pack_bits((u >> 4).reshape(b * 2, 4, 32), 32, 4).reshape(b, 64)
        return torch.cat([ql, qh, f["ls"].to(torch.int8).view(torch.uint8), _fp16(f["d"]).reshape(b, 2)], dim=1)
    if qtype == T.Q3_K:
        u = q + 4  # 0..7: two low bits in qs, the third in hmask (set: no offset of -4)
        hmask = _pack_bits((u >> 2).reshape(b, 8, 32), 32, 8)
        qs = _pack_bits((u & 3).reshape(b * 2, 4, 32), 32, 4).reshape(b, 64)
        su = (f["ls"] + 32).to(torch.int32)  # 0..63
        sc = torch.zeros(b, 12, dtype=torch.int32)
        sc[:, :8] = (su[:, :8] & 15) | ((su[:, 8:] & 15) << 4)
        for t in range(4):
            sc[:, 8:12] |= ((su[:, 4 * t:4 * t + 4] >> 4) & 3) << (2 * t)
        return torch.cat([hmask, qs, sc.to(torch.uint8), _fp16(f["d"]).reshape(b, 2)], dim=1)
    if qtype == T.Q8_0:
        return torch.cat([_fp16(f["d"]).reshape(b, 2), q.to(torch.int8).view(torch.uint8)], dim=1)
    head = [_fp16(f["d"]).reshape(b, 2)]
    if qtype in (T.Q4_1, T.Q5_1):
        head.append(_fp16(f["m"]).reshape(b, 2))
    else:
        q = q - grid.lo  # Q4_0 / Q5_0 store q + 8 / q + 16
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
    block = block_width(qtype)
    if k % block:
        raise ValueError(f"{qtype.name} needs rows of whole {block}-blocks, got {k}")
    x = matrix.detach().float().reshape(-1, block)
    imp = None if importance is None else \
        importance.float().clamp(min=0).reshape(1, k).expand(n, k).reshape(-1, block)
    rows = []
    chunk = max(1, 2 ** 16 // block) * 16  # blocks per pass: bounded temporaries
    for start in range(0, x.shape[0], chunk):
        xs = x[start:start + chunk]
        grid = grid_for(qtype, xs, None if imp is None else imp[start:start + chunk])
        rows.append(pack(grid, grid.codes(xs)))
    return torch.cat(rows).reshape(n, -1).numpy()
