"""The one place where a model's linear layers multiply: which kernel runs for which shape.

Few rows (batch-1 decode) are memory-bound: every weight byte is read once per token, so an
optional narrow copy of the weight (float16) halves the bytes read. Many rows (prefill,
batched decode) are compute-bound: the full-precision weight runs the fast GEMM. The narrow
copy costs memory (+50% for float32 weights) and is an option (`decode_weight_dtype`).
Not for quantization algorithms: they produce weights; this module multiplies them.
"""

import torch
import torch.nn.functional as F
from torch import nn

# Up to this many rows the narrow GEMV wins (measured on AVX2, 3072x576 weights, 2 threads:
# 1 row fp16 282 us vs fp32 772 us; 4 rows 1033 vs 1696; 8 rows 2070 vs 1565).
NARROW_MATMUL_MAX_ROWS = 4
_FP16_SAFE = 60000.0  # activations beyond this would overflow float16: use the wide weight


def mixed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 narrow: torch.Tensor | None = None) -> torch.Tensor:
    """y = x W^T + b in x's dtype. x: [..., in]; weight, narrow: [out, in]."""
    if narrow is not None and x.numel() // x.shape[-1] <= NARROW_MATMUL_MAX_ROWS \
            and (narrow.dtype != torch.float16 or x.abs().max() < _FP16_SAFE):
        b = None if bias is None else bias.to(narrow.dtype)
        return F.linear(x.to(narrow.dtype), narrow, b).to(x.dtype)
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
        bias = None if bias is None else bias.to(x.dtype)
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))  # [out, in]
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.narrow_weight: torch.Tensor | None = None  # optional decode copy, not saved

    def add_narrow_weight(self, dtype: torch.dtype) -> None:
        self.narrow_weight = self.weight.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mixed_linear(x, self.weight, self.bias, self.narrow_weight)

    def extra_repr(self) -> str:
        narrow = f", decode copy {self.narrow_weight.dtype}" if self.narrow_weight is not None else ""
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}{narrow}"


def make_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    return Linear(in_features, out_features, bias)
