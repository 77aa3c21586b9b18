"""The one place where a model's linear layers are created (and, later, where kernels are chosen).

Not for quantization algorithms: those produce weights; this module decides how they are multiplied.
"""

from torch import nn


def make_linear(in_features: int, out_features: int, bias: bool) -> nn.Module:
    """A dense linear layer y = x W^T (+ b); W: [out_features, in_features]."""
    return nn.Linear(in_features, out_features, bias=bias)
