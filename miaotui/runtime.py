"""What the hardware can do, and the dtype that runs fastest on it without losing accuracy.

Not for model code: layers receive a dtype, they never probe the machine.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from miaotui.errors import MiaotuiError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    """AMX-BF16 or AVX512-BF16: bf16 matmuls run natively (else PyTorch emulates them, slowly)."""
    return bool({"amx_bf16", "avx512_bf16"} & cpu_flags())


def default_dtype(device: str | torch.device) -> torch.dtype:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def default_decode_weight_dtype(device: str | torch.device, compute: torch.dtype) -> torch.dtype | None:
    """Batch-1 decode reads every weight per token. On CPUs without native bf16 those matmuls are
    memory-bound and a float16 copy of the weights reads half the bytes (layers/linear.py). With
    bf16 and vectorized int8 kernels (AVX-512), an int8 copy of the output head alone: the head is
    a fifth of the model's bytes, and its best logits are recomputed exactly (models/transformer.py)."""
    if torch.device(device).type == "cpu" and compute == torch.float32:
        return torch.float16
    if torch.device(device).type == "cpu" and compute == torch.bfloat16 and "avx512f" in cpu_flags():
        return torch.int8  # an int8 copy of the output head alone (models/transformer.py: logits)
    return None


def resolve_dtypes(dtype: str | torch.dtype | None, decode_weight_dtype: str | torch.dtype | None,
                   device: str | torch.device) -> tuple[torch.dtype, torch.dtype | None]:
    """-> (compute dtype, decode-copy dtype or None). An 'auto' decode copy follows the device
    only when dtype was 'auto' too: an explicit dtype='float32' means float32 end to end."""
    compute = resolve_dtype(dtype, device)
    if decode_weight_dtype in (None, "none"):
        return compute, None
    if decode_weight_dtype == "auto":
        return compute, default_decode_weight_dtype(device, compute) if dtype in (None, "auto") else None
    return compute, resolve_dtype(decode_weight_dtype, device)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return default_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise MiaotuiError(f"unknown dtype '{dtype}' (use auto, float32, bfloat16 or float16)")
    return DTYPES[dtype]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def describe_device(device: str | torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    simd = [f for f in ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx2") if f in cpu_flags()]
    return f"cpu ({torch.get_num_threads()} threads; {', '.join(simd) or 'no wide SIMD'})"


@lru_cache(maxsize=1)
def _libc_malloc_trim():
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def peak_rss_mb() -> float:
    """This process's peak resident memory so far, MB: Linux's VmHWM (ru_maxrss would also count the
    size of the process this one was forked from), else ru_maxrss."""
    try:
        for line in open("/proc/self/status", encoding="ascii"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_freed_memory() -> None:
    """Hand the allocator's freed pages back to the OS (glibc keeps them; a load converting tensor
    after tensor would otherwise peak at hundreds of MB above what it holds). No-op elsewhere."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)
