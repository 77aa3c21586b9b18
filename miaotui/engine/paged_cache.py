"""The paged KV cache's tensors, and the per-step view attention layers read and write through.

Pool layout per layer: K and V [num_blocks, block_size, kv_heads, head_dim], so a token's slot
is block * block_size + offset in the flattened [slots, kv_heads, head_dim] view. For a step,
each row of the batch has a block table; keys are gathered into [B, kv_heads, T, head_dim]
(T = the longest context in the step) for SDPA, with a mask that hides other rows' slots and
future positions. Not for block bookkeeping (block_manager.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.models.config import ModelConfig


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype) -> int:
    return 2 * config.num_layers * config.kv_size * torch.finfo(dtype).bits // 8


class PagedKVCache:
    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.block_size = block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.num_layers)]

    def step_views(self, slots: torch.Tensor, gather: torch.Tensor) -> list[PagedLayerView]:
        """slots: [B, S] flat slot of each new token (scratch slots for padding);
        gather: [B, T] flat slot of each key position each row attends over."""
        return [PagedLayerView(k, v, slots, gather) for k, v in zip(self.keys, self.values, strict=True)]


@dataclass(slots=True)
class PagedLayerView:
    k_pool: torch.Tensor  # [blocks, block_size, KV, hd]
    v_pool: torch.Tensor
    slots: torch.Tensor  # [B, S]
    gather: torch.Tensor  # [B, T]

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: [B, KV, S, hd] new entries -> all keys/values of each row: [B, KV, T, hd]."""
        kv, hd = self.k_pool.shape[2], self.k_pool.shape[3]
        k_flat, v_flat = self.k_pool.view(-1, kv, hd), self.v_pool.view(-1, kv, hd)
        idx = self.slots.reshape(-1)
        k_flat[idx] = k.transpose(1, 2).reshape(-1, kv, hd).to(k_flat.dtype)
        v_flat[idx] = v.transpose(1, 2).reshape(-1, kv, hd).to(v_flat.dtype)
        b, t = self.gather.shape
        keys = k_flat[self.gather.reshape(-1)].view(b, t, kv, hd).transpose(1, 2)
        values = v_flat[self.gather.reshape(-1)].view(b, t, kv, hd).transpose(1, 2)
        return keys, values

    def rows(self, r0: int, r1: int) -> PagedLayerView:
        """The view of batch rows [r0, r1) (a pipeline micro-batch): same pools, fewer rows."""
        return PagedLayerView(self.k_pool, self.v_pool, self.slots[r0:r1], self.gather[r0:r1])
