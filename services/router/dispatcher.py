"""ClusterEngineClient: the OpenAI frontend's engine client over a cluster of workers (the second
implementation of services.openai.engine_client.EngineClient, beside ZmqEngineClient).

For each request it hashes the prompt with the engine's block-hash function and picks workers
(placement.py): with prefill and decode workers alive, a prefill worker computes the prompt
(`kv_export`) and each handoff record goes on to a decode worker (`kv_import`); otherwise a mixed
worker (or any live worker) runs the whole request. Outputs from every worker go through one
OutputProcessor (detokenization, stop strings) to the request's stream.

Failover: a worker whose connection drops, whose send fails, or whose heartbeat key expires leaves
the pool at once. Its sequences that produced nothing there yet are sent elsewhere (a prefill to
another prefill worker, a handoff to another decode worker: it pulls, or recomputes if the lease
is gone); a sequence that already streamed tokens from it ends with a clear error.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from zmq.utils.monitor import recv_monitor_message

from tandem.services.openai.engine_client import (
    EngineRequestError,
    ModelInfo,
    RequestMetrics,
    RequestStream,
)
from tandem.services.router.placement import Placement
from tandem.services.router.state import ClusterView, WorkerState
from tandem.shared.block_hash import hash_block_chain
from tandem.shared.engine.engine_core import child_request_id
from tandem.shared.engine.output_processor import OutputProcessor
from tandem.shared.outputs import RequestOutput
from tandem.shared.sampling_params import SamplingParams
from tandem.shared.wire.codec import WireError
from tandem.shared.wire.messages import (
    AbortMsg,
    AddRequestMsg,
    EngineOutputsMsg,
    ErrorMsg,
    HandoffRecord,
    HelloMsg,
    ReadyMsg,
    SeqOutput,
    StatsMsg,
    params_to_wire,
)
from tandem.shared.wire.sockets import MsgDealer, PeerUnavailable

logger = logging.getLogger("tandem.router")

_DOWN_S = 5.0  # a worker whose send failed is not picked again for this long (unless it is back)


@dataclass
class SeqRoute:
    """Where one engine sequence runs now."""

    request_id: str
    seq_id: str
    worker_id: str
    phase: str  # "prefill" (kv_export), "decode" (kv_import) or "whole"
    started: bool = False  # a token came from `worker_id` for it
    handoff: HandoffRecord | None = None


@dataclass
class RoutedRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    cache_salt: str | None
    hashes: list[bytes]
    stream: RequestStream
    seqs: dict[str, SeqRoute] = field(default_factory=dict)
    num_blocks: int = 0  # prompt + max new tokens, for the load estimate


class WorkerLink:
    """This router's connection to one worker: a DEALER, its reader task and a disconnect monitor."""

    def __init__(self, client: ClusterEngineClient, state: WorkerState) -> None:
        self.client = client
        self.worker_id = state.worker_id
        self.sock = MsgDealer(client.ctx, state.record.zmq_addr)
        self.sock.socket.setsockopt(zmq.IMMEDIATE, 1)  # a send to a dead worker fails instead of queueing
        self.monitor = self.sock.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.connected = asyncio.Event()
        self.tasks = [asyncio.create_task(self._read(), name=f"worker-{self.worker_id}"),
                      asyncio.create_task(self._watch(), name=f"monitor-{self.worker_id}")]

    async def _read(self) -> None:
        while True:
            try:
                msg = await self.sock.recv()
            except WireError as exc:
                logger.error("undecodable message from %s: %s", self.worker_id, exc)
                continue
            except (asyncio.CancelledError, zmq.ContextTerminated):
                return
            except Exception:
                logger.exception("the connection to %s failed", self.worker_id)
                return
            try:
                self.client.on_message(self.worker_id, msg)
            except Exception:  # one bad output must not stop the others
                logger.exception("failed to process %s from %s", type(msg).__name__, self.worker_id)

    async def _watch(self) -> None:
        while True:
            try:
                event = await recv_monitor_message(self.monitor)
            except (asyncio.CancelledError, zmq.ContextTerminated, zmq.ZMQError):
                return
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.connected.set()
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                self.connected.clear()
                self.client.on_worker_lost(self.worker_id, "its connection dropped")

    def send(self, msg) -> None:
        self.sock.send(msg)

    async def close(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.sock.socket.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close()


class ClusterEngineClient:
    def __init__(self, view: ClusterView, placement: Placement, tokenizer, metrics: RequestMetrics | None = None,
                 ) -> None:
        self.view = view
        self.placement = placement
        self.processor = OutputProcessor(tokenizer)
        self.metrics = metrics
        self.ctx = zmq.asyncio.Context()
        self.model_info: ModelInfo | None = None
        self.links: dict[str, WorkerLink] = {}
        self._requests: dict[str, RoutedRequest] = {}
        self._routes: dict[str, SeqRoute] = {}  # sequence id -> route
        self._ready: dict[str, asyncio.Future] = {}
        self._ids = itertools.count()
        self._instance = uuid.uuid4().hex[:6]
        self.num_failovers = 0

    # --- EngineClient --------------------------------------------------------------------------
    @property
    def dead_reason(self) -> str | None:
        return None  # the router lives on while workers come and go; requests get 503 when none is alive

    async def get_stats(self) -> StatsMsg | None:
        """The cluster's numbers: the alive workers' last load reports, summed."""
        workers = self.view.alive()
        total = sum(w.load.total_blocks for w in workers)
        used = sum(w.load.used_blocks for w in workers)
        return StatsMsg(
            request_seq=0, num_total_blocks=total, num_used_blocks=used, kv_cache_usage=used / total if total else 0.0,
            prefix_cache_queries=sum(w.load.prefix_cache_queries for w in workers),
            prefix_cache_hits=sum(w.load.prefix_cache_hits for w in workers),
            num_running=sum(w.load.running for w in workers), num_waiting=sum(w.load.waiting for w in workers),
            num_preemptions=0, prompt_tokens=sum(w.load.prompt_tokens for w in workers),
            generation_tokens=sum(w.load.generation_tokens for w in workers),
        )

    async def generate(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if request_id in self._requests:
            raise EngineRequestError(400, f"request {request_id!r} is already running", "request_id")
        bs = self._block_size()
        seq_ids = [child_request_id(request_id, i, params.n) for i in range(params.n)]
        stream = RequestStream(self.processor.add_request(request_id, seq_ids, prompt, prompt_token_ids, params))
        req = RoutedRequest(
            request_id, list(prompt_token_ids), params, cache_salt,
            hash_block_chain(prompt_token_ids, bs, (cache_salt,) if cache_salt else None), stream,
            num_blocks=-(-(len(prompt_token_ids) + (params.max_tokens or 0)) // bs),
        )
        self._requests[request_id] = req
        finished = False
        try:
            self._dispatch_new(req)
            while not finished:
                output = await stream.next()
                finished = output.finished
                yield output
        finally:
            self._requests.pop(request_id, None)
            unfinished = set(self.processor.abort_request(request_id) if not finished else [])
            for seq_id in [s for s in req.seqs]:
                route = self._drop_route(seq_id)
                if route is not None and seq_id in unfinished:
                    self._send_quietly(route.worker_id, AbortMsg([seq_id]))
            if not finished and self.metrics is not None and stream.error is None:
                self.metrics.on_finished(["abort"] * len(unfinished), time.monotonic() - stream.arrival)

    # --- placement and sending -----------------------------------------------------------------
    def _block_size(self) -> int:
        workers = self.view.alive()
        if not workers:
            raise EngineRequestError(503, "no worker is alive to serve this request: try again shortly")
        return workers[0].record.block_size

    def _dispatch_new(self, req: RoutedRequest) -> None:
        """Send a request to a prefill worker (P/D) or a whole-request worker."""
        prefill, decode = self.view.alive(("prefill",)), self.view.alive(("decode",))
        if prefill and decode:
            worker = self.placement.pick(prefill, req.hashes, len(req.prompt_token_ids))
            self._send_add(req, worker, "prefill", AddRequestMsg(
                req.request_id, req.prompt_token_ids, params_to_wire(req.params), req.cache_salt, kv_export=True))
            return
        whole = self.view.alive(("mixed",)) or self.view.alive()
        if not whole:
            raise EngineRequestError(503, "no worker is alive to serve this request: try again shortly")
        worker = self.placement.pick(whole, req.hashes, len(req.prompt_token_ids))
        self._send_add(req, worker, "whole", AddRequestMsg(
            req.request_id, req.prompt_token_ids, params_to_wire(req.params), req.cache_salt))

    def _send_add(self, req: RoutedRequest, worker: WorkerState, phase: str, msg: AddRequestMsg,
                  seq_ids: list[str] | None = None) -> None:
        seq_ids = seq_ids or [child_request_id(req.request_id, i, req.params.n) for i in range(req.params.n)]
        link = self._link(worker)
        try:
            link.send(msg)
        except PeerUnavailable:
            self.on_worker_lost(worker.worker_id, "a send to it failed")
            raise EngineRequestError(503, f"worker {worker.worker_id} is unreachable") from None
        worker.routed += 1
        uncached = len(req.prompt_token_ids) - self.view.cached_prefix_blocks(worker.worker_id, req.hashes) * (
            worker.record.block_size)
        for seq_id in seq_ids:
            self._drop_route(seq_id)
            route = SeqRoute(req.request_id, seq_id, worker.worker_id, phase, handoff=msg.kv_import)
            req.seqs[seq_id] = route
            self._routes[seq_id] = route
            worker.inflight[seq_id] = req.num_blocks
            if phase != "decode":
                worker.queued[seq_id] = uncached
        self.view.predict_cached(worker.worker_id, req.hashes)

    def _hand_off(self, req: RoutedRequest, seq_id: str, handoff: HandoffRecord) -> None:
        decode = self.view.alive(("decode",))
        if not decode:  # the decode pool is gone: any live worker continues (pulling, or recomputing)
            decode = self.view.alive()
        if not decode:
            raise EngineRequestError(503, "no decode worker is alive to continue this request")
        worker = self.placement.pick(decode, req.hashes, len(req.prompt_token_ids))
        self._send_add(req, worker, "decode", AddRequestMsg(
            seq_id, req.prompt_token_ids, params_to_wire(req.params), req.cache_salt, kv_import=handoff), [seq_id])

    def _link(self, worker: WorkerState) -> WorkerLink:
        link = self.links.get(worker.worker_id)
        if link is None:
            link = self.links[worker.worker_id] = WorkerLink(self, worker)
        return link

    def _drop_route(self, seq_id: str) -> SeqRoute | None:
        route = self._routes.pop(seq_id, None)
        if route is not None:
            state = self.view.workers.get(route.worker_id)
            if state is not None:
                state.inflight.pop(seq_id, None)
                state.queued.pop(seq_id, None)
        return route

    def _send_quietly(self, worker_id: str, msg) -> None:
        link = self.links.get(worker_id)
        if link is not None:
            try:
                link.send(msg)
            except PeerUnavailable:
                pass

    # --- from workers --------------------------------------------------------------------------
    def on_message(self, worker_id: str, msg) -> None:
        if isinstance(msg, EngineOutputsMsg):
            self._on_outputs(worker_id, msg.outputs)
        elif isinstance(msg, ErrorMsg):
            self._on_error(worker_id, msg)
        elif isinstance(msg, ReadyMsg):
            fut = self._ready.pop(worker_id, None)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        else:
            logger.warning("unexpected %s from %s", type(msg).__name__, worker_id)

    def _on_outputs(self, worker_id: str, outputs: list[SeqOutput]) -> None:
        mine = []
        for out in outputs:
            route = self._routes.get(out.request_id)
            if route is None or route.worker_id != worker_id:
                continue  # an aborted or failed-over sequence's late output
            route.started = True
            state = self.view.workers.get(worker_id)
            if state is not None:
                state.queued.pop(out.request_id, None)
            mine.append(out)
        if not mine:
            return
        processed = self.processor.process(mine)
        to_abort = set(processed.to_abort)
        for seq_id in to_abort:  # stop strings ended these sequences
            route = self._drop_route(seq_id)
            if route is not None:
                self._send_quietly(route.worker_id, AbortMsg([seq_id]))  # on a prefill worker: revokes the lease
        for out in mine:
            if out.finish_reason is not None:
                self._drop_route(out.request_id)
            elif out.handoff is not None and out.request_id not in to_abort:
                route = self._routes.get(out.request_id)
                req = self._requests.get(route.request_id) if route is not None else None
                if req is None:
                    continue
                route.started = False  # nothing streamed from the decode worker yet
                try:
                    self._hand_off(req, out.request_id, out.handoff)
                except EngineRequestError as exc:
                    req.stream.fail(exc)
        now = time.monotonic()
        for state in processed.updated:
            req = self._requests.get(state.request_id)
            if req is not None:
                req.stream.deliver(self.metrics, now)

    def _on_error(self, worker_id: str, msg: ErrorMsg) -> None:
        if msg.request_id is None:
            logger.error("worker %s: error %d: %s", worker_id, msg.code, msg.message)
            return
        # A plain or prefill AddRequestMsg names the request; a handoff names its sequence.
        route = self._routes.get(msg.request_id)
        request_id = route.request_id if route is not None else msg.request_id
        req = self._requests.get(request_id)
        if req is not None:
            req.stream.fail(EngineRequestError(msg.code, msg.message, msg.param))

    # --- failover ------------------------------------------------------------------------------
    def on_worker_lost(self, worker_id: str, why: str) -> None:
        """The worker left (connection dropped, send failed, heartbeat expired): out of the pool at
        once; its sequences that produced nothing there yet go elsewhere, the others fail."""
        self.view.mark_down(worker_id, _DOWN_S)
        affected = [r for r in self._routes.values() if r.worker_id == worker_id]
        if affected:
            logger.warning("worker %s lost (%s): %d sequence(s) affected", worker_id, why, len(affected))
        for route in affected:
            req = self._requests.get(route.request_id)
            self._drop_route(route.seq_id)
            if req is None:
                continue
            if route.started:
                req.stream.fail(EngineRequestError(
                    502, f"the worker serving this request ({worker_id}) died mid-stream: {why}"))
                continue
            self.num_failovers += 1
            try:
                if route.phase == "decode" and route.handoff is not None:
                    self._hand_off(req, route.seq_id, route.handoff)
                elif route.phase == "prefill" or req.params.n == 1:
                    if all(s.seq_id not in self._routes for s in req.seqs.values()):
                        self._dispatch_new(req)  # nothing of it runs anywhere: start over
                else:
                    req.stream.fail(EngineRequestError(502, f"worker {worker_id} died: {why}"))
            except EngineRequestError as exc:
                req.stream.fail(exc)

    async def sync_links(self) -> None:
        """Open links to live workers, close the ones of workers that left; workers the view
        says are gone have their sequences failed over."""
        for worker_id, link in list(self.links.items()):
            state = self.view.workers.get(worker_id)
            if state is None or not state.alive:
                self.on_worker_lost(worker_id, "its heartbeat stopped")
                del self.links[worker_id]
                await link.close()

    def ensure_link(self, worker: WorkerState) -> None:
        """Connect to a live worker ahead of its first request; the first one tells the model."""
        if worker.worker_id in self.links:
            return
        self._link(worker)
        if self.model_info is None:
            asyncio.create_task(self._hello_quietly(worker))

    async def _hello_quietly(self, worker: WorkerState) -> None:
        try:
            await self.hello(worker)
        except (TimeoutError, PeerUnavailable) as exc:
            logger.warning("worker %s did not answer hello: %s", worker.worker_id, exc)

    async def hello(self, worker: WorkerState, timeout_s: float = 10.0) -> ReadyMsg:
        """Ask a worker who it is (ModelInfo for the API comes from the first answer)."""
        link = self._link(worker)
        await asyncio.wait_for(link.connected.wait(), timeout_s)
        fut = self._ready[worker.worker_id] = asyncio.get_running_loop().create_future()
        link.send(HelloMsg(f"router-{self._instance}"))
        ready = await asyncio.wait_for(fut, timeout_s)
        if self.model_info is None:
            self.model_info = ModelInfo(ready.engine_id, ready.max_model_len, ready.vocab_size,
                                        tuple(ready.eos_token_ids), ready.block_size, ready.num_kv_blocks)
        return ready

    async def close(self) -> None:
        for link in self.links.values():
            await link.close()
        self.links.clear()
        self.ctx.term()
