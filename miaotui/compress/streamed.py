"""A model opened for compression or export one decoder layer at a time.

`open_streamed` builds the model's shell (token embedding, final norm, output head in float32) and
leaves every decoder layer in the checkpoint: a stage asks `LayerStore.load(i)` for layer i as
float32, works on it, and `done(i)` keeps it in its compact form (packed integer codes, or the
checkpoint's own 16-bit float dtype) - or `release(i)` drops it when nothing needs it again. So
quantizing, pruning or exporting holds the compressed model, one float32 layer and one layer's
calibration activations, never a float32 copy of the whole model: GPTQ of an 8B bf16 checkpoint
(15 GB) peaks at 13 GB. Stages that train or score the whole network (distillation, gradual and
gradient-scored pruning, structured pruning) call `load_all`, which checks that fits first.

A model loaded whole (tests, the API) gets an `InMemoryLayers` with the same interface.
Not for the algorithms (quantize/, prune/) or the file formats (loaders/).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from miaotui.errors import MiaotuiError
from miaotui.layers.linear import Linear
from miaotui.layers.norm import RMSNorm
from miaotui.layers.quant_formats import QuantFormat, QuantizedTensor
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.loaders.memory import GB, available_bytes
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.config import ModelConfig
from miaotui.models.registry import spec_named
from miaotui.models.transformer import DecoderLayer, Transformer
from miaotui.runtime import cpu_has_fast_bf16


def _float_modules(layer: torch.nn.Module) -> Iterator[torch.nn.Module]:
    return (m for m in layer.modules() if isinstance(m, (Linear, RMSNorm)))


@torch.inference_mode(False)  # normal tensors even inside a calibration pass: stages change them in place
def _cast_floats(layer: torch.nn.Module, dtype: torch.dtype) -> None:
    """The dense weights, biases and norms of a layer to dtype, in place (a packed QuantLinear keeps its codes)."""
    for module in _float_modules(layer):
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dtype != dtype:
                setattr(module, name, torch.nn.Parameter(p.detach().to(dtype), requires_grad=False))


class LayerStore:
    """Decoder layers read from the checkpoint on demand (see the module docstring)."""

    def __init__(self, model: Transformer, read_layer: Callable[[int], DecoderLayer], keep_dtype: torch.dtype,
                 stored_bf16: bool = False) -> None:
        self.model = model
        self._read_layer = read_layer
        self.keep_dtype = keep_dtype  # finished float layers are kept in this (the checkpoint's own) dtype
        # Calibration passes of a checkpoint stored in bf16 run in bf16 where the CPU multiplies it
        # natively (as GPU tools calibrate in the model's dtype; ~2.7x faster GEMMs with AMX); the
        # weights stay float32 for the algorithms, and the statistics (Hessians) are summed in float32.
        self.calibration_dtype = torch.bfloat16 if stored_bf16 and cpu_has_fast_bf16() else torch.float32
        self.loaded: set[int] = set()  # in model.layers now
        self.kept: set[int] = set()  # changed by a stage: never read again from the checkpoint

    @torch.inference_mode(False)
    def load(self, i: int) -> DecoderLayer:
        """Layer i in float32, in model.layers[i]: read from the checkpoint the first time."""
        if i not in self.loaded:
            self.model.layers[i] = self._read_layer(i)
            self.loaded.add(i)
        layer = self.model.layers[i]
        _cast_floats(layer, torch.float32)
        return layer

    def done(self, i: int) -> None:
        """Keep layer i (as a stage left it) in its compact form from now on: float weights in the
        checkpoint's dtype, packed layers as their stored codes alone."""
        _cast_floats(self.model.layers[i], self.keep_dtype)
        for module in self.model.layers[i].modules():
            if isinstance(module, QuantLinear):
                module.drop_kernel_layouts()
        self.kept.add(i)

    def release(self, i: int) -> None:
        """Forget layer i (read again when next loaded) after a pass that only looked at it; a layer
        an earlier stage changed is kept instead."""
        if i in self.kept:
            self.done(i)
        elif i in self.loaded:
            with torch.device("meta"):
                self.model.layers[i] = DecoderLayer(self.model.config, i)
            self.loaded.discard(i)

    def load_all(self, why: str) -> None:
        """Every layer in float32 at once (a stage that trains or scores the whole network)."""
        missing = [i for i in range(len(self.model.layers)) if i not in self.loaded]
        need = sum(p.numel() * 4 for i in missing for p in self.model.layers[i].parameters())
        have = available_bytes()
        if have is not None and need > have:
            raise MiaotuiError(f"{why} needs the whole model in float32 (about {need / GB:.1f} GB more), and "
                               f"{have / GB:.1f} GB are available: quantize and prune (magnitude, wanda, "
                               f"sparsegpt) work one layer at a time")
        for i in tqdm(range(len(self.model.layers)), desc="reading layers", unit="layer", disable=not missing):
            self.load(i)
            self.kept.add(i)


class InMemoryLayers:
    """The LayerStore interface over a model whose layers are all in memory already."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        self.calibration_dtype = torch.float32  # (the model's own dtype: it is loaded whole)

    def load(self, i: int) -> DecoderLayer:
        return self.model.layers[i]

    def done(self, i: int) -> None:
        pass

    def release(self, i: int) -> None:
        pass

    def load_all(self, why: str) -> None:
        pass


def layers_of(model: Transformer) -> LayerStore | InMemoryLayers:
    store = getattr(model, "layer_store", None)
    return store if store is not None else InMemoryLayers(model)


def each_layer(model: Transformer, desc: str) -> Iterator[tuple[int, DecoderLayer]]:
    """(i, layer i in float32) in order, with a progress bar; after the caller's turn the layer is
    kept compact."""
    store = layers_of(model)
    for i in tqdm(range(len(model.layers)), desc=desc, unit="layer"):
        layer = store.load(i)
        yield i, layer
        store.done(i)


# -- opening a checkpoint ------------------------------------------------------------------------

def open_streamed(model_name: str) -> tuple[Transformer, Tokenizer]:
    """The model's shell with a LayerStore (model.layer_store) over its checkpoint, and its tokenizer."""
    from miaotui.loaders.gguf import load_gguf
    from miaotui.loaders.gguf_file import GGUF_MAGIC
    from miaotui.loaders.hf import load_hf_dir
    from miaotui.loaders.miaotui_dir import is_miaotui_dir
    from miaotui.loaders.model_store import resolve_model

    path = resolve_model(model_name)
    if is_miaotui_dir(path):
        return _open_miaotui_dir(path)
    if path.is_dir():
        config, tensors, tokenizer = load_hf_dir(path, float_bytes=0)
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC and path.suffix != ".gguf":
            raise MiaotuiError(f"'{path}' is neither a GGUF file nor a model directory")
        config, tensors, tokenizer = load_gguf(path, keep_quantized=False, float_bytes=0)
    spec = spec_named(config.architecture)
    shell = _shell(config, dict(spec.global_tensors(config, tensors)))
    stored = _stored_float_dtype(path)
    keep = torch.bfloat16 if stored is None else stored  # (a quantized GGUF's layers: bf16)

    def read_layer(i: int) -> DecoderLayer:
        return _layer_from(config, {name.split(".", 2)[2]: t for name, t in spec.layer_tensors(config, tensors, i)},
                           index=i)

    shell.layer_store = LayerStore(shell, read_layer, keep, stored_bf16=stored == torch.bfloat16)
    return shell, tokenizer


def _shell(config: ModelConfig, tensors: dict[str, Any]) -> Transformer:
    with torch.device("meta"):
        model = Transformer(config)
    state = {name: (t.dequantize() if isinstance(t, QuantizedTensor) else t).to(torch.float32)
             for name, t in tensors.items()}
    model.load_state_dict(state, assign=True, strict=False)
    model.materialize_rotary("cpu")
    return model.eval().requires_grad_(False)


def _layer_from(config: ModelConfig, state: dict[str, Any], quantized: dict[str, QuantFormat] | None = None,
                act_quant: bool = False, index: int = 0) -> DecoderLayer:
    """Decoder layer `index` from its tensors (names relative to the layer); `quantized` names its
    packed linears."""
    with torch.device("meta"):
        layer = DecoderLayer(config, index)
        for name, fmt in (quantized or {}).items():
            dense = layer.get_submodule(name)
            parent, _, child = name.rpartition(".")
            setattr(layer.get_submodule(parent), child,
                    QuantLinear(dense.in_features, dense.out_features, dense.bias is not None, fmt, act_quant))
    state = {k: (v.dequantize() if isinstance(v, QuantizedTensor) else v) for k, v in state.items()}
    state = {k: v.to(torch.float32) if v.is_floating_point() and not k.endswith((".scale", ".zero")) else v
             for k, v in state.items()}
    try:
        layer.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as exc:
        raise MiaotuiError(f"a decoder layer's tensors do not match the model: {str(exc).splitlines()[0]}") from None
    for module in layer.modules():
        if isinstance(module, QuantLinear):
            module.prepare_kernels(False)
    return layer.eval().requires_grad_(False)


def _stored_float_dtype(path: Path) -> torch.dtype | None:
    """The float dtype a checkpoint stores its matrices in (float32, float16 or bfloat16), or None
    for a GGUF file of quantized blocks."""
    names = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        try:
            with safe_open(str(files[0]), framework="pt") as f:
                name = next(n for n in f.keys() if n.endswith("proj.weight"))  # noqa: SIM118
                return names.get(f.get_slice(name).get_dtype(), torch.bfloat16)
        except (SafetensorError, OSError, StopIteration, IndexError):
            return torch.bfloat16
    from miaotui.loaders.gguf_file import GGUFFile

    types = {t.qtype.name for t in GGUFFile(path).tensors if len(t.shape) == 2}
    return names.get(types.pop()) if len(types) == 1 else None


def _open_miaotui_dir(path: Path) -> tuple[Transformer, Tokenizer]:
    from miaotui.loaders.miaotui_dir import MARKER, MASK_SUFFIX, VALUES_SUFFIX, read_tokenizer, unpack_sparse

    weights = str(path / "model.safetensors")
    try:
        meta = json.loads((path / MARKER).read_text())
        config = ModelConfig.from_dict(meta["config"])
        with safe_open(weights, framework="pt") as handle:
            names = list(handle.keys())
            first = next((n for n in names if n.startswith("layers.") and n.endswith("norm.weight")), None)
            keep = handle.get_slice(first).get_dtype() if first else "F32"
    except (OSError, json.JSONDecodeError, KeyError, TypeError, SafetensorError) as exc:
        raise MiaotuiError(f"'{path}' is unreadable: {exc}") from None
    sparse = meta.get("sparse_tensors") or {}
    compression = meta.get("compression") or {}
    fmt = QuantFormat(**compression["format"]) if compression.get("layers") else None
    quantized = set(compression.get("layers") or [])

    def read(name: str) -> torch.Tensor:
        # a mapping closed again at once, as hf.py reads: pages read so far do not stay resident
        with safe_open(weights, framework="pt") as handle:
            if name in sparse:
                return unpack_sparse(handle.get_tensor(name + MASK_SUFFIX), handle.get_tensor(name + VALUES_SUFFIX),
                                     tuple(sparse[name]))
            return handle.get_tensor(name)

    def tensors_under(prefix: str) -> dict[str, torch.Tensor]:
        wanted = {n.removesuffix(MASK_SUFFIX).removesuffix(VALUES_SUFFIX) for n in names if n.startswith(prefix)}
        return {n.removeprefix(prefix): read(n) for n in sorted(wanted)}

    shell = _shell(config, {n: read(n) for n in ("embed_tokens.weight", "norm.weight", "lm_head.weight")
                            if n in names or n in sparse})
    shell.stages = list(meta.get("stages") or [])

    def read_layer(i: int) -> DecoderLayer:
        prefix = f"layers.{i}."
        packed = {n.removeprefix(prefix): fmt for n in quantized if n.startswith(prefix)}
        return _layer_from(config, tensors_under(prefix), packed, bool(compression.get("act_quant")), i)

    shell.layer_store = LayerStore(shell, read_layer, torch.float32 if keep == "F32" else torch.bfloat16,
                                   stored_bf16=keep == "BF16")
    shell.compression = compression
    return shell, read_tokenizer(path, config)
