"""Pipeline parallelism: contiguous layer stages on consecutive ranks, activations passed with
send/recv in micro-batches so stages overlap, each stage owning the KV cache of its layers.

The last stage broadcasts its final hidden states (D wide, far narrower than the vocabulary) to
the whole pipeline; every rank then computes the same logits and samples the same tokens (SPMD).
Not for tensor splitting (tensor_parallel.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from miaotui.distributed.tensor_parallel import even_split
from miaotui.errors import MiaotuiError
from miaotui.models.llama import Transformer, causal_mask


class PipelineStage(Transformer):
    stage = 0
    stages = 1
    pp_ranks: list[int] = []
    pp_group = None
    total_layers = 0

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1

    def allocate_kv_cache(self, batch: int, max_len: int):
        return super().allocate_kv_cache(batch, max_len)  # config.num_layers is this stage's layer count

    def hidden_states(self, tokens, positions, kv_caches=None, cache_start=0, attn_mask=None):
        """This stage's layers over the batch in micro-batches of rows: [B, S] -> the last stage's
        final normed hidden states [B, S, D], broadcast to the whole pipeline (so every stage computes
        the same logits and samples the same tokens). kv_caches: this stage's layers only, either
        static (k, v) pairs [B, KV, T, hd] or paged views (the serving engine's)."""
        batch, seq = tokens.shape
        if attn_mask is None and seq > 1 and cache_start > 0:
            attn_mask = causal_mask(seq, cache_start, tokens.device)[None, None].expand(batch, -1, -1, -1)
        is_causal = attn_mask is None and seq > 1
        rows = self._micro_rows(batch)
        dtype, dim = self.dtype, self.config.hidden_size
        sends, outs = [], []
        for r0 in range(0, batch, rows):
            r1 = min(r0 + rows, batch)
            if self.first:
                x = self.embed_tokens(tokens[r0:r1])
            else:
                x = torch.empty(r1 - r0, seq, dim, dtype=dtype, device=tokens.device)
                dist.recv(x, src=self.pp_ranks[self.stage - 1], group=self.pp_group)
            cos, sin = self.rotary(positions[r0:r1], dtype)
            mask = None if attn_mask is None else attn_mask[r0:r1]
            for i, layer in enumerate(self.layers):
                cache = None if kv_caches is None else _rows(kv_caches[i], r0, r1)
                x = layer(x, cos, sin, cache, cache_start, mask, is_causal)
            if self.last:
                outs.append(self.norm(x))
            else:  # hand this micro-batch on and start the next one while it travels
                sends.append(dist.isend(x.contiguous(), dst=self.pp_ranks[self.stage + 1], group=self.pp_group))
        for s in sends:
            s.wait()
        hidden = torch.cat(outs) if self.last else torch.empty(batch, seq, dim, dtype=dtype, device=tokens.device)
        dist.broadcast(hidden, src=self.pp_ranks[-1], group=self.pp_group)
        return hidden

    def _micro_rows(self, batch: int) -> int:
        return max(1, -(-batch // self.stages))  # as many micro-batches as stages (or rows)


def _rows(cache, r0: int, r1: int):
    """One micro-batch's rows of a layer's cache: a static (k, v) pair, or a paged view."""
    if isinstance(cache, tuple):
        return cache[0][r0:r1], cache[1][r0:r1]
    return cache.rows(r0, r1)


def make_pipeline_stage(model: Transformer, stages: int, stage: int, pp_ranks: list[int], group) -> Transformer:
    """Keep only this stage's contiguous layers (in place; returns the model)."""
    from dataclasses import replace

    layers = model.config.num_layers
    if stages > layers:
        raise MiaotuiError(f"pipeline of {stages} stages needs at least {stages} layers (the model has {layers})")
    start, end = even_split(layers, stages, stage)
    model.layers = nn.ModuleList(list(model.layers)[start:end])
    model.full_layers = layers
    model.config = replace(model.config, num_layers=end - start)
    model.__class__ = type("PipelineStage" + model.__class__.__name__, (PipelineStage, model.__class__), {}) \
        if not isinstance(model, PipelineStage) else model.__class__
    model.stage, model.stages, model.pp_ranks, model.pp_group = stage, stages, pp_ranks, group
    model.layer_range = (start, end)
    return model
