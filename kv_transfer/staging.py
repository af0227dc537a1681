"""Staged KV frames: for caches a transport cannot read or write in place, i.e. GPU memory.

Serving side (`LayerGather`): per layer, one gather of the requested blocks' K and V (in request
order) into a fresh [2, n, block_bytes] buffer, on a side CUDA stream, then one copy into pinned
host memory for a host transport (ZeroMQ, sockets), or none for a transport that reads device
memory itself (UCX with cuda_copy / cuda_ipc). Layer i+1 is gathered while layer i is on the wire.
A run's frame is a slice of that buffer, so the wire format is every transport's.

Pulling side (`StagedLanding`): per layer, the frames land in one [2, n, block_bytes] buffer (pinned
host memory, or device memory for UCX), then one copy to the device and one scatter (index_copy_)
into the cache's destination blocks, on a side stream; `finish` waits for that stream, so the pull
is reported done only once the blocks hold the bytes.

Ordering: the served blocks are leased, so nothing writes them; their KV was written by a step whose
sampled token the host had read before the handoff existed. The pulled-into blocks belong to a
request waiting for its KV, which no step reads or writes; the landing's stream still waits for
the work already queued on the device's current stream (a zeroing of fresh blocks, say).

On CPU the same classes run with plain host buffers and no streams (tests exercise them there).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]


def block_table(cache: torch.Tensor) -> torch.Tensor:
    """A [num_blocks, block_bytes] uint8 view of a contiguous cache (any device, any dtype): no copy."""
    return cache.view(-1).view(torch.uint8).view(cache.shape[0], -1)


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    return torch.cuda.Stream(device) if device.type == "cuda" else None


def _ids_on(block_ids: list[int], device: torch.device, stream: torch.cuda.Stream | None) -> torch.Tensor:
    """Block ids as a long tensor on `device`, copied on `stream` (the one that reads them)."""
    ids = torch.tensor(block_ids, dtype=torch.long)
    if stream is None:
        return ids
    with torch.cuda.device(device), torch.cuda.stream(stream):
        return ids.to(device, non_blocking=True)


class _Staged:
    """One layer's buffer and the event after which it holds the bytes."""

    def __init__(self, data: torch.Tensor, done: torch.cuda.Event | None) -> None:
        self.data = data  # [2, n, block_bytes] uint8
        self.done = done


class LayerGather:
    """Serving side: `layer_frames` yields, per layer, the 2*R frames of a reply (see module doc)."""

    def __init__(self, kv_caches: KVCaches, to_host: bool = True) -> None:
        self.tables = [(block_table(k), block_table(v)) for k, v in kv_caches]
        self.device = kv_caches[0][0].device
        self.to_host = to_host or self.device.type == "cpu"
        self.stream = _side_stream(self.device)

    def layer_frames(self, layers: list[int], block_ids: list[int], runs: list[list[int]],
                     ) -> Iterator[list[memoryview | torch.Tensor]]:
        ids = _ids_on(block_ids, self.device, self.stream)
        pending = self._launch(layers[0], ids) if layers else None
        for i in range(len(layers)):
            staged = pending
            if i + 1 < len(layers):
                pending = self._launch(layers[i + 1], ids)  # queued behind this one on the side stream
            if staged.done is not None:
                staged.done.synchronize()
            yield self._frames(staged.data, runs)

    def _launch(self, layer: int, ids: torch.Tensor) -> _Staged:
        key, value = self.tables[layer]
        if self.stream is None:
            data = torch.stack((key.index_select(0, ids), value.index_select(0, ids)))
            return _Staged(data, None)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            data = torch.empty((2, len(ids), key.shape[1]), dtype=torch.uint8, device=self.device)
            torch.index_select(key, 0, ids, out=data[0])
            torch.index_select(value, 0, ids, out=data[1])
            if self.to_host:
                # The caching host allocator keeps the pinned block until this copy is done and the
                # frames (which hold the tensor through their numpy base) are dropped by the transport.
                host = torch.empty(data.shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(data, non_blocking=True)
                data = host
            done = torch.cuda.Event()
            done.record(self.stream)
        return _Staged(data, done)

    def _frames(self, data: torch.Tensor, runs: list[list[int]]) -> list[memoryview | torch.Tensor]:
        frames: list[memoryview | torch.Tensor] = []
        if data.device.type == "cpu":
            rows = data.numpy()  # its base keeps `data` alive while a transport holds the frames
            for first, length in runs:
                frames.append(memoryview(rows[0, first:first + length].reshape(-1)))
                frames.append(memoryview(rows[1, first:first + length].reshape(-1)))
        else:
            for first, length in runs:
                frames.append(data[0, first:first + length].reshape(-1))
                frames.append(data[1, first:first + length].reshape(-1))
        return frames


class StagedLanding:
    """Pulling side: per layer, buffers to receive the frames into, then `commit` them to the cache."""

    def __init__(self, kv_caches: KVCaches, dest_block_ids: list[int], block_bytes: int, on_device: bool = False,
                 ) -> None:
        self.device = kv_caches[0][0].device
        self.tables = [(block_table(k), block_table(v)) for k, v in kv_caches]
        self.num_blocks = len(dest_block_ids)
        self.block_bytes = block_bytes
        self.on_device = on_device and self.device.type == "cuda"
        self.stream = _side_stream(self.device)
        if self.stream is not None:
            # Work already queued on the device (a zeroing of fresh blocks) lands before ours.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.ids = _ids_on(dest_block_ids, self.device, self.stream)
        self._buffers: dict[int, torch.Tensor] = {}

    def buffer(self, layer: int) -> torch.Tensor:
        """The [2, n, block_bytes] buffer that layer `layer`'s frames land in (K run frames in [0], V in [1])."""
        shape = (2, self.num_blocks, self.block_bytes)
        if self.on_device:
            with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                buf = torch.empty(shape, dtype=torch.uint8, device=self.device)
        else:
            buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
        self._buffers[layer] = buf
        return buf

    def commit(self, layer: int) -> None:
        """Layer `layer`'s frames have landed in its buffer: copy them into the destination blocks."""
        buf = self._buffers.pop(layer)
        key, value = self.tables[layer]
        if self.stream is None:
            key.index_copy_(0, self.ids, buf[0])
            value.index_copy_(0, self.ids, buf[1])
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # A pinned source is kept by the caching host allocator until this copy is done.
            data = buf if buf.device.type == "cuda" else buf.to(self.device, non_blocking=True)
            key.index_copy_(0, self.ids, data[0])
            value.index_copy_(0, self.ids, data[1])

    def finish(self) -> None:
        """Wait until every committed layer is in the cache."""
        if self.stream is not None:
            self.stream.synchronize()
