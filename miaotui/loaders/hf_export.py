"""Write any loaded model as a Hugging Face directory in llm-compressor's format (compressed-tensors),
which transformers (with the compressed-tensors package) and vLLM load.

Integer layers are written from their codes, never through floats: weight-only layers as
`pack-quantized` (codes packed into int32 by compressed-tensors, group or channel scales, zero
points for asymmetric formats), W8A8 layers (SmoothQuant) as `int-quantized` with dynamic per-token
int8 activations. Float layers stay `weight`; a model with no integer layer is a plain checkpoint.
Names and config.json come from the family's spec (gguf_layer_names, config_to_hf), the tensors a
decoder layer at a time (layer_pieces.py), so a streamed model is written holding one layer.
Not for reading such directories (hf_quant.py) or for GGUF (gguf_export.py).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from miaotui.compress.streamed import layers_of
from miaotui.errors import MiaotuiError
from miaotui.layers.quant_formats import QuantizedTensor
from miaotui.layers.quantized_embedding import QuantEmbedding
from miaotui.loaders.layer_pieces import Piece, dense_piece, layer_pieces, weight_piece
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.registry import spec_named
from miaotui.models.transformer import Transformer

SHARD_BYTES = 2 * 2**30  # a new safetensors shard after this many bytes (as transformers shards)
EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _ct():
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise MiaotuiError("compressed-tensors export needs the compressed-tensors package "
                           "(pip install compressed-tensors)") from None
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    return pack_to_int32, QuantizationArgs, QuantizationScheme, QuantizationConfig


# (bits, strategy, group size, symmetric, W8A8): one compressed-tensors scheme
SchemeKey = tuple[int, str, int | None, bool, bool]


def _export_group(piece: QuantizedTensor, k: int) -> tuple[str, int | None, torch.Tensor, torch.Tensor]:
    """(strategy, group size, scale, zero) as compressed-tensors can hold them. It needs whole groups
    (K a multiple of G); miaotui ends a row in one shorter group (576 = 4 x 128 + 64), which becomes
    groups of gcd(G, K) with each scale repeated: the same numbers."""
    fmt = piece.fmt
    if fmt.group_size == -1:
        return "channel", None, piece.scale[:, :1], piece.zero[:, :1]
    g = fmt.group_size if k % fmt.group_size == 0 else math.gcd(fmt.group_size, k)
    repeat = fmt.group_size // g
    return ("group", g, piece.scale.repeat_interleave(repeat, 1)[:, :k // g],
            piece.zero.repeat_interleave(repeat, 1)[:, :k // g])


def _quantized_tensors(name: str, piece: QuantizedTensor, dtype: torch.dtype
                       ) -> tuple[SchemeKey, dict[str, torch.Tensor]]:
    """One integer layer's tensors under compressed-tensors' names (`name` is the module's)."""
    pack_to_int32 = _ct()[0]
    fmt = piece.fmt
    if fmt.kind != "int":
        raise MiaotuiError(f"'{name}' is {fmt.kind}: compressed-tensors has no {fmt.kind} format (export int4/int8 "
                           f"models, or use export-gguf)")
    if piece.input_order is not None:
        raise MiaotuiError(f"'{name}' has activation-ordered groups (a GPTQ act-order g_idx), which compressed-tensors "
                           f"no longer writes (its actorder='group' is removed); export-gguf keeps the weights")
    n, k = piece.shape
    strategy, group, scale, zero = _export_group(piece, k)
    half = 1 << (fmt.bits - 1)  # compressed-tensors' codes are signed: [-2^(b-1), 2^(b-1) - 1]
    if fmt.symmetric:
        codes, zp = piece.codes.to(torch.int8), None
    else:
        # miaotui's asymmetric codes are 0..2^b - 1 with a real-valued zero point (GGUF Q4_1's w = d q + m);
        # compressed-tensors' zero points are integers
        zint = torch.round(zero)
        if not torch.allclose(zero, zint, atol=1e-4):
            raise MiaotuiError(f"'{name}': asymmetric {fmt.bits}-bit with real-valued zero points (GGUF Q4_1 style) "
                               f"has no compressed-tensors form; quantize with --symmetric, or export-gguf")
        codes = (piece.codes.to(torch.int16) - half).to(torch.int8)
        zp = (zint - half).to(torch.int8)
    key: SchemeKey = (fmt.bits, strategy, group, fmt.symmetric, piece.act_quant)
    out = {f"{name}.weight_scale": scale.to(dtype).contiguous()}
    if piece.act_quant:  # int-quantized: the int8 weight as it is
        out[f"{name}.weight"] = codes.contiguous()
        if zp is not None:
            out[f"{name}.weight_zero_point"] = zp.contiguous()
    else:
        out[f"{name}.weight_packed"] = pack_to_int32(codes, fmt.bits)
        out[f"{name}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        if zp is not None:
            out[f"{name}.weight_zero_point"] = pack_to_int32(zp.contiguous(), fmt.bits, packed_dim=0)
    return key, out


def _scheme(key: SchemeKey, targets: list[str]):
    _, QuantizationArgs, QuantizationScheme, _ = _ct()
    bits, strategy, group, symmetric, act = key
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=group,
                               dynamic=False)
    inputs = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True) if act else None
    return QuantizationScheme(targets=targets, weights=weights, input_activations=inputs,
                              format="int-quantized" if act else "pack-quantized")


def quantization_config(schemes: dict[SchemeKey, list[str]], floats: list[str]) -> dict | None:
    """config.json's quantization_config: one scheme per format. Where one scheme covers every integer
    layer, it targets "Linear" and ignores the float ones (as llm-compressor writes it); else each scheme
    lists its layers."""
    if not schemes:
        return None
    QuantizationConfig = _ct()[3]
    if len(schemes) == 1:
        (key, _), = schemes.items()
        groups = {"group_0": _scheme(key, ["Linear"])}
        ignore = sorted(floats)
    else:
        groups = {f"group_{i}": _scheme(key, sorted(names)) for i, (key, names) in enumerate(schemes.items())}
        ignore = []
    formats = {g.format for g in groups.values()}
    config = QuantizationConfig(config_groups=groups, format=formats.pop() if len(formats) == 1 else "mixed-precision",
                                quantization_status="compressed", ignore=ignore)
    return config.to_dict() | {"quant_method": "compressed-tensors"}


def _norm(vector: torch.Tensor, plus_one: bool) -> torch.Tensor:
    """miaotui holds Gemma's (1 + w) norms as multipliers; checkpoints store w."""
    return vector - 1.0 if plus_one else vector


class _Writer:
    """Collects a module tree's tensors under checkpoint names and writes them in shards."""

    def __init__(self, directory: Path, dtype: torch.dtype) -> None:
        self.directory, self.dtype = directory, dtype
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[dict[str, torch.Tensor] | str] = []
        self.weight_map: dict[str, str] = {}
        self.schemes: dict[SchemeKey, list[str]] = {}
        self.floats: list[str] = []  # linear layers kept in float

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().cpu().contiguous()
        self.pending[name] = tensor
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def add_linear(self, module_name: str, piece: Piece) -> None:
        if isinstance(piece, QuantizedTensor):
            key, tensors = _quantized_tensors(module_name, piece, self.dtype)
            self.schemes.setdefault(key, []).append(module_name)
            for name, t in tensors.items():
                self.add(name, t)
        else:
            self.floats.append(module_name)
            self.add(f"{module_name}.weight", piece.to(self.dtype))

    def flush(self) -> None:
        if not self.pending:
            return
        part = self.directory / f".shard-{len(self.shards)}.safetensors"
        save_file(self.pending, str(part), metadata={"format": "pt"})
        self.shards.append(str(part))
        for name in self.pending:
            self.weight_map[name] = part.name
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        count = len(self.shards)
        names = {}
        for i, part in enumerate(self.shards):
            final = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
            os.replace(part, self.directory / final)
            names[Path(part).name] = final
        if count > 1:
            weight_map = {k: names[v] for k, v in sorted(self.weight_map.items())}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map},
                                                                                    indent=2))


def _layer_tensors(layer: torch.nn.Module, model: Transformer, i: int) -> Iterator[tuple[str, Piece, bool]]:
    """(Hugging Face name, tensor, is a linear layer's weight) for decoder layer i."""
    c = model.config
    spec = spec_named(c.architecture)
    prefix = f"model.layers.{i}."
    for role, piece in layer_pieces(layer, c, fused=spec.name == "phi3").items():
        key = role if role.endswith(".bias") else role + ".weight"
        if key not in spec.gguf_layer_names:
            raise MiaotuiError(f"no checkpoint name for '{role}' in architecture '{c.architecture}'")
        hf = spec.gguf_layer_names[key]
        if isinstance(piece, list):  # experts
            for e, p in enumerate(piece):
                yield prefix + hf.format(e=e), p, True
        elif "norm" in role:
            yield prefix + hf, _norm(piece, spec.gguf_norm_plus_one), False
        elif role == "ffn_gate_inp":  # the router: a float linear layer (llm-compressor keeps it so too)
            yield prefix + hf, dense_piece(piece), True
        elif role.endswith(".bias"):
            yield prefix + hf, piece, False
        else:
            yield prefix + hf, piece, True


def _embedding(model: Transformer) -> torch.Tensor:
    table = model.embed_tokens
    if isinstance(table, QuantEmbedding):
        return dense_piece(weight_piece(table.table))
    return table.weight.detach().float()


def export_compressed_tensors(model: Transformer, tokenizer: Tokenizer, out_dir: str | Path,
                              dtype: str = "bfloat16") -> Path:
    """The model as a Hugging Face directory; its integer layers in compressed-tensors' formats.
    dtype: the float tensors' and scales' dtype (llm-compressor keeps the model's, usually bfloat16)."""
    if dtype not in EXPORT_DTYPES:
        raise MiaotuiError(f"unknown dtype '{dtype}' (use one of {', '.join(EXPORT_DTYPES)})")
    torch_dtype = EXPORT_DTYPES[dtype]
    c = model.config
    spec = spec_named(c.architecture)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "config.json").is_file():
        raise MiaotuiError(f"output directory '{out_dir}' exists and is not a model directory; choose another")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        writer = _Writer(tmp, torch_dtype)
        writer.add("model.embed_tokens.weight", _embedding(model).to(torch_dtype))
        writer.add("model.norm.weight", _norm(model.norm.weight.detach().float(), spec.gguf_norm_plus_one)
                   .to(torch_dtype))
        store = layers_of(model)
        for i in tqdm(range(len(model.layers)), desc="export compressed-tensors", unit="layer"):
            layer = store.load(i)
            for name, piece, linear in _layer_tensors(layer, model, i):
                if linear:
                    writer.add_linear(name.removesuffix(".weight"), piece)
                else:
                    writer.add(name, piece.to(torch_dtype))
            store.release(i)
        if model.lm_head is not None:
            writer.add_linear("lm_head", weight_piece(model.lm_head))
        else:
            writer.floats.append("lm_head")  # tied: the embedding, which stays float
        writer.finish()
        config = spec.hf_config(c) | {"torch_dtype": dtype}
        quant = quantization_config(writer.schemes, writer.floats)
        if quant is not None:
            config["quantization_config"] = quant
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        generation = {"bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_ids or None}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        _write_tokenizer(tokenizer, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _readable(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def _readable(directory: Path) -> None:
    """The permissions a plain `mkdir` and file write give (mkdtemp's directory and safetensors' files
    are private to their owner): a server running as another user reads the export."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _write_tokenizer(tokenizer: Tokenizer, directory: Path) -> None:
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.bos_token,
              "eos_token": tokenizer.eos_token, "clean_up_tokenization_spaces": False}
    if tokenizer.chat_template:
        config["chat_template"] = tokenizer.chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
