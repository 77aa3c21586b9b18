"""WrappedModel: the base of the distributed wrappers (tensor-parallel shard, pipeline stage), a
Transformer part behind the interface the engine and the tools use.

Not for how a model is split (tensor_parallel.py, pipeline.py).
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.models.config import ModelConfig
from miaotui.models.transformer import Transformer


class WrappedModel(nn.Module):
    def __init__(self, inner: nn.Module, config: ModelConfig) -> None:
        super().__init__()
        self.inner = inner  # a Transformer or another WrappedModel
        self.config = config  # this rank's shapes: its heads, its layers (the KV cache follows them)
        # the whole model's (a pipeline stage's config names its own layers only)
        self.whole_config = getattr(inner, "whole_config", None) or inner.config

    @property
    def transformer(self) -> Transformer:
        """The Transformer at the bottom: its embedding, layers, norm and rope."""
        return self.inner if isinstance(self.inner, Transformer) else self.inner.transformer

    @property
    def dtype(self) -> torch.dtype:
        return self.inner.dtype

    @property
    def device(self) -> torch.device:
        return self.inner.device

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, kv_views: list | None = None
                      ) -> torch.Tensor:
        return self.inner.hidden_states(tokens, positions, kv_views)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.inner.logits(hidden)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, kv_views: list | None = None,
                last_only: bool = False) -> torch.Tensor:
        hidden = self.hidden_states(tokens, positions, kv_views)
        return self.logits(hidden[:, -1] if last_only else hidden)

    def add_decode_weights(self, dtype: torch.dtype) -> None:
        self.transformer.add_decode_weights(dtype)

    def add_bf16_tiles(self) -> None:
        self.transformer.add_bf16_tiles()

    def num_parameters(self) -> int:
        return self.transformer.num_parameters()

    def weight_bytes(self) -> int:
        return self.transformer.weight_bytes()

    def decode_read_bytes(self) -> int:
        """This rank's share: the shard's or the stage's weights a one-row decode step reads."""
        return self.transformer.decode_read_bytes()
