"""miaotui's own checkpoint directory: what `quantize` (and later `prune`, `distill`) write.

Files: miaotui_model.json (model config + compression record + version), model.safetensors
(float and packed integer tensors exactly as the modules hold them), tokenizer.json and
tokenizer_config.json (special tokens, chat template). Not for Hugging Face directories (hf.py).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from miaotui.errors import MiaotuiError
from miaotui.layers.quant_formats import QuantFormat
from miaotui.layers.quantized_linear import QuantLinear
from miaotui.loaders.safetensors_stream import Entry, write_safetensors
from miaotui.loaders.tokenizer import Tokenizer, tokenizer_from_hf_dir
from miaotui.models.config import ModelConfig
from miaotui.models.transformer import Transformer

MARKER = "miaotui_model.json"
FORMAT_VERSION = 1
SPARSE_MIN_ZEROS = 0.1  # a float matrix with at least this share of exact zeros is stored as bitmask + values
MASK_SUFFIX, VALUES_SUFFIX = ".__mask", ".__values"


def pack_sparse(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense [N, K] -> (bitmask uint8 [ceil(N*K / 8)], the nonzero values in row-major order [nnz])."""
    flat = tensor.reshape(-1)
    keep = flat != 0
    bits = torch.nn.functional.pad(keep, (0, -keep.numel() % 8)).reshape(-1, 8).to(torch.uint8)
    mask = (bits << torch.arange(8, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return mask, flat[keep].contiguous()


def unpack_sparse(mask: torch.Tensor, values: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    numel = int(torch.tensor(shape).prod())
    keep = ((mask[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:numel].bool()
    if int(keep.sum()) != values.numel():
        raise MiaotuiError(f"sparse tensor: bitmask has {int(keep.sum())} ones but {values.numel()} values are stored")
    dense = torch.zeros(numel, dtype=values.dtype)
    dense[keep] = values
    return dense.reshape(shape)


def _is_sparse(name: str, t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.is_floating_point() and name.startswith("layers.") \
        and float((t == 0).sum()) >= SPARSE_MIN_ZEROS * t.numel()


def _entries(state: dict[str, torch.Tensor]) -> tuple[list[Entry], dict[str, list[int]]]:
    """What to write, one tensor at a time: pruned float matrices as bitmask + values; -> (entries,
    {name: shape} stored sparse)."""
    out: list[Entry] = []
    sparse: dict[str, list[int]] = {}
    for name, t in state.items():
        if t.is_meta:
            raise MiaotuiError(f"cannot save: tensor '{name}' was never read from the checkpoint")
        if _is_sparse(name, t):
            nnz = int(torch.count_nonzero(t))
            out.append((name + MASK_SUFFIX, torch.uint8, (-(-t.numel() // 8),), lambda t=t: pack_sparse(t)[0]))
            out.append((name + VALUES_SUFFIX, t.dtype, (nnz,), lambda t=t: pack_sparse(t)[1]))
            sparse[name] = list(t.shape)
        else:
            out.append((name, t.dtype, tuple(t.shape), lambda t=t: t))
    return out, sparse


def is_miaotui_dir(path: Path) -> bool:
    return path.is_dir() and (path / MARKER).is_file()


def save_model(model: Transformer, tokenizer: Tokenizer, out_dir: str | Path,
               record: dict[str, Any] | None = None, stages: list[dict[str, Any]] | None = None) -> Path:
    """Write atomically: into a temporary sibling directory, renamed into place when complete.

    record: the quantization record (which modules are QuantLinear, in what format); stages: what
    each compression stage did (pruning, distillation, ...), kept for people and reports.
    """
    from miaotui import __version__

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    if out_dir.exists() and any(out_dir.iterdir()) and not is_miaotui_dir(out_dir):
        raise MiaotuiError(f"output directory '{out_dir}' exists and is not a miaotui model; choose another")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    entries, sparse = _entries(model.state_dict())
    write_safetensors(tmp / "model.safetensors", entries)  # one tensor at a time: no second copy
    meta = {"format_version": FORMAT_VERSION, "miaotui_version": __version__, "config": model.config.to_dict(),
            "compression": record or {}, "sparse_tensors": sparse,
            "stages": list(getattr(model, "stages", [])) if stages is None else stages}
    (tmp / MARKER).write_text(json.dumps(meta, indent=2, default=str))
    tokenizer.backend.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "chat_template": tokenizer.chat_template,
        "gguf_pre": tokenizer.gguf_pre,
    }, indent=2, ensure_ascii=False))
    if out_dir.exists():
        for f in out_dir.iterdir():
            f.unlink()
        out_dir.rmdir()
    os.replace(tmp, out_dir)
    return out_dir


def update_stages(path: Path, stages: list[dict[str, Any]]) -> None:
    """Rewrite the stage records of a saved model (e.g. to add metrics measured on it), atomically."""
    meta = json.loads((path / MARKER).read_text())
    meta["stages"] = stages
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    os.replace(tmp, path / MARKER)


def load_miaotui_dir(path: Path, dtype: torch.dtype, device: str | torch.device, layout_only: bool = False
                     ) -> tuple[Transformer, Tokenizer, ModelConfig]:
    try:
        meta = json.loads((path / MARKER).read_text())
        config = ModelConfig.from_dict(meta["config"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise MiaotuiError(f"'{path / MARKER}' is unreadable: {exc}") from None
    compression = meta.get("compression") or {}
    try:
        state = load_file(path / "model.safetensors")
    except (SafetensorError, OSError) as exc:
        raise MiaotuiError(f"cannot read '{path / 'model.safetensors'}': {exc}") from None
    for name, shape in (meta.get("sparse_tensors") or {}).items():
        try:
            state[name] = unpack_sparse(state.pop(name + MASK_SUFFIX), state.pop(name + VALUES_SUFFIX), tuple(shape))
        except KeyError:
            raise MiaotuiError(f"'{path}': sparse tensor '{name}' is recorded but its bitmask or values are missing"
                               ) from None
    with torch.device("meta"):
        model = Transformer(config)
        if compression.get("layers"):
            fmt = QuantFormat(**compression["format"])
            for name in compression["layers"]:
                dense = model.get_submodule(name)
                q = QuantLinear(dense.in_features, dense.out_features, dense.bias is not None, fmt,
                                bool(compression.get("act_quant")))
                if f"{name}.input_order" in state:  # activation-ordered groups (from a GPTQ act-order checkpoint)
                    q.input_order = torch.empty(dense.in_features, dtype=torch.long)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, q)
    expected = model.state_dict()
    problems = sorted(set(expected) ^ set(state))
    if problems:
        raise MiaotuiError(f"'{path}': tensors do not match the model record (e.g. '{problems[0]}')")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise MiaotuiError(f"'{path}': tensor '{name}' has shape {tuple(tensor.shape)}, the record implies "
                               f"{tuple(expected[name].shape)}")
    # Integer codes keep their dtype; float tensors take the compute dtype.
    state = {k: v.to(device=device, dtype=dtype if v.is_floating_point() and not _is_qparam(k) else v.dtype)
             for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=True)
    model.materialize_rotary(device)
    model.stages = list(meta.get("stages") or [])  # earlier compression stages: carried into later saves
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.prepare_kernels(layout_only)
    return model.eval().requires_grad_(False), read_tokenizer(path, config), config


def read_tokenizer(path: Path, config: ModelConfig) -> Tokenizer:
    tok_cfg = json.loads((path / "tokenizer_config.json").read_text())
    return tokenizer_from_hf_dir(str(path / "tokenizer.json"), tok_cfg, tok_cfg.get("chat_template"),
                                 config.eos_token_ids)


def _is_qparam(name: str) -> bool:
    return name.endswith((".scale", ".zero"))
