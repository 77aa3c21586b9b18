"""Read a GGUF file: config from its metadata, its tensors, its tokenizer. Matrices of the block
types that map exactly onto miaotui's integer formats stay quantized (gguf_quant.py); every other
tensor is dequantized to float32, one tensor at a time, from the memory-mapped file.

Not for writing GGUF (export lives with quantization) or for running the model.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf.quants import dequantize

from miaotui.errors import MiaotuiError
from miaotui.loaders.gguf_file import GGUFFile, GGUFTensorInfo
from miaotui.loaders.gguf_quant import NATIVE_TYPES, GGUFBlocks, QuantizedTensor, held_bytes, native_weight
from miaotui.loaders.lazy import LazyTensors
from miaotui.loaders.memory import check_fits
from miaotui.loaders.tokenizer import Tokenizer, tokenizer_from_gguf_metadata
from miaotui.models.config import ModelConfig
from miaotui.models.registry import spec_for_gguf, spec_named
from miaotui.models.spec import GLOBAL_GGUF_NAMES


def config_from_gguf_metadata(meta: dict[str, Any], tensor_names: set[str]) -> ModelConfig:
    """GGUF metadata -> ModelConfig, by the family's own parser."""
    spec = spec_for_gguf(meta.get("general.architecture", "<missing>"), meta)
    return spec.config_from_gguf(meta, tensor_names)


def _unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved RoPE pairs -> rotate-half pairs)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf(path: str | Path, keep_quantized: bool = True, float_bytes: int = 4, blocks: bool = False
              ) -> tuple[ModelConfig, LazyTensors, Tokenizer]:
    """-> (config, Hugging Face-named tensors, read when asked for, tokenizer). keep_quantized: 2-D
    weights in a block type with an exact integer mapping come as QuantizedTensor (no float copy);
    the others as float32 tensors, float_bytes each once in the model's dtype (for the check, before
    anything large is allocated, that the model fits in the memory available). blocks (with
    keep_quantized): Q4_0, Q4_1 and Q8_0 matrices come as GGUFBlocks, the file's bytes, for an
    inference load to lay out in one pass."""
    gguf_file = GGUFFile(path)
    meta = gguf_file.metadata
    names = {t.name for t in gguf_file.tensors}
    config = config_from_gguf_metadata(meta, names)
    need = sum(held_bytes(t.qtype, t.shape, float_bytes) if keep_quantized else int(np.prod(t.shape)) * float_bytes
               for t in gguf_file.tensors)
    check_fits(need, Path(path).name)
    _check_types_run(gguf_file, keep_quantized)
    spec = spec_named(config.architecture)
    if "rope_freqs.weight" in names:
        # Llama 3.1 GGUFs carry their rope scaling as per-frequency divisors.
        factors = next(t for t in gguf_file.tensors if t.name == "rope_freqs.weight")
        config.rope_scaling = {"rope_type": "freq_factors",
                               "factors": dequantize(gguf_file.raw(factors), factors.qtype).astype(np.float32).tolist()}
    if "rope_factors_short.weight" in names:  # LongRoPE (Phi-3): the two divisor sets as tensors
        arch = meta["general.architecture"]
        short, long = (next(t for t in gguf_file.tensors if t.name == f"rope_factors_{n}.weight")
                       for n in ("short", "long"))
        config.rope_scaling = {
            "rope_type": "longrope",
            "short_factor": dequantize(gguf_file.raw(short), short.qtype).astype(np.float32).tolist(),
            "long_factor": dequantize(gguf_file.raw(long), long.qtype).astype(np.float32).tolist(),
            "original_max_position_embeddings": int(meta.get(f"{arch}.rope.scaling.original_context_length")
                                                    or config.max_position_embeddings),
            "attention_factor": float(meta.get(f"{arch}.rope.scaling.attn_factor") or 1.0),
        }
    readers = {}
    for t in gguf_file.tensors:
        hf_name = _hf_name(t.name, spec.gguf_layer_names)
        if hf_name is None:
            continue
        if "{e}" in hf_name:  # a stack of expert matrices [E, N, K]: one tensor per expert
            for e in range(t.shape[0]):
                readers[hf_name.format(e=e)] = partial(_read_tensor, gguf_file, t.expert(e), None, keep_quantized,
                                                       blocks)
            continue
        heads = None
        permuted = spec.gguf_rope_permuted
        if permuted and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            heads = config.num_heads
        elif permuted and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            heads = config.num_kv_heads
        readers[hf_name] = partial(_read_tensor, gguf_file, t, heads, keep_quantized, blocks)
        if spec.gguf_norm_plus_one and hf_name.endswith("norm.weight"):
            readers[hf_name] = partial(_minus_one, readers[hf_name])  # the model file adds it back
    tokenizer = tokenizer_from_gguf_metadata(meta, config.eos_token_ids)
    return config, LazyTensors(readers), tokenizer


def _check_types_run(gguf_file: GGUFFile, keep_quantized: bool) -> None:
    """Every tensor type either loads natively or has a dequantizer: asked of one zero block per
    type before anything large is read, so a type nothing runs is a clear error up front."""
    for qtype in sorted({t.qtype for t in gguf_file.tensors}):
        if keep_quantized and qtype in NATIVE_TYPES:
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        try:
            dequantize(np.zeros((1, size), dtype=np.uint8), qtype)
        except (NotImplementedError, ValueError, KeyError):
            name = next(t.name for t in gguf_file.tensors if t.qtype == qtype)
            raise MiaotuiError(f"tensor '{name}' of '{gguf_file.path}' is in GGUF type {qtype.name}, which miaotui "
                               f"cannot run yet (re-quantize the file to a K-quant, Q8_0 or Q4_0)") from None


def _read_tensor(gguf_file: GGUFFile, t: GGUFTensorInfo, heads: int | None, keep_quantized: bool,
                 blocks: bool = False) -> torch.Tensor | QuantizedTensor | GGUFBlocks:
    """One tensor from the memory map, its q/k rows un-permuted when `heads` is given."""
    if blocks and keep_quantized and GGUFBlocks.fits(t.qtype, t.shape):
        raw = gguf_file.raw(t)  # a view of the map: its pages are the page cache's, read once by the layout
        minus_128 = t.qtype.name == "Q8_0" and bool((raw.reshape(-1, 34)[:, 2:].view(np.int8) == -128).any())
        if not minus_128:  # (int8 g32 symmetric holds -127..127: such a Q8_0 tensor is dequantized below)
            found = GGUFBlocks(t.qtype, raw, t.shape[-1], partial(gguf_file.release, t))
            return found.take_rows(_unpermute_rope_rows(np.arange(t.shape[0]), heads)) if heads is not None else found
    native = native_weight(gguf_file.raw(t), t.qtype, t.shape[-1]) if keep_quantized and len(t.shape) == 2 else None
    if native is not None:
        if heads is not None:
            native = native.take_rows(torch.from_numpy(_unpermute_rope_rows(np.arange(t.shape[0]), heads)))
        gguf_file.release(t)  # (native_weight copies what it keeps)
        return native
    array = dequantize(gguf_file.raw(t), t.qtype).astype(np.float32, copy=False)
    if heads is not None:
        array = _unpermute_rope_rows(array, heads)
    if not (array.flags.writeable and array.flags.c_contiguous):
        array = array.copy(order="C")  # F32 tensors are read-only views of the memory map
    gguf_file.release(t)
    return torch.from_numpy(array)


def _minus_one(read) -> torch.Tensor:
    """A norm llama.cpp's converter stored as 1 + w (Gemma), back to the checkpoint's w."""
    return read() - 1.0


def _hf_name(gguf_name: str, layer_names: Mapping[str, str]) -> str | None:
    if gguf_name in GLOBAL_GGUF_NAMES:
        return GLOBAL_GGUF_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in layer_names:
        return f"model.layers.{parts[1]}.{layer_names[parts[2]]}"
    return None
