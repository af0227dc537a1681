"""Fixed-size KV blocks with ref counts, an O(1) LRU free list and a hash index (prefix cache).

A freed block keeps its hash and stays findable until it is reused (lazy eviction): the free
list is ordered least-recently-freed first, and allocation evicts from its front.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tandem.shared.block_hash import BlockHash


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()  # the tokens behind block_hash, re-checked on every hit


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be at least 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        # KV events for the router's prefix index: (kind, hashes), kind "stored" or "removed".
        self.events: list[tuple[str, list[BlockHash]]] | None = None

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def lookup(self, block_hash: BlockHash, token_ids: Sequence[int]) -> int | None:
        """The cached block holding exactly these tokens under this hash, or None."""
        block_id = self._cached.get(block_hash)
        if block_id is None or self.blocks[block_id].token_ids != tuple(token_ids):
            return None
        return block_id

    def allocate(self, num: int) -> list[int] | None:
        """`num` fresh blocks (ref 1), evicting cached ones LRU-first; None if too few are free."""
        if num > len(self._free):
            return None
        block_ids = []
        removed: list[BlockHash] = []
        for _ in range(num):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                removed.append(block.block_hash)
                self._evict(block)
            block.ref_count = 1
            block_ids.append(block_id)
        if removed and self.events is not None:
            self.events.append(("removed", removed))
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Take one more reference on each block (a prefix-cache hit or a shared n>1 prompt)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block. Pass a sequence's blocks tail-first so that its
        tail is evicted before its (more shareable) head."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise RuntimeError(f"block {block_id} freed more often than allocated")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None

    def cache_block(self, block_id: int, block_hash: BlockHash, token_ids: Sequence[int]) -> None:
        """Register a full, computed block under its hash (first writer wins)."""
        if not self.enable_caching or block_hash in self._cached:
            return
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = tuple(token_ids)
        self._cached[block_hash] = block_id
        if self.events is not None:
            self.events.append(("stored", [block_hash]))

    def count_evictable_needed(self, block_ids: Iterable[int]) -> int:
        """How many of these blocks sit on the free list (touching them takes them off it)."""
        return sum(1 for b in block_ids if self.blocks[b].ref_count == 0)

    def cached_hashes(self) -> list[BlockHash]:
        """Every hash in the prefix cache now (a snapshot for the router's index)."""
        return list(self._cached)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_used_blocks:
            return False
        if self._cached and self.events is not None:
            self.events.append(("removed", list(self._cached)))
        for block in self.blocks:
            if block.block_hash is not None:
                self._evict(block)
        return True

    def _evict(self, block: KVBlock) -> None:
        assert block.block_hash is not None
        if self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.token_ids = ()
