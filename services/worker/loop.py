"""The worker's engine loop: requests from a ROUTER socket (many clients), a KVEngine step, outputs
back to the client that sent each request.

Messages: AddRequestMsg (plain, kv_export or kv_import), AbortMsg, StatsRequestMsg, HelloMsg
(answered with ReadyMsg), ShutdownMsg. A bad message or a refused request is answered with an
ErrorMsg to its sender and the worker keeps serving; a client that is gone has its requests
aborted; a failing engine step is fatal (exit 1: its clients see the worker leave).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections import defaultdict
from typing import TYPE_CHECKING

from tandem.services.worker.kv_engine import KVEngine, StepResult
from tandem.services.worker.status_http import StatusBoard
from tandem.shared.cluster import WorkerLoad
from tandem.shared.engine.engine_core import EngineStats
from tandem.shared.sampling_params import InvalidParameterError
from tandem.shared.wire.messages import (
    AbortMsg,
    AddRequestMsg,
    EngineOutputsMsg,
    ErrorMsg,
    HelloMsg,
    ReadyMsg,
    SeqOutput,
    ShutdownMsg,
    StatsMsg,
    StatsRequestMsg,
)
from tandem.shared.wire.sockets import BadMessage, MsgRouter, PeerUnavailable

if TYPE_CHECKING:  # redis (the router extra) is imported only by workers given a Redis URL
    from tandem.services.worker.redis_agent import RedisAgent

logger = logging.getLogger("tandem.worker")

_IDLE_POLL_MS = 100  # nothing to do: wake up this often (lease expiry, shutdown)
_PULL_POLL_MS = 2  # only KV pulls in flight: check for their completion this often
_PUBLISH_S = 0.25  # how often /metrics' snapshot is refreshed


class WorkerLoop:
    def __init__(self, kv: KVEngine, sock: MsgRouter, board: StatusBoard, role: str, worker_id: str,
                 agent: RedisAgent | None = None) -> None:
        self.kv = kv
        self.engine = kv.engine
        self.sock = sock
        self.board = board
        self.role = role
        self.worker_id = worker_id
        self.shutdown = False
        self._owner: dict[str, bytes] = {}  # sequence id -> the client identity that asked for it
        self._last_publish = 0.0
        self.agent = agent  # Redis registration: fed KV events and load from this thread
        self._last_load = 0.0

    def ready_msg(self) -> ReadyMsg:
        mc, kvm = self.engine.model_config, self.engine.kv
        return ReadyMsg(
            engine_id=self.worker_id, pid=os.getpid(), model=str(self.engine.source.path),
            max_model_len=mc.max_model_len, vocab_size=mc.vocab_size, eos_token_ids=sorted(self.engine.eos_token_ids),
            block_size=kvm.block_size, num_kv_blocks=kvm.pool.num_blocks, role=self.role, kv_addr=self.kv.kv_addr,
            compat_hash=self.kv.compat_hash,
        )

    def run(self) -> int:
        """Serve until ShutdownMsg or stop() (0), or a failed step (1)."""
        self._publish(force=True)
        while not self.shutdown:
            kv = self.kv
            timeout = 0 if kv.has_work else _PULL_POLL_MS if kv.busy else _IDLE_POLL_MS
            if self.sock.poll(timeout):
                self._drain()
            if self.shutdown:
                break
            try:
                result = kv.step()
            except Exception as exc:
                logger.exception("engine step failed")
                self.board.status.dead_reason = f"the engine failed: {type(exc).__name__}: {exc}"
                for identity in set(self._owner.values()):
                    self._send(identity, ErrorMsg(None, 500, self.board.status.dead_reason))
                return 1
            self._dispatch(result)
            self._publish()
            self._feed_agent()
        return 0

    def stop(self) -> None:
        self.shutdown = True

    # --- inputs ----------------------------------------------------------------------------
    def _drain(self) -> None:
        while self.sock.poll(0):
            try:
                identity, msg = self.sock.recv()
            except BadMessage as exc:
                logger.warning("bad message: %s", exc)
                self._send(exc.identity, ErrorMsg(None, 400, f"bad message: {exc}"))
                continue
            self._handle(identity, msg)

    def _handle(self, identity: bytes, msg) -> None:
        if isinstance(msg, AddRequestMsg):
            try:
                for seq_id in self.kv.add_request(msg):
                    self._owner[seq_id] = identity
            except InvalidParameterError as exc:
                self._send(identity, ErrorMsg(msg.request_id, 400, str(exc), exc.param))
            except Exception as exc:  # a bug, not the request's fault: refuse it, keep serving
                logger.exception("add_request %s failed", msg.request_id)
                self._send(identity, ErrorMsg(msg.request_id, 500, f"the worker could not add the request: {exc}"))
        elif isinstance(msg, AbortMsg):
            self.kv.abort(msg.request_ids)
            for seq_id in msg.request_ids:
                self._owner.pop(seq_id, None)
        elif isinstance(msg, StatsRequestMsg):
            self._send(identity, StatsMsg(msg.request_seq, **dataclasses.asdict(self.engine.stats())))
        elif isinstance(msg, HelloMsg):
            self._send(identity, self.ready_msg())
        elif isinstance(msg, ShutdownMsg):
            logger.info("shutting down%s", f": {msg.reason}" if msg.reason else "")
            self.shutdown = True
        else:
            self._send(identity, ErrorMsg(None, 400, f"a worker does not take {type(msg).__name__}"))

    # --- outputs ---------------------------------------------------------------------------
    def _dispatch(self, result: StepResult) -> None:
        by_client: dict[bytes, list[SeqOutput]] = defaultdict(list)
        for out in result.outputs:
            identity = self._owner.get(out.request_id)
            if out.finish_reason is not None or out.handoff is not None:
                self._owner.pop(out.request_id, None)  # done here (a handoff continues elsewhere)
            if identity is not None:
                by_client[identity].append(out)
        for identity, outputs in by_client.items():
            self._send(identity, EngineOutputsMsg(outputs))
        for error in result.errors:
            identity = self._owner.pop(error.request_id, None)
            if identity is not None:
                self._send(identity, error)

    def _send(self, identity: bytes, msg) -> None:
        try:
            self.sock.send(identity, msg)
        except PeerUnavailable as exc:
            gone = [seq_id for seq_id, owner in self._owner.items() if owner == identity]
            logger.warning("%s; aborting its %d sequences", exc, len(gone))
            if gone:
                self.kv.abort(gone)
                for seq_id in gone:
                    del self._owner[seq_id]

    def _feed_agent(self) -> None:
        """KV events since the last iteration (or the whole cache, when asked) and, at most once per
        heartbeat, the load: cheap list handoffs, the agent's thread talks to Redis."""
        agent, pool = self.agent, self.engine.kv.pool
        if agent is None:
            return
        if pool.events:
            events, pool.events = pool.events, []
            agent.push_events(events)
        if agent.wants_snapshot:
            agent.offer_snapshot(pool.cached_hashes())
        now = time.monotonic()
        if now - self._last_load >= agent.heartbeat_s:
            self._last_load = now
            agent.set_load(_load_of(self.engine.stats()))

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        self.board.status.last_beat = now
        if not force and self.kv.busy and now - self._last_publish < _PUBLISH_S:
            return  # throttled while busy; when idle the loop wakes rarely and every wake publishes
        self._last_publish = now
        self.board.engine_collector.stats = StatsMsg(0, **dataclasses.asdict(self.engine.stats()))
        s = self.kv.stats
        self.board.status = dataclasses.replace(
            self.board.status, ready=True, last_beat=now,
            kv_stats=dataclasses.replace(s, transfer_seconds_buckets=list(s.transfer_seconds_buckets)),
        )


def _load_of(stats: EngineStats) -> WorkerLoad:
    """What routers read in tandem:load:{id} (prefix-cache counts are tokens)."""
    return WorkerLoad(
        running=stats.num_running, waiting=stats.num_waiting, used_blocks=stats.num_used_blocks,
        total_blocks=stats.num_total_blocks, prefix_cache_queries=stats.prefix_cache_queries,
        prefix_cache_hits=stats.prefix_cache_hits, prompt_tokens=stats.prompt_tokens,
        generation_tokens=stats.generation_tokens, updated=time.time(),
    )
