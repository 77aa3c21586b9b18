"""KV-cache blocks: a fixed pool of fixed-size blocks, per-sequence block tables, and prefix
caching (a full block is found again by the hash of its tokens and of everything before it).

Blocks are reference-counted: sequences sharing a prompt prefix share its blocks. A freed block
that holds a full, hashed prefix stays findable until the pool needs it (least recently used
first). Block 0 is reserved as a scratch slot for padding writes and is never handed out; in a
table it also stands for a block given back because every layer's sliding window has passed it.
Not for the tensors (paged_cache.py) or for scheduling (llm_engine.py).
"""

from __future__ import annotations

from collections import OrderedDict, deque

from miaotui.errors import MiaotuiError


def block_hashes(tokens: list[int], block_size: int) -> list[int]:
    """Chained hashes of the full blocks of `tokens`: hash i covers tokens[: (i + 1) * block_size]."""
    hashes, parent = [], 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        hashes.append(parent)
    return hashes


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise MiaotuiError(f"the KV cache needs at least 2 blocks, got {num_blocks}: raise --kv-cache-mb")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.free: deque[int] = deque(range(1, num_blocks))  # never-used or unhashed free blocks
        self.block_hash: dict[int, int] = {}  # block -> hash of the prefix it completes
        self.cached: dict[int, int] = {}  # hash -> block
        self.evictable: OrderedDict[int, None] = OrderedDict()  # hashed blocks with ref 0, LRU first
        self.prefix_hits = 0  # tokens served from the prefix cache (for metrics)

    # -- capacity ---------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        return len(self.free) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Share of usable blocks held by live sequences."""
        return 1.0 - self.num_free / (self.num_blocks - 1)

    def blocks_needed(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # -- allocation -------------------------------------------------------------------------
    def _take(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash.pop(block)]
        else:
            raise MiaotuiError("KV cache is out of blocks")
        self.ref_count[block] = 1
        return block

    def match_prefix(self, tokens: list[int]) -> list[int]:
        """Blocks already holding the longest cached prefix of `tokens`, now referenced by the caller.
        At least one token is always left to compute (its logits are needed)."""
        if not self.prefix_caching:
            return []
        blocks = []
        for h in block_hashes(tokens[:len(tokens) - 1], self.block_size):
            block = self.cached.get(h)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            if self.ref_count[block] == 0:
                self.evictable.pop(block, None)
            self.ref_count[block] += 1
        self.prefix_hits += len(blocks) * self.block_size
        return blocks

    def can_grow(self, table: list[int], total_tokens: int) -> bool:
        return self.blocks_needed(total_tokens) - len(table) <= self.num_free

    def grow(self, table: list[int], total_tokens: int) -> None:
        """Append blocks to `table` until it can hold total_tokens."""
        need = self.blocks_needed(total_tokens) - len(table)
        if need > self.num_free:
            raise MiaotuiError("KV cache is out of blocks")
        for _ in range(need):
            table.append(self._take())

    def commit_full_blocks(self, table: list[int], tokens: list[int], computed: int) -> None:
        """Make the blocks whose tokens are all computed findable by later requests."""
        if not self.prefix_caching:
            return
        for i, h in enumerate(block_hashes(tokens[:computed], self.block_size)):
            block = table[i]
            if block == 0 or block in self.block_hash:  # (given back, or findable already)
                continue
            if h in self.cached:  # an identical block exists already: keep that one findable
                continue
            self.block_hash[block] = h
            self.cached[h] = block

    def drop_before(self, table: list[int], position: int) -> int:
        """Give back the blocks holding only positions before `position` (no query will attend to
        them again: they lie outside every layer's sliding window); their table entries become 0.
        A hashed block stays findable by prefix until the pool needs it. -> blocks given back."""
        dropped = 0
        for i in range(min(len(table), max(0, position) // self.block_size)):
            if table[i] != 0:
                self._release_block(table[i])
                table[i] = 0
                dropped += 1
        return dropped

    def release(self, table: list[int]) -> None:
        for block in table:
            if block != 0:
                self._release_block(block)
        table.clear()

    def _release_block(self, block: int) -> None:
        self.ref_count[block] -= 1
        if self.ref_count[block] == 0:
            if block in self.block_hash:
                self.evictable[block] = None
            else:
                self.free.append(block)
