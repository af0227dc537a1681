"""The connector: export under a lease, plan only what the local prefix cache lacks, pull into
the decode worker's own blocks, and the failure policies. Block pools are the engine's."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
import torch

from tandem.kv_transfer.compat import compat_hash
from tandem.kv_transfer.connector import KVConnectorConsumer, KVConnectorProducer
from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.messages import HandoffRecord, decode_kv_msg, encode_kv_msg
from tandem.kv_transfer.transport import KVDest
from tandem.shared.block_hash import hash_block_chain
from tandem.shared.engine.block_pool import BlockPool
from tests.kv_transfer.conftest import COMPAT, FakeClock, random_kv, zeros_like_kv

BS = 4


def prefill_side(transport, clock, num_tokens=10, ttl=30.0):
    """A prefill worker that computed a prompt of `num_tokens` into its pool's blocks."""
    pool = BlockPool(8)
    kv = random_kv(8, block_size=BS)
    block_ids = pool.allocate(-(-num_tokens // BS))
    leases = LeaseTable()
    server = transport.server(kv, leases, clock=clock)
    producer = KVConnectorProducer("prefill-0", server.address, COMPAT, BS, leases, lease_ttl_s=ttl, clock=clock)
    request = SimpleNamespace(request_id="req-1", block_ids=block_ids, num_prompt_tokens=num_tokens)
    return pool, kv, server, producer, request


def test_handoff_record_round_trips_the_wire():
    record = HandoffRecord("r", 7, "e", "tcp://127.0.0.1:5", "ab" * 16, [3, 1], 6, COMPAT, 1234.5)
    assert decode_kv_msg(encode_kv_msg(record)) == record


def test_plan_pulls_only_what_the_local_cache_lacks():
    consumer = KVConnectorConsumer(COMPAT, BS, client=None)
    handoff = HandoffRecord("r", 7, "e", "addr", "l", [10, 11, 12], 10, COMPAT, 0.0)
    assert consumer.plan_pull(handoff, 0).remote_block_ids == [10, 11, 12]
    plan = consumer.plan_pull(handoff, 2)
    assert plan.num_local_blocks == 2 and plan.remote_block_ids == [12]  # the partial block is always pulled
    full = HandoffRecord("r", 7, "e", "addr", "l", [10, 11], 8, COMPAT, 0.0)
    assert consumer.plan_pull(full, 3).remote_block_ids == []
    with pytest.raises(Exception, match="blocks for"):
        consumer.plan_pull(HandoffRecord("r", 7, "e", "addr", "l", [10], 10, COMPAT, 0.0), 0)
    with pytest.raises(ValueError):
        KVConnectorConsumer(COMPAT, BS, client=None, failure_policy="retry")


def test_export_pull_release(transport):
    clock = FakeClock(time.time())
    prompt = list(range(100, 110))  # 10 tokens: two full blocks and a partial one
    pool, kv, server, producer, request = prefill_side(transport, clock)
    with server:
        handoff = producer.export(request, first_token=42)
        handoff = decode_kv_msg(encode_kv_msg(handoff))  # as it would travel via the router
        assert handoff.block_ids == request.block_ids and handoff.first_token == 42
        assert handoff.lease_expiry == clock() + 30

        # The decode worker already caches the prompt's first block.
        decode_pool = BlockPool(6)
        decode_kv = zeros_like_kv(kv, 6)
        hashes = hash_block_chain(prompt, BS)
        (cached,) = decode_pool.allocate(1)
        decode_kv[0][0][cached].fill_(7.0)
        decode_pool.cache_block(cached, hashes[0], prompt[:BS])
        hits = [decode_pool.lookup(hashes[0], prompt[:BS])]
        consumer = KVConnectorConsumer(COMPAT, BS, transport.client(), clock=clock)
        plan = consumer.plan_pull(handoff, len(hits))
        assert plan.remote_block_ids == handoff.block_ids[1:]
        local = decode_pool.allocate(len(plan.remote_block_ids))
        outcome = consumer.pull(handoff, plan, KVDest(decode_kv, local))
        assert outcome.ok and outcome.action == "use" and outcome.stats.num_blocks == 2
        for layer in range(3):
            for r, d in zip(plan.remote_block_ids, local):
                assert torch.equal(decode_kv[layer][0][d], kv[layer][0][r])
                assert torch.equal(decode_kv[layer][1][d], kv[layer][1][r])
        assert (decode_kv[0][0][cached] == 7.0).all()  # the local hit was not overwritten

        pool.free(producer.release(handoff.lease_id))
        assert pool.num_used_blocks == 0


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_expired_lease_frees_blocks_and_applies_the_policy(transport, policy):
    clock = FakeClock(time.time())
    pool, kv, server, producer, request = prefill_side(transport, clock, ttl=5.0)
    with server:
        handoff = producer.export(request, first_token=1)
        consumer = KVConnectorConsumer(COMPAT, BS, transport.client(), failure_policy=policy, clock=clock)
        dest = KVDest(zeros_like_kv(kv, 4), [0, 1, 2])
        plan = consumer.plan_pull(handoff, 0)

        clock.now += 6 + producer.leases.free_grace_s
        pool.free(producer.expire_due())
        assert pool.num_used_blocks == 0
        outcome = consumer.pull(handoff, plan, dest)  # refused locally: the record says it expired
        assert not outcome.ok and outcome.action == policy and outcome.error.code == "lease_expired"

        consumer.clock = lambda: 0.0  # a decode clock behind the prefill's: the server still refuses
        outcome = consumer.pull(handoff, plan, dest)
        assert not outcome.ok and outcome.action == policy and outcome.error.code == "lease_expired"
    assert all(not k.any() and not v.any() for k, v in dest.kv_caches)


def test_compat_mismatch_and_dead_peer_fall_back(transport):
    clock = FakeClock(time.time())
    pool, kv, server, producer, request = prefill_side(transport, clock)
    handoff = producer.export(request, first_token=1)
    dest = KVDest(zeros_like_kv(kv, 4), [0, 1, 2])
    other = KVConnectorConsumer(compat_hash("x", "float32", 4, 3, 2, 8), BS, transport.client(), clock=clock)
    outcome = other.pull(handoff, other.plan_pull(handoff, 0), dest)
    assert outcome.action == "recompute" and outcome.error.code == "compat_mismatch"

    server.close()  # the prefill worker died
    consumer = KVConnectorConsumer(COMPAT, BS, transport.client(timeout_s=1.0), clock=clock)
    outcome = consumer.pull(handoff, consumer.plan_pull(handoff, 0), dest)
    assert outcome.action == "recompute" and outcome.error.code in ("peer_gone", "timeout")
    pool.free(producer.release(handoff.lease_id))
