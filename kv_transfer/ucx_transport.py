"""The UCX transport via `ucxx` (optional: `pip install ucxx-cu12`); imported only when used.

UCX's listener API always runs over TCP (its peer error handling rules out shared memory; see
docs). ucxx is process-global and asyncio-based, so one `UcxRuntime` per process runs every UCX
call on its own event-loop thread; servers and clients submit coroutines to it.

On one endpoint, a pull is length-prefixed messages:
    client -> server   u64 size, KVPullMsg
    server -> client   u64 size, KVBlocksMsg | KVErrorMsg, then 2*R*L frames (for each layer, for
                       each run of blocks: K, V), each length * block_bytes, or one frame per group
                       of layers (staged caches; KVBlocksMsg.groups)
The client checks the header before it posts a single receive, then receives each frame
straight into its own KV cache when the run's destination blocks are consecutive too, else into
a buffer it copies from per block. GPU caches: frames are sent from and received into device
memory (UCX moves them with cuda_ipc between GPUs of one host, cuda_copy otherwise), or staged
through pinned host memory with TANDEM_UCX_DEVICE_MEMORY=0 (see staging.py).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import torch

try:
    import ucxx
except ImportError as exc:  # pragma: no cover - depends on the optional extra
    raise ImportError("the UCX KV transport needs ucxx: pip install ucxx-cu12") from exc

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
_MAX_IDLE_ENDPOINTS = 8  # kept per server: as many as pulls to it may run at once


class UcxRuntime:
    """The event-loop thread that owns this process' ucxx state."""

    _default: UcxRuntime | None = None
    _default_lock = threading.Lock()

    def __init__(self) -> None:
        # UCX finds its CUDA transports through the context current at init: a process that already
        # uses a GPU makes that device's current on the loop thread first.
        self.cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ucx-runtime", daemon=True)
        self._thread.start()
        self.run(self._init(), timeout=30)

    @classmethod
    def default(cls) -> UcxRuntime:
        with cls._default_lock:  # ucxx allows one context per process
            if cls._default is None:
                cls._default = cls()
            return cls._default

    async def _init(self) -> None:
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)
            torch.cuda.synchronize()  # creates the context on this thread
        ucxx.init()

    def run(self, coro, timeout: float | None = None):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)


async def _send_msg(ep, payload: bytes) -> None:
    await ep.send(np.array([len(payload)], dtype=np.uint64))
    await ep.send(np.frombuffer(payload, dtype=np.uint8))


async def _recv_msg(ep) -> bytes:
    size = np.empty(1, dtype=np.uint64)
    await ep.recv(size)
    n = int(size[0])
    if not 0 < n <= _MAX_HEADER_BYTES:
        raise KVTransferError("bad_message", f"message of {n} bytes, at most {_MAX_HEADER_BYTES}")
    buf = np.empty(n, dtype=np.uint8)
    await ep.recv(buf)
    return buf.tobytes()


class UcxKVBlockServer(KVBlockServer):
    """Listens on `ucx://HOST:PORT` (PORT 0: a free one). Note: ucxx listeners accept on every
    interface; HOST is only the address advertised to peers."""

    def __init__(
        self, addr: str, kv_caches: KVCaches, leases: LeaseTable, compat_hash: str,
        clock: Callable[[], float] = time.time, runtime: UcxRuntime | None = None, lease_ttl_s: float = 30.0,
        device_memory: bool | None = None,
    ) -> None:
        host, port = _parse(addr)
        device_memory = device_memory_default() if device_memory is None else device_memory
        self.source = KVBlockSource(kv_caches, leases, compat_hash, clock, lease_ttl_s, device_frames=device_memory)
        self.runtime = runtime or UcxRuntime.default()
        self._host, self._port = host, port
        self._listener = None
        self._endpoints: set = set()  # of connected pullers (touched on the loop's thread only)
        self.address = addr

    def start(self) -> UcxKVBlockServer:
        if self._listener is not None:
            return self

        async def listen():
            return ucxx.create_listener(self._handle, port=self._port or None)

        self._listener = self.runtime.run(listen(), timeout=30)
        self.address = f"ucx://{self._host}:{self._listener.port}"
        return self

    async def _handle(self, ep) -> None:
        self._endpoints.add(ep)
        try:
            while True:
                try:
                    request = await _recv_msg(ep)
                except KVTransferError:
                    return  # a peer that sends garbage is dropped
                messages = self.source.serve_messages(request)
                (header,) = next(messages)
                await _send_msg(ep, header)
                while True:  # per unit: views of the leased blocks, gathered copies, or a staged group
                    if self.source.staged:  # a gather on the GPU and a wait: not on this loop's thread
                        frames = await asyncio.to_thread(next, messages, None)
                    else:
                        frames = next(messages, None)
                    if frames is None:
                        break
                    await asyncio.gather(*(ep.send(_wire_buffer(frame)) for frame in frames))
        except Exception:  # the peer closed or died: nothing to answer
            return
        finally:
            self._endpoints.discard(ep)
            if not ep.closed:
                await ep.close()

    def close(self) -> None:
        """Stop listening and close the connections of pullers (which keep theirs between pulls)."""
        if self._listener is not None:
            listener, self._listener = self._listener, None

            async def stop():
                listener.close()
                for ep in list(self._endpoints):
                    await _close_quietly(ep)

            self.runtime.run(stop(), timeout=10)


class UcxKVBlockClient(KVBlockClient):
    def __init__(
        self, compat_hash: str, timeout_s: float = 10.0, connect_timeout_s: float | None = None,
        runtime: UcxRuntime | None = None, device_memory: bool | None = None,
    ) -> None:
        self.compat_hash = compat_hash
        device_memory = device_memory_default() if device_memory is None else device_memory
        self.sink = KVBlockSink(compat_hash, device_frames=device_memory)
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self.runtime = runtime or UcxRuntime.default()
        self._idle: dict[tuple[str, int], list] = {}  # (host, port) -> endpoints free for an exchange

    def pull(
        self, addr: str, lease_id: str, block_ids: list[int], dest: KVDest, layers: list[int] | None = None,
    ) -> PullStats:
        clock = PhaseClock()
        host, port = _parse(addr)
        request = self.sink.request(lease_id, block_ids, dest, layers)
        num_bytes, num_layers = self.runtime.run(
            self._pull(host, port, request, lease_id, block_ids, dest, layers, clock))
        return clock.stats(len(block_ids), num_layers, num_bytes)

    def _request_reply(self, addr: str, request: bytes) -> bytes:
        host, port = _parse(addr)

        async def exchange(ep):
            await _send_msg(ep, request)
            return await _recv_msg(ep)

        return self.runtime.run(self._on_endpoint(host, port, exchange))

    async def _pull(self, host, port, request, lease_id, block_ids, dest, layers, clock) -> tuple[int, int]:
        async def exchange(ep):
            clock.mark("connect")  # from the pull's call: the hop to this loop's thread, then the endpoint
            return await self._exchange(ep, request, lease_id, block_ids, dest, layers, clock)

        return await self._on_endpoint(host, port, exchange)

    async def _on_endpoint(self, host, port, exchange):
        """Run `exchange(ep)` under the timeout on an idle endpoint to the server kept from an earlier
        exchange (no connection setup: ~3 ms a pull on two H200s), else a new one; a kept endpoint
        that fails is closed and the exchange runs once more on a new one (the server may have gone and
        come back). UCX failures become KVTransferError. Runs on the loop's thread only."""
        ep = self._take_idle(host, port)
        if ep is not None:
            try:
                return await self._run_on(ep, host, port, exchange)
            except KVTransferError as exc:
                if exc.code != "peer_gone":
                    raise
        ep = await self._connect(host, port)
        return await self._run_on(ep, host, port, exchange)

    async def _connect(self, host, port):
        try:
            return await asyncio.wait_for(
                ucxx.create_endpoint(host, port, connect_timeout=self.connect_timeout_s), self.connect_timeout_s,
            )
        except (TimeoutError, ucxx.exceptions.UCXError) as exc:
            raise KVTransferError("peer_gone", f"no KV server reachable at {host}:{port}: {exc}") from None

    async def _run_on(self, ep, host, port, exchange):
        """The exchange on `ep`; kept for the next one if it completed, else closed (a half-read
        reply must never be taken for the next one's)."""
        done = False
        try:
            result = await asyncio.wait_for(exchange(ep), self.timeout_s)
            done = True
            return result
        except TimeoutError:
            raise KVTransferError("timeout", f"no complete reply from {host}:{port} in {self.timeout_s}s") from None
        except ucxx.exceptions.UCXError as exc:
            raise KVTransferError("peer_gone", f"connection to {host}:{port} failed: {exc}") from None
        finally:
            idle = self._idle.setdefault((host, port), [])
            if done and not ep.closed and len(idle) < _MAX_IDLE_ENDPOINTS:
                idle.append(ep)
            else:
                await _close_quietly(ep)

    def _take_idle(self, host, port):
        idle = self._idle.get((host, port), [])
        while idle:
            ep = idle.pop()
            if not ep.closed:
                return ep
        return None

    def close(self) -> None:
        """Close the kept endpoints."""
        async def close_all():
            for idle in self._idle.values():
                for ep in idle:
                    await _close_quietly(ep)
            self._idle.clear()

        self.runtime.run(close_all(), timeout=10)

    async def _exchange(self, ep, request, lease_id, block_ids, dest, layers, clock) -> tuple[int, int]:
        await _send_msg(ep, request)
        msg = self.sink.check_reply(await _recv_msg(ep), lease_id, block_ids, dest, layers)
        clock.mark("header")
        # The header fixed every frame's size before any receive. One layer's receives are posted
        # at once (UCX matches them in order): one await per frame would leave the wire idle.
        landing = self.sink.landing(msg, dest)
        try:
            for u in range(landing.num_units):  # a layer's run frames, or a group's one frame
                unit = landing.unit_targets(u)
                bufs = [t.inplace if t.inplace is not None else np.empty(t.nbytes, dtype=np.uint8) for t in unit]
                await asyncio.gather(*(ep.recv(buf) for buf in bufs))  # straight into the cache where it can
                for target, buf in zip(unit, bufs):
                    if target.inplace is None:
                        target.scatter(buf)
                landing.commit_unit(u)
            clock.mark("frames")
        finally:
            # Also after a failure: no copy may land once the blocks are reused. Waiting for the GPU
            # happens off this loop's thread, where other pulls progress meanwhile.
            await asyncio.to_thread(landing.finish)
        clock.mark("landing")
        return 2 * len(msg.block_ids) * len(msg.layers) * msg.block_bytes, len(msg.layers)


async def _close_quietly(ep) -> None:
    """Close an endpoint that may be broken already (closing one whose peer died can raise)."""
    if not ep.closed:
        try:
            await ep.close()
        except Exception:
            pass


def device_memory_default() -> bool:
    """Whether GPU caches' frames travel from and to device memory (UCX cuda_copy / cuda_ipc):
    yes unless TANDEM_UCX_DEVICE_MEMORY=0 (then they are staged through pinned host memory)."""
    return os.environ.get("TANDEM_UCX_DEVICE_MEMORY", "1") != "0"


def _wire_buffer(frame) -> np.ndarray | torch.Tensor:
    """What ucxx sends: device tensors as they are (__cuda_array_interface__), host buffers as arrays."""
    return frame if isinstance(frame, torch.Tensor) else np.asarray(frame)


def _parse(addr: str) -> tuple[str, int]:
    if not addr.startswith("ucx://") or ":" not in addr[6:]:
        raise ValueError(f"UCX address must be ucx://HOST:PORT, got {addr!r}")
    host, port = addr[6:].rsplit(":", 1)
    return host, int(port)
