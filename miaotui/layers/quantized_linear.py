"""QuantLinear: a drop-in for Linear whose weight is stored as packed integer codes.

Storage (saved): `packed` codes (uint8, 1/2/4/8 bits each), `scale` and `zero` [N, groups].
Kernels (layouts built at load, not saved), chosen per call by kernel_choice.quant_kernel:
- "tiles_q":  the native few-row kernel on AVX512-VNNI CPUs (linear_q_tiles): as rows_q, with the codes
              repacked in 16-row tiles (q_tiles_layout), one VNNI dot product per 64 bytes; decode
- "rows_q":   the native few-row kernel (kernels/decode_matmul.cpp, linear_q_rows): 4- and 8-bit codes
              in their own bits against int8-quantized activations (as llama.cpp's Q8_0); decode
- "int8pack": torch._weight_int8pack_mm (int8 per-channel weights; few rows)
- "int4pack": torch._weight_int4pack_mm_for_cpu (4-bit groups of 32..256; few rows)
- "int_mm":   W8A8 — activations quantized per token on the fly, torch._int_mm (int8 x int8 -> int32)
- "w8a8_float": the same W8A8 arithmetic as a float GEMM over the integer values (CPUs without VNNI/AMX)
- "amx4":     4-bit weights on AMX CPUs: a native kernel dequantizes 16-column blocks into tiles and
              multiplies them with AMX (kernels/cpu_kernels.cpp; from INT4_AMX_MIN_ROWS rows, prefill too)
- "dense":    dequantize to the activation dtype and run the float GEMM (many rows; any format)
Not for producing codes (compress/quantize/).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.errors import MiaotuiError
from miaotui.kernels import native_op
from miaotui.layers.kernel_choice import (
    _INT4_INNER_K_TILES,
    amx4_fits,
    int4pack_fits,
    int8pack_fits,
    note_kernel,
    q_rows_fits,
    q_tiles_fits,
    q_tiles_format_fits,
    quant_kernel,
    this_cpu,
)
from miaotui.layers.quant_formats import QuantFormat, dequantize_codes, in_weight_order, pack_codes, unpack_codes

# Measured (3072x576 int4 g32, 30 weights streamed from DRAM, AMX Xeon, 2 threads, us per call):
#   rows:                                                       1    2    4    8   16   64  512
#   _weight_int4pack_mm_for_cpu                                70   83  124  238  460 1734 13871
#   int4_amx_linear                                           115  106  149  116  118  224  1395
#   dequantize + bf16 GEMM (dense)                           468  500  496  448  474  587  2040
# (kernel_choice.py: INT4_AMX_MIN_ROWS; the native few-row kernel takes the calls below Q_ROWS_MAX_ROWS.)


def amx_int4_layout(nibbles: torch.Tensor, scale: torch.Tensor,
                    offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The AMX kernel's layout (kernels/cpu_kernels.cpp, int4_amx_linear). nibbles: [N, K] uint8 in
    0..15 with w = nibble * scale + offset; scale, offset: [N, G] float32 -> (wq [N/16, K/32, 16, 16]
    uint8, meta [N/16, K/32, 2, 16] float32)."""
    n, k = nibbles.shape
    blocks, chunks = n // 16, k // 32
    # Tile row r of a 32-wide chunk holds k = 2r, 2r+1 of the block's 16 columns as pairs: e = 2 * column + k % 2.
    e = nibbles.view(blocks, 16, chunks, 16, 2).permute(0, 2, 3, 1, 4).reshape(blocks, chunks, 16, 32)
    wq = (e[..., :16] | (e[..., 16:] << 4)).contiguous()
    group_of_chunk = torch.arange(chunks) * 32 // (k // scale.shape[1])
    per_chunk = [t[:, group_of_chunk].float().view(blocks, 16, chunks).permute(0, 2, 1) for t in (scale, offset)]
    return wq, torch.stack(per_chunk, dim=2).contiguous()


def int4pack_layout(codes: torch.Tensor, fmt: QuantFormat, scale: torch.Tensor,
                    zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch's CPU int4pack layout: (packed weight, scales_zeros [G, N, 2]). codes: [N, K] signed
    (symmetric) or unsigned codes; the kernel computes w = (q - 8) * s + z with q in [0, 15]."""
    shift = 8 if fmt.symmetric else 0
    q = (codes + shift).to(torch.int32).contiguous()
    z = (8 - (zero + shift)) * scale
    return (torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, _INT4_INNER_K_TILES),
            torch.stack([scale.t(), z.t()], dim=-1).contiguous())


@dataclass(frozen=True, slots=True)
class QTiles:
    """linear_q_tiles' weight (kernels/decode_matmul.cpp): 16 weight rows per tile, each 64-byte chunk
    one VNNI dot product for all 16; scales (and offsets) in float16 times 2^exponent."""
    tiles: torch.Tensor  # [ceil(N/16), K/32, 32*bits/64, 64] uint8
    meta: torch.Tensor  # [ceil(N/16), G, 2, 16] float16 (scale, offset), or [.., 1, 16] (scale) with zero_code
    zero_code: int  # offset = -zero_code * scale (symmetric formats), or -1: the offsets are in meta
    exponent: int

    def tensors(self) -> list[torch.Tensor]:
        return [self.tiles, self.meta]

    def __call__(self, x: torch.Tensor, n: int, bits: int, group_width: int,
                 bias: torch.Tensor | None) -> torch.Tensor:
        return native_op("linear_q_tiles")(x, self.tiles, self.meta, n, bits, group_width, self.zero_code,
                                           self.exponent, bias)


def q_tiles_layout(codes: torch.Tensor, bits: int, scale: torch.Tensor, offset: torch.Tensor) -> QTiles:
    """codes: [N, K] uint8 stored codes (w = u * scale + offset per group); scale, offset: [N, G]
    float32. Padding rows have zero codes, scales and offsets. Where every offset is -z * scale for
    one code z (symmetric formats) only the scales are kept: 2 bytes a group, as in GGUF's Q4_0."""
    packed = native_op("q_tiles_codes")(codes.contiguous(), bits)  # (the tiles exist with the native kernels)
    return q_tiles_from_packed(packed, bits, scale, offset)


def q_tiles_from_packed(packed: torch.Tensor, bits: int, scale: torch.Tensor, offset: torch.Tensor | None,
                        zero_code: int | None = None) -> QTiles:
    """Codes already in the tiles (q_tiles_codes, or gguf_q_tiles straight from a GGUF file's blocks)
    and their scale, offset [N, G] float32 -> QTiles. zero_code: the caller knows offset = -zero_code *
    scale (a GGUF Q4_0 / Q8_0 block's own arithmetic; offset may then be None), so it is not checked."""
    n, groups = scale.shape
    tiles, full, pad = -(-n // 16), n // 16, -n % 16
    scale = scale.float()
    if zero_code is None:
        offset = offset.float()
        first = int(torch.argmax((scale.reshape(-1) != 0).to(torch.uint8)))  # a group with a scale (rows of
        z = round(float(-offset.reshape(-1)[first] / scale.reshape(-1)[first])) if scale.numel() and \
            scale.reshape(-1)[first] != 0 else 0  # zeros say nothing of the zero code)
        symmetric = 0 <= z < 2 ** bits and bool(torch.equal(offset, -z * scale))
    else:
        z, symmetric = zero_code, True
    parts = (scale,) if symmetric else (scale, offset)
    # fp16 keeps 11 bits over 2^-14..65504: bring the largest value near 2^14 by a power of two
    largest = max(max(-float(lo), float(hi)) for lo, hi in (torch.aminmax(t) for t in parts)) if scale.numel() else 0.
    exponent = 14 - math.frexp(largest)[1] if largest > 0 else 0
    # meta[t, g, i, j] = part i [16 t + j, g] (padding rows 0): scaled, transposed and narrowed in one copy
    meta = torch.empty(tiles, groups, len(parts), 16, dtype=torch.float16)
    for i, t in enumerate(parts):
        scaled = torch.ldexp(t, torch.tensor(float(exponent)))
        meta[:full, :, i, :].copy_(scaled[:full * 16].view(full, 16, groups).transpose(1, 2))
        if pad:
            meta[full, :, i, :].zero_()
            meta[full, :, i, :16 - pad].copy_(scaled[full * 16:].t())
    return QTiles(packed.contiguous(), meta, z if symmetric else -1, exponent)


class QuantLinear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, fmt: QuantFormat,
                 act_quant: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.fmt, self.act_quant = in_features, out_features, fmt, act_quant
        groups = fmt.groups(in_features)
        self.register_buffer("packed", torch.zeros(out_features, in_features * fmt.storage_bits // 8,
                                                   dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("zero", torch.zeros(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        # activation-ordered groups (GPTQ act-order checkpoints): the codes' column j is input column
        # input_order[j] [K]; forward gathers the input in that order first. None: the weight's own order.
        self.register_buffer("input_order", None)
        self._int8: torch.Tensor | None = None  # [N, K] int8 codes for int8pack / int_mm
        self._int4: torch.Tensor | None = None  # CPU int4pack layout
        self._int4_scales_zeros: torch.Tensor | None = None  # [groups, N, 2]
        self._amx4: tuple[torch.Tensor, torch.Tensor] | None = None  # AMX layout (amx_int4_layout)
        self._cast_cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}  # scales in the activations' dtype
        # 4-bit fast dequantize, w = stored nibble * scale + offset per group: ([N, G, 1], [N, G, 1]) fp32
        self._nibble_affine: tuple[torch.Tensor, torch.Tensor] | None = None
        self._log_name = f"{fmt.kind}{fmt.bits if fmt.kind == 'int' else ''} g{fmt.group_size}"  # for KernelLog
        # rows_q: w = stored code * scale + offset per group, ([N, G], [N, G]) fp32
        self._q_affine: tuple[torch.Tensor, torch.Tensor] | None = None
        # 8-bit fast dequantize (dequantize_8bit): the same ([N, G], [N, G]) fp32
        self._byte_affine: tuple[torch.Tensor, torch.Tensor] | None = None
        self._q_tiles: QTiles | None = None  # tiles_q: q_tiles_layout
        self._layouts_dropped = False  # drop_kernel_layouts: built again on the next call

    def set_codes(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                  bias: torch.Tensor | None = None, layout_only: bool = False) -> None:
        """layout_only: for inference, keep the tile kernel's layout alone where it runs
        (keep_kernel_layout_only), building no other."""
        self.scale, self.zero = scale.float().contiguous(), zero.float().contiguous()
        if bias is not None:
            self.bias = bias.float().clone()
        fmt = self.fmt
        if layout_only and not self.act_quant and codes.device.type == "cpu" \
                and q_tiles_format_fits(fmt, self.in_features) and q_tiles_fits(this_cpu()) \
                and native_op("dequantize_q_tiles") is not None:
            # straight to the tiles from the codes (stored u = code - qmin), never packed row-major
            # (uint8 arithmetic wraps: code + 127 for -127..127 lands on 0..254)
            u = codes.view(torch.uint8) + (-fmt.qmin) if codes.dtype == torch.int8 else codes - fmt.qmin
            scale = self.scale
            offset = -(self.zero - fmt.qmin) * scale
            self._q_tiles = q_tiles_layout(u, fmt.storage_bits, scale, offset)
            self.keep_kernel_layout_only()
            return
        self.packed = pack_codes(codes, fmt)
        self.prepare_kernels(layout_only)

    def set_packed_tiles(self, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                         zero_code: int | None = None) -> None:
        """Inference only: the weight given straight in linear_q_tiles' layout (packed: stored codes
        u = code - qmin in tiles; w = u * scale + offset per group, offset = -zero_code * scale when
        given), as a GGUF file's Q4_0, Q4_1 and Q8_0 blocks convert in one pass (loaders/gguf_quant.py)."""
        self._q_tiles = q_tiles_from_packed(packed, self.fmt.storage_bits, scale, offset, zero_code)
        if not self.keep_kernel_layout_only():
            raise MiaotuiError("set_packed_tiles needs the tile kernel (this CPU or layer cannot run it)")

    def codes(self) -> torch.Tensor:
        if self.packed is None:
            raise MiaotuiError("this layer was loaded for inference and keeps its weight in the decode kernel's "
                               "layout only; load the model with dtype float32 to work on its codes")
        return unpack_codes(self.packed, self.fmt)

    def set_input_order(self, order: torch.Tensor | None) -> None:
        self.input_order = None if order is None else order.long().contiguous()

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K] in the weight's own column order."""
        if self.packed is None:
            return in_weight_order(self._tiles_weight(torch.float32).to(dtype), self.input_order)
        return in_weight_order(dequantize_codes(self.codes(), self.scale, self.zero, self.fmt, dtype), self.input_order)

    def weight_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ids [R] of the weight, dequantized: [R, K] in dtype (an embedding lookup, or the exact
        rescoring of a quantized head's best candidates)."""
        if self.packed is None:
            t = self._q_tiles
            rows = native_op("embedding_q_tiles")(t.tiles, t.meta, ids.reshape(-1).long().contiguous(),
                                                  self.fmt.storage_bits, self.fmt.group_width(self.in_features),
                                                  t.zero_code, t.exponent, dtype)
            return in_weight_order(rows, self.input_order)
        ids = ids.reshape(-1)
        return in_weight_order(dequantize_codes(unpack_codes(self.packed[ids], self.fmt), self.scale[ids],
                                                self.zero[ids], self.fmt, dtype), self.input_order)

    @property
    def device(self) -> torch.device:
        return (self.packed if self.packed is not None else self._q_tiles.tiles).device

    def keep_kernel_layout_only(self) -> bool:
        """Inference on a CPU with the tile kernel: hold the weight once, in linear_q_tiles' layout
        (codes and float16 scales, as a GGUF file's blocks), and drop the stored codes, float32 scales
        and the other kernels' layouts: prefill dequantizes the tiles per call (dequantize_q_tiles)
        for its GEMM. -> whether the layer now keeps its tiles alone (not for W8A8 layers, whose int8
        GEMM wants its own layout, nor off the tile kernel's CPUs)."""
        if self._q_tiles is None or self.act_quant or native_op("dequantize_q_tiles") is None:
            return False
        self.packed = self.scale = self.zero = None
        self._int8 = self._int4 = self._int4_scales_zeros = self._nibble_affine = self._amx4 = None
        self._q_affine = self._byte_affine = None
        self._cast_cache = {}
        return True

    def _tiles_weight(self, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
        """The weight [N, K] from the tiles alone (float32 or bf16), into out when given."""
        t = self._q_tiles
        if out is None:
            out = torch.empty(self.out_features, self.in_features, dtype=dtype)
        native_op("dequantize_q_tiles")(t.tiles, t.meta, self.out_features, self.fmt.storage_bits,
                                        self.fmt.group_width(self.in_features), t.zero_code, t.exponent, out)
        return out

    def prepare_kernels(self, layout_only: bool = False) -> None:
        """Build the kernel-specific layouts from the stored codes (after loading or quantizing);
        layout_only: the tile kernel's alone, then keep_kernel_layout_only."""
        if self.packed is None:
            return  # the tiles are all there is (keep_kernel_layout_only)
        fmt, cpu, k = self.fmt, self.packed.device.type == "cpu", self.in_features
        self._int8 = self._int4 = self._int4_scales_zeros = self._nibble_affine = self._amx4 = None
        self._q_affine = self._q_tiles = self._byte_affine = None
        self._cast_cache = {}
        if fmt.kind == "int" and fmt.storage_bits in (4, 8):
            # stored u = code - qmin, so w = (code - zero) * scale = u * scale - (zero - qmin) * scale
            scale = self.scale.float().contiguous()
            offset = (-(self.zero.float() - fmt.qmin) * scale).contiguous()
            if cpu and q_tiles_format_fits(fmt, k) and q_tiles_fits(this_cpu()):
                codes = self.packed if fmt.storage_bits == 8 else \
                    torch.stack([self.packed & 15, self.packed >> 4], dim=-1).view(self.out_features, k)
                self._q_tiles = q_tiles_layout(codes, fmt.storage_bits, scale, offset)
                if layout_only and not self.act_quant and self.keep_kernel_layout_only():
                    return
            elif cpu and q_rows_fits(fmt, k) and this_cpu().native:
                self._q_affine = scale, offset
            if fmt.storage_bits == 8:
                self._byte_affine = scale, offset
            if fmt.storage_bits == 4 and k % fmt.group_width(k) == 0:
                self._nibble_affine = scale[..., None], offset[..., None]
                if cpu and this_cpu().amx and amx4_fits(fmt, k, self.out_features):
                    nibbles = torch.stack([self.packed & 15, self.packed >> 4], dim=-1).view(self.out_features, -1)
                    self._amx4 = amx_int4_layout(nibbles, scale, offset)
        if int8pack_fits(fmt):
            self._int8 = self.codes().to(torch.int8).contiguous()
        elif cpu and int4pack_fits(fmt, k, self.out_features) and self._q_tiles is None:
            # (with the tiles, int4pack would run nowhere: linear_q_tiles takes every few-row call)
            self._int4, self._int4_scales_zeros = int4pack_layout(self.codes(), self.fmt, self.scale, self.zero)

    def drop_kernel_layouts(self) -> None:
        """Keep the stored codes alone (what a saved model holds, 1/3 of the memory with the AMX and
        tile layouts): a streamed compression keeps its finished layers so (compress/streamed.py).
        A later call builds the layouts again."""
        if self.packed is None:
            return
        self._int8 = self._int4 = self._int4_scales_zeros = self._nibble_affine = self._amx4 = None
        self._q_affine = self._q_tiles = self._byte_affine = None
        self._cast_cache = {}
        self._layouts_dropped = True

    def _in_dtype(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t (the kernel input `name`) cast to the activations' dtype, once: a per-call cast copies."""
        if (name, dtype) not in self._cast_cache:
            self._cast_cache[name, dtype] = t.to(dtype).contiguous()
        return self._cast_cache[name, dtype]

    def kernel_tensors(self) -> list[torch.Tensor]:
        """The kernel layouts built at load (held beside the stored codes; weight-bytes accounting)."""
        held = [self._int8, self._int4, self._int4_scales_zeros, *(self._amx4 or ()),
                *(self._q_tiles.tensors() if self._q_tiles else ())]
        return [t for t in held if t is not None]

    def decode_tensors(self) -> list[torch.Tensor]:
        """What a one-row call reads: the layout of the kernel it runs (memory traffic of a decode step)."""
        kernel = self.kernel_for(1)
        if kernel == "tiles_q" or self.packed is None:
            return self._q_tiles.tensors()
        if kernel == "int8pack":
            return [self._int8, self.scale]
        if kernel == "int4pack":
            return [self._int4, self._int4_scales_zeros]
        return [self.packed, self.scale, self.zero]

    def kernel_for(self, rows: int, dtype: torch.dtype = torch.bfloat16) -> str:
        """The kernel a call of `rows` rows runs here (kernel_choice.quant_kernel, for this CPU)."""
        cpu = self.device.type == "cpu"
        kernel = quant_kernel(self.fmt, self.in_features, self.out_features, rows, dtype, this_cpu(), cpu,
                              self.act_quant)
        layout = {"rows_q": self._q_affine, "amx4": self._amx4, "tiles_q": self._q_tiles, "int8pack": self._int8,
                  "int4pack": self._int4}
        if kernel in layout and layout[kernel] is None:
            # layouts not built (a layer moved off the CPU and back) or dropped (keep_kernel_layout_only)
            return "dense"
        return kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., K] -> [..., N]
        if self._layouts_dropped:
            self._layouts_dropped = False
            self.prepare_kernels()
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.input_order is not None:
            x2 = x2.index_select(1, self.input_order)
        kernel = self.kernel_for(x2.shape[0], x.dtype)
        if kernel in ("amx4", "rows_q", "tiles_q") and torch.is_grad_enabled() and x.requires_grad:
            kernel = "dense"  # the native kernels have no backward
        note_kernel(self._log_name, kernel)
        if kernel == "tiles_q":  # as rows_q
            y = self._q_tiles(x2.contiguous(), self.out_features, self.fmt.storage_bits,
                              self.fmt.group_width(self.in_features), self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        if kernel == "rows_q":
            # bias added inside, in float32 before the one rounding: return at once
            y = native_op("linear_q_rows")(x2.contiguous(), self.packed, *self._q_affine, self.fmt.storage_bits,
                                           self.fmt.group_width(self.in_features), self.bias)
            return y.reshape(*shape[:-1], self.out_features)
        if kernel == "int8pack":
            scale = self._in_dtype("scale", self.scale[:, 0], x.dtype)
            y = torch._weight_int8pack_mm(x2.contiguous(), self._int8, scale)
        elif kernel == "int4pack":
            scales_zeros = self._in_dtype("scales_zeros", self._int4_scales_zeros, x.dtype)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self._int4, self.fmt.group_size,
                                                           scales_zeros)
        elif kernel == "amx4":
            y = native_op("int4_amx_linear")(x2.contiguous(), *self._amx4)
        elif kernel == "int_mm":
            y = _w8a8_matmul(x2, self._int8, self.scale[:, 0])
        elif kernel == "w8a8_float":
            xq, x_scale = quantize_activations_per_token(x2)
            y = ((xq.float() @ self._int8.float().t()) * x_scale * self.scale[:, 0][None, :]).to(x.dtype)
        else:
            y = F.linear(x2, self._dense_weight(x.dtype))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [N, K] in dtype for one GEMM, built per call (never kept: the layer stays 4/8-bit).
        Fast paths for int8 and 4-bit: 3072x576 in ~1 ms, 5-10x faster than the generic unpack."""
        if self.packed is None:  # the tiles alone (keep_kernel_layout_only)
            if dtype in (torch.float32, torch.bfloat16):
                return self._tiles_weight(dtype, self._dense_out(dtype))
            return self._tiles_weight(torch.float32).to(dtype)
        native8 = native_op("dequantize_8bit") if self._byte_affine is not None and self.packed.device.type == "cpu" \
            else None
        if native8 is not None:  # one pass over the codes (kernels/cpu_kernels.cpp)
            out = self._dense_out(dtype)
            native8(self.packed, *self._byte_affine, self.fmt.group_width(self.in_features), out)
            return out
        if self._int8 is not None and self.fmt.symmetric:
            return self._int8.to(dtype) * self._in_dtype("scale_column", self.scale[:, :1], dtype)
        if self._nibble_affine is None:
            return self.dequantized_weight(dtype)
        scale, offset = self._nibble_affine  # [N, G, 1] each
        n, groups = scale.shape[0], scale.shape[1]
        native = native_op("dequantize_4bit") if self.packed.device.type == "cpu" else None
        if native is not None:  # one pass, several times faster than the ops below (kernels/cpu_kernels.cpp)
            out = self._dense_out(dtype)
            native(self.packed, scale.view(n, groups), offset.view(n, groups), out)
            return out
        nibbles = torch.empty(n, self.packed.shape[1], 2, dtype=torch.uint8, device=self.packed.device)
        torch.bitwise_and(self.packed, 15, out=nibbles[..., 0])  # low nibble first (pack_codes)
        torch.bitwise_right_shift(self.packed, 4, out=nibbles[..., 1])
        w = torch.empty(n, groups, self.in_features // groups, dtype=torch.float32, device=self.packed.device)
        w.copy_(nibbles.view(w.shape))
        # float32 arithmetic, one rounding to dtype: as dequantize_codes, up to the fp32 rounding of offset
        return w.mul_(scale).add_(offset).view(n, self.in_features).to(dtype)

    def _dense_out(self, dtype: torch.dtype) -> torch.Tensor:
        """Where a native dequantize writes the weight [N, K]: inference reuses one buffer; with
        autograd the GEMM keeps its weight for the backward pass."""
        n, k = self.out_features, self.in_features
        if not torch.is_grad_enabled():
            return _scratch(n * k, dtype).view(n, k)
        return torch.empty(n, k, dtype=dtype, device=self.device)

    def extra_repr(self) -> str:
        f = self.fmt
        return (f"in={self.in_features}, out={self.out_features}, {f.kind}{f.bits if f.kind == 'int' else ''}, "
                f"group={f.group_size}, {'sym' if f.symmetric else 'asym'}{', W8A8' if self.act_quant else ''}")


_scratch_buffers = threading.local()


def _scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A per-thread buffer for a weight rebuilt for one GEMM and dropped right after: a fresh 3.5 MB
    allocation per call costs ~0.17 ms in page faults, as much as the dequantize itself."""
    buffers = getattr(_scratch_buffers, "by_dtype", None)
    if buffers is None:
        buffers = _scratch_buffers.by_dtype = {}
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def quantize_activations_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] float -> (int8 [M, K], scale [M, 1]) with x ~= q * scale."""
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-8) / 127.0
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def _w8a8_matmul(x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    xq, x_scale = quantize_activations_per_token(x)
    rows = xq.shape[0]
    if rows <= 16:  # torch._int_mm wants more than 16 rows: pad (the extra rows are discarded)
        xq = torch.cat([xq, xq.new_zeros(17 - rows, xq.shape[1])])
    acc = torch._int_mm(xq, w_int8.t())[:rows]  # [M, N] int32
    return (acc.float() * x_scale * w_scale[None, :].float()).to(x.dtype)
