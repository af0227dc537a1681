"""WorkerClient: a blocking client of one worker's request socket (tests, scripts, benchmarks).
The router has its own asyncio client; both speak the same messages (shared/wire/messages.py)."""

from __future__ import annotations

import itertools
import time
import uuid
from typing import Any

import zmq

from tandem.shared.wire.messages import (
    AbortMsg,
    AddRequestMsg,
    HandoffRecord,
    HelloMsg,
    ReadyMsg,
    ShutdownMsg,
    StatsMsg,
    StatsRequestMsg,
    params_to_wire,
)
from tandem.shared.wire.sockets import MsgDealer


class WorkerClient:
    def __init__(self, zmq_addr: str, ctx: zmq.Context | None = None) -> None:
        self._ctx = ctx or zmq.Context.instance()
        self.sock = MsgDealer(self._ctx, zmq_addr)
        self.client_id = uuid.uuid4().hex[:8]
        self._seq = itertools.count(1)
        self.pending: list[Any] = []  # messages received while waiting for another one

    def close(self) -> None:
        self.sock.close()

    def hello(self, timeout_s: float = 30.0) -> ReadyMsg:
        self.sock.send(HelloMsg(self.client_id))
        return self.wait_for(lambda m: isinstance(m, ReadyMsg), timeout_s)

    def add(self, request_id: str, prompt_token_ids: list[int], params, *, kv_export: bool = False,
            kv_import: HandoffRecord | None = None, cache_salt: str | None = None) -> None:
        self.sock.send(AddRequestMsg(request_id, list(prompt_token_ids), params_to_wire(params), cache_salt,
                                     kv_export, kv_import))

    def abort(self, seq_ids: list[str]) -> None:
        self.sock.send(AbortMsg(list(seq_ids)))

    def shutdown(self, reason: str = "") -> None:
        self.sock.send(ShutdownMsg(reason))

    def stats(self, timeout_s: float = 10.0) -> StatsMsg:
        seq = next(self._seq)
        self.sock.send(StatsRequestMsg(seq))
        return self.wait_for(lambda m: isinstance(m, StatsMsg) and m.request_seq == seq, timeout_s)

    def recv(self, timeout_s: float) -> Any | None:
        """The next message (earlier set-aside ones first), or None after the timeout."""
        if self.pending:
            return self.pending.pop(0)
        if not self.sock.poll(int(timeout_s * 1000)):
            return None
        return self.sock.recv()

    def wait_for(self, match, timeout_s: float) -> Any:
        """The first message that `match`es; others are kept (in order) for recv."""
        deadline = time.monotonic() + timeout_s
        kept: list[Any] = []
        try:
            for i, msg in enumerate(self.pending):
                if match(msg):
                    del self.pending[i]
                    return msg
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not self.sock.poll(int(left * 1000)):
                    raise TimeoutError(f"no matching answer from {self.sock.address} in {timeout_s}s")
                msg = self.sock.recv()
                if match(msg):
                    return msg
                kept.append(msg)
        finally:
            self.pending.extend(kept)

    def wait_idle(self, timeout_s: float = 30.0, poll_s: float = 0.05) -> StatsMsg:
        """Stats once nothing runs, waits or holds a block (leases released or expired)."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.stats()
            if s.num_used_blocks == 0 and s.num_running == 0 and s.num_waiting == 0:
                return s
            if time.monotonic() > deadline:
                return s
            time.sleep(poll_s)
