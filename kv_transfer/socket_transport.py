"""The plain-socket transport: TCP (`tcp://HOST:PORT`, port 0 picks one) or a Unix socket
(`ipc:///path`), one thread per connection on the server, no ZeroMQ.

Why a third transport: ZeroMQ hands every received frame over in its own buffer, so a pull costs
one more copy (into the cache) than the wire does; here the puller receives each frame with
`recv_into` straight into its destination blocks when they are consecutive (else into a buffer it
scatters), like the UCX transport. The messages are the same as every transport's:
    client -> server   u64 size, KVPullMsg | KVLeaseMsg
    server -> client   u64 size, KVBlocksMsg | KVErrorMsg | KVLeaseAckMsg, then for a KVBlocksMsg
                       2*R*L raw frames (for each layer, for each run: K, V), each length * block_bytes,
                       or one frame per group of layers (staged caches; KVBlocksMsg.groups)
The header fixes every frame's size before a byte of them is received.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from tandem.kv_transfer.errors import KVTransferError
from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.transport import (
    KVBlockClient,
    KVBlockServer,
    KVBlockSink,
    KVBlockSource,
    KVCaches,
    KVDest,
    PhaseClock,
    PullStats,
)

_MAX_HEADER_BYTES = 16 << 20
_SIZE = struct.Struct("<Q")
_ACCEPT_POLL_S = 0.1


def _parse(addr: str) -> tuple[int, object]:
    """(address family, sockaddr) of tcp://HOST:PORT or ipc:///path."""
    if addr.startswith("tcp://"):
        host, port = addr[6:].rsplit(":", 1)
        if host in ("*", ""):
            raise ValueError("bind the KV server to a configured interface, not '*'")
        return socket.AF_INET, (host, int(port))
    if addr.startswith("ipc://"):
        return socket.AF_UNIX, addr[6:]
    raise ValueError(f"socket transport address must be tcp://HOST:PORT or ipc:///path, got {addr!r}")


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    """Fill `view`. On a blocking socket with SO_RCVTIMEO (the client's) one MSG_WAITALL call takes
    a whole frame: one release of the GIL instead of one per socket buffer (the engine's thread
    holds the GIL most of the time, so each taking back can wait)."""
    got = 0
    flags = socket.MSG_WAITALL if sock.gettimeout() is None else 0
    while got < len(view):
        try:
            n = sock.recv_into(view[got:], 0, flags)
        except BlockingIOError:  # SO_RCVTIMEO ran out with nothing received
            raise TimeoutError("receive timed out") from None
        if n == 0:
            raise ConnectionError("the peer closed the connection")
        got += n


def _recv_msg(sock: socket.socket) -> bytes:
    size = bytearray(_SIZE.size)
    _recv_exact(sock, memoryview(size))
    (n,) = _SIZE.unpack(size)
    if not 0 < n <= _MAX_HEADER_BYTES:
        raise KVTransferError("bad_message", f"message of {n} bytes, at most {_MAX_HEADER_BYTES}")
    buf = bytearray(n)
    _recv_exact(sock, memoryview(buf))
    return bytes(buf)


def _send_msg(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_SIZE.pack(len(payload)) + payload)


class SocketKVBlockServer(KVBlockServer):
    def __init__(
        self, addr: str, kv_caches: KVCaches, leases: LeaseTable, compat_hash: str,
        clock: Callable[[], float] = time.time, lease_ttl_s: float = 30.0,
    ) -> None:
        family, sockaddr = _parse(addr)
        self.source = KVBlockSource(kv_caches, leases, compat_hash, clock, lease_ttl_s)
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        if family == socket.AF_INET:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        elif os.path.exists(sockaddr):
            os.unlink(sockaddr)  # a stale socket file from an earlier run
        self._listener.bind(sockaddr)
        self._listener.listen(64)
        self._listener.settimeout(_ACCEPT_POLL_S)
        if family == socket.AF_INET:
            self.address = f"tcp://{sockaddr[0]}:{self._listener.getsockname()[1]}"
        else:
            self.address = addr
        self._path = sockaddr if family == socket.AF_UNIX else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="kv-socket-server", daemon=True)

    def start(self) -> SocketKVBlockServer:
        if not self._thread.is_alive() and not self._stop.is_set():
            self._thread.start()
        return self

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="kv-socket-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        # One helper thread builds layer i+1's frames (a gather of scattered blocks is a copy) while
        # this one sends layer i; both release the GIL for the bulk of their work.
        with conn, ThreadPoolExecutor(1, thread_name_prefix="kv-socket-gather") as gather:
            conn.settimeout(None)
            try:
                while not self._stop.is_set():
                    try:
                        request = _recv_msg(conn)
                    except KVTransferError:
                        return  # a peer that sends garbage is dropped
                    messages = self.source.serve_messages(request)
                    (header,) = next(messages)
                    _send_msg(conn, header)
                    pending = gather.submit(next, messages, None)
                    while (frames := pending.result()) is not None:
                        pending = gather.submit(next, messages, None)
                        for frame in frames:  # views of the leased blocks, or gathered copies
                            conn.sendall(frame)
            except (ConnectionError, OSError):
                return  # the peer closed or died: nothing to answer

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._listener.close()
        if self._path is not None and os.path.exists(self._path):
            os.unlink(self._path)


class SocketKVBlockClient(KVBlockClient):
    def __init__(self, compat_hash: str, timeout_s: float = 10.0, connect_timeout_s: float | None = None) -> None:
        self.compat_hash = compat_hash
        self.sink = KVBlockSink(compat_hash)
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s

    def pull(
        self, addr: str, lease_id: str, block_ids: list[int], dest: KVDest, layers: list[int] | None = None,
    ) -> PullStats:
        clock = PhaseClock()
        request = self.sink.request(lease_id, block_ids, dest, layers)
        with self._connect(addr) as sock:
            clock.mark("connect")
            try:
                _send_msg(sock, request)
                msg = self.sink.check_reply(_recv_msg(sock), lease_id, block_ids, dest, layers)
                clock.mark("header")
                # The header fixed every frame's size: receive straight into the cache (or the
                # layer's staging buffer) where it can.
                landing = self.sink.landing(msg, dest)
                try:
                    for u in range(landing.num_units):  # a layer's run frames, or a group's one frame
                        for target in landing.unit_targets(u):
                            if target.inplace is not None:
                                _recv_exact(sock, memoryview(target.inplace).cast("B"))
                            else:
                                buf = np.empty(target.nbytes, dtype=np.uint8)
                                _recv_exact(sock, memoryview(buf))
                                target.scatter(buf)
                        landing.commit_unit(u)
                    clock.mark("frames")
                finally:
                    landing.finish()  # also after a failure: no copy may land once the blocks are reused
                clock.mark("landing")
            except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_SNDTIMEO / SO_RCVTIMEO ran out
                raise KVTransferError("timeout", f"no complete reply from {addr} in {self.timeout_s}s") from None
            except (ConnectionError, OSError) as exc:
                raise KVTransferError("peer_gone", f"connection to {addr} failed: {exc}") from None
        return clock.stats(len(block_ids), len(msg.layers), 2 * len(msg.block_ids) * len(msg.layers) * msg.block_bytes)

    def _request_reply(self, addr: str, request: bytes) -> bytes:
        with self._connect(addr) as sock:
            try:
                _send_msg(sock, request)
                return _recv_msg(sock)
            except (TimeoutError, BlockingIOError):
                raise KVTransferError("timeout", f"no reply from {addr} in {self.timeout_s}s") from None
            except (ConnectionError, OSError) as exc:
                raise KVTransferError("peer_gone", f"connection to {addr} failed: {exc}") from None

    def _connect(self, addr: str) -> socket.socket:
        sock = _connect_raw(addr, self.connect_timeout_s)
        # Blocking, with kernel timeouts per call: a stalled reply fails within the timeout, and a
        # frame is received in one MSG_WAITALL call (see _recv_exact).
        sock.settimeout(None)
        timeval = struct.pack("ll", int(self.timeout_s), int(self.timeout_s % 1 * 1e6))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
        return sock


def _connect_raw(addr: str, timeout_s: float = 10.0) -> socket.socket:
    family, sockaddr = _parse(addr)
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(sockaddr)
    except (TimeoutError, OSError) as exc:
        sock.close()
        raise KVTransferError("peer_gone", f"no KV server reachable at {addr}: {exc}") from None
    return sock
