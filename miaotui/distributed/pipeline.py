"""Pipeline parallelism: contiguous layer stages on consecutive ranks, activations passed with
send/recv in micro-batches so stages overlap, each stage owning the KV cache of its layers.

The last stage broadcasts its final hidden states (D wide, far narrower than the vocabulary) to
the whole pipeline; every rank then computes the same logits and samples the same tokens (SPMD).
Not for tensor splitting (tensor_parallel.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
from torch import nn

from miaotui.distributed.tensor_parallel import even_split
from miaotui.distributed.wrapped_model import WrappedModel
from miaotui.errors import MiaotuiError
from miaotui.models.transformer import Transformer


class PipelineStage(WrappedModel):
    """One stage of a pipeline: a model (or tensor shard) cut down to its contiguous layers."""

    def __init__(self, model: Transformer | WrappedModel, stages: int, stage: int, pp_ranks: list[int],
                 group=None) -> None:
        layers = model.config.num_layers
        if stages > layers:
            raise MiaotuiError(f"pipeline of {stages} stages needs at least {stages} layers (the model has {layers})")
        start, end = even_split(layers, stages, stage)
        # config.num_layers is this stage's layer count: the KV cache holds these layers only.
        c = model.config
        super().__init__(model, replace(c, num_layers=end - start,
                                        layer_types=None if c.layer_types is None else c.layer_types[start:end],
                                        dense_layers=[d - start for d in c.dense_layers if start <= d < end]))
        self.transformer.layers = nn.ModuleList(list(self.transformer.layers)[start:end])
        self.stage, self.stages, self.pp_ranks, self.group = stage, stages, pp_ranks, group

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def hidden_states(self, tokens: torch.Tensor, positions: torch.Tensor, kv_views: list | None = None
                      ) -> torch.Tensor:
        """This stage's layers over the rows in micro-batches: [B, S] -> the last stage's final normed
        hidden states [B, S, D], broadcast to the whole pipeline (so every stage computes the same
        logits and samples the same tokens). An engine step is one packed row: one micro-batch."""
        net = self.transformer
        batch, seq = tokens.shape
        if kv_views is not None and batch != 1:
            raise ValueError("an engine step is one packed row")
        rows = max(1, -(-batch // self.stages))  # as many micro-batches as stages (or rows)
        dtype, dim = self.dtype, self.config.hidden_size
        sends, outs = [], []
        for r0 in range(0, batch, rows):
            r1 = min(r0 + rows, batch)
            if self.first:
                x = net.embed(tokens[r0:r1])
            else:
                x = torch.empty(r1 - r0, seq, dim, dtype=dtype, device=tokens.device)
                dist.recv(x, src=self.pp_ranks[self.stage - 1], group=self.group)
            ropes = net.rope_tables(positions[r0:r1], dtype)
            for i, layer in enumerate(net.layers):
                x = layer(x, *ropes[layer.rope_kind], None if kv_views is None else kv_views[i])
            if self.last:
                outs.append(net.norm(x))
            else:  # hand this micro-batch on and start the next one while it travels
                sends.append(dist.isend(x.contiguous(), dst=self.pp_ranks[self.stage + 1], group=self.group))
        for s in sends:
            s.wait()
        hidden = torch.cat(outs) if self.last else torch.empty(batch, seq, dim, dtype=dtype, device=tokens.device)
        dist.broadcast(hidden, src=self.pp_ranks[-1], group=self.group)
        return hidden
