"""Typed ZeroMQ sockets that send and receive `*Msg` objects (wire.messages): PUSH/PULL pairs
(serve's frontend and engine), ROUTER/DEALER (a worker and its clients).

Sends never block: high-water marks are off and a send that cannot be queued (no peer) raises
PeerUnavailable, so an engine loop or an event loop never hangs on a dead peer. Addresses are
ipc paths in a private temp folder, or tcp on loopback; nothing binds to all interfaces unless
the caller passes such an address itself.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import zmq
import zmq.asyncio

from tandem.shared.wire.codec import WireError
from tandem.shared.wire.messages import decode_msg, encode_msg

_LINGER_MS = 1000  # on close, queued messages (a ShutdownMsg) get this long to leave
_MAX_MESSAGE_BYTES = 64 << 20  # a request or an output batch; KV blocks never travel here


class PeerUnavailable(ConnectionError):
    """The message could not be queued: no peer is connected."""


def ipc_address(folder: str, name: str) -> str:
    return f"ipc://{os.path.join(folder, name)}"


def _configure(sock: zmq.Socket, addr: str, bind: bool) -> str:
    sock.setsockopt(zmq.LINGER, _LINGER_MS)
    sock.setsockopt(zmq.SNDHWM, 0)
    sock.setsockopt(zmq.RCVHWM, 0)
    if not bind:
        sock.connect(addr)
        return addr
    if addr.startswith("tcp://") and addr.rsplit(":", 1)[1] == "0":  # tcp://HOST:0 -> a free port
        port = sock.bind_to_random_port(addr.rsplit(":", 1)[0])
        return f"{addr.rsplit(':', 1)[0]}:{port}"
    sock.bind(addr)
    return addr


def _send_now(sock: zmq.Socket, frames: list, unavailable: str) -> None:
    """Queue a message without blocking; PeerUnavailable(`unavailable`) if it cannot be queued."""
    try:
        result = sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=len(frames) == 1)
    except zmq.Again:
        raise PeerUnavailable(unavailable) from None
    if isinstance(result, asyncio.Future):  # an asyncio socket answers with a done future
        exc = result.exception()
        if isinstance(exc, zmq.Again):
            raise PeerUnavailable(unavailable)
        if exc is not None:
            raise exc


class MsgPush:
    """The sending end (blocking-free). `address` is the bound address (a real port for tcp ...:0)."""

    def __init__(self, ctx: zmq.Context, addr: str, *, bind: bool) -> None:
        self.socket = ctx.socket(zmq.PUSH)
        self.address = _configure(self.socket, addr, bind)

    def send(self, msg: Any) -> None:
        _send_now(self.socket, encode_msg(msg), f"no peer on {self.address}")

    def close(self) -> None:
        self.socket.close()


class MsgPull:
    """The receiving end, blocking with a poll timeout (the engine loop)."""

    def __init__(self, ctx: zmq.Context, addr: str, *, bind: bool) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.address = _configure(self.socket, addr, bind)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.socket.poll(timeout_ms, zmq.POLLIN))

    def recv(self) -> Any:
        """The next message; raises WireError for one that does not decode (it is consumed)."""
        return decode_msg(self.socket.recv_multipart(copy=True))

    def close(self) -> None:
        self.socket.close()


class AsyncMsgPull:
    """The receiving end on an asyncio loop; needs a zmq.asyncio.Context."""

    def __init__(self, ctx: zmq.asyncio.Context, addr: str, *, bind: bool) -> None:
        self.socket = ctx.socket(zmq.PULL)
        self.address = _configure(self.socket, addr, bind)

    async def recv(self) -> Any:
        return decode_msg(await self.socket.recv_multipart(copy=True))

    def close(self) -> None:
        self.socket.close()


class MsgRouter:
    """A worker's request socket (ROUTER, bound): many clients (routers, test drivers) each own a
    DEALER; every message comes with its sender's identity and replies go to that identity. A send
    to a client that is gone raises PeerUnavailable (ROUTER_MANDATORY), so its requests can be
    aborted."""

    def __init__(self, ctx: zmq.Context, addr: str) -> None:
        self.socket = ctx.socket(zmq.ROUTER)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.socket.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
        self.address = _configure(self.socket, addr, bind=True)

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.socket.poll(timeout_ms, zmq.POLLIN))

    def recv(self) -> tuple[bytes, Any]:
        """(identity, message); raises BadMessage (carrying the identity) for one that does not decode."""
        identity, *frames = self.socket.recv_multipart(copy=True)
        try:
            return identity, decode_msg(frames)
        except WireError as exc:
            raise BadMessage(identity, exc) from None

    def send(self, identity: bytes, msg: Any) -> None:
        frames = encode_msg(msg)
        try:
            self.socket.send_multipart([identity, *frames], flags=zmq.NOBLOCK, copy=len(frames) == 1)
        except zmq.ZMQError as exc:  # EHOSTUNREACH (gone) or EAGAIN
            raise PeerUnavailable(f"client {identity.hex()[:8]} is gone: {exc}") from None

    def close(self) -> None:
        self.socket.close()


class BadMessage(Exception):
    def __init__(self, identity: bytes, error: Exception) -> None:
        super().__init__(str(error))
        self.identity = identity
        self.error = error


class MsgDealer:
    """A client's socket to one worker (DEALER, connected). Sync (a zmq.Context) or asyncio (a
    zmq.asyncio.Context: then `recv` is awaited)."""

    def __init__(self, ctx: zmq.Context, addr: str) -> None:
        self.socket = ctx.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.MAXMSGSIZE, _MAX_MESSAGE_BYTES)
        self.address = _configure(self.socket, addr, bind=False)

    def send(self, msg: Any) -> None:
        _send_now(self.socket, encode_msg(msg), f"no worker on {self.address}")

    def poll(self, timeout_ms: int) -> bool:
        return bool(self.socket.poll(timeout_ms, zmq.POLLIN))

    def recv(self):
        """The next message (sync) or an awaitable of it (asyncio); WireError if it does not decode."""
        frames = self.socket.recv_multipart(copy=True)
        if isinstance(frames, asyncio.Future):
            return _decode_when_done(frames)
        return decode_msg(frames)

    def close(self) -> None:
        self.socket.close(linger=0)


async def _decode_when_done(frames) -> Any:
    return decode_msg(await frames)
