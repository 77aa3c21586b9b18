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
    arch: str = "llama"  # the GGUF architecture: llama, or qwen3 (RMSNorm on each q and k head)
    head_dim: int = 0  # 0: hidden / heads
    # where the file is read: the 'llama' arch's q/k rows in llama.cpp's interleaved order are only
    # a permutation of random rows, so they are written as drawn

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden // self.heads


SHAPES = {
    # Llama 3.2 1B's body (hidden 2048, 16 layers, 32/8 heads, MLP 8192), the default model's vocabulary
    "1b": Shape("1b", 2048, 16, 32, 8, 8192, tied=True),
    # Llama 3.1 8B's body (hidden 4096, 32 layers, 32/8 heads, MLP 14336)
    "8b": Shape("8b", 4096, 32, 32, 8, 14336, tied=False),
    # Qwen3 1.7B's body (hidden 2048, 28 layers, 16/8 heads of 128, MLP 6144, q/k norms)
    "qwen3-1.7b": Shape("qwen3-1.7b", 2048, 28, 16, 8, 6144, tied=True, arch="qwen3", head_dim=128),
}


def _tensors(shape: Shape, vocab: int) -> list[tuple[str, tuple[int, ...]]]:
    """GGUF tensor names and numpy shapes ([out, in] for matrices)."""
    d, hd = shape.hidden, shape.head_size
    q, kv = shape.heads * hd, shape.kv_heads * hd
    out = [("token_embd.weight", (vocab, d)), ("output_norm.weight", (d,))]
    if not shape.tied:
        out.append(("output.weight", (vocab, d)))
    for i in range(shape.layers):
        out += [(f"blk.{i}.attn_norm.weight", (d,)), (f"blk.{i}.ffn_norm.weight", (d,)),
                (f"blk.{i}.attn_q.weight", (q, d)), (f"blk.{i}.attn_k.weight", (kv, d)),
                (f"blk.{i}.attn_v.weight", (kv, d)), (f"blk.{i}.attn_output.weight", (d, q)),
                (f"blk.{i}.ffn_gate.weight", (shape.mlp, d)), (f"blk.{i}.ffn_up.weight", (shape.mlp, d)),
                (f"blk.{i}.ffn_down.weight", (d, shape.mlp))]
        if shape.arch == "qwen3":
            out += [(f"blk.{i}.attn_q_norm.weight", (hd,)), (f"blk.{i}.attn_k_norm.weight", (hd,))]
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
    writer = gguf.GGUFWriter(str(tmp), shape.arch)
    vocab = _copy_tokenizer(reader, writer)
    writer.add_name(f"random {shape.arch} {shape.name}")
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    writer.add_block_count(shape.layers)
    writer.add_context_length(8192)
    writer.add_embedding_length(shape.hidden)
    writer.add_feed_forward_length(shape.mlp)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.kv_heads)
    writer.add_rope_dimension_count(shape.head_size)
    writer.add_key_length(shape.head_size)
    writer.add_value_length(shape.head_size)
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


def write_random_hf_dir(shape: Shape, tokenizer_source: Path, path: Path, seed: int = 0,
                        shard_bytes: int = 2 * 10**9) -> Path:
    """The same shape as a Hugging Face directory: bf16 safetensors shards of about `shard_bytes`
    with their index, config.json and the tokenizer of the GGUF `tokenizer_source`. One shard is in
    memory at a time; written once (kept if present)."""
    import json

    import torch
    from safetensors.torch import save_file

    from miaotui.loaders.gguf import load_gguf

    if (path / "model.safetensors.index.json").is_file():
        return path
    config, _, tokenizer = load_gguf(tokenizer_source, keep_quantized=True, float_bytes=0)
    vocab = config.vocab_size
    d, kv = shape.hidden, shape.hidden // shape.heads * shape.kv_heads
    names: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, d)), ("model.norm.weight", (d,))]
    if not shape.tied:
        names.append(("lm_head.weight", (vocab, d)))
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        names += [(p + "input_layernorm.weight", (d,)), (p + "post_attention_layernorm.weight", (d,)),
                  (p + "self_attn.q_proj.weight", (d, d)), (p + "self_attn.k_proj.weight", (kv, d)),
                  (p + "self_attn.v_proj.weight", (kv, d)), (p + "self_attn.o_proj.weight", (d, d)),
                  (p + "mlp.gate_proj.weight", (shape.mlp, d)), (p + "mlp.up_proj.weight", (shape.mlp, d)),
                  (p + "mlp.down_proj.weight", (d, shape.mlp))]
    tmp = path.with_name(path.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, dims in names:
        nbytes = int(np.prod(dims)) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, dims))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for s, shard in enumerate(tqdm(shards, desc=f"writing random {shape.name} HF shards", unit="shard")):
        file = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: (torch.ones(dims) if len(dims) == 1 else torch.randn(dims, generator=generator) * 0.02
                          ).to(torch.bfloat16) for name, dims in shard}
        save_file(tensors, str(tmp / file), metadata={"format": "pt"})
        weight_map |= {name: file for name, _ in shard}
        del tensors
    total = sum(int(np.prod(dims)) * 2 for _, dims in names)
    (tmp / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
        "intermediate_size": shape.mlp, "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads, "head_dim": d // shape.heads, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_position_embeddings": 8192, "tie_word_embeddings": shape.tied,
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": config.eos_token_ids, "torch_dtype": "bfloat16",
    }, indent=1))
    tokenizer.backend.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token, "chat_template": tokenizer.chat_template,
    }, indent=1, ensure_ascii=False))
    tmp.rename(path)
    return path
