"""The router's view of the cluster: which workers are alive, their load, and which worker caches
which block hash. Plain in-memory data, fed by the Redis sync task (or by tests); placement reads
it without ever waiting on Redis.

The prefix index maps a block hash to the workers that have it cached, from the workers' KV events
(stored / removed / reset). A worker that restarts (new epoch) or leaves loses its entries.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field

from tandem.shared.block_hash import BlockHash
from tandem.shared.cluster import KVEvent, WorkerLoad, WorkerRecord

logger = logging.getLogger("tandem.router")


@dataclass
class WorkerState:
    record: WorkerRecord
    alive: bool = True
    load: WorkerLoad = field(default_factory=WorkerLoad)
    cached: set[BlockHash] = field(default_factory=set)
    # This router's own requests on the worker: sequence id -> its blocks (prompt + max new tokens),
    # counted at dispatch, before any load report could show them.
    inflight: dict[str, int] = field(default_factory=dict)
    queued: dict[str, int] = field(default_factory=dict)  # sequence id -> prompt tokens to compute (until a token)
    routed: int = 0  # requests this router sent it
    down_until: float = 0.0  # after a failed send: not picked again before this (monotonic)

    @property
    def worker_id(self) -> str:
        return self.record.worker_id

    @property
    def inflight_blocks(self) -> int:
        return sum(self.inflight.values())


class ClusterView:
    def __init__(self) -> None:
        self.workers: dict[str, WorkerState] = {}
        self._index: dict[BlockHash, set[str]] = defaultdict(set)

    # --- membership ----------------------------------------------------------------------------
    def upsert(self, record: WorkerRecord) -> WorkerState:
        """A worker as registered; a new epoch for a known id starts it afresh."""
        current = self.workers.get(record.worker_id)
        if current is not None and current.record.epoch == record.epoch:
            current.record = record
            return current
        if current is not None:
            logger.info("worker %s restarted (epoch %d -> %d)", record.worker_id, current.record.epoch, record.epoch)
            self._forget_cache(current)
        state = WorkerState(record)
        self.workers[record.worker_id] = state
        return state

    def set_alive(self, worker_id: str, alive: bool) -> None:
        state = self.workers.get(worker_id)
        if state is None or state.alive == alive:
            return
        state.alive = alive
        logger.warning("worker %s is %s", worker_id, "back" if alive else "gone")
        if not alive:
            self._forget_cache(state)

    def remove(self, worker_id: str) -> None:
        state = self.workers.pop(worker_id, None)
        if state is not None:
            self._forget_cache(state)

    def alive(self, roles: tuple[str, ...] | None = None) -> list[WorkerState]:
        now = time.monotonic()
        return [w for w in self.workers.values()
                if w.alive and w.down_until <= now and (roles is None or w.record.role in roles)]

    def mark_down(self, worker_id: str, seconds: float) -> None:
        """A send or a request failed there: keep it out of placement for a while (heartbeats may
        still say it lives; a worker that is really gone leaves when its heartbeat key expires)."""
        state = self.workers.get(worker_id)
        if state is not None:
            state.down_until = time.monotonic() + seconds

    # --- KV events -----------------------------------------------------------------------------
    def apply_event(self, worker_id: str, event: KVEvent) -> None:
        state = self.workers.get(worker_id)
        if state is None or event.epoch != state.record.epoch:
            return  # an older life of the worker (or one we do not know yet)
        if event.kind == "reset":
            self._forget_cache(state)
        if event.kind == "removed":
            for h in event.hashes:
                state.cached.discard(h)
                holders = self._index.get(h)
                if holders is not None:
                    holders.discard(worker_id)
                    if not holders:
                        del self._index[h]
        else:  # stored, or the first chunk of a reset
            state.cached.update(event.hashes)
            for h in event.hashes:
                self._index[h].add(worker_id)

    def _forget_cache(self, state: WorkerState) -> None:
        for h in state.cached:
            holders = self._index.get(h)
            if holders is not None:
                holders.discard(state.worker_id)
                if not holders:
                    del self._index[h]
        state.cached = set()

    def predict_cached(self, worker_id: str, hashes: list[BlockHash]) -> None:
        """The router just sent these blocks' prompt to the worker: count them as cached there now,
        before its KV events confirm it (so that a burst of one prefix lands on one worker)."""
        state = self.workers.get(worker_id)
        if state is None:
            return
        state.cached.update(hashes)
        for h in hashes:
            self._index[h].add(worker_id)

    def cached_prefix_blocks(self, worker_id: str, hashes: list[BlockHash]) -> int:
        """How many leading blocks of a prompt (its hash chain) the worker caches."""
        n = 0
        for h in hashes:
            holders = self._index.get(h)
            if holders is None or worker_id not in holders:
                break
            n += 1
        return n

    @property
    def index_size(self) -> int:
        return len(self._index)
