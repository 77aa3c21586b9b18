"""Tensor-parallel serving: rank 0 owns the HTTP server and the scheduler; every engine step's
input tensors are broadcast to the other ranks, which run the same forward on their shards
(joining its all-reduces and all-gathers) over a paged KV cache of the same shape.

Not for scheduling (engine/llm_engine.py): workers never see requests, only steps.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from miaotui.engine.llm_engine import forward_step
from miaotui.engine.paged_cache import PagedKVCache

_STOP = "stop"


def broadcaster(group=None):
    """Rank 0's side: a callable the engine hands each step to (None = shut the workers down)."""

    def send(step: tuple | None) -> None:
        dist.broadcast_object_list([step if step is not None else _STOP], src=0, group=group)

    return send


def cache_shape_from_driver(num_blocks: int | None, block_size: int, group=None) -> tuple[int, int]:
    """Every rank uses rank 0's block count (shards may differ in size, the block tables may not)."""
    box = [(num_blocks, block_size)]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


@torch.inference_mode()
def run_worker(model, num_blocks: int, block_size: int, group=None) -> None:
    """Serve steps until rank 0 says stop (or dies: the broadcast then raises)."""
    cache = PagedKVCache(model.config, num_blocks, block_size, model.dtype, model.device)
    while True:
        box = [None]
        dist.broadcast_object_list(box, src=0, group=group)
        if box[0] == _STOP:
            return
        forward_step(model, cache, box[0])
