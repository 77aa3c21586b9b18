"""Native CPU kernels, compiled on first use for this machine (torch.utils.cpp_extension + ninja + a
C++ compiler) and cached under ~/.cache/miaotui/kernels. Where they cannot be built the callers
fall back to plain PyTorch ops, with one warning: never an error.

Not for kernels PyTorch already has at the speed we need (its int4/int8 matmuls stay in
layers/quantized_linear.py; int4_amx_linear covers what they do slowly on AMX CPUs).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import torch

from miaotui.runtime import cpu_flags

log = logging.getLogger(__name__)
# cpu_kernels.cpp: attention, norms, dequantize, AMX; decode_matmul.cpp: few-row matmuls (decode);
# decode_layer.cpp: the decode step of consecutive decoder layers in one op.
# kv_codes.cpp: the quantized KV cache's writes and decode attention; gptq_columns.cpp: GPTQ's column loop.
SOURCES = [Path(__file__).with_name(name) for name in ("cpu_kernels.cpp", "decode_matmul.cpp", "decode_layer.cpp",
                                                       "kv_codes.cpp", "gptq_columns.cpp")]
# decode_parts.h: the parts decode_layer.cpp runs, shared by the first three; kv_codes.h: kv_codes.cpp's parts
HEADERS = [Path(__file__).with_name(name) for name in ("decode_parts.h", "kv_codes.h")]
_lock = threading.Lock()
_state: dict[str, object] = {}


def _build_dir() -> Path:
    """One build per source text, PyTorch version and CPU features (it is compiled with -march=native)."""
    key = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES + HEADERS) + torch.__version__.encode()
                         + " ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    root = Path(os.environ.get("MIAOTUI_KERNEL_CACHE", Path.home() / ".cache" / "miaotui" / "kernels"))
    path = root / f"cpu_kernels-{key}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def native_ops():
    """torch.ops.miaotui (see cpu_kernels.cpp), built if needed; None where it cannot be
    (no compiler, MIAOTUI_NATIVE_KERNELS=0)."""
    with _lock:
        if "ops" not in _state:
            _state["ops"] = _load()
        return _state["ops"]


def native_op(name: str) -> Callable | None:
    """One native op (cpu_kernels.cpp: paged_attention, int4_amx_linear, rms_norm_bf16, ...;
    decode_matmul.cpp: linear_bf16_tiles, linear_q_rows, linear_q_tiles) or None.
    Cached: layers ask on every call."""
    op = _ops_by_name.get(name, _MISSING)
    if op is _MISSING:
        ops = native_ops()
        op = _ops_by_name[name] = None if ops is None else getattr(ops, name)
    return op  # type: ignore[return-value]


_MISSING = object()
_ops_by_name: dict[str, object] = {}


def _load() -> Callable | None:
    if os.environ.get("MIAOTUI_NATIVE_KERNELS", "1") == "0":
        return None
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        log.warning("miaotui: no C++ compiler (%s) to build the native CPU kernels; using PyTorch ops", compiler)
        return None
    verbose = os.environ.get("MIAOTUI_KERNEL_VERBOSE", "0") == "1"
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(name="miaotui_cpu_kernels", sources=[str(source) for source in SOURCES],
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                           extra_ldflags=["-fopenmp", "-lmvec", "-lm"],
                           build_directory=str(_build_dir()), is_python_module=False, verbose=verbose)
        return torch.ops.miaotui
    except Exception as exc:  # noqa: BLE001 - any build failure means: use the PyTorch path
        log.warning("miaotui: building the native CPU kernels failed (%s; MIAOTUI_KERNEL_VERBOSE=1 shows the "
                    "compiler's output); using PyTorch ops", type(exc).__name__)
        return None
