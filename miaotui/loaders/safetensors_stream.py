"""Write a safetensors file one tensor at a time: the header (every name, dtype, shape and byte
range) first, then each tensor's bytes as it is produced, so saving a model holds no second copy
of it (safetensors' own save_file builds the whole file's bytes in memory first).
The file is the format safetensors reads (8-byte header length, JSON header, data).
Not for reading (safetensors.safe_open does that).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
           torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
           torch.bool: "BOOL"}

# (name, dtype, shape, produce): produce() returns the tensor when its turn to be written comes
Entry = tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]


def write_safetensors(path: str | Path, entries: Iterable[Entry], metadata: dict[str, str] | None = None) -> None:
    entries = list(entries)
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, dtype, shape, produce in entries:
            t = produce().detach().cpu().contiguous()
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"tensor '{name}' is {t.dtype} {tuple(t.shape)}, the header said {dtype} {shape}")
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
