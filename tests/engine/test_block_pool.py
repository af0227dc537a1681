"""BlockPool and KVCacheManager: allocation, ref counts, the LRU free list, the prefix cache."""

from __future__ import annotations

import pytest

from tandem.shared.block_hash import hash_block, hash_block_chain
from tandem.shared.engine.block_pool import BlockPool
from tandem.shared.engine.kv_cache_manager import KVCacheManager
from tandem.shared.engine.request import Request
from tandem.shared.sampling_params import SamplingParams

BS = 4


def make_request(request_id: str, tokens: list[int], **params) -> Request:
    return Request(request_id, list(tokens), SamplingParams(**params))


def compute_all(kv: KVCacheManager, request: Request) -> None:
    """What one step does for a request: reserve blocks for all its tokens, 'compute' them, and
    register the full ones."""
    num_new = request.num_tokens - request.num_computed_tokens
    assert kv.allocate_slots(request, num_new)
    request.num_computed_tokens += num_new
    kv.cache_computed_blocks(request)


def admit(kv: KVCacheManager, request: Request) -> list[int]:
    """The scheduler's admission of a new request: prefix lookup, then slots for the rest."""
    cached = kv.find_cached_prefix(request)
    num_new = request.num_tokens - len(cached) * BS
    assert kv.allocate_slots(request, num_new, cached)
    kv.record_prefix_query(request.num_prompt_tokens, len(cached) * BS)
    request.num_computed_tokens += num_new
    kv.cache_computed_blocks(request)
    return cached


def check_pool_consistent(pool: BlockPool) -> None:
    free = set(pool._free)
    for block in pool.blocks:
        assert block.ref_count >= 0
        assert (block.ref_count == 0) == (block.block_id in free), block
    for block_hash, block_id in pool._cached.items():
        assert pool.blocks[block_id].block_hash == block_hash


# --- BlockPool ------------------------------------------------------------------------------------


def test_pool_rejects_zero_blocks():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_allocate_until_exhausted_returns_none():
    pool = BlockPool(5)
    a = pool.allocate(3)
    assert a is not None and len(a) == 3 and len(set(a)) == 3
    assert pool.num_used_blocks == 3 and pool.num_free_blocks == 2
    assert pool.allocate(3) is None  # too few: nothing taken
    assert pool.num_free_blocks == 2
    b = pool.allocate(2)
    assert b is not None and not set(a) & set(b)
    assert pool.allocate(1) is None
    assert pool.allocate(0) == []
    assert pool.usage == 1.0
    pool.free(a + b)
    assert pool.num_used_blocks == 0
    check_pool_consistent(pool)


def test_double_free_raises():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([b])
    with pytest.raises(RuntimeError):
        pool.free([1])  # never allocated
    check_pool_consistent(pool)


def test_touch_and_free_ref_counts():
    pool = BlockPool(3)
    (b,) = pool.allocate(1)
    pool.touch([b])
    assert pool.blocks[b].ref_count == 2
    pool.free([b])
    assert pool.blocks[b].ref_count == 1 and pool.num_used_blocks == 1
    pool.free([b])
    assert pool.blocks[b].ref_count == 0 and pool.num_used_blocks == 0
    # touching a free (cached) block takes it off the free list
    pool.touch([b])
    assert pool.num_used_blocks == 1 and pool.num_free_blocks == 2
    assert pool.allocate(3) is None
    assert b not in pool.allocate(2)
    check_pool_consistent(pool)


def test_lru_eviction_order():
    pool = BlockPool(6)
    first = pool.allocate(3)
    second = pool.allocate(3)
    for i, b in enumerate(first + second):
        pool.cache_block(b, hash_block(None, [i]), [i])
    pool.free(reversed(first))  # a sequence frees tail-first
    pool.free(reversed(second))
    # least recently freed first: first's tail, ..., first's head, then second's tail ...
    expected = list(reversed(first)) + list(reversed(second))
    got = [pool.allocate(1)[0] for _ in range(6)]
    assert got == expected


def test_never_used_blocks_go_before_cached_ones():
    pool = BlockPool(4)
    (b,) = pool.allocate(1)
    h = hash_block(None, [1, 2])
    pool.cache_block(b, h, [1, 2])
    pool.free([b])
    fresh = pool.allocate(3)
    assert b not in fresh
    assert pool.lookup(h, [1, 2]) == b  # still cached
    pool.free(fresh)


def test_freed_cached_block_findable_until_reused():
    pool = BlockPool(2)
    pool.events = []
    (b,) = pool.allocate(1)
    h = hash_block(None, [7, 8])
    assert pool.lookup(h, [7, 8]) is None
    pool.cache_block(b, h, [7, 8])
    assert pool.lookup(h, [7, 8]) == b
    pool.free([b])
    assert pool.lookup(h, [7, 8]) == b  # lazy eviction: still there
    got = pool.allocate(2)  # reuses (evicts) it
    assert b in got
    assert pool.lookup(h, [7, 8]) is None
    assert pool.blocks[b].block_hash is None
    assert pool.events == [("stored", [h]), ("removed", [h])]
    pool.free(got)


def test_lookup_rechecks_tokens():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    h = hash_block(None, [1, 2, 3, 4])
    pool.cache_block(b, h, [1, 2, 3, 4])
    assert pool.lookup(h, [1, 2, 3, 4]) == b
    assert pool.lookup(h, [1, 2, 3, 5]) is None  # a hash collision must not return wrong KV
    assert pool.lookup(h, (1, 2, 3, 4)) == b
    pool.free([b])


def test_cache_block_first_writer_wins_and_caching_off():
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    h = hash_block(None, [1])
    pool.cache_block(a, h, [1])
    pool.cache_block(b, h, [1])
    assert pool.lookup(h, [1]) == a
    assert pool.blocks[b].block_hash is None
    # evicting the duplicate must not drop the original's index entry
    pool.free([b])
    pool.allocate(1)  # a never-used block
    pool.free([a])
    assert pool.lookup(h, [1]) == a

    off = BlockPool(2, enable_caching=False)
    (c,) = off.allocate(1)
    off.cache_block(c, h, [1])
    assert off.lookup(h, [1]) is None


def test_reset_prefix_cache():
    pool = BlockPool(2)
    (b,) = pool.allocate(1)
    h = hash_block(None, [3])
    pool.cache_block(b, h, [3])
    assert pool.reset_prefix_cache() is False  # refused while in use
    pool.free([b])
    assert pool.reset_prefix_cache() is True
    assert pool.lookup(h, [3]) is None
    check_pool_consistent(pool)


# --- KVCacheManager -------------------------------------------------------------------------------


def test_block_hashes_cover_full_blocks_only():
    kv = KVCacheManager(8, BS)
    r = make_request("a", list(range(10)))
    kv.update_block_hashes(r)
    assert r.block_hashes == hash_block_chain(list(range(10)), BS)
    assert len(r.block_hashes) == 2
    r.append_output_token(10)
    r.append_output_token(11)
    kv.update_block_hashes(r)
    assert r.block_hashes == hash_block_chain(list(range(12)), BS)


def test_allocate_slots_counts_blocks():
    kv = KVCacheManager(4, BS)
    r = make_request("a", list(range(6)))
    assert kv.allocate_slots(r, 6)
    assert len(r.block_ids) == 2
    r.num_computed_tokens = 6
    assert kv.allocate_slots(r, 2)  # fills the second block: nothing new
    assert len(r.block_ids) == 2
    r.num_computed_tokens = 8
    assert kv.allocate_slots(r, 1)
    assert len(r.block_ids) == 3
    r.num_computed_tokens = 9
    other = make_request("b", [1] * 8)
    assert not kv.can_allocate(other, 8)
    assert not kv.allocate_slots(other, 8)  # nothing changed on failure
    assert other.block_ids == [] and kv.pool.num_used_blocks == 3
    kv.free(r)
    assert r.block_ids == [] and kv.pool.num_used_blocks == 0


def test_prefix_hit_shares_blocks_and_counts():
    kv = KVCacheManager(16, BS)
    prompt = list(range(100, 113))  # 13 tokens: 3 full blocks
    a = make_request("a", prompt)
    assert admit(kv, a) == []
    b = make_request("b", prompt + [1, 2, 3])
    hits = admit(kv, b)
    assert hits == a.block_ids[:3]
    assert b.block_ids[:3] == a.block_ids[:3]
    assert b.block_ids[3] != a.block_ids[3]
    for block_id in hits:
        assert kv.pool.blocks[block_id].ref_count == 2
    assert kv.stats.queries == 13 + 16
    assert kv.stats.hits == 12
    assert kv.stats.hits <= kv.stats.queries
    kv.free(a)
    for block_id in hits:
        assert kv.pool.blocks[block_id].ref_count == 1
    kv.free(b)
    assert kv.pool.num_used_blocks == 0
    check_pool_consistent(kv.pool)


def test_cache_hit_leaves_one_token_to_compute():
    kv = KVCacheManager(16, BS)
    prompt = list(range(8))  # exactly two full blocks
    a = make_request("a", prompt)
    admit(kv, a)
    assert len(a.block_hashes) == 2
    kv.free(a)
    b = make_request("b", prompt)
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 1  # the last block is recomputed: its last token's logits are needed
    assert b.num_tokens - len(hits) * BS >= 1
    c = make_request("c", prompt[:1])
    assert kv.find_cached_prefix(c) == []


def test_prefix_hit_on_freed_blocks_and_eviction():
    kv = KVCacheManager(4, BS)
    prompt = list(range(9))
    a = make_request("a", prompt)
    admit(kv, a)
    a_blocks = list(a.block_ids)
    kv.free(a)
    assert kv.pool.num_used_blocks == 0
    b = make_request("b", prompt)
    hits = kv.find_cached_prefix(b)
    assert hits == a_blocks[:2]
    # the freed-but-cached hits count against the free blocks they take off the free list
    assert kv.allocate_slots(b, 1, hits)
    assert kv.pool.num_used_blocks == 3
    kv.free(b)
    # churn through all blocks: the cache entries are evicted, lookups miss
    filler = make_request("f", [50 + i for i in range(16)])
    compute_all(kv, filler)
    kv.free(filler)
    filler2 = make_request("g", [90 + i for i in range(16)])
    compute_all(kv, filler2)
    assert kv.find_cached_prefix(make_request("c", prompt)) == []
    kv.free(filler2)
    check_pool_consistent(kv.pool)


def test_can_allocate_accounts_for_evictable_hits():
    kv = KVCacheManager(3, BS)
    prompt = list(range(9))  # 2 full blocks + 1
    a = make_request("a", prompt)
    admit(kv, a)
    kv.free(a)
    # all 3 blocks free; 2 of them hold the cached prefix. b needs those 2 + 1 new for its last token
    b = make_request("b", prompt)
    hits = kv.find_cached_prefix(b)
    assert len(hits) == 2
    assert kv.can_allocate(b, 1, hits)
    assert kv.can_allocate(b, 4, hits)  # 8 + 4 tokens: 3 blocks
    assert not kv.can_allocate(b, 5, hits)  # 8 + 5 tokens: 4 blocks
    # a 4th block's worth held elsewhere: the pool's never-cached block goes first
    other = make_request("o", [200] * 4)
    assert kv.allocate_slots(other, 4)
    assert kv.find_cached_prefix(b) == hits  # the cached blocks survived
    # b needs 1 new block + the 2 hits off the free list: only 2 are free
    assert not kv.can_allocate(b, 1, hits)
    assert not kv.allocate_slots(b, 1, hits)
    assert b.block_ids == [] and b.num_computed_tokens == 0
    kv.free(other)
    assert kv.allocate_slots(b, 1, hits)
    kv.free(b)


def test_no_hits_with_prompt_logprobs_or_caching_off_or_other_salt():
    prompt = list(range(12))
    kv = KVCacheManager(16, BS)
    first = make_request("a", prompt)
    admit(kv, first)
    assert kv.find_cached_prefix(make_request("b", prompt, prompt_logprobs=1)) == []
    salted = make_request("c", prompt)
    salted.cache_salt = "tenant-2"
    assert kv.find_cached_prefix(salted) == []
    assert len(kv.find_cached_prefix(make_request("d", prompt))) == 2
    kv.free(first)
    assert kv.pool.num_used_blocks == 0

    off = KVCacheManager(16, BS, enable_caching=False)
    a = make_request("a", prompt)
    admit(off, a)
    assert off.find_cached_prefix(make_request("b", prompt)) == []
    assert off.stats.hits == 0
    off.free(a)


def test_share_prefix_refcounts_and_registration():
    kv = KVCacheManager(16, BS)
    parent = make_request("p", list(range(10)))
    compute_all(kv, parent)
    shared = parent.block_ids[:2]
    child = make_request("p#1", list(range(10)))
    kv.share_prefix(child, shared)
    assert child.num_computed_tokens == 8
    assert all(kv.pool.blocks[b].ref_count == 2 for b in shared)
    compute_all(kv, child)
    assert child.block_ids[:2] == shared and child.block_ids[2] not in parent.block_ids
    kv.free(parent)
    assert all(kv.pool.blocks[b].ref_count == 1 for b in shared)
    kv.free(child)
    assert kv.pool.num_used_blocks == 0
    check_pool_consistent(kv.pool)


def test_free_is_tail_first():
    kv = KVCacheManager(8, BS)
    r = make_request("a", list(range(12)))
    compute_all(kv, r)
    blocks = list(r.block_ids)
    kv.free(r)
    # the tail is evicted first; the never-used blocks go before all three
    got = kv.pool.allocate(8)
    assert got[-3:] == list(reversed(blocks))
    kv.pool.free(got)
