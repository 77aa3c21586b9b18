"""Integer weight formats: how real weights map to integer codes and back, and how codes pack.

A weight W [N, K] is cut into groups of G input columns (G = K: one group per output row).
Each group has a scale s and a zero point z (float): W ~= (code - z) * s.
- symmetric 8-bit: codes in [-127, 127], z = 0 (per channel, like Q8_0 and llm-compressor).
- symmetric b-bit (b < 8): codes in [-2^(b-1), 2^(b-1) - 1], z = 0, and like GGUF's Q4_0 the
  scale is signed (the group's largest-magnitude weight maps to -2^(b-1)), so all 2^b codes are used.
- asymmetric b-bit: codes in [0, 2^b - 1], z = -min / s, real-valued (Q4_1-like: w = s * code + min).
- ternary: codes in {-1, 0, 1}, s = mean |w| of the weights kept (TWN-style threshold 0.7 mean|w|).
- binary: codes in {-1, +1}, s = mean |w| (sign x scale).
Not for choosing kernels (quantized_linear.py) or for the algorithms that pick codes (compress/).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from miaotui.errors import MiaotuiError

SUPPORTED_BITS = (8, 4, 3, 2)
SUPPORTED_GROUPS = (-1, 16, 32, 64, 128, 256)  # 16: GGUF's Q6_K (8-bit slots; kernel_choice.py)


@dataclass(frozen=True, slots=True)
class QuantFormat:
    bits: int  # 8, 4, 3, 2; ternary and binary use kind
    group_size: int  # -1 = one group per output row (per channel)
    symmetric: bool
    kind: str = "int"  # "int" | "ternary" | "binary"
    # asymmetric only: round zero points to whole codes (GPTQ's and compressed-tensors' convention)
    # rather than keep them real-valued (GGUF Q4_1's w = d * q + m)
    integer_zero: bool = False

    def __post_init__(self) -> None:
        if self.kind == "int" and self.bits not in SUPPORTED_BITS:
            raise MiaotuiError(f"unsupported bits {self.bits} (miaotui quantizes to {SUPPORTED_BITS})")
        if self.group_size not in SUPPORTED_GROUPS:
            raise MiaotuiError(f"unsupported group size {self.group_size} "
                               f"(use one of {SUPPORTED_GROUPS}; -1 = per channel)")

    @property
    def qmin(self) -> int:
        if self.kind != "int":
            return -1
        if not self.symmetric:
            return 0
        return -127 if self.bits == 8 else -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        if self.kind != "int":
            return 1
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def storage_bits(self) -> int:
        """Bits per code as stored on disk and in memory (3-bit codes use 4-bit slots)."""
        if self.kind == "binary":
            return 1
        if self.kind == "ternary":
            return 2
        return {8: 8, 4: 4, 3: 4, 2: 2}[self.bits]

    def group_width(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def groups(self, in_features: int) -> int:
        """ceil(K / G): like GPTQ and llm-compressor, a row whose width is not a multiple of G
        ends in one shorter group (576 = 4 x 128 + 64)."""
        g = self.group_width(in_features)
        if g > in_features:
            raise MiaotuiError(f"group size {g} is larger than the input dimension {in_features}")
        return -(-in_features // g)

    def to_dict(self) -> dict:
        return asdict(self)


def _grouped(weight: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """[N, K] -> [N, groups, G], zero-padding a short last group (zeros change no scale: the
    symmetric scale is a max of |w|, the asymmetric range always includes 0)."""
    n, k = weight.shape
    groups, g = fmt.groups(k), fmt.group_width(k)
    if groups * g != k:
        weight = torch.nn.functional.pad(weight, (0, groups * g - k))
    return weight.reshape(n, groups, g)


def _clamp_magnitude(scale: torch.Tensor) -> torch.Tensor:
    """Keep a (possibly negative) scale away from 0."""
    return torch.where(scale.abs() < 1e-8, torch.full_like(scale, 1e-8), scale)


def _range_stats(w: torch.Tensor, fmt: QuantFormat) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a grouped w [N, groups, G]'s ranges are made of, [N, groups] each: the largest magnitude
    (8-bit symmetric), the signed extreme (other symmetric), or the min and max (asymmetric)."""
    if fmt.symmetric:
        if fmt.bits == 8:
            return w.abs().amax(-1), None
        idx = w.abs().argmax(-1, keepdim=True)
        return torch.gather(w, -1, idx).squeeze(-1), None
    return w.amin(-1), w.amax(-1)


def _range_qparams(stats: tuple[torch.Tensor, torch.Tensor | None], fmt: QuantFormat,
                   ratio: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """_range_stats -> scale, zero [N, groups] with the range shrunk by `ratio` (clipping)."""
    a, b = stats
    if fmt.symmetric:
        if fmt.bits == 8:
            scale = (a * ratio / fmt.qmax).clamp(min=1e-8)
            return scale, torch.zeros_like(scale)
        # Q4_0-style signed scale: the weight of largest magnitude lands exactly on qmin.
        scale = _clamp_magnitude(a * ratio / fmt.qmin)
        return scale, torch.zeros_like(scale)
    # Like GGUF's Q4_1 (w = d * q + m): the group's min maps to code 0 and its max to qmax,
    # with a real-valued zero point, so every code is used.
    lo, hi = a * ratio, b * ratio
    scale = ((hi - lo) / fmt.qmax).clamp(min=1e-8)
    zero = -lo / scale
    return scale, torch.round(zero).clamp(0, fmt.qmax) if fmt.integer_zero else zero


def compute_qparams(weight: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None,
                    clip_search: bool = False, grid: int = 20, min_ratio: float = 0.5
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points: weight [N, K] -> scale, zero [N, groups] (float32).

    Plain round-to-nearest uses each group's full range. With clip_search, each group also tries
    ranges shrunk to ratio in [min_ratio, 1] and keeps the one with the least squared rounding
    error, weighted per input column by `importance` [K] (e.g. E[x_j^2] of the calibration
    inputs: the output error a column causes grows with its input's energy). Ties keep the larger
    ratio, so a weight already on the grid (the shipped Q4_1 model at asym g32) is reproduced exactly.
    """
    w = _grouped(weight.float(), fmt)
    if fmt.kind == "binary":
        return w.abs().mean(-1).clamp(min=1e-8), torch.zeros(w.shape[:2])
    if fmt.kind == "ternary":
        delta = 0.7 * w.abs().mean(-1, keepdim=True)
        kept = (w.abs() > delta).float()
        scale = (w.abs() * kept).sum(-1) / kept.sum(-1).clamp(min=1)
        return scale.clamp(min=1e-8), torch.zeros(w.shape[:2])
    stats = _range_stats(w, fmt)
    best_scale, best_zero = _range_qparams(stats, fmt)
    if not clip_search:
        return best_scale, best_zero
    col = torch.ones(weight.shape[1]) if importance is None else importance.float().clamp(min=0)
    col = _grouped(col[None, :], fmt)  # [1, groups, G]; padded columns weigh 0

    def error(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        q = torch.round(w / scale[..., None] + zero[..., None]).clamp(fmt.qmin, fmt.qmax)
        return (((q - zero[..., None]) * scale[..., None] - w).pow(2) * col).sum(-1)

    best_err = error(best_scale, best_zero)
    for step in range(1, grid + 1):
        scale, zero = _range_qparams(stats, fmt, 1.0 - (1.0 - min_ratio) * step / grid)
        err = error(scale, zero)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale, best_zero = torch.where(better, scale, best_scale), torch.where(better, zero, best_zero)
    return best_scale, best_zero


def quantize_codes(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """weight [N, K] -> integer codes [N, K] (int8) under the given per-group scale/zero [N, groups]."""
    w = _grouped(weight.float(), fmt)
    if fmt.kind == "binary":
        codes = torch.where(w >= 0, 1, -1)
    elif fmt.kind == "ternary":
        codes = torch.round(w / scale[..., None]).clamp(-1, 1)
    else:
        codes = torch.round(w / scale[..., None] + zero[..., None]).clamp(fmt.qmin, fmt.qmax)
    codes = codes.reshape(weight.shape[0], -1)[:, :weight.shape[1]]
    return codes.to(torch.int8 if fmt.qmin < 0 else torch.uint8).contiguous()


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, fmt: QuantFormat,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes [N, K] -> weight [N, K] in dtype."""
    c = _grouped(codes.to(torch.float32), fmt)
    w = (c - zero[..., None].float()) * scale[..., None].float()
    return w.reshape(codes.shape[0], -1)[:, :codes.shape[1]].to(dtype)


def fake_quantize(weight: torch.Tensor, fmt: QuantFormat, importance: torch.Tensor | None = None,
                  clip_search: bool = False) -> torch.Tensor:
    scale, zero = compute_qparams(weight, fmt, importance, clip_search)
    return dequantize_codes(quantize_codes(weight, scale, zero, fmt), scale, zero, fmt, weight.dtype)


def _storage_offset(fmt: QuantFormat) -> tuple[int, int]:
    """(offset, step): stored = (code + offset) // step; binary {-1, +1} -> {0, 1}."""
    return (1, 2) if fmt.kind == "binary" else (-fmt.qmin, 1)


def pack_codes(codes: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Pack codes [N, K] into uint8 [N, K * storage_bits / 8], lowest bits first."""
    bits = fmt.storage_bits
    offset, step = _storage_offset(fmt)
    u = ((codes.to(torch.int16) + offset) // step).to(torch.uint8)
    if bits == 8:
        return u
    per_byte = 8 // bits
    u = u.reshape(codes.shape[0], -1, per_byte)
    packed = torch.zeros(u.shape[:2], dtype=torch.uint8)
    for i in range(per_byte):
        packed |= u[..., i] << (bits * i)
    return packed


def unpack_codes(packed: torch.Tensor, fmt: QuantFormat, dtype: torch.dtype = torch.int16) -> torch.Tensor:
    bits = fmt.storage_bits
    offset, step = _storage_offset(fmt)
    if bits == 8:
        u = packed
    else:
        mask = (1 << bits) - 1
        u = torch.stack([(packed >> (bits * i)) & mask for i in range(8 // bits)], dim=-1)
        u = u.reshape(packed.shape[0], -1)
    return (u.to(torch.int16) * step - offset).to(dtype)


def in_weight_order(w: torch.Tensor, input_order: torch.Tensor | None) -> torch.Tensor:
    """Columns held in input_order ([N, K], column j is the weight's input_order[j]) -> the weight's order."""
    if input_order is None:
        return w
    out = torch.empty_like(w)
    out[:, input_order] = w
    return out


@dataclass
class QuantizedTensor:
    """An integer weight as QuantLinear.set_codes takes it, before packing (a GGUF file's blocks,
    loaders/gguf_quant.py): codes [N, K] in fmt's code range, scale and zero [N, groups] float32,
    w = (code - zero) * scale."""
    fmt: QuantFormat
    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    act_quant: bool = False  # W8A8: the layer quantizes its input per token too (writers record it)
    # activation-ordered groups (GPTQ's act-order, a g_idx): the codes' columns are the weight's columns
    # input_order[j], so that each group is a run; the layer reads its input in that order (x[:, order])
    input_order: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:  # [N, K], the weight's column order
        return in_weight_order(dequantize_codes(self.codes, self.scale, self.zero, self.fmt, dtype), self.input_order)

    def widened(self, group: int) -> QuantizedTensor | None:
        """The same weights as 8-bit unsigned codes in asymmetric groups of `group` (exact: codes keep
        their values, each group's scale and zero repeat over its sub-groups), so that matrices of
        different formats can share one fused layer (a Q4_K_M file's Q4_K q and k beside a Q6_K v);
        None where the groups do not split into `group`s."""
        k = self.codes.shape[1]
        width = self.fmt.group_width(k)
        if self.fmt.kind != "int" or self.input_order is not None or width % group or k % group \
                or self.scale.shape[1] * width != k:
            return None
        # codes shifted by their own least value (Q6_K's -32..31 -> 0..63): the offsets the kernel
        # keeps in float16, -zero * scale, stay as small as the codes allow
        low = int(self.codes.min())
        stored = (self.codes.to(torch.int16) - low).to(torch.uint8)
        repeat = width // group
        return QuantizedTensor(QuantFormat(8, group, False), stored, self.scale.repeat_interleave(repeat, dim=1),
                               (self.zero - low).repeat_interleave(repeat, dim=1))

    def take_rows(self, index: torch.Tensor) -> QuantizedTensor:
        """Rows in a new order (llama.cpp's q/k row permutation undone)."""
        return QuantizedTensor(self.fmt, self.codes[index], self.scale[index], self.zero[index], self.act_quant,
                               self.input_order)

    def split_rows(self, sizes: list[int]) -> list[QuantizedTensor]:
        """A fused matrix's parts ([q; k; v] rows): exact, every group lies within one row."""
        return [QuantizedTensor(self.fmt, c, s, z, self.act_quant, self.input_order) for c, s, z in
                zip(*(t.split(sizes) for t in (self.codes, self.scale, self.zero)), strict=True)]
