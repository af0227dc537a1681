"""RedisAgent: a worker's whole conversation with Redis, on its own thread (keys: shared/cluster.py).

Every heartbeat, one MULTI/EXEC pipeline: the worker record and its membership (rewritten each
time: HSET answers how many fields were new, so a Redis that lost its data, or a router that
dropped the worker, is noticed at once), the alive key with its TTL, the latest load, then the
pending KV events in order (a "reset" with the whole prefix cache first when one was offered).

The engine thread only calls push_events / set_load / offer_snapshot, which take a lock around a
few list operations: no engine call ever waits on Redis. The agent asks for a snapshot of the
cache (`wants_snapshot`) at start, on the first heartbeat after an outage or after Redis lost the
worker's keys, when its bounded event buffer overflowed, and when so many entries were added since
the last reset that Redis' trimming could cut it off. Events that arrive while a snapshot is wanted,
or while Redis is down, are dropped: the snapshot taken later contains them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

import redis
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from redis.backoff import NoBackoff
from redis.retry import Retry

from tandem.shared.block_hash import BlockHash
from tandem.shared.cluster import (
    EVENTS_MAXLEN,
    HEARTBEAT_S,
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

logger = logging.getLogger("tandem.worker.redis")

MAX_BUFFERED_HASHES = 200_000  # pending event hashes; beyond this the buffer is dropped for a snapshot


class RedisAgent:
    def __init__(self, url: str, record: WorkerRecord, heartbeat_s: float = HEARTBEAT_S,
                 ttl_s: float = HEARTBEAT_TTL_S, max_buffered_hashes: int = MAX_BUFFERED_HASHES,
                 timeout_s: float | None = None) -> None:
        """Raises ValueError for a malformed URL (nothing is connected before start())."""
        if heartbeat_s <= 0 or ttl_s <= heartbeat_s:
            raise ValueError(f"heartbeat ({heartbeat_s}s) must be positive and shorter than the TTL ({ttl_s}s)")
        self.record = record
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self.max_buffered_hashes = max_buffered_hashes
        timeout = timeout_s if timeout_s is not None else max(2 * heartbeat_s, 0.5)
        # No retries inside redis-py: a failed heartbeat is retried by the next one.
        self._client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                            retry=Retry(NoBackoff(), 0))
        self.url = url
        self._lock = threading.Lock()
        # Guarded by _lock (engine thread <-> agent thread):
        self._pending: list[tuple[str, list[BlockHash]]] = []  # consecutive same-kind events merged
        self._pending_hashes = 0
        self._snapshot: list[BlockHash] | None = None  # offered, not yet written
        self._wants_snapshot = True
        self._down = False  # the last heartbeat failed: events are dropped until a snapshot after it
        self._load: WorkerLoad | None = None
        # Agent thread only (read by /metrics):
        self.heartbeats = 0  # successful ones
        self.errors = 0  # failed heartbeats
        self.snapshots = 0  # resets written
        self.overflows = 0  # event buffers dropped for a snapshot
        self.connected = False
        self._entries_since_reset = 0
        self._fresh_stream = True  # this epoch has not written its stream yet: delete a previous epoch's
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="redis-agent", daemon=True)

    # --- the engine thread's side ----------------------------------------------------------
    @property
    def wants_snapshot(self) -> bool:
        return self._wants_snapshot

    def push_events(self, events: Iterable[tuple[str, list[BlockHash]]]) -> None:
        """BlockPool events drained since the last call, in order."""
        with self._lock:
            if self._wants_snapshot or self._down:
                return  # the coming snapshot holds their effect
            for kind, hashes in events:
                if self._pending and self._pending[-1][0] == kind:
                    self._pending[-1][1].extend(hashes)
                else:
                    self._pending.append((kind, list(hashes)))
                self._pending_hashes += len(hashes)
            if self._pending_hashes > self.max_buffered_hashes:
                self._pending, self._pending_hashes = [], 0
                self._wants_snapshot = True
                self.overflows += 1

    def offer_snapshot(self, cached_hashes: Iterable[BlockHash]) -> None:
        """The whole prefix cache now (after every event pushed so far): it replaces them."""
        snapshot = list(cached_hashes)
        with self._lock:
            self._snapshot = snapshot
            self._pending, self._pending_hashes = [], 0
            self._wants_snapshot = False

    def set_load(self, load: WorkerLoad) -> None:
        self._load = load  # one reference swap: the heartbeat writes the latest

    # --- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop beating and remove the worker's keys (best effort): routers drop it at once."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        wid = self.record.worker_id
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.srem(WORKERS_KEY, wid)
            pipe.delete(alive_key(wid), load_key(wid), worker_key(wid), events_key(wid))
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            logger.info("could not remove worker %s from Redis (its keys expire or routers drop it): %s", wid, exc)
        finally:
            self._client.close()

    def _run(self) -> None:
        next_beat = time.monotonic()
        while not self._stop.is_set():
            self._beat()
            next_beat = max(next_beat + self.heartbeat_s, time.monotonic())
            self._stop.wait(next_beat - time.monotonic())

    # --- one heartbeat ---------------------------------------------------------------------
    def _beat(self) -> None:
        with self._lock:
            snapshot, self._snapshot = self._snapshot, None
            events, self._pending, self._pending_hashes = self._pending, [], 0
        load = self._load
        try:
            new_fields, num_entries = self._write(snapshot, events, load)
        except Exception as exc:  # Redis down or slow (RedisError, OSError); anything else is a bug: logged
            if not isinstance(exc, (redis.RedisError, OSError)):
                logger.exception("heartbeat failed")
            self.errors += 1
            with self._lock:
                self._snapshot, self._pending, self._pending_hashes = None, [], 0
                self._wants_snapshot = False  # until Redis answers again: then the cache as it is then
                self._down = True
            if self.connected or self.errors == 1:
                logger.warning("Redis at %s is unreachable (%s: %s); the worker keeps serving and retries every "
                               "%.1fs", self._safe_url(), type(exc).__name__, exc, self.heartbeat_s)
            self.connected = False
            return
        self.heartbeats += 1
        self._fresh_stream = False
        if not self.connected:
            logger.info("registered in Redis at %s as %s", self._safe_url(), self.record.worker_id)
        self.connected = True
        if snapshot is not None:
            self.snapshots += 1
            self._entries_since_reset = num_entries
        else:
            self._entries_since_reset += num_entries
        with self._lock:
            lost = new_fields > 0 and snapshot is None  # Redis restarted or the worker was dropped
            if self._down or lost or self._entries_since_reset > EVENTS_MAXLEN // 2:
                self._down = False
                self._snapshot, self._pending, self._pending_hashes = None, [], 0
                self._wants_snapshot = True

    def _write(self, snapshot: list[BlockHash] | None, events: list[tuple[str, list[BlockHash]]],
               load: WorkerLoad | None) -> tuple[int, int]:
        """One atomic pipeline; (new worker-record fields, stream entries added)."""
        rec = self.record
        wid = rec.worker_id
        pipe = self._client.pipeline(transaction=True)
        pipe.hset(worker_key(wid), mapping=rec.to_redis())
        pipe.sadd(WORKERS_KEY, wid)
        pipe.set(alive_key(wid), str(rec.epoch), px=int(self.ttl_s * 1000))
        if load is not None:
            pipe.hset(load_key(wid), mapping=load.to_redis())
        stream = events_key(wid)
        if self._fresh_stream:
            pipe.delete(stream)  # a previous process under this id left its events
        entries = []
        if snapshot is not None:
            entries += _reset_chunks(snapshot)
        for kind, hashes in events:
            entries += _chunks(kind, hashes)
        for kind, hashes in entries:
            pipe.xadd(stream, KVEvent(rec.epoch, kind, hashes).to_redis(), maxlen=EVENTS_MAXLEN, approximate=True)
        replies = pipe.execute()
        return int(replies[0]), len(entries)

    def _safe_url(self) -> str:
        kw = self._client.connection_pool.connection_kwargs
        where = kw.get("path") or f"{kw.get('host')}:{kw.get('port')}"
        return f"{where}/{kw.get('db', 0)}"


def _chunks(kind: str, hashes: list[BlockHash]) -> list[tuple[str, list[BlockHash]]]:
    """Stream entries of at most MAX_HASHES_PER_EVENT hashes each."""
    return [(kind, hashes[i : i + MAX_HASHES_PER_EVENT]) for i in range(0, len(hashes), MAX_HASHES_PER_EVENT)]


def _reset_chunks(snapshot: list[BlockHash]) -> list[tuple[str, list[BlockHash]]]:
    """A "reset" with the first chunk of the cache (maybe empty), the rest as "stored" entries."""
    chunks = _chunks("stored", snapshot) or [("stored", [])]
    return [("reset", chunks[0][1]), *chunks[1:]]


class RedisAgentCollector:
    """/metrics: tandem:redis_* counters of the worker's agent."""

    def __init__(self, model_name: str, agent: RedisAgent) -> None:
        self.model_name = model_name
        self.agent = agent

    def describe(self):
        return []

    def collect(self):
        a, labels, value = self.agent, ["model_name"], [self.model_name]
        for name, doc, v in (
            ("tandem:redis_heartbeats", "Heartbeats written to Redis.", a.heartbeats),
            ("tandem:redis_errors", "Heartbeats that failed (Redis down or slow).", a.errors),
            ("tandem:redis_kv_resets", "Whole-cache snapshots (reset events) written to Redis.", a.snapshots),
            ("tandem:redis_kv_event_overflows", "KV event buffers dropped for a snapshot.", a.overflows),
        ):
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            yield c
        g = GaugeMetricFamily("tandem:redis_connected", "1 while the last heartbeat reached Redis.", labels=labels)
        g.add_metric(value, 1.0 if a.connected else 0.0)
        yield g
