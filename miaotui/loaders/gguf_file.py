"""A lean GGUF container reader: metadata, tensor directory, and raw tensor bytes (memory-mapped).

Why not gguf.GGUFReader: it builds a Python object per array element, which takes ~6 s for a
49k-token vocabulary; this reads the same header in milliseconds. Tensor *contents* are still
decoded by the gguf package (loaders/gguf.py). Not for writing GGUF.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from miaotui.errors import MiaotuiError

GGUF_MAGIC = b"GGUF"
_U64 = struct.Struct("<Q")
_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i", GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d",
}
_NUMPY = {GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
          GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
          GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_, GGUFValueType.UINT64: np.uint64,
          GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT64: np.float64}


@dataclass(frozen=True, slots=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # row-major (PyTorch order): GGUF's dims reversed
    qtype: GGMLQuantizationType
    offset: int  # absolute byte offset in the file
    nbytes: int

    def expert(self, e: int) -> GGUFTensorInfo:
        """Matrix e of a stacked [E, N, K] expert tensor, as a tensor of its own."""
        size = self.nbytes // self.shape[0]
        return GGUFTensorInfo(f"{self.name}[{e}]", self.shape[1:], self.qtype, self.offset + e * size, size)


class _Cursor:
    def __init__(self, buf: memoryview) -> None:
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        (n,) = _U64.unpack_from(self.buf, self.pos)
        start = self.pos + 8
        if start + n > len(self.buf):
            raise EOFError("string runs past the end of the file")
        self.pos = start + n
        return str(self.buf[start:self.pos], "utf-8", "replace")

    def value(self, vtype: int) -> Any:
        if vtype == GGUFValueType.STRING:
            return self.string()
        if vtype == GGUFValueType.ARRAY:
            etype, count = self.scalar("<I"), self.scalar("<Q")
            if etype == GGUFValueType.STRING:
                return [self.string() for _ in range(count)]
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return arr.tolist()
            return [self.value(etype) for _ in range(count)]
        return self.scalar(_SCALARS[GGUFValueType(vtype)])


class GGUFFile:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise MiaotuiError(f"model file '{self.path}' does not exist")
        self.data = np.memmap(self.path, dtype=np.uint8, mode="r")
        if bytes(self.data[:4]) != GGUF_MAGIC:
            raise MiaotuiError(f"'{self.path}' is not a GGUF file (it starts with {bytes(self.data[:4])!r}, "
                               "not b'GGUF')")
        try:
            self._parse()
        except MiaotuiError:
            raise
        except (struct.error, EOFError, ValueError, KeyError, IndexError) as exc:
            raise MiaotuiError(f"model file '{self.path}' is corrupt or truncated ({exc})") from None
        end = max((t.offset + t.nbytes for t in self.tensors), default=0)
        if end > len(self.data):
            raise MiaotuiError(f"model file '{self.path}' is truncated (expected {end:,} bytes, "
                               f"found {len(self.data):,})")

    def _parse(self) -> None:
        cur = _Cursor(memoryview(self.data))
        cur.pos = 4
        self.version = cur.scalar("<I")
        if self.version not in (2, 3):
            raise MiaotuiError(f"GGUF version {self.version} of '{self.path}' is not supported (2 or 3)")
        n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.scalar("<I"))
        infos = []
        for _ in range(n_tensors):
            name = cur.string()
            dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
            type_id = cur.scalar("<I")
            try:
                qtype = GGMLQuantizationType(type_id)
            except ValueError:
                raise MiaotuiError(f"tensor '{name}' of '{self.path}' is in GGML type {type_id}, which miaotui does "
                                   f"not know (a newer llama.cpp quantization?)") from None
            infos.append((name, tuple(reversed(dims)), qtype, cur.scalar("<Q")))
        alignment = int(self.metadata.get("general.alignment", 32))
        data_start = (cur.pos + alignment - 1) // alignment * alignment
        self.tensors: list[GGUFTensorInfo] = []
        for name, shape, qtype, offset in infos:
            block, type_size = GGML_QUANT_SIZES[qtype]
            n = int(np.prod(shape)) if shape else 1
            self.tensors.append(GGUFTensorInfo(name, shape, qtype, data_start + offset, n // block * type_size))

    def release(self, info: GGUFTensorInfo) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache): after a tensor is
        converted, its file bytes no longer count toward the load's resident memory."""
        mapped = getattr(self.data, "_mmap", None)
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(self.data), -(-(info.offset + info.nbytes) // mmap.PAGESIZE) * mmap.PAGESIZE)
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)

    def raw(self, info: GGUFTensorInfo) -> np.ndarray:
        """The tensor's bytes as uint8 [*shape[:-1], bytes per row] (what gguf.quants decodes)."""
        block, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = info.shape[-1] // block * type_size
        flat = self.data[info.offset:info.offset + info.nbytes]
        return flat.reshape(*info.shape[:-1], row_bytes)
