"""A mixture-of-experts MLP (Mixtral, Qwen3-MoE): a router picks the top-k of E gated MLPs per
token and sums their outputs, weighted by the router's softmax (renormalised over the k picked
where the family does). Each expert is an ordinary GatedMLP, so quantization packs, pruning scores
and tensor parallelism splits it like any other MLP.

Not for load balancing or training the router (inference and post-training compression only).
"""

from __future__ import annotations

import torch
from torch import nn

from miaotui.layers.linear import make_linear
from miaotui.layers.mlp import GatedMLP


class MoE(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int,
                 normalize: bool, act: str = "silu") -> None:
        super().__init__()
        self.top_k, self.normalize = top_k, normalize
        self.router = make_linear(hidden_size, num_experts, False)  # [D -> E] scores
        self.experts = nn.ModuleList(GatedMLP(hidden_size, intermediate_size, act) for _ in range(num_experts))

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [N, D] -> (expert ids [N, k], weights [N, k] in x's dtype)."""
        probs = self.router(x).float().softmax(dim=-1)  # [N, E], float32 as the references do
        weights, ids = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, D]
        ids, weights = self.route(flat)
        out = torch.zeros_like(flat)
        # one matmul per expert over the tokens routed to it (decode: k experts run, the rest are skipped)
        hit = torch.bincount(ids.reshape(-1), minlength=len(self.experts)).tolist()
        for e, expert in enumerate(self.experts):
            if hit[e] == 0:
                continue
            rows, slot = (ids == e).nonzero(as_tuple=True)  # [n_e] tokens and which of their k picks
            out.index_add_(0, rows, expert(flat.index_select(0, rows)) * weights[rows, slot, None])
        return out.view(x.shape)
