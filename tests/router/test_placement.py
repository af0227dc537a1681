"""The router's cluster view and placement, without processes: prefix index from KV events
(stored / removed / reset, epochs), and the three policies."""

from __future__ import annotations

import pytest

from tandem.services.router.placement import Placement
from tandem.services.router.state import ClusterView
from tandem.shared.block_hash import hash_block_chain
from tandem.shared.cluster import KVEvent, WorkerLoad, WorkerRecord

BS = 16


def record(worker_id: str, role: str = "mixed", epoch: int = 1) -> WorkerRecord:
    return WorkerRecord(worker_id, role, "m", f"tcp://127.0.0.1:{hash(worker_id) % 1000 + 5000}", "tcp://x:1",
                        "http://x:2", BS, "c", 2048, epoch)


@pytest.fixture
def view():
    v = ClusterView()
    for w in ("a", "b"):
        v.upsert(record(w))
    return v


def test_prefix_index_follows_events_and_epochs(view):
    prompt = list(range(100))  # 6 full blocks
    hashes = hash_block_chain(prompt, BS)
    view.apply_event("a", KVEvent(1, "stored", hashes[:4]))
    assert view.cached_prefix_blocks("a", hashes) == 4 and view.cached_prefix_blocks("b", hashes) == 0
    view.apply_event("a", KVEvent(1, "removed", [hashes[1]]))
    assert view.cached_prefix_blocks("a", hashes) == 1  # a prefix stops at the first missing block
    view.apply_event("a", KVEvent(0, "stored", hashes))  # an older life of the worker: ignored
    assert view.cached_prefix_blocks("a", hashes) == 1
    view.apply_event("a", KVEvent(1, "reset", hashes[:2]))
    assert view.cached_prefix_blocks("a", hashes) == 2
    view.upsert(record("a", epoch=2))  # restarted: everything it had is gone
    assert view.cached_prefix_blocks("a", hashes) == 0 and view.index_size == 0
    view.apply_event("b", KVEvent(1, "stored", hashes))
    view.set_alive("b", False)
    assert view.cached_prefix_blocks("b", hashes) == 0 and view.alive() == [view.workers["a"]]


def test_cache_aware_prefers_the_cached_prefix_until_load_outweighs_it(view):
    hashes = hash_block_chain(list(range(320)), BS)  # a 20-block prompt
    view.apply_event("b", KVEvent(1, "stored", hashes))
    placement = Placement("cache_aware", view)
    candidates = view.alive()
    assert placement.pick(candidates, hashes, 320).worker_id == "b"
    view.workers["b"].load = WorkerLoad(used_blocks=75)  # 75 active blocks < 4 x 20 blocks to prefill on a
    assert placement.pick(candidates, hashes, 320).worker_id == "b"
    view.workers["b"].load = WorkerLoad(used_blocks=85)  # now a is cheaper: no cliff, one cost
    assert placement.pick(candidates, hashes, 320).worker_id == "a"
    other = hash_block_chain(list(range(1000, 1320)), BS)  # nobody caches it: the less loaded one
    assert placement.pick(candidates, other, 320).worker_id == "a"


def test_predicted_cache_keeps_a_burst_of_one_prefix_together(view):
    hashes = hash_block_chain(list(range(320)), BS)
    placement = Placement("cache_aware", view)
    first = placement.pick(view.alive(), hashes, 320)
    view.predict_cached(first.worker_id, hashes)  # what the dispatcher does when it sends the prompt
    first.inflight["r0"] = 21
    assert placement.pick(view.alive(), hashes, 320) is first


def test_round_robin_and_least_loaded(view):
    hashes = hash_block_chain(list(range(64)), BS)
    view.apply_event("a", KVEvent(1, "stored", hashes))
    rr = Placement("round_robin", view)
    assert [rr.pick(view.alive(), hashes, 64).worker_id for _ in range(4)] == ["a", "b", "a", "b"]
    ll = Placement("least_loaded", view)
    view.workers["a"].inflight["x"] = 3
    assert ll.pick(view.alive(), hashes, 64).worker_id == "b"  # the cache does not count
    with pytest.raises(ValueError):
        Placement("random", view)
    with pytest.raises(LookupError):
        ll.pick([], hashes, 64)


def test_marked_down_workers_are_skipped(view):
    view.mark_down("a", 60)
    assert [w.worker_id for w in view.alive()] == ["b"]


def test_records_and_events_round_trip_redis_shapes():
    r = record("w-1", "prefill", epoch=123)
    assert WorkerRecord.from_redis({k.encode(): v.encode() for k, v in r.to_redis().items()}) == r
    with pytest.raises(ValueError, match="block_size"):
        WorkerRecord.from_redis({**r.to_redis(), "block_size": "sixteen"})
    with pytest.raises(ValueError, match="missing"):
        WorkerRecord.from_redis({"worker_id": "x"})
    load = WorkerLoad(running=2, used_blocks=7, updated=1.5)
    assert WorkerLoad.from_redis(load.to_redis()) == load
    hashes = hash_block_chain(list(range(48)), BS)
    event = KVEvent(9, "stored", hashes)
    assert KVEvent.from_redis({k.encode(): v for k, v in event.to_redis().items()}) == event
    for bad in ({**event.to_redis(), "kind": "moved"}, {**event.to_redis(), "hashes": b"\x93\x01\x02\x03"},
                {"epoch": "x"}):
        with pytest.raises(ValueError):
            KVEvent.from_redis(bad)
