"""Engine clients: what the HTTP layer needs from an engine, and the ZeroMQ implementation
that talks to one engine process.

`generate()` yields cumulative RequestOutputs (text, token ids and logprobs so far); a consumer
that falls behind simply gets the latest one, never a backlog. Detokenization and stop strings
run here (OutputProcessor), on the event loop; model code never does.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import zmq.asyncio

from tandem.shared.engine.engine_core import child_request_id
from tandem.shared.engine.output_processor import OutputProcessor, RequestState
from tandem.shared.outputs import RequestOutput
from tandem.shared.sampling_params import SamplingParams
from tandem.shared.wire.codec import WireError
from tandem.shared.wire.messages import (
    AbortMsg,
    AddRequestMsg,
    EngineOutputsMsg,
    ErrorMsg,
    ReadyMsg,
    SeqOutput,
    ShutdownMsg,
    StatsMsg,
    StatsRequestMsg,
    params_to_wire,
)
from tandem.shared.wire.sockets import AsyncMsgPull, MsgPush, PeerUnavailable

logger = logging.getLogger("tandem.frontend")


class EngineDeadError(RuntimeError):
    """The engine is gone: every request fails with this, /health answers 503."""


class EngineRequestError(Exception):
    """The engine refused or failed one request (code 400 with the field in `param`, or 500)."""

    def __init__(self, code: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass(frozen=True)
class ModelInfo:
    engine_id: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: tuple[int, ...]
    block_size: int
    num_kv_blocks: int


class RequestMetrics(Protocol):
    """Timing hooks the client calls (the server's Prometheus metrics implement them)."""

    def on_first_token(self, ttft_s: float) -> None: ...
    def on_next_token(self, itl_s: float) -> None: ...
    def on_finished(self, finish_reasons: list[str], e2e_s: float) -> None: ...


class EngineClient(Protocol):
    """What the OpenAI layer needs; the router (issue 5) brings a second implementation."""

    model_info: ModelInfo

    @property
    def dead_reason(self) -> str | None: ...

    def generate(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    async def get_stats(self) -> StatsMsg | None: ...


class RequestStream:
    """One request's mailbox: the reader task marks it updated; the consumer snapshots the state."""

    def __init__(self, state: RequestState) -> None:
        self.state = state
        self.arrival = time.monotonic()
        self.last_token_time: float | None = None
        self.error: BaseException | None = None
        self._updated = asyncio.Event()

    def notify(self) -> None:
        self._updated.set()

    def deliver(self, metrics: RequestMetrics | None, now: float) -> None:
        """The state has new output: time it in the metrics (first token, next token, finished)
        and wake the consumer."""
        if metrics is not None:
            if self.last_token_time is None:
                metrics.on_first_token(now - self.arrival)
            else:
                metrics.on_next_token(now - self.last_token_time)
            if self.state.num_unfinished == 0:
                metrics.on_finished([c.output.finish_reason or "abort" for c in self.state.choices],
                                    now - self.arrival)
        self.last_token_time = now
        self.notify()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self._updated.set()

    async def next(self) -> RequestOutput:
        await self._updated.wait()
        self._updated.clear()
        if self.error is not None:
            raise self.error
        return self.state.snapshot()


class EngineSockets:
    """The frontend's two sockets, bound before the engine process starts (it connects)."""

    def __init__(self, input_addr: str, output_addr: str) -> None:
        self.ctx = zmq.asyncio.Context()
        self.input = MsgPush(self.ctx, input_addr, bind=True)
        self.output = AsyncMsgPull(self.ctx, output_addr, bind=True)

    def close(self) -> None:
        self.input.close()
        self.output.close()
        self.ctx.term()


class ZmqEngineClient:
    """Talks to one engine process. Lifecycle: `await wait_ready()`, `start()`, ...,
    `mark_dead(reason)` when a watchdog sees the engine die, `close()`."""

    def __init__(self, sockets: EngineSockets, tokenizer, metrics: RequestMetrics | None = None) -> None:
        self.sockets = sockets
        self.processor = OutputProcessor(tokenizer)
        self.metrics = metrics
        self.model_info: ModelInfo | None = None
        self.engine_pid: int | None = None
        self._streams: dict[str, RequestStream] = {}
        self._dead_reason: str | None = None
        self._fatal_message: str | None = None  # an engine's last words (ErrorMsg 500)
        self._latest_stats: StatsMsg | None = None
        self._stats_seq = itertools.count(1)
        self._stats_waiters: list[tuple[int, asyncio.Future]] = []
        self._reader: asyncio.Task | None = None
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------------------
    async def wait_ready(self, timeout_s: float, is_alive=lambda: True) -> ModelInfo:
        """Wait for the engine's ReadyMsg; raise EngineDeadError if it dies or fails first."""
        deadline = time.monotonic() + timeout_s
        while True:
            if not is_alive():
                raise EngineDeadError(self._fatal_message or "the engine process exited while loading")
            if time.monotonic() > deadline:
                raise EngineDeadError(f"the engine did not become ready in {timeout_s:.0f} s")
            try:
                msg = await asyncio.wait_for(self.sockets.output.recv(), 0.5)
            except TimeoutError:
                continue
            except WireError as exc:
                raise EngineDeadError(f"the engine speaks another protocol: {exc}") from None
            if isinstance(msg, ErrorMsg):
                self._fatal_message = msg.message
            elif isinstance(msg, ReadyMsg):
                self.engine_pid = msg.pid
                self.model_info = ModelInfo(
                    msg.engine_id, msg.max_model_len, msg.vocab_size, tuple(msg.eos_token_ids), msg.block_size,
                    msg.num_kv_blocks,
                )
                return self.model_info

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read_outputs(), name="engine-output-reader")

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    def mark_dead(self, reason: str) -> None:
        """The engine is gone: fail every in-flight request with a clear error."""
        if self._dead_reason is not None:
            return
        if self._fatal_message:
            reason = f"{reason}: {self._fatal_message}"
        self._dead_reason = reason
        logger.error("%s; failing %d in-flight request(s)", reason, len(self._streams))
        error = EngineDeadError(reason)
        for stream in self._streams.values():
            stream.fail(error)
        for _, fut in self._stats_waiters:
            if not fut.done():
                fut.set_result(None)

    async def close(self, reason: str = "server shutdown") -> None:
        if self._closed:
            return
        self._closed = True
        if self._dead_reason is None:
            try:
                self.sockets.input.send(ShutdownMsg(reason))
            except PeerUnavailable:
                pass
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass

    # --- requests ------------------------------------------------------------------------------------
    async def generate(
        self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
        cache_salt: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if request_id in self._streams:
            raise EngineRequestError(400, f"request {request_id!r} is already running", "request_id")
        seq_ids = [child_request_id(request_id, i, params.n) for i in range(params.n)]
        stream = RequestStream(self.processor.add_request(request_id, seq_ids, prompt, prompt_token_ids, params))
        self._streams[request_id] = stream
        finished = False
        try:
            self._send(AddRequestMsg(request_id, list(prompt_token_ids), params_to_wire(params), cache_salt))
            while not finished:
                output = await stream.next()
                finished = output.finished
                yield output
        finally:
            del self._streams[request_id]
            if not finished:  # the client went away, or the engine refused or died
                unfinished = self.processor.abort_request(request_id)
                if unfinished and self._dead_reason is None:
                    try:
                        self._send(AbortMsg(unfinished))
                    except EngineDeadError:
                        pass
                if self.metrics is not None and stream.error is None:
                    self.metrics.on_finished(["abort"] * len(unfinished), time.monotonic() - stream.arrival)

    async def get_stats(self, timeout_s: float = 2.0) -> StatsMsg | None:
        """Fresh engine stats (answered after the engine's current step); the last known ones
        if the engine does not answer in time or is dead."""
        if self._dead_reason is not None:
            return self._latest_stats
        seq = next(self._stats_seq)
        fut = asyncio.get_running_loop().create_future()
        self._stats_waiters.append((seq, fut))
        try:
            self._send(StatsRequestMsg(seq))
            return await asyncio.wait_for(fut, timeout_s) or self._latest_stats
        except (TimeoutError, EngineDeadError):
            return self._latest_stats
        finally:
            self._stats_waiters = [(s, f) for s, f in self._stats_waiters if f is not fut]

    def _send(self, msg) -> None:
        try:
            self.sockets.input.send(msg)
        except PeerUnavailable as exc:
            raise EngineDeadError(f"the engine is unreachable: {exc}") from None

    # --- the reader task ---------------------------------------------------------------------------
    async def _read_outputs(self) -> None:
        while True:
            try:
                msg = await self.sockets.output.recv()
            except WireError as exc:
                logger.error("undecodable message from the engine: %s", exc)
                continue
            except Exception as exc:  # the socket itself failed: nothing more will arrive
                logger.exception("the engine output socket failed")
                self.mark_dead(f"the engine connection failed: {type(exc).__name__}: {exc}")
                return
            try:
                if isinstance(msg, EngineOutputsMsg):
                    self._on_outputs(msg.outputs)
                elif isinstance(msg, StatsMsg):
                    self._on_stats(msg)
                elif isinstance(msg, ErrorMsg):
                    self._on_error(msg)
                else:
                    logger.warning("unexpected %s from the engine", type(msg).__name__)
            except Exception:  # one bad output must not stop every other request's stream
                logger.exception("failed to process %s", type(msg).__name__)

    def _on_outputs(self, outputs: list[SeqOutput]) -> None:
        processed = self.processor.process(outputs)
        if processed.to_abort:  # stop strings ended these sequences
            try:
                self._send(AbortMsg(processed.to_abort))
            except EngineDeadError:
                pass
        now = time.monotonic()
        for state in processed.updated:
            stream = self._streams.get(state.request_id)
            if stream is not None:
                stream.deliver(self.metrics, now)

    def _on_stats(self, msg: StatsMsg) -> None:
        self._latest_stats = msg
        for seq, fut in self._stats_waiters:
            if seq <= msg.request_seq and not fut.done():
                fut.set_result(msg)

    def _on_error(self, msg: ErrorMsg) -> None:
        if msg.request_id is None:
            if msg.code >= 500:
                self._fatal_message = msg.message  # the engine exits next; the watchdog reports it
            logger.error("engine error %d: %s", msg.code, msg.message)
            return
        stream = self._streams.get(msg.request_id)
        if stream is not None:
            stream.fail(EngineRequestError(msg.code, msg.message, msg.param))
