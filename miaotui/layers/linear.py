"""The one place where a model's linear layers multiply: which kernel runs for which shape.

Few rows (batch-1 decode) are memory-bound: every weight byte is read once per token, so an
optional narrow copy of the weight (float16) halves the bytes read. A few more rows (batched
decode, speculative verification) are still memory-bound: float32 as W @ x^T, which streams the
big matrix once instead of repacking it as the B operand of a skinny GEMM. Many rows (prefill)
are compute-bound: the ordinary GEMM. The narrow
copy costs memory (+50% for float32 weights) and is an option (`decode_weight_dtype`).
On AVX512-BF16 CPUs a bf16 weight is also kept in 16-row tiles (`bf16_tiles_layout`): few-row
calls stream it once with bf16 pair dot products, 16 outputs per 64-byte load (linear_bf16_tiles,
kernels/decode_matmul.cpp), and on AMX CPUs every other call multiplies the same tiles with AMX
(linear_bf16_amx): PyTorch's bf16 matmul re-lays a plain weight out on every call, which made
decode-sized calls twice as slow as the memory bound (docs/kernels.md). The tiles cost one more
copy of the weight.
Not for quantization algorithms: they produce weights; this module multiplies them.
"""

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.kernels import native_op
from miaotui.layers.kernel_choice import bf16_kernel, bf16_tiles_fits, note_kernel, this_cpu

# Measured on AVX2 (Zen 3), 2 threads, 30 different 3072x576 weights so they stream from DRAM as
# in a real model (us per call):   rows:      1     2     4    16    64
#   x @ W^T (F.linear)                       834  1819  1620  1790  3720
#   W @ x^T                                  907   699   610  1279  2883
#   float16 narrow copy                      289   488   861  3619 13227
NARROW_MATMUL_MAX_ROWS = 3  # up to here the float16 copy wins
SKINNY_MATMUL_MAX_ROWS = 64  # up to here W @ x^T wins
_FP16_SAFE = 60000.0  # activations beyond this would overflow float16: use the wide weight


def bf16_tiles_layout(weight: torch.Tensor) -> torch.Tensor:
    """weight [N, K] bf16 -> tiles [ceil(N/16), K/32, 16, 32] bf16 with [t, b, p, 2j + h] =
    weight[16t + j, 32b + 2p + h] (padding rows 0): 16 rows' K-pairs per 64 bytes, each [16, 32]
    block an AMX B tile (kernels/decode_matmul.cpp, linear_bf16_tiles). A copy: inference only."""
    n, k = weight.shape
    tiles = -(-n // 16)
    padded = F.pad(weight.detach(), (0, 0, 0, -n % 16))
    return padded.view(tiles, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).reshape(tiles, k // 32, 16, 32).contiguous()


def tiled_linear(x: torch.Tensor, tiles: torch.Tensor, n: int, bias: torch.Tensor | None, kernel: str) -> torch.Tensor:
    """y = x W^T + b for W in bf16_tiles_layout, by `kernel` (kernel_choice.bf16_kernel). x: [..., K] bf16."""
    x2 = x.reshape(-1, x.shape[-1])
    x2 = x2 if x2.is_contiguous() else x2.contiguous()
    if kernel == "tiles_bf16":  # bias added in float32 before the one rounding
        y = native_op("linear_bf16_tiles")(x2, tiles, n, bias)
    else:
        y = native_op("linear_bf16_amx")(x2, tiles, n)
        if bias is not None:
            y = y + bias.to(y.dtype)
    return y.view(*x.shape[:-1], n)


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 narrow: torch.Tensor | None = None, tiles: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b in x's dtype. x: [..., in]; weight, narrow: [out, in]; tiles: the weight in
    bf16_tiles_layout (used for bf16 inputs when no gradient is wanted, where bf16_kernel says)."""
    rows = x.numel() // x.shape[-1]
    grad = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad)
    on_cpu = x.device.type == "cpu"
    kind = f"{str(weight.dtype).removeprefix('torch.')} linear"
    if tiles is not None and not grad:
        kernel = bf16_kernel(rows, x.shape[-1], x.dtype, weight.dtype, this_cpu(), on_cpu)
        if kernel is not None:
            note_kernel(kind, kernel)
            return tiled_linear(x, tiles, weight.shape[0], bias, kernel)
    if narrow is not None and rows <= NARROW_MATMUL_MAX_ROWS \
            and (narrow.dtype != torch.float16 or x.abs().max() < _FP16_SAFE):
        note_kernel(kind, f"narrow_{str(narrow.dtype).removeprefix('torch.')}")
        b = None if bias is None else bias.to(narrow.dtype)
        return F.linear(x.to(narrow.dtype), narrow, b).to(x.dtype)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    if rows <= SKINNY_MATMUL_MAX_ROWS and x.dtype == torch.float32 and on_cpu:
        note_kernel(kind, "skinny_fp32")
        # [out, rows] -> [rows, out], made contiguous: kernels downstream (SDPA) want the usual strides.
        y = torch.mm(weight, x.reshape(rows, x.shape[-1]).t()).t().contiguous()
        if bias is not None:
            y += bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1 and x.dtype in (torch.bfloat16, torch.float16) and on_cpu:
        # One row goes down a matrix-vector path whose sums round differently from the same row
        # inside a GEMM (measured: every GEMM of 2..64 rows agrees bit for bit, the 1-row path does
        # not). A one-token decode step and a verification pass of drafted tokens must agree, or
        # speculation flips near-tied greedy picks: run one row as two (no slower: docs/kernels.md).
        note_kernel(kind, "gemm_one_row_as_two")
        return F.linear(torch.cat([x2, x2]), weight, bias)[:1].view(*x.shape[:-1], weight.shape[0])
    note_kernel(kind, "gemm")
    return F.linear(x2, weight, bias).view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.narrow_weight: torch.Tensor | None = None  # optional decode copy, not saved
        self.tiles: torch.Tensor | None = None  # optional bf16_tiles_layout copy, not saved

    def add_narrow_weight(self, dtype: torch.dtype) -> None:
        self.narrow_weight = self.weight.detach().to(dtype)

    def add_bf16_tiles(self) -> None:
        if self.weight.dtype == torch.bfloat16 and bf16_tiles_fits(self.in_features, this_cpu()) \
                and self.weight.device.type == "cpu":
            self.tiles = bf16_tiles_layout(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixed_linear(x, self.weight, self.bias, self.narrow_weight, self.tiles)

    def extra_repr(self) -> str:
        narrow = f", decode copy {self.narrow_weight.dtype}" if self.narrow_weight is not None else ""
        tiled = ", bf16 tiles" if self.tiles is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{narrow}{tiled}"


def make_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return Linear(in_features, out_features, bias)
