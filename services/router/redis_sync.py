"""The router's Redis reader: every HEARTBEAT_S it refreshes the ClusterView from the registry
(shared/cluster.py): worker records, heartbeats, load reports, and new KV events from each worker's
stream. Several routers can read one Redis; none writes worker state.

Redis down or restarted: the view is kept as it was (requests never wait on Redis) and nobody is
declared dead for a missing heartbeat until Redis has answered for a whole TTL again (workers
re-register after a Redis restart within a heartbeat).
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from tandem.services.router.dispatcher import ClusterEngineClient
from tandem.services.router.state import ClusterView
from tandem.shared.cluster import (
    HEARTBEAT_S,
    HEARTBEAT_TTL_S,
    WORKERS_KEY,
    KVEvent,
    WorkerLoad,
    WorkerRecord,
    alive_key,
    events_key,
    load_key,
    worker_key,
)

logger = logging.getLogger("tandem.router")

_EVENTS_PER_READ = 2000


class RedisSync:
    def __init__(self, url: str, view: ClusterView, client: ClusterEngineClient, interval_s: float = HEARTBEAT_S,
                 ) -> None:
        self.url = url
        self.view = view
        self.client = client
        self.interval_s = interval_s
        self.redis = aioredis.Redis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0)
        self.connected = False
        self.num_errors = 0
        self.last_ok = 0.0  # monotonic time of the last successful sync
        self._last_seen: dict[str, float] = {}  # worker id -> monotonic time its heartbeat key was last there
        self._stream_pos: dict[str, tuple[int, bytes]] = {}  # worker id -> (epoch, last stream id read)
        self.first_worker = asyncio.Event()

    async def run(self) -> None:
        while True:
            try:
                await self.sync_once()
            except (RedisError, OSError) as exc:
                self.num_errors += 1
                if self.connected or self.num_errors == 1:
                    logger.warning("Redis at %s is unreachable (%s): serving on the last view", self.url, exc)
                self.connected = False
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("cluster sync failed")
            try:
                await self.client.sync_links()
            except Exception:
                logger.exception("worker link sync failed")
            await asyncio.sleep(self.interval_s)

    async def sync_once(self) -> None:
        r = self.redis
        ids = sorted(x.decode() for x in await r.smembers(WORKERS_KEY))
        now = time.monotonic()
        if not self.connected:
            if self.num_errors:
                logger.info("Redis at %s answers again", self.url)
            self.connected = True
            for worker_id in self._last_seen:  # heartbeats could not be seen meanwhile
                self._last_seen[worker_id] = now
        async with r.pipeline(transaction=False) as pipe:
            for worker_id in ids:
                pipe.hgetall(worker_key(worker_id))
                pipe.exists(alive_key(worker_id))
                pipe.hgetall(load_key(worker_id))
            replies = await pipe.execute()
        seen = set()
        for i, worker_id in enumerate(ids):
            raw_record, alive, raw_load = replies[3 * i:3 * i + 3]
            if not raw_record:
                continue
            try:
                record = WorkerRecord.from_redis(raw_record)
            except ValueError as exc:
                logger.warning("ignoring worker %s: bad record: %s", worker_id, exc)
                continue
            seen.add(worker_id)
            state = self.view.upsert(record)
            if alive:
                self._last_seen[worker_id] = now
            last = self._last_seen.setdefault(worker_id, now if alive else 0.0)
            self.view.set_alive(worker_id, now - last <= HEARTBEAT_TTL_S)
            if raw_load:
                try:
                    state.load = WorkerLoad.from_redis(raw_load)
                except ValueError as exc:
                    logger.warning("worker %s: bad load report: %s", worker_id, exc)
            if state.alive:
                self.client.ensure_link(state)
        for worker_id in list(self.view.workers):
            if worker_id not in seen and now - self._last_seen.get(worker_id, 0.0) > HEARTBEAT_TTL_S:
                self.view.set_alive(worker_id, False)  # deregistered (clean stop) or gone with Redis' data
                self.view.remove(worker_id)
                self._last_seen.pop(worker_id, None)
                self._stream_pos.pop(worker_id, None)
        await self._read_events(r, [w for w in seen if self.view.workers[w].alive])
        self.last_ok = now
        if self.view.alive():
            self.first_worker.set()

    async def _read_events(self, r, worker_ids: list[str]) -> None:
        if not worker_ids:
            return
        streams = {}
        owner = {events_key(w): w for w in worker_ids}
        for worker_id in worker_ids:
            epoch = self.view.workers[worker_id].record.epoch
            pos = self._stream_pos.get(worker_id)
            if pos is None or pos[0] != epoch:
                pos = self._stream_pos[worker_id] = (epoch, b"0-0")
            streams[events_key(worker_id)] = pos[1]
        while streams:
            replies = await r.xread(streams, count=_EVENTS_PER_READ)
            if not replies:
                return
            more = {}
            for key, entries in replies:
                key = key.decode() if isinstance(key, bytes) else key
                worker_id = owner[key]
                for entry_id, fields in entries:
                    try:
                        event = KVEvent.from_redis(fields)
                    except ValueError as exc:
                        logger.warning("worker %s: bad KV event %s: %s", worker_id, entry_id, exc)
                    else:
                        self.view.apply_event(worker_id, event)
                    self._stream_pos[worker_id] = (self._stream_pos[worker_id][0], entry_id)
                if len(entries) == _EVENTS_PER_READ:
                    more[key] = self._stream_pos[worker_id][1]
            streams = more

    async def close(self) -> None:
        await self.redis.aclose()
