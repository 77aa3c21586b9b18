"""The gated MLP of every family: down(act(gate(x)) * up(x)), act SiLU (SwiGLU) or tanh-GELU (GeGLU).

Not for routing between experts (layers/moe.py holds several of these).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from miaotui.errors import MiaotuiError
from miaotui.kernels import native_op
from miaotui.layers.linear import make_linear

ACTIVATIONS = ("silu", "gelu_tanh")


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise MiaotuiError(f"unsupported MLP activation '{act}' (miaotui runs: {', '.join(ACTIVATIONS)})")
        self.intermediate_size = intermediate_size
        self.act = act
        # gate and up share their input: one fused matmul [D -> 2I].
        self.gate_up_proj = make_linear(hidden_size, 2 * intermediate_size, False)
        self.down_proj = make_linear(intermediate_size, hidden_size, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [..., 2I]
        if self.act == "silu" and gate_up.dtype == torch.bfloat16 and gate_up.device.type == "cpu" \
                and not torch.is_grad_enabled() and (native := native_op("silu_mul_bf16")) is not None:
            # inference: one op, no backward
            act = native(gate_up.view(-1, gate_up.shape[-1])).view(*gate_up.shape[:-1], self.intermediate_size)
            return self.down_proj(act)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)
        gate = F.silu(gate) if self.act == "silu" else F.gelu(gate, approximate="tanh")
        return self.down_proj(gate * up)
