"""Per-request block bookkeeping over the BlockPool: prefix-cache lookups, slot allocation,
registration of newly filled blocks, and freeing."""

from __future__ import annotations

from dataclasses import dataclass

from tandem.shared.block_hash import hash_block
from tandem.shared.engine.block_pool import BlockPool
from tandem.shared.engine.request import Request


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of those, tokens found in the cache


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.stats = PrefixCacheStats()
        self._num_registered: dict[str, int] = {}  # request_id -> blocks already in the hash index

    def update_block_hashes(self, request: Request) -> None:
        """Extend request.block_hashes over every full block of its tokens."""
        if not self.enable_caching:
            return
        bs = self.block_size
        tokens = request.all_token_ids
        hashes = request.block_hashes
        while (len(hashes) + 1) * bs <= len(tokens):
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tokens[i * bs : (i + 1) * bs], request.extra_keys))

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks of the longest cached prefix of `request` (not yet referenced). At least one
        token is always left to compute, since the next token needs its logits."""
        if not self.enable_caching or request.params.prompt_logprobs is not None:
            return []
        self.update_block_hashes(request)
        bs = self.block_size
        max_blocks = (request.num_tokens - 1) // bs
        hits: list[int] = []
        for i, block_hash in enumerate(request.block_hashes[:max_blocks]):
            block_id = self.pool.lookup(block_hash, request.all_token_ids[i * bs : (i + 1) * bs])
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_prefix_query(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.stats.queries += num_tokens
        self.stats.hits += num_hit_tokens

    def can_allocate(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        return self._num_needed(request, num_new_tokens, cached_blocks) <= self.pool.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int, cached_blocks: list[int] = ()) -> bool:
        """Reserve blocks for `num_new_tokens` more tokens after the computed ones (and take the
        prefix-cache hits `cached_blocks`, which then count as computed). False: nothing changed."""
        if not self.can_allocate(request, num_new_tokens, cached_blocks):
            return False
        if cached_blocks:
            self.pool.touch(cached_blocks)
            request.block_ids.extend(cached_blocks)
            request.num_computed_tokens += len(cached_blocks) * self.block_size
            self._num_registered[request.request_id] = len(request.block_ids)
        num_required = self._num_blocks_for(request.num_computed_tokens + num_new_tokens)
        new_blocks = self.pool.allocate(num_required - len(request.block_ids))
        assert new_blocks is not None  # checked by can_allocate
        request.block_ids.extend(new_blocks)
        return True

    def share_prefix(self, child: Request, block_ids: list[int]) -> None:
        """An n>1 child takes references on its parent's full prompt blocks."""
        self.pool.touch(block_ids)
        child.block_ids = list(block_ids)
        child.num_computed_tokens = len(block_ids) * self.block_size
        self._num_registered[child.request_id] = len(block_ids)

    def cache_computed_blocks(self, request: Request) -> None:
        """Register the blocks that are now full and computed in the hash index."""
        if not self.enable_caching:
            return
        self.update_block_hashes(request)
        bs = self.block_size
        start = self._num_registered.get(request.request_id, 0)
        end = min(request.num_computed_tokens // bs, len(request.block_hashes))
        for i in range(start, end):
            tokens = request.all_token_ids[i * bs : (i + 1) * bs]
            self.pool.cache_block(request.block_ids[i], request.block_hashes[i], tokens)
        if end > start:
            self._num_registered[request.request_id] = end

    def free(self, request: Request) -> None:
        self.pool.free(reversed(request.block_ids))
        request.block_ids = []
        self._num_registered.pop(request.request_id, None)

    def _num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _num_needed(self, request: Request, num_new_tokens: int, cached_blocks) -> int:
        num_computed = request.num_computed_tokens + len(cached_blocks) * self.block_size
        num_new_blocks = self._num_blocks_for(num_computed + num_new_tokens) - len(request.block_ids)
        num_new_blocks -= len(cached_blocks)
        return max(num_new_blocks, 0) + self.pool.count_evictable_needed(cached_blocks)
