"""Which GGUF type each tensor is written in: the single types, and the mixes llama.cpp users ask for by
name (Q3_K_M, Q4_K_M, Q5_K_M), chosen per tensor as llama-quantize chooses them (llama.cpp's
llama_tensor_get_type for these mixes: more bits for v and for a third of the down projections,
Q6_K or Q8_0 for the output head, the fallbacks for rows that are not whole 256-blocks).

Not for encoding blocks (gguf_kquants.py) or writing the file (gguf_export.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

T = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class ExportType:
    base: T  # the type of most matrices
    file_type: F
    mix: bool = False  # per-tensor choices as llama-quantize makes for this named mix
    embedding: T | None = None  # the token embedding's type where it differs from base (legacy 4-bit: Q8_0)


EXPORT_TYPES: dict[str, ExportType] = {
    "f32": ExportType(T.F32, F.ALL_F32), "f16": ExportType(T.F16, F.MOSTLY_F16),
    "bf16": ExportType(T.BF16, F.MOSTLY_BF16), "q8_0": ExportType(T.Q8_0, F.MOSTLY_Q8_0),
    "q4_0": ExportType(T.Q4_0, F.MOSTLY_Q4_0, embedding=T.Q8_0),
    "q4_1": ExportType(T.Q4_1, F.MOSTLY_Q4_1, embedding=T.Q8_0),
    "q5_0": ExportType(T.Q5_0, F.MOSTLY_Q5_0, embedding=T.Q8_0),
    "q5_1": ExportType(T.Q5_1, F.MOSTLY_Q5_1, embedding=T.Q8_0),
    "q3_k": ExportType(T.Q3_K, F.MOSTLY_Q3_K_S), "q4_k": ExportType(T.Q4_K, F.MOSTLY_Q4_K_S),
    "q5_k": ExportType(T.Q5_K, F.MOSTLY_Q5_K_S), "q6_k": ExportType(T.Q6_K, F.MOSTLY_Q6_K),
    "q3_k_m": ExportType(T.Q3_K, F.MOSTLY_Q3_K_M, mix=True), "q4_k_m": ExportType(T.Q4_K, F.MOSTLY_Q4_K_M, mix=True),
    "q5_k_m": ExportType(T.Q5_K, F.MOSTLY_Q5_K_M, mix=True),
}
_K_QUANTS = (T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
# llama.cpp's tensor_type_fallback: a row that is not whole blocks of the type takes this one
_FALLBACK = {T.Q2_K: T.Q4_0, T.Q3_K: T.Q4_0, T.Q4_K: T.Q5_0, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}


def block_size(qtype: T) -> int:
    return gguf.GGML_QUANT_SIZES[qtype][0]


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of layers that get more bits: the first and last eighth, every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def fallback(qtype: T, k: int) -> T:
    """The type a matrix with rows of k values is written in when `qtype`'s blocks do not divide k."""
    if k % block_size(qtype) == 0:
        return qtype
    other = _FALLBACK.get(qtype, qtype)
    return other if k % block_size(other) == 0 else T.F16


def matrix_type(kind: ExportType, role: str, layer: int, n_layers: int, k: int, n_experts: int,
                tied: bool) -> T:
    """The type of one matrix: role is its GGUF name inside 'blk.N.' without '.weight' ('attn_v',
    'ffn_down_exps'), or 'token_embd' / 'output'; k its row length."""
    base = kind.base
    if base in (T.F32, T.F16, T.BF16):
        return base
    if role == "output" or (role == "token_embd" and tied):
        if kind.embedding is not None:
            return fallback(kind.embedding, k)
        # llama.cpp: the head in Q6_K, or Q8_0 where the base type's blocks do not fit its rows
        if base not in _K_QUANTS:
            return fallback(base, k)
        return T.Q8_0 if k % block_size(base) else fallback(T.Q6_K, k)
    if role == "token_embd":
        return fallback(kind.embedding or base, k)
    chosen = base
    if kind.mix:
        chosen = _mix_choice(kind.file_type, role.removesuffix("_exps"), layer, n_layers, n_experts, base)
    return fallback(chosen, k)


def _mix_choice(mix: F, role: str, i: int, n: int, n_experts: int, base: T) -> T:
    if role == "attn_v":
        if n_experts == 8:
            return T.Q8_0
        if mix == F.MOSTLY_Q3_K_M:
            return T.Q5_K if i < 2 else T.Q4_K
        return T.Q6_K if use_more_bits(i, n) else base
    if role == "attn_k":
        return T.Q8_0 if n_experts == 8 else base
    if role == "ffn_down":
        if mix == F.MOSTLY_Q3_K_M:
            return T.Q5_K if i < n // 16 else T.Q4_K
        return T.Q6_K if use_more_bits(i, n) else base
    if role == "attn_output":
        if n_experts == 8:
            return T.Q5_K if mix in (F.MOSTLY_Q3_K_M, F.MOSTLY_Q4_K_M) else base
        return T.Q4_K if mix == F.MOSTLY_Q3_K_M else base
    if role == "attn_qkv":
        return {F.MOSTLY_Q3_K_M: T.Q4_K, F.MOSTLY_Q4_K_M: T.Q5_K, F.MOSTLY_Q5_K_M: T.Q6_K}[mix]
    return base
