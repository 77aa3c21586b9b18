"""targets / ignore selectors: which modules a compression stage touches, by regular expression.

Not for what the stage does to them.
"""

from __future__ import annotations

import re

from torch import nn

from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.models.plan import model_linears


def decoder_linears(model: nn.Module) -> list[str]:
    """Full names of the dense compressible linears inside decoder layers (models/plan.py; an MoE
    router is not one), e.g. 'layers.3.mlp.down_proj', 'layers.3.mlp.experts.5.gate_up_proj'."""
    planned = set(model_linears(model.config))
    return [name for name, m in model.named_modules() if isinstance(m, Linear) and name in planned]


def select_modules(model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None,
                   field: str = "targets") -> list[str]:
    """Decoder linears whose name matches any `targets` regex (default: all) and no `ignore` regex.

    A selector that matches no module is an error: it is almost always a typo.
    """
    names = decoder_linears(model)
    for key, patterns in ((field, targets), ("ignore", ignore)):
        for pattern in patterns or []:
            try:
                rx = re.compile(pattern)
            except re.error as exc:
                raise MiaotuiError(f"{key}: '{pattern}' is not a valid regular expression ({exc})") from None
            if not any(rx.search(n) for n in names):
                raise MiaotuiError(f"{key}: '{pattern}' matches no module (names look like '{names[0]}')")
    chosen = [n for n in names if not targets or any(re.search(p, n) for p in targets)]
    return [n for n in chosen if not any(re.search(p, n) for p in ignore or [])]
