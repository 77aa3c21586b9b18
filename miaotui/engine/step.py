"""The engine's unit of work: one forward pass over packed rows, as a named record (ModelStep),
how rows are packed into it, and how a model runs it. Distributed workers receive the same record,
or a Heartbeat / Shutdown message.

Not for choosing the rows (llm_engine.py) or for the KV tensors themselves (paged_cache.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from miaotui.engine.paged_cache import AttentionGroup, PagedKVCache


@dataclass(slots=True)
class PackRow:
    """One request's share of a step."""

    tokens: list[int]  # its new tokens
    start: int  # the position of the first
    table: list[int]  # its KV-cache blocks
    all_logits: bool = False  # logits at every new token (verifying drafts), else at the last one


@dataclass(slots=True)
class ModelStep:
    """What the scheduler hands the model runner (and every rank of a distributed model replica)."""

    tokens: torch.Tensor  # [1, N] the new tokens of all rows, packed on one axis
    positions: torch.Tensor  # [1, N]
    slots: torch.Tensor  # [N] flat KV-cache slot of each new token
    groups: list[AttentionGroup]  # rows with the same number of new tokens attend together
    logits_at: torch.Tensor  # [L] packed indices whose logits the step returns
    score_all: bool = False  # also return the logits at every packed position (prompt log-probs)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """To distributed workers while the engine is idle: still here (their collectives time out)."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    """To distributed workers: the engine has stopped; exit."""


WorkerMessage = ModelStep | Heartbeat | Shutdown


def pack_rows(rows: list[PackRow], block_size: int, score_all: bool = False
              ) -> tuple[ModelStep, list[int], list[slice]]:
    """-> (the step, each row's offset on the packed token axis, each row's slice of the logits
    run_model_step returns)."""
    bs = block_size
    # Plain Python lists, one tensor each at the end: per-row tensor ops cost ~1 ms a step at 16 rows.
    tokens: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    offsets: list[int] = []
    for row in rows:
        offsets.append(len(tokens))
        n, table = len(row.tokens), row.table
        tokens += row.tokens
        positions += range(row.start, row.start + n)
        slots += [table[p // bs] * bs + p % bs for p in range(row.start, row.start + n)]
    by_length: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        by_length.setdefault(len(row.tokens), []).append(i)
    groups = []
    for n, members in by_length.items():
        ends = torch.tensor([rows[r].start + n for r in members])  # [G] keys each row has after this step
        t = int(ends.max())
        width = (t + bs - 1) // bs
        table = torch.tensor([rows[r].table[:width] + [0] * (width - len(rows[r].table[:width]))
                              for r in members])  # [G, blocks]
        ctx = torch.arange(t)
        gather = (table[:, ctx // bs] * bs + ctx % bs) * (ctx[None, :] < ends[:, None])  # unused -> slot 0, masked
        lengths = (ends - n)[:, None] + torch.arange(1, n + 1)[None, :]  # [G, n] keys query i sees
        mask = (ctx[None, None, :] < lengths[:, :, None])[:, None]  # [G, 1, n, T]: key <= the query's position
        index = torch.tensor([offsets[r] for r in members])[:, None] + torch.arange(n)[None, :]
        groups.append(AttentionGroup(index, gather, mask, lengths))
    logits_at: list[int] = []
    row_logits: list[slice] = []
    for i, row in enumerate(rows):
        first, n = len(logits_at), len(row.tokens)
        logits_at += range(offsets[i], offsets[i] + n) if row.all_logits else [offsets[i] + n - 1]
        row_logits.append(slice(first, len(logits_at)))
    step = ModelStep(torch.tensor(tokens)[None], torch.tensor(positions)[None], torch.tensor(slots), groups,
                     torch.tensor(logits_at), score_all)
    return step, offsets, row_logits


def run_model_step(model, cache: PagedKVCache, step: ModelStep) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (logits at step.logits_at [L, V], and all logits [N, V] when step.score_all, else None).
    The same call on every rank of a model replica (tensor shards, pipeline stages)."""
    device = model.device
    groups = [AttentionGroup(g.token_index.to(device), g.gather.to(device), g.mask.to(device),
                             g.lengths.to(device)) for g in step.groups]
    views = cache.step_views(step.slots.to(device), groups)
    hidden = model.hidden_states(step.tokens.to(device), step.positions.to(device), views)[0]  # [N, D]
    logits_at = step.logits_at.to(device)
    # index_select, not tensor[index]: advanced indexing's generic kernel costs ~40 us a step here
    if step.score_all:
        all_logits = model.logits(hidden)
        return all_logits.index_select(0, logits_at), all_logits
    return model.logits(hidden.index_select(0, logits_at)), None
