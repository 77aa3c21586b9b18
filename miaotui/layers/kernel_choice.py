"""Which matmul kernel a linear layer runs: a pure function of the weight's format, the number of
rows in the call, the activations' dtype and what the CPU can do (CpuCaps), so the choice can be
pinned by tests for every CPU kind we run on (a slow path cannot come back unnoticed).

Decode-sized calls (a few rows) are bound by memory: every weight byte is read once per call. On
x86 CPUs the native few-row kernels (kernels/decode_matmul.cpp) stream the weight in its own bits:
integer weights at 4 or 8 bits against int8-quantized activations, in 16-row tiles with AVX512-VNNI
(linear_q_tiles) or row by row with AVX2 (linear_q_rows); bf16 weights in 16-row tiles with
AVX512-BF16 dot products (linear_bf16_tiles; AMX multiplies the same tiles for longer calls).
Their sums run in one fixed order per
output element, so a row gets the same bits whatever else shares the call: a verification pass of
drafted tokens agrees with a one-token step, and that is why their row limits cover a wide
verification pass even where a GEMM would be a little faster.
Not for running the kernels (linear.py, quantized_linear.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from miaotui.layers.quant_formats import QuantFormat

# Up to these many rows the native few-row kernels run (docs/kernels.md: measured per call against
# the packed PyTorch kernels and dequantize + GEMM).
Q_ROWS_MAX_ROWS = 16
Q_TILES_MAX_ROWS = 40
BF16_TILES_MAX_ROWS = 8
# Up to here AMX multiplies bf16 tiles faster than PyTorch's GEMM (which re-lays the weight out per
# call; from ~128 rows the re-layout is paid back: docs/kernels.md).
AMX_BF16_MAX_ROWS = 64
_INT4_INNER_K_TILES = 2
# From here the AMX 4-bit kernel runs (bf16 activations, AMX CPUs; quantized_linear.py).
INT4_AMX_MIN_ROWS = 8


@dataclass(frozen=True, slots=True)
class CpuCaps:
    """What the matmul kernels can use on a CPU."""
    avx2: bool = False
    avx512: bool = False
    avx512_bf16: bool = False
    int8_dot: bool = False  # AVX512-VNNI or AMX-INT8: fast int8 x int8 products (linear_q_tiles)
    amx: bool = False  # AMX tiles, permitted by the OS
    native: bool = False  # miaotui's native kernels were built (kernels/)

    @classmethod
    def from_flags(cls, flags: frozenset[str] | set[str], native: bool, amx_permitted: bool = True) -> CpuCaps:
        return cls(avx2="avx2" in flags, avx512="avx512f" in flags, avx512_bf16="avx512_bf16" in flags,
                   int8_dot=bool({"avx512_vnni", "amx_int8"} & set(flags)),
                   amx=native and amx_permitted and "amx_bf16" in flags, native=native)


@lru_cache(maxsize=1)
def this_cpu() -> CpuCaps:
    from miaotui.kernels import native_op
    from miaotui.runtime import cpu_flags

    has_amx = native_op("has_amx")
    return CpuCaps.from_flags(cpu_flags(), native=native_op("linear_q_rows") is not None,
                              amx_permitted=has_amx is not None and bool(has_amx()))


def q_rows_fits(fmt: QuantFormat, in_features: int) -> bool:
    """linear_q_rows takes integer codes stored at 4 or 8 bits in groups of whole 32-wide blocks."""
    return (fmt.kind == "int" and fmt.storage_bits in (4, 8) and in_features % 32 == 0
            and fmt.group_width(in_features) % 32 == 0)


def q_tiles_format_fits(fmt: QuantFormat, in_features: int) -> bool:
    """linear_q_tiles takes what linear_q_rows takes, and 8-bit codes in groups of 16 (GGUF's Q6_K:
    two groups per 32-wide activation block)."""
    return q_rows_fits(fmt, in_features) or (fmt.kind == "int" and fmt.storage_bits == 8 and in_features % 32 == 0
                                             and fmt.group_width(in_features) == 16)


def q_tiles_fits(caps: CpuCaps) -> bool:
    """linear_q_tiles (16-row tiles, VNNI dot products) is built on AVX-512 CPUs with VNNI; it takes
    every format linear_q_rows takes (q_rows_fits)."""
    return caps.native and caps.avx512 and caps.int8_dot


def int8pack_fits(fmt: QuantFormat) -> bool:
    return fmt.kind == "int" and fmt.bits == 8 and fmt.symmetric and fmt.group_size == -1


def int4pack_fits(fmt: QuantFormat, in_features: int, out_features: int) -> bool:
    return (fmt.kind == "int" and fmt.bits == 4 and fmt.group_size in (32, 64, 128, 256) and out_features % 16 == 0
            and in_features % (fmt.group_size * _INT4_INNER_K_TILES) == 0)


def amx4_fits(fmt: QuantFormat, in_features: int, out_features: int) -> bool:
    return (fmt.kind == "int" and fmt.storage_bits == 4 and out_features % 16 == 0
            and fmt.group_width(in_features) % 32 == 0 and in_features % 32 == 0)


def packed_kernel_max_rows(bits: int, caps: CpuCaps) -> int:
    """Rows up to which PyTorch's packed weight-only kernels beat dequantize + float GEMM, for
    bf16/fp16 activations. AVX-512: their cost grows with every row (int4 g32 3072x576: 16 rows
    0.18 ms, 512 rows 5.6 ms) while dequantize (0.2 ms native, 0.7 ms with PyTorch ops) + a bf16
    GEMM wins from ~40 rows (~160 without the native dequantize). AVX2 only: they fall back to slow
    code; int8pack still wins at 1 row and loses from 4 (docs/kernels.md)."""
    if not caps.avx512:
        return 1
    return 40 if caps.native or bits != 4 else 160


def quant_kernel(fmt: QuantFormat, in_features: int, out_features: int, rows: int, dtype: torch.dtype,
                 caps: CpuCaps, on_cpu: bool = True, act_quant: bool = False) -> str:
    """The kernel a QuantLinear call of `rows` rows runs (quantized_linear.py lists them)."""
    if act_quant and int8pack_fits(fmt):
        # Same W8A8 arithmetic either way; without int8 dot-product units the int8 x int8 kernel is
        # ~30x slower than a float GEMM over the same integer values.
        return "int_mm" if not on_cpu or caps.int8_dot else "w8a8_float"
    native_dtype = on_cpu and caps.native and dtype in (torch.bfloat16, torch.float32)
    if native_dtype and q_tiles_fits(caps) and q_tiles_format_fits(fmt, in_features) and rows <= Q_TILES_MAX_ROWS:
        return "tiles_q"
    native_few_rows = native_dtype and q_rows_fits(fmt, in_features) and rows <= Q_ROWS_MAX_ROWS
    low_precision = dtype in (torch.bfloat16, torch.float16) or not on_cpu
    # 4-bit with bf16/fp16 activations on AVX-512 without VNNI: int4pack streams faster than linear_q_rows
    # at every row count measured (1B up 8192x2048 g32: 1 row 0.60 vs 1.00 ms, 16 rows 4.2 vs 7.0 ms).
    int4pack_first = (on_cpu and caps.avx512 and low_precision and rows <= packed_kernel_max_rows(4, caps)
                      and int4pack_fits(fmt, in_features, out_features))
    if native_few_rows and caps.avx2 and not int4pack_first:
        return "rows_q"
    if on_cpu and caps.amx and dtype == torch.bfloat16 and rows >= INT4_AMX_MIN_ROWS \
            and amx4_fits(fmt, in_features, out_features):
        return "amx4"
    # float32 activations: the packed CPU kernels run scalar code even on AVX-512 (int4 g32,
    # 3072x576: 1 row 1.3 ms vs 4.5 ms dequantize + GEMM, but 16 rows 20.5 ms vs 6.0 ms).
    if rows <= (packed_kernel_max_rows(fmt.bits, caps) if low_precision else 1):
        if int8pack_fits(fmt):
            return "int8pack"
        if on_cpu and int4pack_fits(fmt, in_features, out_features):
            return "int4pack"
    return "dense"


def bf16_tiles_fits(in_features: int, caps: CpuCaps) -> bool:
    """Whether bf16 weights get the 16-row tile layout (layers/linear.py, bf16_tiles_layout):
    AVX512-BF16 CPUs with the native kernels, K in whole 32-wide blocks."""
    return caps.native and caps.avx512_bf16 and in_features % 32 == 0


def bf16_kernel(rows: int, in_features: int, dtype: torch.dtype, weight_dtype: torch.dtype, caps: CpuCaps,
                on_cpu: bool = True) -> str | None:
    """The kernel of a bf16 x bf16 inference call on a tiled weight: "tiles_bf16" (few rows,
    memory-bound: the weight streams once; one kernel for every decode-sized call, so a row's bits
    do not depend on the batch), "amx_bf16" (batched decode on AMX CPUs), or None: PyTorch's matmul
    on the plain weight (prefill)."""
    if not (on_cpu and dtype == torch.bfloat16 and weight_dtype == torch.bfloat16
            and bf16_tiles_fits(in_features, caps)):
        return None
    if rows <= BF16_TILES_MAX_ROWS:
        return "tiles_bf16"
    return "amx_bf16" if caps.amx and rows <= AMX_BF16_MAX_ROWS else None


class KernelLog:
    """Counts of the kernels linear layers ran, while one is active (`miaotui bench` reports them):
    {"<layer kind> <kernel>": calls}."""

    active: KernelLog | None = None

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def __enter__(self) -> KernelLog:
        KernelLog.active = self
        return self

    def __exit__(self, *exc: object) -> None:
        KernelLog.active = None


def note_kernel(layer_kind: str, kernel: str) -> None:
    """Count one call (a no-op unless a KernelLog is active: one attribute read per call)."""
    log = KernelLog.active
    if log is not None:
        key = f"{layer_kind} {kernel}"
        log.calls[key] = log.calls.get(key, 0) + 1
