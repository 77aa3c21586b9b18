"""GGUF quantized blocks -> miaotui's packed integer formats, exactly, with no float copy of the weight.

Each GGUF block type whose weights are w = scale * code + offset per group of 32 maps onto a
QuantFormat the few-row kernels run (layers/kernel_choice.py):

| GGUF | block | miaotui format | codes |
|---|---|---|---|
| Q4_0 | 32: d, 4-bit q; w = d (q - 8) | int4 g32 symmetric | q - 8 |
| Q4_1 | 32: d, m, 4-bit q; w = d q + m | int4 g32 asymmetric | q |
| Q8_0 | 32: d, int8 q; w = d q | int8 g32 symmetric | q |
| Q4_K | 256: d, dmin, 8 x (6-bit sc, 6-bit m), 4-bit q; w = d sc q - dmin m per 32 | int4 g32 asymmetric | q |
| Q5_0 | 32: d, 5-bit q; w = d (q - 16) | 8-bit slots, g32 symmetric | q - 16 |
| Q5_1 | 32: d, m, 5-bit q; w = d q + m | 8-bit slots, g32 asymmetric | q |
| Q5_K | 256: as Q4_K with 5-bit q | 8-bit slots, g32 asymmetric | q |
| Q6_K | 256: d, 16 x int8 sc, 6-bit q; w = d sc (q - 32) per 16 | 8-bit slots, g16 symmetric | q - 32 |
| Q3_K | 256: d, 16 x 6-bit sc, 3-bit q3 (2 bits + mask); w = d (sc - 32) q3 per 16 | 8-bit, g16 sym | q3 in -4..3 |
| Q2_K | 256: d, dmin, 16 x (4-bit sc, 4-bit m), 2-bit q; w = d sc q - dmin m per 16 | 8-bit slots, g16 asymmetric | q |

(2- to 6-bit codes sit in 8-bit slots: exact, 34 bytes per 32 weights in memory (36 for the
groups of 16 of Q2_K, Q3_K and Q6_K) against the file's 10.5-26.)
An asymmetric group's zero point is offset / scale, so (code - zero) * scale gives the block's own
w = scale * code + offset up to float32 rounding. Other types (IQ*, TQ*, ...) return
None here: the loader dequantizes those tensors one at a time (loaders/gguf.py).
Not for reading the file (gguf_file.py) or for writing GGUF (gguf_export.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from miaotui.kernels import native_op
from miaotui.layers.quant_formats import QuantFormat, QuantizedTensor

# A group whose scale is 0 holds one value, its offset: a tiny scale keeps offset / scale finite.
_TINY_SCALE = 1e-30


NATIVE_TYPES = (T.Q4_0, T.Q4_1, T.Q8_0, T.Q4_K, T.Q5_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K)
_SUPER_BLOCK = (T.Q4_K, T.Q5_K, T.Q6_K, T.Q2_K, T.Q3_K)  # 256 values per block


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The float16 at byte `start` of every block: [n, blocks, B] -> float32 [n, blocks] (one strided
    pass: the blocks seen as records with a float16 field)."""
    size = blocks.shape[-1]
    record = np.dtype({"names": ["v"], "formats": ["<f2"], "offsets": [start], "itemsize": size})
    flat = np.ascontiguousarray(blocks).reshape(-1, size)
    return flat.reshape(-1).view(record)["v"].astype(np.float32).reshape(blocks.shape[:-1])


def _nibbles_32(blocks: np.ndarray, start: int, minus: int = 0) -> np.ndarray:
    """The 16 bytes from `start` of each block [n, B, block bytes] hold 32 values (low nibbles: values
    0-15, high: 16-31) -> [n, B, 32] uint8, less `minus` (as int8 when minus > 0: uint8 arithmetic
    wraps onto the signed codes)."""
    native = native_op("nibble_blocks")
    if native is not None:  # one pass (kernels/decode_matmul.cpp)
        n, count, size = blocks.shape
        with warnings.catch_warnings():  # the memory map is read-only; the op only reads it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(blocks).reshape(n, count * size))
        out = native(raw, size, start, minus).numpy().reshape(n, count, 32)
        return out.view(np.int8) if minus else out
    qs = blocks[..., start:start + 16]
    out = np.empty((*qs.shape[:-1], 32), dtype=np.uint8)
    np.bitwise_and(qs, 15, out=out[..., :16])
    np.right_shift(qs, 4, out=out[..., 16:])
    if minus:
        out -= np.uint8(minus)
        return out.view(np.int8)
    return out


def _high_bits_32(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1's 4 bytes of fifth bits (bit j: value j) -> [..., 32] uint8 of 0 or 16."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")  # [..., 32]
    return (bits << 4).astype(np.uint8)


def _k_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 bytes -> the 8 sub-blocks' 6-bit scales and mins, each [..., 8] float32."""
    s = scales.astype(np.uint8)
    sc = np.concatenate([s[..., 0:4] & 63, (s[..., 8:12] & 15) | ((s[..., 0:4] >> 6) << 4)], axis=-1)
    mn = np.concatenate([s[..., 4:8] & 63, (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)], axis=-1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 128 bytes per 256 values: 4 chunks of 32 bytes, low nibbles the chunk's first 32
    values, high nibbles its next 32 -> [..., 256] uint8."""
    q = qs.reshape(*qs.shape[:-1], 4, 32)
    return np.stack([q & 15, q >> 4], axis=-2).reshape(*qs.shape[:-1], 256)


def _asymmetric(scale: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """w = scale * q + offset -> (scale, zero) with w = (q - zero) * scale."""
    scale = np.where(scale == 0, np.float32(_TINY_SCALE), scale).astype(np.float32)
    return scale, (-offset / scale).astype(np.float32)


def held_bytes(qtype: T, shape: tuple[int, ...], float_bytes: int) -> int:
    """About what one tensor will hold in memory once loaded: its codes in the tile layout with
    float16 scales (and offsets) for a native type, else float_bytes per value."""
    n = int(np.prod(shape)) if shape else 1
    if qtype not in NATIVE_TYPES or len(shape) != 2 or shape[-1] % 32:
        return n * float_bytes
    if qtype in (T.Q4_0, T.Q4_1, T.Q4_K):
        return n // 2 + n // 32 * (2 if qtype == T.Q4_0 else 4)
    group = 16 if qtype in (T.Q6_K, T.Q3_K, T.Q2_K) else 32
    return n + n // group * (2 if qtype in (T.Q8_0, T.Q5_0, T.Q6_K, T.Q3_K) else 4)


def native_weight(raw: np.ndarray, qtype: T, k: int) -> QuantizedTensor | None:
    """raw: uint8 [N, bytes per row] of one GGUF matrix with K = k columns -> its exact
    QuantizedTensor, or None for a type without a native mapping (or a Q8_0 using code -128,
    which int8 g32 symmetric cannot hold)."""
    if qtype not in NATIVE_TYPES or k % 32:
        return None
    n = raw.shape[0]
    per_block = 256 if qtype in _SUPER_BLOCK else 32
    blocks = np.asarray(raw).reshape(n, k // per_block, -1)
    if qtype == T.Q4_0:
        d = _f16(blocks, 0)
        codes = _nibbles_32(blocks, 2, minus=8)
        return _tensor(QuantFormat(4, 32, True), codes, d, np.zeros_like(d), n, k)
    if qtype == T.Q4_1:
        scale, zero = _asymmetric(_f16(blocks, 0), _f16(blocks, 2))
        return _tensor(QuantFormat(4, 32, False), _nibbles_32(blocks, 4), scale, zero, n, k)
    if qtype == T.Q8_0:
        codes = np.ascontiguousarray(blocks[..., 2:34]).view(np.int8)
        if (codes == -128).any():
            return None
        d = _f16(blocks, 0)
        return _tensor(QuantFormat(8, 32, True), codes, d, np.zeros_like(d), n, k)
    if qtype == T.Q5_0:
        d = _f16(blocks, 0)
        q = _nibbles_32(blocks, 6) | _high_bits_32(blocks[..., 2:6])
        return _tensor(QuantFormat(8, 32, True), q.astype(np.int8) - 16, d, np.zeros_like(d), n, k)
    if qtype == T.Q5_1:
        scale, zero = _asymmetric(_f16(blocks, 0), _f16(blocks, 2))
        q = _nibbles_32(blocks, 8) | _high_bits_32(blocks[..., 4:8])
        return _tensor(QuantFormat(8, 32, False), q, scale, zero, n, k)
    if qtype == T.Q6_K:  # 16 groups of 16 per 256: ql 128, qh 64, int8 scales 16, d
        ql = blocks[..., 0:128].reshape(n, -1, 2, 64)
        qh = blocks[..., 128:192].reshape(n, -1, 2, 1, 32)
        # value 128 h + 32 t + l: nibble (t >= 2) of ql[64 h + 32 (t % 2) + l], bits 2t, 2t + 1 of qh[32 h + l]
        low = np.stack([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], axis=-2)
        high = (qh >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3
        q = (low | (high << 4)).reshape(n, -1, 256).astype(np.int8) - 32
        scale = _f16(blocks, 208)[..., None] * np.ascontiguousarray(blocks[..., 192:208]).view(np.int8)
        return _tensor(QuantFormat(8, 16, True), q, scale, np.zeros_like(scale), n, k)
    if qtype == T.Q3_K:  # hmask 32, qs 64, scales 12, d: 16 groups of 16
        # value 128 h + 32 j + l: 2 bits (2j) of qs[32 h + l], less 4 unless bit 4h + j of hmask[l]
        qs = blocks[..., 32:96].reshape(n, -1, 2, 1, 32)
        low = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # [n, nb, 2, 4, 32]
        hm = blocks[..., 0:32].reshape(n, -1, 1, 1, 32)
        bit = (4 * np.arange(2, dtype=np.uint8)[:, None] + np.arange(4, dtype=np.uint8)[None, :])[..., None]
        q = low.astype(np.int8) - np.where((hm >> bit) & 1, 0, 4).astype(np.int8)
        sb = blocks[..., 96:108].astype(np.uint8)  # 16 6-bit scales: low nibbles of 0-7, 2-bit tops in 8-11
        top = sb[..., 8:12]
        sc = np.concatenate([(sb[..., 0:4] & 15) | ((top & 3) << 4), (sb[..., 4:8] & 15) | (((top >> 2) & 3) << 4),
                             (sb[..., 0:4] >> 4) | (((top >> 4) & 3) << 4), (sb[..., 4:8] >> 4) | ((top >> 6) << 4)],
                            axis=-1)
        scale = _f16(blocks, 108)[..., None] * (sc.astype(np.float32) - 32)
        return _tensor(QuantFormat(8, 16, True), q.reshape(n, -1, 256), scale, np.zeros_like(scale), n, k)
    if qtype == T.Q2_K:  # scales 16, qs 64, d, dmin: 16 groups of 16
        qs = blocks[..., 16:80].reshape(n, -1, 2, 1, 32)
        q = (qs >> (2 * np.arange(4, dtype=np.uint8))[:, None]) & 3  # value 128 h + 32 j + l
        sb = blocks[..., 0:16]
        scale, zero = _asymmetric(_f16(blocks, 80)[..., None] * (sb & 15).astype(np.float32),
                                  -(_f16(blocks, 82)[..., None] * (sb >> 4).astype(np.float32)))
        return _tensor(QuantFormat(8, 16, False), q.reshape(n, -1, 256), scale, zero, n, k)
    # Q4_K / Q5_K: super-blocks of 256 = 8 groups of 32, w = (d sc) q - (dmin m)
    d, dmin = _f16(blocks, 0)[..., None], _f16(blocks, 2)[..., None]
    sc, mn = _k_scales(blocks[..., 4:16])
    scale, zero = _asymmetric(d * sc, -(dmin * mn))
    if qtype == T.Q4_K:
        return _tensor(QuantFormat(4, 32, False), _k_nibbles(blocks[..., 16:144]), scale, zero, n, k)
    qh = blocks[..., 16:48]  # bit 2c of byte l: value l of chunk c's low half, bit 2c + 1: of its high half
    high = np.unpackbits(np.ascontiguousarray(qh)[..., None], axis=-1, bitorder="little")  # [n, nb, 32, 8]
    high = np.moveaxis(high, -1, -2).reshape(*qh.shape[:-1], 256) << 4  # value 32 j + l <- bit j of byte l
    q = _k_nibbles(blocks[..., 48:176]) | high.astype(np.uint8)
    return _tensor(QuantFormat(8, 32, False), q, scale, zero, n, k)


def _tensor(fmt: QuantFormat, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray, n: int, k: int
            ) -> QuantizedTensor:
    dtype = torch.int8 if fmt.qmin < 0 else torch.uint8
    return QuantizedTensor(fmt, torch.from_numpy(np.ascontiguousarray(codes).reshape(n, k)).to(dtype),
                           torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(n, -1)),
                           torch.from_numpy(np.ascontiguousarray(zero, dtype=np.float32).reshape(n, -1)))


BLOCK_FORMATS = {T.Q4_0: QuantFormat(4, 32, True), T.Q4_1: QuantFormat(4, 32, False), T.Q8_0: QuantFormat(8, 32, True)}


class GGUFBlocks:
    """A matrix still in its GGUF file's Q4_0, Q4_1 or Q8_0 blocks (raw uint8 [N, row bytes], rows
    permuted or stacked at the byte level): an inference load turns it into the tile kernel's
    layout in one pass (gguf_q_tiles, `tiles`), never unpacking the codes; anything else asks for
    the QuantizedTensor (`quantized`)."""

    def __init__(self, qtype: T, raw: np.ndarray, k: int, release: Callable[[], None] | None = None) -> None:
        self.qtype, self.raw, self.k = qtype, raw, k
        self.fmt = BLOCK_FORMATS[qtype]
        self.shape = (raw.shape[0], k)
        self._release = release  # drops the mapped file pages raw views, once they are read

    @staticmethod
    def fits(qtype: T, shape: tuple[int, ...]) -> bool:
        return qtype in BLOCK_FORMATS and len(shape) == 2 and shape[-1] % 32 == 0

    def release(self) -> None:
        if self._release is not None:
            self._release()
            self._release = None

    def take_rows(self, rows: np.ndarray) -> GGUFBlocks:
        out = GGUFBlocks(self.qtype, self.raw[rows], self.k)  # (a copy)
        self.release()
        return out

    @staticmethod
    def cat(parts: list[GGUFBlocks]) -> GGUFBlocks | None:
        """The parts' rows stacked, when they share one block type (else None)."""
        if len({(p.qtype, p.k) for p in parts}) != 1:
            return None
        out = GGUFBlocks(parts[0].qtype, np.concatenate([p.raw for p in parts]), parts[0].k)
        for p in parts:
            p.release()
        return out

    def quantized(self) -> QuantizedTensor:
        out = native_weight(self.raw, self.qtype, self.k)  # (copies what it keeps)
        self.release()
        return out

    def tiles(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, int | None]:
        """(packed tiles, scale, offset [N, K / 32] float32 or None, zero code or None) for
        QuantLinear.set_packed_tiles."""
        blocks = np.asarray(self.raw).reshape(self.shape[0], self.k // 32, -1)
        with warnings.catch_warnings():  # a view of the read-only memory map: the op only reads it
            warnings.simplefilter("ignore", UserWarning)
            raw = torch.from_numpy(np.ascontiguousarray(self.raw))
        packed = native_op("gguf_q_tiles")(raw, int(self.qtype), self.k)
        d = torch.from_numpy(_f16(blocks, 0))
        # w = u * scale + offset with u the stored code: Q4_1 w = d u + m; Q4_0 u = q, w = d (u - 8);
        # Q8_0 u = q + 127, w = d (u - 127)
        offset = torch.from_numpy(_f16(blocks, 2)) if self.qtype == T.Q4_1 else None
        self.release()
        return packed, d, offset, {T.Q4_0: 8, T.Q8_0: 127}.get(self.qtype)
