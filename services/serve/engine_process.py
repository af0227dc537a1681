"""The engine process: an EngineCore behind two ZeroMQ sockets. It never parses HTTP and never
tokenizes; it takes AddRequestMsg / AbortMsg / StatsRequestMsg / ShutdownMsg and answers with
EngineOutputsMsg (one per step that produced tokens), StatsMsg and ErrorMsg.

Loop: drain the input socket (blocking poll when idle, non-blocking when busy), step, send.
A bad message or a refused request is answered with an ErrorMsg and the engine keeps serving; a
failing step is fatal (ErrorMsg code 500, exit 1). The engine exits when its parent dies.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass

import zmq

from tandem.shared.config import EngineConfig
from tandem.shared.engine.engine_core import EngineCore
from tandem.shared.sampling_params import InvalidParameterError
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
    params_from_wire,
)
from tandem.shared.wire.sockets import MsgPull, MsgPush, PeerUnavailable

logger = logging.getLogger("tandem.engine")

_IDLE_POLL_MS = 500  # how often an idle engine checks that its parent lives


@dataclass(frozen=True)
class EngineProcessConfig:
    engine: EngineConfig
    input_addr: str  # the engine PULLs requests from here (the frontend binds it)
    output_addr: str  # and PUSHes outputs here
    engine_id: str
    parent_pid: int
    stats_interval_s: float = 1.0  # unasked StatsMsg while busy; 0: only when asked


def run_engine_process(config: EngineProcessConfig) -> None:
    """The process target (multiprocessing spawn): load, serve until shutdown or parent death."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s [engine] %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the parent decides
    ctx = zmq.Context()
    inputs = MsgPull(ctx, config.input_addr, bind=False)
    outputs = MsgPush(ctx, config.output_addr, bind=False)
    code = 0
    try:
        try:
            engine = EngineCore(config.engine)
        except Exception as exc:
            logger.exception("engine failed to start")
            outputs.send(ErrorMsg(None, 500, f"the engine failed to start: {type(exc).__name__}: {exc}"))
            code = 1
            return
        code = EngineLoop(engine, inputs, outputs, config).run()
    finally:
        inputs.close()
        outputs.close()
        ctx.term()
        if code:
            sys.exit(code)


class EngineLoop:
    def __init__(self, engine: EngineCore, inputs: MsgPull, outputs: MsgPush, config: EngineProcessConfig) -> None:
        self.engine = engine
        self.inputs = inputs
        self.outputs = outputs
        self.config = config
        self.shutdown = False
        self._last_stats = 0.0

    def run(self) -> int:
        """Serve until ShutdownMsg (returns 0), parent death (0) or a failed step (1)."""
        mc, kv = self.engine.model_config, self.engine.kv
        self.outputs.send(ReadyMsg(
            engine_id=self.config.engine_id, pid=os.getpid(), model=str(self.engine.source.path),
            max_model_len=mc.max_model_len, vocab_size=mc.vocab_size,
            eos_token_ids=sorted(self.engine.eos_token_ids), block_size=kv.block_size, num_kv_blocks=kv.pool.num_blocks,
        ))
        while not self.shutdown:
            busy = self.engine.has_unfinished()
            if self.inputs.poll(0 if busy else _IDLE_POLL_MS):
                self._drain()
            if os.getppid() != self.config.parent_pid:
                logger.warning("the parent process is gone: exiting")
                return 0
            if self.shutdown:
                break
            if self.engine.has_unfinished():
                try:
                    step_outputs = self.engine.step()
                except Exception as exc:
                    logger.exception("engine step failed")
                    self._send(ErrorMsg(None, 500, f"the engine failed: {type(exc).__name__}: {exc}"))
                    return 1
                if step_outputs:
                    self._send(EngineOutputsMsg([SeqOutput.of(o) for o in step_outputs]))
                self._maybe_send_stats()
            elif busy:
                self._maybe_send_stats(force=True)  # just went idle: report it
        return 0

    def _drain(self) -> None:
        while self.inputs.poll(0):
            try:
                msg = self.inputs.recv()
            except WireError as exc:
                logger.warning("bad message: %s", exc)
                self._send(ErrorMsg(None, 400, f"bad message: {exc}"))
                continue
            self._handle(msg)

    def _handle(self, msg) -> None:
        if isinstance(msg, AddRequestMsg):
            try:
                params = params_from_wire(msg.params)
                self.engine.add_request(msg.request_id, msg.prompt_token_ids, params, msg.cache_salt)
            except InvalidParameterError as exc:
                self._send(ErrorMsg(msg.request_id, 400, str(exc), exc.param))
            except Exception as exc:  # a bug, not the request's fault: refuse it, keep serving
                logger.exception("add_request %s failed", msg.request_id)
                self._send(ErrorMsg(msg.request_id, 500, f"the engine could not add the request: {exc}"))
        elif isinstance(msg, AbortMsg):
            self.engine.abort(msg.request_ids)
        elif isinstance(msg, StatsRequestMsg):
            self._send_stats(msg.request_seq)
        elif isinstance(msg, ShutdownMsg):
            logger.info("shutting down%s", f": {msg.reason}" if msg.reason else "")
            self.shutdown = True
        else:
            logger.warning("unexpected message %s", type(msg).__name__)
            self._send(ErrorMsg(None, 400, f"an engine does not take {type(msg).__name__}"))

    def _maybe_send_stats(self, force: bool = False) -> None:
        interval = self.config.stats_interval_s
        if interval <= 0:
            return
        now = time.monotonic()
        if force or now - self._last_stats >= interval:
            self._send_stats(0)

    def _send_stats(self, request_seq: int) -> None:
        self._last_stats = time.monotonic()
        self._send(StatsMsg(request_seq, **dataclasses.asdict(self.engine.stats())))

    def _send(self, msg) -> None:
        try:
            self.outputs.send(msg)
        except PeerUnavailable:
            logger.warning("no frontend connected: %s dropped", type(msg).__name__)
