"""SmoothQuant (Xiao et al., 2023): move activation outliers into the weights before W8A8.

Per input channel j: s_j = max|X_j|^alpha / max|W_j|^(1 - alpha); X / s is easier to quantize
per token, W * s stays easy per channel. The 1/s is folded into the op that produces X:
the RMSNorm weight (q/k/v and gate/up inputs) or the up-projection rows (down_proj's input,
silu(gate) * up). o_proj's input has no foldable producer here and is quantized unsmoothed.
Not for the int8 kernels (layers/quantized_linear.py).
"""

from __future__ import annotations

import torch

from miaotui.models.transformer import DecoderLayer


def smoothing_scales(act_abs_max: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """act_abs_max: [K]; weight: [N, K] -> s: [K] (clamped away from 0 and inf)."""
    w_max = weight.abs().amax(0).clamp(min=1e-5)
    a_max = act_abs_max.clamp(min=1e-5)
    return (a_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5, max=1e5)


@torch.no_grad()
def smooth_layer(layer: DecoderLayer, act_abs_max: dict[str, torch.Tensor], alpha: float) -> None:
    """Fold smoothing scales into one decoder layer in place (the float function is unchanged)."""
    for linear_name, norm in (("self_attn.qkv_proj", layer.input_layernorm),
                              ("mlp.gate_up_proj", layer.post_attention_layernorm)):
        linear = layer.get_submodule(linear_name)
        s = smoothing_scales(act_abs_max[linear_name], linear.weight, alpha)
        norm.weight.div_(s.to(norm.weight.dtype))
        linear.weight.mul_(s[None, :].to(linear.weight.dtype))
    mlp = layer.mlp
    s = smoothing_scales(act_abs_max["mlp.down_proj"], mlp.down_proj.weight, alpha)
    inter = mlp.intermediate_size
    mlp.gate_up_proj.weight[inter:].div_(s[:, None].to(mlp.gate_up_proj.weight.dtype))  # up rows
    mlp.down_proj.weight.mul_(s[None, :].to(mlp.down_proj.weight.dtype))
