"""The worker side of the Redis registry (shared/cluster.py keys), against a real Redis: a worker
process registers, heartbeats, reports its load and publishes its prefix-cache events; it leaves
on SIGTERM, expires after SIGKILL, and re-registers with a whole-cache reset after Redis restarts.
Plus the RedisAgent's own rules (chunking, order, overflow, lost state) in process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import httpx
import pytest

redis = pytest.importorskip("redis")

from tandem.services.worker.redis_agent import RedisAgent  # noqa: E402
from tandem.shared.block_hash import hash_block_chain  # noqa: E402
from tandem.shared.cluster import (  # noqa: E402
    HEARTBEAT_TTL_S,
    MAX_HASHES_PER_EVENT,
    WORKERS_KEY,
    KVEvent,
    WorkerLoad,
    WorkerRecord,
    alive_key,
    events_key,
    load_key,
    worker_key,
)
from tandem.shared.engine.block_pool import BlockPool  # noqa: E402
from tandem.shared.sampling_params import SamplingParams  # noqa: E402
from tandem.shared.wire.messages import EngineOutputsMsg, ErrorMsg  # noqa: E402
from tests.worker.conftest import Worker, metric  # noqa: E402

BLOCK_SIZE = 4  # tests/worker/conftest.py WORKER_ARGS
REDIS_SERVER = "/usr/bin/redis-server"


@pytest.fixture
def redis_url():
    """DB 14 of the shared Redis (other tests use other DBs), emptied before and after."""
    url = "redis://127.0.0.1:6379/14"
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis at 127.0.0.1:6379")
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"][0]


def eventually(check, timeout_s: float = 5.0, poll_s: float = 0.05):
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(poll_s)


def events(client: redis.Redis, worker_id: str) -> list[KVEvent]:
    return [KVEvent.from_redis(fields) for _, fields in client.xrange(events_key(worker_id))]


def cache_view(evts: list[KVEvent]) -> set[bytes]:
    """The prefix index a router builds from one worker's stream."""
    cached: set[bytes] = set()
    for e in evts:
        if e.kind == "reset":
            cached = set(e.hashes)
        elif e.kind == "stored":
            cached |= set(e.hashes)
        else:
            cached -= set(e.hashes)
    return cached


def run_request(w: Worker, request_id: str, prompt: list[int], max_tokens: int = 1,
                timeout_s: float = 60.0) -> list[int]:
    w.client.add(request_id, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
    tokens: list[int] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        msg = w.client.recv(0.05)
        if isinstance(msg, ErrorMsg):
            raise AssertionError(f"request {request_id} failed: {msg}")
        if isinstance(msg, EngineOutputsMsg):
            for out in msg.outputs:
                tokens.extend(out.new_token_ids)
                if out.finish_reason is not None:
                    return tokens
    raise AssertionError(f"request {request_id} did not finish")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- a worker process --------------------------------------------------------------------------
def test_worker_registers_reports_load_and_kv_events_then_leaves_on_sigterm(redis_url, model, workers):
    r = redis.Redis.from_url(redis_url)
    w = workers("mixed", model, "--redis-url", redis_url, "--worker-id", "w-redis-1")
    wid = "w-redis-1"
    raw = eventually(lambda: r.hgetall(worker_key(wid)))
    record = WorkerRecord.from_redis(raw)
    assert (record.role, record.zmq_addr, record.kv_addr, record.block_size, record.compat_hash) == (
        "mixed", w.info["zmq_addr"], w.info["kv_addr"], BLOCK_SIZE, w.info["compat_hash"])
    assert record.http_addr == f"http://127.0.0.1:{w.info['http_port']}" and record.max_model_len == 256
    assert record.model == w.info["model"] and abs(record.epoch - time.time_ns()) < 600e9
    assert r.sismember(WORKERS_KEY, wid)
    assert int(r.get(alive_key(wid))) == record.epoch
    assert 0 < r.pttl(alive_key(wid)) <= HEARTBEAT_TTL_S * 1000
    first = eventually(lambda: events(r, wid))
    assert first[0] == KVEvent(record.epoch, "reset", [])  # the cache is empty at start

    vocab = 100
    prompt = [(7 * i + 3) % vocab + 3 for i in range(5 * BLOCK_SIZE + 2)]  # 5 full blocks and 2 tokens
    out = run_request(w, "q1", prompt, max_tokens=1)
    chain = hash_block_chain(prompt, BLOCK_SIZE)
    assert len(chain) == 5
    stored = eventually(lambda: cache_view(events(r, wid)) >= set(chain))
    assert stored, [e.kind for e in events(r, wid)]
    evts = events(r, wid)
    assert [e.kind for e in evts[:1]] == ["reset"] and all(e.epoch == record.epoch for e in evts)
    stored_hashes = [h for e in evts if e.kind == "stored" for h in e.hashes]
    assert stored_hashes == hash_block_chain(prompt + out, BLOCK_SIZE)[: len(stored_hashes)]  # in order

    load = eventually(lambda: (lo := WorkerLoad.from_redis(r.hgetall(load_key(wid)))).prompt_tokens >= len(prompt)
                      and lo)
    assert load and load.prefix_cache_queries >= len(prompt) and load.total_blocks > 0 and load.running == 0
    # The same prompt again: a prefix-cache hit, counted in tokens.
    run_request(w, "q2", prompt, max_tokens=1)
    hits = eventually(lambda: WorkerLoad.from_redis(r.hgetall(load_key(wid))).prefix_cache_hits >= 5 * BLOCK_SIZE - 1)
    assert hits
    text = httpx.get(w.http + "/metrics", timeout=5).text
    assert metric(text, "tandem:redis_heartbeats_total") > 0 and metric(text, "tandem:redis_errors_total") == 0
    assert metric(text, "tandem:redis_connected") == 1

    w.proc.send_signal(signal.SIGTERM)
    assert w.proc.wait(20) == 0
    assert not r.exists(worker_key(wid), alive_key(wid), load_key(wid), events_key(wid))
    assert not r.sismember(WORKERS_KEY, wid)


def test_killed_worker_expires(redis_url, model, workers):
    r = redis.Redis.from_url(redis_url)
    w = workers("mixed", model, "--redis-url", redis_url, "--worker-id", "w-redis-kill")
    wid = "w-redis-kill"
    assert eventually(lambda: r.exists(alive_key(wid)))
    w.kill()
    killed = time.monotonic()
    assert eventually(lambda: not r.exists(alive_key(wid)), timeout_s=HEARTBEAT_TTL_S + 2)
    assert time.monotonic() - killed <= HEARTBEAT_TTL_S + 1.5
    assert r.sismember(WORKERS_KEY, wid)  # routers drop it (nobody is left to remove it)


def test_worker_survives_redis_restart_and_resyncs(tmp_path, model, workers):
    if not os.path.exists(REDIS_SERVER):
        pytest.skip(f"no {REDIS_SERVER}")
    port = free_port()
    cmd = [REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
           "--dir", str(tmp_path)]

    def start_redis() -> subprocess.Popen:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=port, socket_connect_timeout=0.5)
        if not eventually(lambda: _pings(client), timeout_s=10):
            proc.kill()
            pytest.fail("the private redis-server did not start")
        return proc

    server = start_redis()
    try:
        url = f"redis://127.0.0.1:{port}/0"
        r = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=1)
        w = workers("mixed", model, "--redis-url", url, "--worker-id", "w-redis-restart")
        wid = "w-redis-restart"
        p1 = [(5 * i + 1) % 90 + 3 for i in range(4 * BLOCK_SIZE)]
        p2 = [(11 * i + 2) % 90 + 3 for i in range(6 * BLOCK_SIZE + 1)]
        run_request(w, "before", p1)
        assert eventually(lambda: cache_view(events(r, wid)) >= set(hash_block_chain(p1, BLOCK_SIZE)))
        epoch = WorkerRecord.from_redis(r.hgetall(worker_key(wid))).epoch

        server.kill()
        server.wait(10)
        out = run_request(w, "during", p2, max_tokens=3)  # Redis is down: the worker keeps serving
        assert len(out) == 3
        assert eventually(lambda: metric(httpx.get(w.http + "/metrics", timeout=5).text,
                                         "tandem:redis_errors_total") > 0)
        assert metric(httpx.get(w.http + "/metrics", timeout=5).text, "tandem:redis_connected") == 0

        server = start_redis()  # empty: it lost everything
        back = time.monotonic()
        want = set(hash_block_chain(p1, BLOCK_SIZE)) | set(hash_block_chain(p2, BLOCK_SIZE))
        resets = eventually(lambda: [e for e in events(r, wid) if e.kind == "reset"], timeout_s=5)
        assert resets, "no reset after Redis came back"
        assert time.monotonic() - back < 5
        assert want <= set(resets[-1].hashes)  # the cache now, incl. the blocks of the request run while down
        assert WorkerRecord.from_redis(r.hgetall(worker_key(wid))).epoch == epoch  # the same worker
        assert r.sismember(WORKERS_KEY, wid) and r.exists(alive_key(wid))
        assert eventually(lambda: r.exists(load_key(wid)))
        assert run_request(w, "after", p1) is not None
    finally:
        server.kill()
        server.wait(10)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


# --- the agent in process ----------------------------------------------------------------------
def _record(worker_id: str) -> WorkerRecord:
    return WorkerRecord(worker_id, "mixed", "m", "tcp://h:1", "tcp://h:2", "http://h:3", 4, "c", 256, time.time_ns())


def _hashes(n: int, tag: int = 0) -> list[bytes]:
    return [tag.to_bytes(4, "big") + i.to_bytes(28, "big") for i in range(n)]


def test_agent_chunks_snapshot_then_events_in_order(redis_url):
    r = redis.Redis.from_url(redis_url)
    rec = _record("a1")
    agent = RedisAgent(redis_url, rec, heartbeat_s=0.05, ttl_s=1.0)
    big = _hashes(MAX_HASHES_PER_EVENT + 10)
    agent.offer_snapshot(big)
    assert not agent.wants_snapshot
    agent.push_events([("stored", _hashes(2, 1)), ("stored", _hashes(1, 2)), ("removed", big[:3])])
    agent.set_load(WorkerLoad(running=3, updated=1.5))
    agent.start()
    try:
        evts = eventually(lambda: (e := events(r, "a1")) and len(e) >= 4 and e)
        assert [(e.kind, len(e.hashes)) for e in evts] == [
            ("reset", MAX_HASHES_PER_EVENT), ("stored", 10), ("stored", 3), ("removed", 3)]
        assert evts[0].hashes + evts[1].hashes == big and evts[2].hashes == _hashes(2, 1) + _hashes(1, 2)
        assert cache_view(evts) == set(big[3:]) | set(_hashes(2, 1)) | set(_hashes(1, 2))
        assert WorkerLoad.from_redis(r.hgetall(load_key("a1"))) == WorkerLoad(running=3, updated=1.5)
        # Redis loses the worker's keys (a restart, or a router dropped it): re-registered, and a
        # snapshot is asked for; events pushed meanwhile are not sent (the snapshot holds them).
        r.flushdb()
        assert eventually(lambda: agent.wants_snapshot, timeout_s=2)
        agent.push_events([("stored", _hashes(1, 9))])
        assert r.hgetall(worker_key("a1")) and r.sismember(WORKERS_KEY, "a1")
        agent.offer_snapshot(_hashes(2, 7))
        evts = eventually(lambda: events(r, "a1"))
        assert [(e.kind, e.hashes) for e in evts] == [("reset", _hashes(2, 7))]
        assert agent.snapshots == 2 and agent.errors == 0 and agent.heartbeats > 2
    finally:
        agent.stop()
    assert not r.exists(worker_key("a1"), alive_key("a1"), load_key("a1"), events_key("a1"))


def test_agent_overflow_drops_buffer_and_wants_snapshot(redis_url):
    r = redis.Redis.from_url(redis_url)
    agent = RedisAgent(redis_url, _record("a2"), heartbeat_s=3600, ttl_s=7200, max_buffered_hashes=10)
    agent.offer_snapshot([])
    agent.push_events([("stored", _hashes(6))])
    agent.push_events([("removed", _hashes(3))])
    assert not agent.wants_snapshot
    agent.push_events([("stored", _hashes(2, 1))])  # 11 pending > 10
    assert agent.wants_snapshot and agent.overflows == 1
    agent.push_events([("stored", _hashes(1, 2))])  # dropped: the snapshot will hold it
    agent.offer_snapshot(_hashes(3, 3))
    agent.start()  # the first heartbeat runs at once
    try:
        evts = eventually(lambda: events(r, "a2"))
        assert [(e.kind, e.hashes) for e in evts] == [("reset", _hashes(3, 3))]
    finally:
        agent.stop()


def test_agent_without_redis_never_raises_and_logs_once(caplog):
    port = free_port()  # nothing listens there
    agent = RedisAgent(f"redis://127.0.0.1:{port}/0", _record("a3"), heartbeat_s=0.02, ttl_s=1.0)
    agent.offer_snapshot([])
    with caplog.at_level("WARNING", logger="tandem.worker.redis"):
        agent.start()
        assert eventually(lambda: agent.errors >= 5, timeout_s=5)
        agent.push_events([("stored", _hashes(3))])  # dropped while down: a snapshot follows reconnection
        agent.set_load(WorkerLoad(running=1))
        assert not agent.wants_snapshot and not agent.connected
        agent.stop()
    assert len([r for r in caplog.records if "unreachable" in r.getMessage()]) == 1


def test_bad_redis_url_is_a_clear_error():
    with pytest.raises(ValueError, match="Redis URL"):
        RedisAgent("http://127.0.0.1:6379", _record("a4"))


def test_block_pool_cached_hashes_and_reset_event():
    pool = BlockPool(4)
    pool.events = []
    hashes = _hashes(2)
    (a, b) = pool.allocate(2)
    pool.cache_block(a, hashes[0], [1])
    pool.cache_block(b, hashes[1], [2])
    assert pool.cached_hashes() == hashes
    pool.free([b, a])
    assert pool.cached_hashes() == hashes  # freed blocks stay cached until reused
    assert pool.reset_prefix_cache()
    assert pool.cached_hashes() == [] and pool.events[-1] == ("removed", hashes)
