"""Quantized Hugging Face checkpoints read as integer codes: compressed-tensors (llm-compressor's
`pack-quantized` and `int-quantized`), GPTQ (AutoGPTQ / GPTQModel, `quant_method: gptq`) and AWQ
(`quant_method: awq`, GEMM layout).

quantized_view wraps a checkpoint's LazyTensors so that each quantized linear layer's weight
('...q_proj.weight') reads as a QuantizedTensor: its codes, scales and zero points, which the model
builder packs straight into a QuantLinear, never through a float matrix. Codes map exactly onto
miaotui's formats (QuantFormat); what has no exact form is refused in one line.
Not for writing (hf_export.py) or for plain float checkpoints (hf.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from miaotui.errors import MiaotuiError
from miaotui.layers.quant_formats import SUPPORTED_GROUPS, QuantFormat, QuantizedTensor
from miaotui.loaders.lazy import LazyTensors

# AWQ's GEMM kernels pack 8 nibbles into an int32 in this order of output columns
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _group(k: int, groups: int, where: str) -> int:
    if groups == 1:
        return -1
    if k % groups or k // groups not in SUPPORTED_GROUPS:
        raise MiaotuiError(f"{where}: groups of {k / groups:g} columns are not supported "
                           f"(miaotui runs groups of {', '.join(str(g) for g in SUPPORTED_GROUPS if g > 0)})")
    return k // groups


def _from_signed(name: str, codes: torch.Tensor, bits: int, scale: torch.Tensor, zero: torch.Tensor | None,
                 act_quant: bool = False) -> QuantizedTensor:
    """Signed codes q in [-2^(b-1), 2^(b-1) - 1] with w = (q - zp) * s (compressed-tensors' convention;
    zp None: symmetric) -> the QuantizedTensor of the same numbers."""
    n, k = codes.shape
    group = _group(k, scale.shape[1], name)
    half = 1 << (bits - 1)
    scale = scale.float()
    if zero is None and (bits < 8 or int(codes.min()) > -128):
        zeros = torch.zeros_like(scale)
        return QuantizedTensor(QuantFormat(bits, group, True), codes.to(torch.int8).contiguous(), scale, zeros,
                               act_quant)
    if act_quant:
        # W8A8's kernel multiplies symmetric int8 codes; -128 (compressed-tensors' range ends there,
        # miaotui's at -127) is moved one step, the one inexact change on this path
        if zero is not None:
            raise MiaotuiError(f"{name}: asymmetric int8 weights with int8 activations are not supported")
        return QuantizedTensor(QuantFormat(8, group, True), codes.clamp(min=-127).to(torch.int8).contiguous(),
                               scale, torch.zeros_like(scale), True)
    stored = (codes.to(torch.int16) + half).to(torch.uint8)  # 0 .. 2^b - 1
    z = (zero.float() + half) if zero is not None else torch.full_like(scale, float(half))
    return QuantizedTensor(QuantFormat(bits, group, False, integer_zero=True), stored.contiguous(), scale, z)


# -- compressed-tensors --------------------------------------------------------------------------

def _ct_schemes(qcfg: dict[str, Any]) -> list[tuple[list[str], dict[str, Any]]]:
    groups = qcfg.get("config_groups") or {}
    return [(list(g.get("targets") or []), g) for g in groups.values() if isinstance(g, dict)]


def _matches(module: str, targets: list[str]) -> bool:
    """compressed-tensors' target rules for linear layers: the class name, 're:' regexes, exact names."""
    for target in targets:
        if target == "Linear" or target == module:
            return True
        if target.startswith("re:") and re.match(target[3:], module):
            return True
    return False


def _ct_scheme(module: str, qcfg: dict[str, Any]) -> dict[str, Any] | None:
    if any(_matches(module, [t]) for t in qcfg.get("ignore") or []):
        return None
    for targets, scheme in _ct_schemes(qcfg):
        if _matches(module, targets):
            return scheme
    return None


def _ct_weight(tensors: LazyTensors, module: str, scheme: dict[str, Any]) -> QuantizedTensor:
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32

    args = scheme.get("weights") or {}
    if args.get("type", "int") != "int":
        raise MiaotuiError(f"{module}: {args.get('type')} weights are not supported (miaotui reads int formats)")
    if args.get("strategy") not in ("group", "channel"):
        raise MiaotuiError(f"{module}: weight strategy '{args.get('strategy')}' is not supported (group, channel)")
    bits = int(args.get("num_bits", 8))
    scale = tensors[module + ".weight_scale"]
    inputs = scheme.get("input_activations")
    act_quant = inputs is not None
    if act_quant and not (inputs.get("dynamic") and inputs.get("strategy") == "token" and inputs.get("num_bits") == 8
                          and inputs.get("symmetric", True)):
        raise MiaotuiError(f"{module}: only dynamic per-token int8 activations are supported")
    zp_name = module + ".weight_zero_point"
    if module + ".weight_packed" in tensors:
        shape = tuple(int(v) for v in tensors[module + ".weight_shape"])
        codes = unpack_from_int32(tensors[module + ".weight_packed"], bits, shape)
        zero = None
        if not args.get("symmetric", True):
            zero = unpack_from_int32(tensors[zp_name], bits, (shape[0], scale.shape[1]), packed_dim=0)
    else:  # int-quantized: the int8 weight as it is
        codes = tensors[module + ".weight"]
        zero = tensors[zp_name] if not args.get("symmetric", True) else None
    order = _group_order(tensors[module + ".weight_g_idx"], codes.shape[1], scale.shape[1], module) \
        if module + ".weight_g_idx" in tensors else None
    return _ordered(_from_signed(module, codes, bits, scale, zero, act_quant), order)


def _group_order(g_idx: torch.Tensor, k: int, groups: int, module: str) -> torch.Tensor | None:
    """Activation-ordered GPTQ gives each column its group in g_idx [K]; miaotui's groups are runs of
    columns, so such a layer holds its columns sorted by group and reads its input in that order
    (QuantLinear.input_order). -> that order, or None where g_idx is already the runs."""
    g_idx = g_idx.long()
    width = -(-k // groups)
    if torch.equal(g_idx, torch.arange(k) // width):
        return None
    order = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[order], torch.arange(k) // width):
        raise MiaotuiError(f"{module}: g_idx does not give every group {width} columns")
    return order


def _ordered(q: QuantizedTensor, order: torch.Tensor | None) -> QuantizedTensor:
    """Codes [N, K] in the weight's column order -> held in `order` (see _group_order)."""
    if order is None:
        return q
    return QuantizedTensor(q.fmt, q.codes[:, order].contiguous(), q.scale, q.zero, q.act_quant, order)


# -- GPTQ (AutoGPTQ / GPTQModel) ------------------------------------------------------------------

def _unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [R, C] holding 32/bits codes each along the rows, lowest bits first -> [R * 32/bits, C] uint8."""
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    u = (packed.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # [R, per, C]
    return u.reshape(packed.shape[0] * per, packed.shape[1]).to(torch.uint8)


def _unpack_cols(packed: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [R, C] holding 32/bits codes each along the columns -> [R, C * 32/bits] uint8; `order`:
    which output column each successive field holds (AWQ's interleave)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [R, C, per]
    if order is not None:
        u = u[..., torch.argsort(torch.tensor(order))]
    return u.reshape(packed.shape[0], -1).to(torch.uint8)


def _gptq_weight(tensors: LazyTensors, module: str, qcfg: dict[str, Any]) -> QuantizedTensor:
    bits = int(qcfg.get("bits", 4))
    if bits not in (2, 4, 8):
        raise MiaotuiError(f"{module}: GPTQ {bits}-bit is not supported (2, 4 and 8 bits are)")
    qweight, scales = tensors[module + ".qweight"], tensors[module + ".scales"]  # [K*b/32, N], [G, N]
    codes = _unpack_rows(qweight, bits).t()  # [N, K] in 0 .. 2^b - 1
    k = codes.shape[1]
    order = _group_order(tensors[module + ".g_idx"], k, scales.shape[0], module) if module + ".g_idx" in tensors \
        else None
    zeros = _unpack_cols(tensors[module + ".qzeros"], bits).t().float()[:codes.shape[0]]  # [N, G]
    if qcfg.get("checkpoint_format", "gptq") == "gptq":
        zeros = zeros + 1  # AutoGPTQ's v1 files store zero - 1
    scale = scales.t().float().contiguous()
    group = _group(k, scale.shape[1], module)
    half = 1 << (bits - 1)
    if bool(torch.all(zeros == half)):  # symmetric
        fmt = QuantFormat(bits, group, True)
        return _ordered(QuantizedTensor(fmt, (codes.to(torch.int16) - half).to(torch.int8).contiguous(), scale,
                                        torch.zeros_like(scale)), order)
    return _ordered(QuantizedTensor(QuantFormat(bits, group, False, integer_zero=True), codes.contiguous(), scale,
                                    zeros.contiguous()), order)


def _awq_weight(tensors: LazyTensors, module: str, qcfg: dict[str, Any]) -> QuantizedTensor:
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    version = str(qcfg.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm":
        raise MiaotuiError(f"{module}: AWQ {bits}-bit '{version}' is not supported (4-bit GEMM layout is)")
    codes = _unpack_cols(tensors[module + ".qweight"], bits, AWQ_ORDER).t()  # [K, N] -> [N, K]
    zeros = _unpack_cols(tensors[module + ".qzeros"], bits, AWQ_ORDER).t().float()  # [N, G]
    scale = tensors[module + ".scales"].t().float().contiguous()
    group = _group(codes.shape[1], scale.shape[1], module)
    return QuantizedTensor(QuantFormat(bits, group, False, integer_zero=True), codes.contiguous(), scale,
                           zeros.contiguous())


# -- the view --------------------------------------------------------------------------------------

# quant_method -> (the tensor naming a quantized module, the tensors it replaces, reader)
_METHODS: dict[str, tuple[str, tuple[str, ...], Callable[..., QuantizedTensor]]] = {
    "gptq": (".qweight", (".qweight", ".qzeros", ".scales", ".g_idx", ".bias_placeholder"), _gptq_weight),
    "awq": (".qweight", (".qweight", ".qzeros", ".scales"), _awq_weight),
}
_CT_PARTS = (".weight_packed", ".weight_shape", ".weight_scale", ".weight_zero_point", ".weight_g_idx",
             ".input_scale", ".input_zero_point")


def is_quantized_hf_dir(path: Path) -> bool:
    """A Hugging Face directory whose config.json names a quantization."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return False
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("quantization_config"))
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def quantized_view(tensors: LazyTensors, qcfg: dict[str, Any] | None) -> LazyTensors:
    """The checkpoint's tensors with every quantized linear weight as one QuantizedTensor under
    '<module>.weight'; `tensors` itself where the config names no quantization."""
    if not qcfg:
        return tensors
    method = str(qcfg.get("quant_method", "")).lower()
    readers: dict[str, Callable[[], Any]] = {name: partial(tensors.__getitem__, name) for name in tensors}
    if method == "compressed-tensors":
        fmt = qcfg.get("format")
        if fmt not in ("pack-quantized", "int-quantized", "naive-quantized", "mixed-precision", "dense", None):
            raise MiaotuiError(f"compressed-tensors format '{fmt}' is not supported (pack-quantized and "
                               f"int-quantized are)")
        modules = {n.removesuffix(".weight_scale") for n in tensors if n.endswith(".weight_scale")}
        for module in modules:
            scheme = _ct_scheme(module, qcfg)
            if scheme is None:
                continue
            for suffix in _CT_PARTS:
                readers.pop(module + suffix, None)
            readers[module + ".weight"] = partial(_ct_weight, tensors, module, scheme)
        return LazyTensors(readers, tensors.numel)
    if method not in _METHODS:
        raise MiaotuiError(f"quantization method '{method}' is not supported (miaotui reads compressed-tensors, "
                           f"gptq and awq checkpoints)")
    marker, parts, read = _METHODS[method]
    for module in {n.removesuffix(marker) for n in tensors if n.endswith(marker)}:
        for suffix in parts:
            readers.pop(module + suffix, None)
        readers[module + ".weight"] = partial(read, tensors, module, qcfg)
    return LazyTensors(readers, tensors.numel)
