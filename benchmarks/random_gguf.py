"""Llama-shaped GGUF files with random weights, for speed and memory at real sizes (random weights
read and multiply exactly as trained ones do). Written tensor by tensor in BF16, so an 8B file
(16 GB) never sits in memory; the tokenizer and chat template are the default model's.

Not for quality: the text such a model writes is noise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm


@dataclass(frozen=True)
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    mlp: int
    tied: bool  # output head shares the token embedding (small models)


SHAPES = {
    # Llama 3.2 1B's body (hidden 2048, 16 layers, 32/8 heads, MLP 8192), the default model's vocabulary
    "1b": Shape("1b", 2048, 16, 32, 8, 8192, tied=True),
    # Llama 3.1 8B's body (hidden 4096, 32 layers, 32/8 heads, MLP 14336)
    "8b": Shape("8b", 4096, 32, 32, 8, 14336, tied=False),
}


def _tensors(shape: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names and numpy shapes ([out, in] for matrices)."""
    d, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    out = [("token_embd.weight", (vocab, d)), ("output_norm.weight", (d,))]
    if not shape.tied:
        out.append(("output.weight", (vocab, d)))
    for i in range(shape.layers):
        out += [(f"blk.{i}.attn_norm.weight", (d,)), (f"blk.{i}.ffn_norm.weight", (d,)),
                (f"blk.{i}.attn_q.weight", (d, d)), (f"blk.{i}.attn_k.weight", (kv, d)),
                (f"blk.{i}.attn_v.weight", (kv, d)), (f"blk.{i}.attn_output.weight", (d, d)),
                (f"blk.{i}.ffn_gate.weight", (shape.mlp, d)), (f"blk.{i}.ffn_up.weight", (shape.mlp, d)),
                (f"blk.{i}.ffn_down.weight", (d, shape.mlp))]
    return out


def _copy_tokenizer(reader: gguf.GGUFReader, writer: gguf.GGUFWriter) -> int:
    """Every tokenizer.* field of the source file; -> its vocabulary size."""
    vocab = 0
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        value, kind = field.contents(), field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            writer.add_array(key, value)
            vocab = len(value) if key == "tokenizer.ggml.tokens" else vocab
        elif kind == gguf.GGUFValueType.STRING:
            writer.add_string(key, value)
        elif kind == gguf.GGUFValueType.BOOL:
            writer.add_bool(key, value)
        else:
            writer.add_uint32(key, int(value))
    return vocab


def write_random_gguf(shape: Shape, tokenizer_source: Path, path: Path, seed: int = 0) -> Path:
    """A BF16 GGUF of `shape` with N(0, 0.02) weights and unit norms; written once (kept if present)."""
    if path.exists():
        return path
    reader = gguf.GGUFReader(str(tokenizer_source))
    tmp = path.with_suffix(".partial")
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(tmp), "llama")
    vocab = _copy_tokenizer(reader, writer)
    writer.add_name(f"random llama {shape.name}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_block_count(shape.layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.mlp)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.hidden // shape.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(500000.0)
    writer.add_vocab_size(vocab)
    tensors = _tensors(shape, vocab)
    for name, dims in tensors:
        matrix = len(dims) == 2
        writer.add_tensor_info(name, dims, np.dtype(np.uint16 if matrix else np.float32),
                               int(np.prod(dims)) * (2 if matrix else 4),
                               gguf.GGMLQuantizationType.BF16 if matrix else gguf.GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for _name, dims in tqdm(tensors, desc=f"writing random {shape.name} GGUF", unit="tensor"):
        if len(dims) == 1:
            writer.write_tensor_data(np.ones(dims, dtype=np.float32))
            continue
        # bf16 = the top half of float32 (truncation is fine for random values)
        values = rng.standard_normal(dims, dtype=np.float32) * np.float32(0.02)
        writer.write_tensor_data((values.view(np.uint32) >> 16).astype(np.uint16))
    writer.close()
    tmp.rename(path)
    return path
