"""The ZeroMQ transport: a ROUTER socket served by a background thread, a fresh DEALER per pull.

tcp (`tcp://127.0.0.1:0` picks a free port) or ipc (`ipc:///path`). Reply frames are zero-copy
views of the KV caches (`copy=False`; scattered blocks gathered), one per layer, K or V and run (or one
frame per group of layers from staged GPU caches, in pinned memory); the
receiver copies each frame once, into its own cache.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator

import zmq

from tandem.kv_transfer.errors import KVTransferError
from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.transport import (
    KVBlockClient,
    KVBlockServer,
    KVBlockSink,
    KVBlockSource,
    KVCaches,
    KVDest,
    KVSpec,
    PhaseClock,
    PullStats,
)

_POLL_MS = 50  # how often the server thread looks at its stop flag
# Frames larger than this (a staged group of layers: up to 128 MiB) travel as zero-copy pieces of it:
# ZeroMQ moved 4 MiB frames at 4-5 GB/s and 128 MiB ones at 1.4-1.7 (two H200s, loopback, 2026-11-25).
PIECE_BYTES = 4 << 20
_MAX_REQUEST_BYTES = 16 << 20


class ZmqKVBlockServer(KVBlockServer):
    def __init__(
        self, addr: str, kv_caches: KVCaches, leases: LeaseTable, compat_hash: str,
        clock: Callable[[], float] = time.time, ctx: zmq.Context | None = None, lease_ttl_s: float = 30.0,
    ) -> None:
        if addr.startswith("tcp://*"):
            raise ValueError("bind the KV server to a configured interface, not '*'")
        self.source = KVBlockSource(kv_caches, leases, compat_hash, clock, lease_ttl_s)
        self._ctx = ctx or zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.MAXMSGSIZE, _MAX_REQUEST_BYTES)
        if addr.startswith("tcp://") and addr.rsplit(":", 1)[1] == "0":
            host = addr.rsplit(":", 1)[0]
            self.address = f"{host}:{self._socket.bind_to_random_port(host)}"
        else:
            self._socket.bind(addr)
            self.address = addr
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-server", daemon=True)

    def start(self) -> ZmqKVBlockServer:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        return self

    def _run(self) -> None:
        sock = self._socket
        try:
            while not self._stop.is_set():
                if not sock.poll(_POLL_MS, zmq.POLLIN):
                    continue
                identity, *frames = sock.recv_multipart(copy=False)
                request = frames[0].buffer if len(frames) == 1 else b""  # b"": answered as a bad message
                # The header, then one message per unit (layer or group): the puller copies unit i into its cache
                # while layer i+1 is on the wire.
                for i, message in enumerate(self.source.serve_messages(request)):
                    sock.send_multipart([identity, *(_pieces(message) if i else message)], copy=False)
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        else:
            self._socket.close(linger=0)


class ZmqKVBlockClient(KVBlockClient):
    def __init__(
        self, compat_hash: str, timeout_s: float = 10.0, connect_timeout_s: float | None = None,
        ctx: zmq.Context | None = None,
    ) -> None:
        self.compat_hash = compat_hash
        self.sink = KVBlockSink(compat_hash)
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self._ctx = ctx or zmq.Context.instance()

    def pull(
        self, addr: str, lease_id: str, block_ids: list[int], dest: KVDest, layers: list[int] | None = None,
    ) -> PullStats:
        clock = PhaseClock()
        request = self.sink.request(lease_id, block_ids, dest, layers)
        # No reply frame may be larger than the whole pull (or a header): a peer cannot make us
        # allocate more.
        spec = KVSpec.of(dest.kv_caches)
        run_cap = len(block_ids) * spec.block_bytes * 2 * (spec.num_layers if layers is None else len(layers))
        deadline = time.monotonic() + self.timeout_s
        with self._connect(addr, max(run_cap, _MAX_REQUEST_BYTES)) as sock:
            clock.mark("connect")
            sock.send(request)
            header, *rest = self._recv(sock, addr, deadline)
            msg = self.sink.check_reply(header.buffer, lease_id, block_ids, dest, layers)
            if rest:
                raise KVTransferError("bad_message", "the reply header came with extra frames")
            clock.mark("header")
            landing = self.sink.landing(msg, dest)
            try:
                for u in range(landing.num_units):  # a message per layer, or per group of layers
                    frames = self._recv(sock, addr, deadline)
                    self.sink.write_pieces(landing.unit_targets(u), [f.buffer for f in frames])
                    landing.commit_unit(u)
                clock.mark("frames")
            finally:
                landing.finish()  # also after a failure: no copy may land once the blocks are reused
            clock.mark("landing")
        return clock.stats(len(block_ids), len(msg.layers), len(block_ids) * len(msg.layers) * 2 * msg.block_bytes)

    def _request_reply(self, addr: str, request: bytes) -> bytes:
        header, *rest = self._exchange(addr, request, _MAX_REQUEST_BYTES)
        if rest:
            raise KVTransferError("bad_message", f"a one-frame reply expected, got {1 + len(rest)} frames")
        return header.bytes

    def _exchange(self, addr: str, request: bytes, max_frame_bytes: int) -> list[zmq.Frame]:
        with self._connect(addr, max_frame_bytes) as sock:
            sock.send(request)
            return self._recv(sock, addr, time.monotonic() + self.timeout_s)

    @contextlib.contextmanager
    def _connect(self, addr: str, max_frame_bytes: int) -> Iterator[zmq.Socket]:
        # A fresh socket per exchange: a late reply to an earlier, timed-out one can never be taken
        # for this one's.
        sock = self._ctx.socket(zmq.DEALER)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # writable only once a connection is up
            sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
            sock.connect(addr)
            if not sock.poll(int(self.connect_timeout_s * 1000), zmq.POLLOUT):
                raise KVTransferError("peer_gone", f"no KV server reachable at {addr}")
            yield sock
        finally:
            sock.close(linger=0)

    def _recv(self, sock: zmq.Socket, addr: str, deadline: float) -> list[zmq.Frame]:
        left_ms = int(max(deadline - time.monotonic(), 0) * 1000)
        if not sock.poll(left_ms, zmq.POLLIN):
            raise KVTransferError("timeout", f"no complete reply from {addr} in {self.timeout_s}s")
        return sock.recv_multipart(copy=False)


def _pieces(message: list) -> list:
    """A message's frames with any larger than PIECE_BYTES cut into views of at most that (no copy);
    the puller fills its targets from the pieces in order (KVBlockSink.write_pieces)."""
    out = []
    for frame in message:
        view = memoryview(frame)
        if view.nbytes <= PIECE_BYTES:
            out.append(frame)
            continue
        flat = view.cast("B")
        out.extend(flat[i:i + PIECE_BYTES] for i in range(0, flat.nbytes, PIECE_BYTES))
    return out
