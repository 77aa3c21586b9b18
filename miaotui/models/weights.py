"""Checkpoint tensors onto miaotui's module tree: the pieces every family's name map is made of
(take a tensor, stack the parts of a fused layer, the tensors outside the decoder layers).

Not for any one family's names (the model files in models/ hold those).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from miaotui.errors import MiaotuiError
from miaotui.layers.quant_formats import QuantizedTensor
from miaotui.loaders.gguf_quant import GGUFBlocks
from miaotui.models.config import ModelConfig

Tensor = torch.Tensor | QuantizedTensor | GGUFBlocks
Tensors = Mapping[str, Tensor]  # Hugging Face names -> tensors, each read when asked for
Named = Iterator[tuple[str, Tensor]]  # (miaotui module-tree name, tensor), one at a time


def take(tensors: Tensors, name: str) -> Tensor:
    if name not in tensors:
        raise MiaotuiError(f"checkpoint has no tensor '{name}'")
    return tensors[name]


def global_tensors(config: ModelConfig, hf: Tensors) -> Named:
    """The tensors outside the decoder layers: token embedding, final norm, untied output head."""
    yield "embed_tokens.weight", take(hf, "model.embed_tokens.weight")
    yield "norm.weight", take(hf, "model.norm.weight")
    if not config.tie_word_embeddings:
        yield "lm_head.weight", take(hf, "lm_head.weight")


def plus_one(tensor: Tensor) -> torch.Tensor:
    """A (1 + w)-style norm weight (Gemma) as the multiplier it is, computed in float32 as the
    reference does at run time."""
    return tensor.float() + 1.0


def cat_rows(parts: list[Tensor]) -> Tensor:
    """Stack matrices that become one fused layer ([N_i, K] -> [sum N_i, K]). Quantized parts stay
    quantized when they share one format; one layer holds one format, so parts in different formats
    (a Q4_K_M file's Q6_K v beside Q4_K q and k) become 8-bit codes in asymmetric groups of 16 or 32
    (QuantizedTensor.widened: exact); dequantized (float32) only where even that cannot hold them."""
    if all(isinstance(p, GGUFBlocks) for p in parts):
        stacked = GGUFBlocks.cat(parts)
        if stacked is not None:
            return stacked
    parts = [p.quantized() if isinstance(p, GGUFBlocks) else p for p in parts]
    if all(isinstance(p, QuantizedTensor) for p in parts):
        if len({p.fmt for p in parts}) > 1:
            group = 16 if any(p.fmt.group_size == 16 for p in parts) else 32
            widened = [p.widened(group) for p in parts]
            parts = widened if all(w is not None for w in widened) else parts
        orders = [p.input_order for p in parts]
        same_order = all(o is None for o in orders) or all(o is not None and torch.equal(o, orders[0]) for o in orders)
        if len({p.fmt for p in parts}) == 1 and same_order:
            return QuantizedTensor(parts[0].fmt, *(torch.cat([getattr(p, f) for p in parts])
                                                   for f in ("codes", "scale", "zero")),
                                   act_quant=all(p.act_quant for p in parts), input_order=orders[0])
    return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts])


def split_qkv_attention(config: ModelConfig, hf: Tensors, i: int, attn: str) -> Named:
    """Separate q/k/v projections (names under `attn`, e.g. 'model.layers.3.self_attn.') fused into
    one qkv_proj; o_proj; q/k norms where the family has them."""
    out = f"layers.{i}.self_attn."
    yield out + "qkv_proj.weight", cat_rows([take(hf, attn + f"{n}_proj.weight") for n in "qkv"])
    if config.qkv_bias:
        yield out + "qkv_proj.bias", cat_rows([take(hf, attn + f"{n}_proj.bias") for n in "qkv"])
    yield out + "o_proj.weight", take(hf, attn + "o_proj.weight")
    if config.qk_norm:
        yield out + "q_norm.weight", take(hf, attn + "q_norm.weight")
        yield out + "k_norm.weight", take(hf, attn + "k_norm.weight")


def gated_mlp(hf: Tensors, source: str, target: str, names: tuple[str, str, str] = ("gate_proj", "up_proj",
                                                                                     "down_proj")) -> Named:
    """A gated MLP (gate, up and down weights under `source`) as one gate_up_proj and a down_proj."""
    gate, up, down = names
    yield target + "gate_up_proj.weight", cat_rows([take(hf, f"{source}{gate}.weight"),
                                                     take(hf, f"{source}{up}.weight")])
    yield target + "down_proj.weight", take(hf, f"{source}{down}.weight")
