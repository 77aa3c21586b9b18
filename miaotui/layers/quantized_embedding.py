"""QuantEmbedding: an embedding table kept in its own integer bits (a GGUF file's token_embd), in
the few-row kernel's tile layout: a lookup dequantizes just the rows it gathers (embedding_q_tiles),
and a tied output head multiplies by the same tiles (QuantLinear's kernels). One copy in memory
instead of a bf16 table plus an int8 head copy. Not for choosing when to use it (models/transformer.py).
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.kernels import native_op
from miaotui.layers.quant_formats import QuantFormat, QuantizedTensor
from miaotui.layers.quantized_linear import QuantLinear


class QuantEmbedding(nn.Module):
    def __init__(self, table: QuantLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.table = table  # [V, D] as a linear layer: D in, V out (the tied head)
        self.dtype = dtype  # of the gathered rows (the model's compute dtype)

    @classmethod
    def from_quantized(cls, weight: QuantizedTensor, dtype: torch.dtype) -> QuantEmbedding | None:
        """The table [V, D] in its tiles, or None where this CPU has no tile kernel (the caller
        dequantizes it then)."""
        if dtype not in (torch.float32, torch.bfloat16) or native_op("embedding_q_tiles") is None:
            return None
        vocab, dim = weight.shape
        with torch.device("meta"):  # set_codes gives it its real tensors
            table = QuantLinear(dim, vocab, False, weight.fmt)
        table.set_codes(weight.codes, weight.scale, weight.zero, None, layout_only=True)
        return cls(table, dtype) if table.packed is None else None

    @classmethod
    def from_tiles(cls, vocab: int, dim: int, fmt: QuantFormat, tiles: tuple, dtype: torch.dtype
                   ) -> QuantEmbedding | None:
        """The table [V, D] from codes already in the tiles (QuantLinear.set_packed_tiles' arguments:
        a GGUF file's Q4_0 / Q4_1 / Q8_0 blocks), or None where the gather cannot run."""
        if dtype not in (torch.float32, torch.bfloat16) or native_op("embedding_q_tiles") is None:
            return None
        with torch.device("meta"):
            table = QuantLinear(dim, vocab, False, fmt)
        table.set_packed_tiles(*tiles)
        return cls(table, dtype)

    @property
    def num_embeddings(self) -> int:
        return self.table.out_features

    @property
    def embedding_dim(self) -> int:
        return self.table.in_features

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [...] -> [..., D] in self.dtype."""
        return self.table.weight_rows(tokens, self.dtype).view(*tokens.shape, -1)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.table.extra_repr()}"
