"""load_model: any model argument (name, .gguf, HF directory) -> a ready model and tokenizer.

Not for choosing devices or dtypes' defaults beyond honouring what the caller asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from miaotui.errors import MiaotuiError
from miaotui.loaders.gguf import load_gguf
from miaotui.loaders.gguf_file import GGUF_MAGIC
from miaotui.loaders.hf import load_hf_dir
from miaotui.loaders.miaotui_dir import is_miaotui_dir, load_miaotui_dir
from miaotui.loaders.model_store import resolve_model
from miaotui.loaders.tokenizer import Tokenizer
from miaotui.models.config import ModelConfig
from miaotui.models.transformer import Transformer, build_transformer


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    config: ModelConfig
    path: Path
    format: str  # "gguf", "hf" or "miaotui"


def load_model(model: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu",
               decode_weight_dtype: torch.dtype | None = None, keep_quantized: bool | None = None,
               layout_only: bool = False) -> LoadedModel:
    """keep_quantized: a GGUF file's quantized matrices run in their own bits (gguf_quant.py);
    None: yes unless dtype is float32, the float path (compression, reference perplexity).
    layout_only: inference alone (no compression, no sharding): integer layers keep their weight in
    the decode kernel's layout only (QuantLinear.keep_kernel_layout_only), one copy in memory."""
    path = resolve_model(str(model))
    if is_miaotui_dir(path):
        net, tokenizer, config = load_miaotui_dir(path, dtype, device, layout_only)
        fmt = "miaotui"
    elif path.is_dir():
        config, tensors, tokenizer = load_hf_dir(path, float_bytes=torch.empty(0, dtype=dtype).element_size())
        fmt = "hf"
    else:
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC and path.suffix != ".gguf":
            raise MiaotuiError(f"'{path}' is neither a GGUF file nor a model directory")
        config, tensors, tokenizer = load_gguf(
            path, keep_quantized=dtype != torch.float32 if keep_quantized is None else keep_quantized,
            float_bytes=torch.empty(0, dtype=dtype).element_size(), blocks=layout_only)
        fmt = "gguf"
    if fmt != "miaotui":
        net = build_transformer(config, tensors, dtype=dtype, device=device, layout_only=layout_only)
        del tensors
    if decode_weight_dtype is not None and decode_weight_dtype != dtype:
        net.add_decode_weights(decode_weight_dtype)
    return LoadedModel(net, tokenizer, config, path, fmt)
