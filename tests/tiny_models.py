"""Tiny random-weight Llama-family checkpoints, written the way real ones are (HF directory, GGUF).

Not for quality: these models are noise; they pin loading, numerics and generation mechanics.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = [
    "The quick brown fox jumps over the lazy dog. Once upon a time there was a model.",
    "Large language models run fast when their weights are small. 秒推 means inference in seconds.",
    "你好，世界！模型推理。 Emoji: 😀🚀✨ Numbers 0123456789 and symbols #$%&*()[]{}",
    "def main():\n    print('hello world')\n\nHello, hello, HELLO. what is the capital of France? Paris.",
]


def train_tokenizer(vocab_size: int = 420) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS * 20, trainer)
    return tok


WINDOW = 8  # the families' sliding windows in tests: shorter than the test sequences
# family -> (config class, model class, config fields): each family's own features switched on
FAMILY_CONFIGS = {
    "mistral_window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=WINDOW)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(
        head_dim=32, rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                                      "rope_theta": 10000.0})),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=48, norm_topk_prob=True)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=8, num_experts_per_tok=2,
                                                            sliding_window=WINDOW)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=32, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0, tie_word_embeddings=True, layer_types=["sliding_attention", "full_attention"])),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        head_dim=32, sliding_window=WINDOW, query_pre_attn_scalar=32, tie_word_embeddings=True,
        num_hidden_layers=6,  # 5 sliding layers, 1 global
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}})),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(
        pad_token_id=0, sliding_window=WINDOW, partial_rotary_factor=0.5, max_position_embeddings=256,
        original_max_position_embeddings=64,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64,
                         "short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 5.0, 8.0]})),
}


def write_hf_dir(directory: Path, arch: str = "llama", tie: bool = True, seed: int = 0,
                 rope_scaling: dict | None = None, vocab_size: int = 420, **shape: int) -> Path:
    """A tiny checkpoint saved by transformers itself, plus a trained byte-level BPE tokenizer.
    shape: config fields to override (hidden_size=128 gives 32-wide heads, as the native kernels want)."""
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(vocab_size)
    tok.save(str(directory / "tokenizer.json"))
    common = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
                  tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2) | shape
    if arch == "llama":
        config = transformers.LlamaConfig(rope_theta=10000.0, rope_scaling=rope_scaling, **common)
        cls = transformers.LlamaForCausalLM
    elif arch == "qwen2":
        config = transformers.Qwen2Config(rope_theta=10000.0, **common)
        cls = transformers.Qwen2ForCausalLM
    elif arch == "mistral":
        config = transformers.MistralConfig(rope_theta=10000.0, sliding_window=None, **common)
        cls = transformers.MistralForCausalLM
    elif arch in FAMILY_CONFIGS:
        config_cls, cls, extra = FAMILY_CONFIGS[arch]
        config_cls, cls = getattr(transformers, config_cls), getattr(transformers, cls)
        config = config_cls(**(common | extra | shape))
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = cls(config)
    with torch.no_grad():  # random norms and biases so every tensor matters
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                # (Gemma's norms scale by 1 + w: their w lie around 0)
                centre = 0.0 if arch.startswith("gemma") or "norm" not in name else 1.0
                p.copy_(centre + 0.1 * torch.randn_like(p))
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }))
    return directory


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutation (rotate-half -> interleaved pairs).
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf_from_hf_dir(hf_dir: Path, path: Path, quant: dict[str, gguf.GGMLQuantizationType] | None = None,
                           arch: str = "llama", truncate_to: int | None = None) -> Path:
    """Convert a tiny HF checkpoint to GGUF as llama.cpp does; `quant` maps tensor-name suffixes
    (e.g. 'attn_q.weight') to a GGML type (default F32)."""
    from safetensors.numpy import load_file

    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors = load_file(hf_dir / "model.safetensors")
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIAL_TOKENS else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(vocab["<|im_start|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
             "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
             "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
             "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
             "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
             "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
    for hf_name, array in tensors.items():
        if hf_name in names:
            name = names[hf_name]
        else:
            _, _, idx, rest = hf_name.split(".", 3)
            name = f"blk.{idx}.{layer[rest]}"
        array = array.astype(np.float32)
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            array = _permute_rope_rows(array, heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            array = _permute_rope_rows(array, kv_heads)
        qtype = next((q for suffix, q in (quant or {}).items() if name.endswith(suffix)), None)
        if qtype is None or qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(name, array)
        elif qtype in K_QUANTIZERS:
            w.add_tensor(name, K_QUANTIZERS[qtype](array), raw_dtype=qtype)
        else:
            w.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if truncate_to is not None:
        with open(path, "r+b") as f:
            f.truncate(truncate_to)
    return path


# K-quants, which the gguf package reads but does not write: plain round-to-nearest quantizers
# (llama-quantize searches its scales; the block layouts are the same, checked against gguf's
# dequantize below).
def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)


def _k_quantize_asymmetric(x: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """[..., 256] -> (d, dmin, 12 packed 6-bit scale/min bytes) header [..., 16] and codes [..., 256]:
    8 groups of 32, w = d sc q - dmin m (Q4_K, Q5_K)."""
    top = 2 ** bits - 1
    g = x.reshape(*x.shape[:-1], 8, 32)
    lo, hi = np.minimum(g.min(-1), 0), g.max(-1)
    scale, low = (hi - lo) / top, -lo
    d = np.maximum(scale.max(-1), 1e-8) / 63
    dmin = np.maximum(low.max(-1), 1e-8) / 63
    d, dmin = d.astype(np.float16).astype(np.float32), dmin.astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[..., None]), 1, 63).astype(np.uint8)
    m = np.clip(np.round(low / dmin[..., None]), 0, 63).astype(np.uint8)
    q = np.clip(np.round((g + (dmin[..., None] * m)[..., None]) / (d[..., None] * sc)[..., None]), 0, top)
    packed = np.concatenate([sc[..., :4] | ((sc[..., 4:] >> 4) << 6), m[..., :4] | ((m[..., 4:] >> 4) << 6),
                             (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], axis=-1)
    header = np.concatenate([_f16_bytes(d), _f16_bytes(dmin), packed], axis=-1)
    return header, q.astype(np.uint8).reshape(*x.shape)


def _k_nibbles(q: np.ndarray) -> np.ndarray:
    """codes [..., 256] < 16 -> 128 bytes: per 64 values, low nibbles the first 32, high the next 32."""
    c = q.reshape(*q.shape[:-1], 4, 2, 32)
    return (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*q.shape[:-1], 128)


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    x = array.reshape(array.shape[0], -1, 256)
    header, q = _k_quantize_asymmetric(x, 4)
    return np.concatenate([header, _k_nibbles(q)], axis=-1).reshape(array.shape[0], -1)


def quantize_q5_k(array: np.ndarray) -> np.ndarray:
    x = array.reshape(array.shape[0], -1, 256)
    header, q = _k_quantize_asymmetric(x, 5)
    high = (q >> 4).reshape(*q.shape[:-1], 8, 32)  # bit j of byte l: value 32 j + l
    qh = (high << np.arange(8, dtype=np.uint8)[:, None]).sum(-2).astype(np.uint8)
    return np.concatenate([header, qh, _k_nibbles(q & 15)], axis=-1).reshape(array.shape[0], -1)


def quantize_q6_k(array: np.ndarray) -> np.ndarray:
    """16 groups of 16 per 256, w = d sc (q - 32), sc int8, q 6-bit: ql 128, qh 64, scales 16, d."""
    x = array.reshape(array.shape[0], -1, 256)
    g = x.reshape(*x.shape[:-1], 16, 16)
    scale = np.abs(g).max(-1) / 31
    d = (np.maximum(scale.max(-1), 1e-8) / 127).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[..., None]), 1, 127).astype(np.int8)
    q = (np.clip(np.round(g / (d[..., None] * sc)[..., None]), -32, 31) + 32).astype(np.uint8).reshape(x.shape)
    v = q.reshape(*q.shape[:-1], 2, 4, 32)  # [half n, quarter t, l]: value 128 n + 32 t + l
    ql = np.concatenate([(v[..., 0, :] & 15) | ((v[..., 2, :] & 15) << 4),
                         (v[..., 1, :] & 15) | ((v[..., 3, :] & 15) << 4)], axis=-1)  # [.., 2, 64]
    qh = (v[..., 0, :] >> 4) | ((v[..., 1, :] >> 4) << 2) | ((v[..., 2, :] >> 4) << 4) | ((v[..., 3, :] >> 4) << 6)
    blocks = np.concatenate([ql.reshape(*q.shape[:-1], 128), qh.reshape(*q.shape[:-1], 64), sc.view(np.uint8),
                             _f16_bytes(d)], axis=-1)
    return blocks.reshape(array.shape[0], -1)


def _two_bit_planes(q: np.ndarray) -> np.ndarray:
    """codes [..., 256] < 4 -> 64 bytes: value 128 h + 32 j + l in bits 2j of byte 32 h + l (Q2_K, Q3_K)."""
    v = q.reshape(*q.shape[:-1], 2, 4, 32).astype(np.uint8)
    return (v << (2 * np.arange(4, dtype=np.uint8))[:, None]).sum(-2).astype(np.uint8).reshape(*q.shape[:-1], 64)


def quantize_q3_k(array: np.ndarray) -> np.ndarray:
    """16 groups of 16 per 256, w = d (s - 32) q, q in -4..3, s 6-bit: hmask 32, qs 64, scales 12, d."""
    x = array.reshape(array.shape[0], -1, 256)
    g = x.reshape(*x.shape[:-1], 16, 16)
    scale = np.abs(g).max(-1) / 4
    d = (np.maximum(scale.max(-1), 1e-8) / 31).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[..., None]), 1, 31).astype(np.uint8)  # stored s = sc + 32
    q = (np.clip(np.round(g / (d[..., None] * sc)[..., None]), -4, 3) + 4).astype(np.uint8).reshape(x.shape)
    high = (q >> 2).reshape(*q.shape[:-1], 2, 4, 32)  # bit 4 h + j of hmask byte l: value 128 h + 32 j + l
    hmask = (high << (4 * np.arange(2, dtype=np.uint8)[:, None, None] + np.arange(4, dtype=np.uint8)[:, None])
             ).sum((-3, -2)).astype(np.uint8)
    s = sc + 32
    packed = np.concatenate([(s[..., 0:4] & 15) | ((s[..., 8:12] & 15) << 4),
                             (s[..., 4:8] & 15) | ((s[..., 12:16] & 15) << 4),
                             (s[..., 0:4] >> 4) | ((s[..., 4:8] >> 4) << 2) | ((s[..., 8:12] >> 4) << 4)
                             | ((s[..., 12:16] >> 4) << 6)], axis=-1)
    blocks = np.concatenate([hmask, _two_bit_planes(q & 3), packed, _f16_bytes(d)], axis=-1)
    return blocks.reshape(array.shape[0], -1)


def quantize_q2_k(array: np.ndarray) -> np.ndarray:
    """16 groups of 16 per 256, w = d sc q - dmin m, sc and m 4-bit, q 2-bit: scales 16, qs 64, d, dmin."""
    x = array.reshape(array.shape[0], -1, 256)
    g = x.reshape(*x.shape[:-1], 16, 16)
    lo, hi = np.minimum(g.min(-1), 0), g.max(-1)
    scale, low = (hi - lo) / 3, -lo
    d = (np.maximum(scale.max(-1), 1e-8) / 15).astype(np.float16).astype(np.float32)
    dmin = (np.maximum(low.max(-1), 1e-8) / 15).astype(np.float16).astype(np.float32)
    sc = np.clip(np.round(scale / d[..., None]), 1, 15).astype(np.uint8)
    m = np.clip(np.round(low / dmin[..., None]), 0, 15).astype(np.uint8)
    q = np.clip(np.round((g + (dmin[..., None] * m)[..., None]) / (d[..., None] * sc)[..., None]), 0, 3)
    blocks = np.concatenate([sc | (m << 4), _two_bit_planes(q.astype(np.uint8).reshape(x.shape)), _f16_bytes(d),
                             _f16_bytes(dmin)], axis=-1)
    return blocks.reshape(array.shape[0], -1)


K_QUANTIZERS = {gguf.GGMLQuantizationType.Q4_K: quantize_q4_k, gguf.GGMLQuantizationType.Q5_K: quantize_q5_k,
                gguf.GGMLQuantizationType.Q6_K: quantize_q6_k, gguf.GGMLQuantizationType.Q3_K: quantize_q3_k,
                gguf.GGMLQuantizationType.Q2_K: quantize_q2_k}
