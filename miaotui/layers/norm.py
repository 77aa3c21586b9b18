"""RMSNorm, as in Llama: x / rms(x) * weight, computed in float32 for stability.

Not for LayerNorm variants with a bias or mean subtraction.
"""

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.kernels import native_op


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [..., D]. Normalise in float32 (as the reference implementations do), then
        # scale in the model dtype.
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and self.weight.dtype == torch.bfloat16 \
                and not torch.is_grad_enabled() and (native := native_op("rms_norm_bf16")) is not None \
                and x.stride(-1) == 1:  # inference only: the native op has no backward
            # the same two roundings in one native op (kernels/cpu_kernels.cpp) instead of six small ones
            return native(x.reshape(-1, x.shape[-1]), self.weight, self.eps).view(x.shape)
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)
        return normed * self.weight
