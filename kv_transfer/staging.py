"""Staged KV frames: for caches a transport cannot read or write in place, i.e. GPU memory.

Serving side (`LayerGather`): the requested layers are cut into groups of consecutive layers of at
most GROUP_BYTES; per group, one gather of every layer's K and V blocks (in request order) into a
fresh [layers, 2, n, block_bytes] buffer on a side CUDA stream, then one copy into pinned host
memory for a host transport (ZeroMQ, sockets), or none for a transport that reads device memory
itself (UCX with cuda_copy / cuda_ipc). Group g+1 is gathered while group g is on the wire. The
reply is one frame per group (KVBlocksMsg.groups), that buffer as it is.

Pulling side (`StagedLanding`): frames land in one buffer per group (pinned host memory, or device
memory for UCX); once a group's last layer has landed, one copy to the device and one scatter
(index_copy_) into the destination blocks, on a side stream; `finish` waits for that stream, so the
pull is reported done only once the blocks hold the bytes.

Few calls, on purpose: these run on transfer threads beside the engine's thread, and every torch
call gives up the GIL and must win it back (up to the switch interval while the engine runs Python).
When the runner's caches are views of one allocation (`KVTables`), a group is one gather and one
scatter, whatever its number of layers.

Ordering: the served blocks are leased, so nothing writes them; their KV was written by a step whose
sampled token the host had read before the handoff existed. The pulled-into blocks belong to a
request waiting for its KV, which no step reads or writes; the landing's stream still waits for
the work already queued on the device's current stream (a zeroing of fresh blocks, say).

On CPU the same classes run with plain host buffers and no streams (tests exercise them there).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]

# At most this many bytes of a reply are staged at once (per group of layers).
GROUP_BYTES = 128 << 20


def block_table(cache: torch.Tensor) -> torch.Tensor:
    """A [num_blocks, block_bytes] uint8 view of a contiguous cache (any device, any dtype): no copy."""
    return cache.view(-1).view(torch.uint8).view(cache.shape[0], -1)


class KVTables:
    """The caches as [num_blocks, block_bytes] byte tables, and, when every layer's K and V are
    consecutive views of one allocation (K0, V0, K1, V1, ...), one [2 * layers, num_blocks,
    block_bytes] view of them all: a group of consecutive layers is then one slice of it."""

    def __init__(self, kv_caches: KVCaches) -> None:
        self.per_layer = [(block_table(k), block_table(v)) for k, v in kv_caches]
        self.stacked = _stacked(kv_caches)

    def gather(self, first: int, count: int, ids: torch.Tensor, out: torch.Tensor) -> None:
        """out[i, kv] = layer (first + i)'s K (kv 0) or V (kv 1) rows `ids`; out: [count, 2, n, bb]."""
        if self.stacked is not None:
            flat = out.view(2 * count, *out.shape[2:])
            torch.index_select(self.stacked[2 * first:2 * (first + count)], 1, ids, out=flat)
            return
        for i in range(count):
            key, value = self.per_layer[first + i]
            torch.index_select(key, 0, ids, out=out[i, 0])
            torch.index_select(value, 0, ids, out=out[i, 1])

    def scatter(self, first: int, count: int, ids: torch.Tensor, data: torch.Tensor) -> None:
        """The inverse of gather: rows `ids` of layers first..first+count-1 from data [count, 2, n, bb]."""
        if self.stacked is not None:
            self.stacked[2 * first:2 * (first + count)].index_copy_(1, ids, data.view(2 * count, *data.shape[2:]))
            return
        for i in range(count):
            key, value = self.per_layer[first + i]
            key.index_copy_(0, ids, data[i, 0])
            value.index_copy_(0, ids, data[i, 1])


def _stacked(kv_caches: KVCaches) -> torch.Tensor | None:
    key = kv_caches[0][0]
    nbytes = key.numel() * key.element_size()
    base = key.data_ptr()
    storage = key.untyped_storage()
    for layer, (k, v) in enumerate(kv_caches):
        for j, t in enumerate((k, v)):
            if t.data_ptr() != base + (2 * layer + j) * nbytes or t.untyped_storage().data_ptr() != storage.data_ptr():
                return None
    rows = key.shape[0]
    return torch.empty(0, dtype=torch.uint8, device=key.device).set_(
        storage, key.storage_offset() * key.element_size(), (2 * len(kv_caches), rows, nbytes // rows),
    )


def layer_groups(layers: list[int], layer_bytes: int, cap: int | None = None) -> list[tuple[int, int]]:
    """`layers` (in reply order) as (first layer, count) groups of consecutive layers of at most
    `cap` bytes (default GROUP_BYTES; at least one layer each)."""
    per_group = max(1, (GROUP_BYTES if cap is None else cap) // max(layer_bytes, 1))
    groups: list[tuple[int, int]] = []
    for layer in layers:
        if groups and layer == sum(groups[-1]) and groups[-1][1] < per_group:
            groups[-1] = (groups[-1][0], groups[-1][1] + 1)
        else:
            groups.append((layer, 1))
    return groups


def _side_stream(device: torch.device) -> torch.cuda.Stream | None:
    """A high-priority stream: the gather or scatter of a pull (tiny next to the engine's work) runs
    ahead of the kernels the engine has queued, not after them."""
    return torch.cuda.Stream(device, priority=-1) if device.type == "cuda" else None


def _ids_on(block_ids: list[int], device: torch.device, stream: torch.cuda.Stream | None) -> torch.Tensor:
    """Block ids as a long tensor on `device`, copied on `stream` (the one that reads them)."""
    ids = torch.tensor(block_ids, dtype=torch.long)
    if stream is None:
        return ids
    with torch.cuda.device(device), torch.cuda.stream(stream):
        return ids.to(device, non_blocking=True)


class LayerGather:
    """Serving side: `group_frames` yields a reply's frames, one per group of layers (see module doc)."""

    def __init__(self, kv_caches: KVCaches, to_host: bool = True) -> None:
        self.tables = KVTables(kv_caches)
        self.device = kv_caches[0][0].device
        self.block_bytes = self.tables.per_layer[0][0].shape[1]
        self.to_host = to_host or self.device.type == "cpu"
        self.stream = _side_stream(self.device)
        self.seconds = 0.0  # spent launching gathers and waiting for them (a metric; races are harmless)

    def groups(self, layers: list[int], num_blocks: int) -> list[tuple[int, int]]:
        return layer_groups(layers, 2 * num_blocks * self.block_bytes)

    def group_frames(self, groups: list[tuple[int, int]], block_ids: list[int]) -> Iterator[memoryview | torch.Tensor]:
        """One frame per group: [count, 2, n, block_bytes] bytes (see the module doc)."""
        t0 = time.perf_counter()
        ids = _ids_on(block_ids, self.device, self.stream)
        pending = self._launch(groups[0], ids) if groups else None
        for g in range(len(groups)):
            data, done = pending
            if g + 1 < len(groups):
                pending = self._launch(groups[g + 1], ids)  # queued behind this one on the side stream
            if done is not None:
                done.synchronize()
            self.seconds += time.perf_counter() - t0
            # numpy's view keeps the pinned tensor alive while a transport holds the frame
            yield memoryview(data.numpy().reshape(-1)) if data.device.type == "cpu" else data.view(-1)
            t0 = time.perf_counter()

    def _launch(self, group: tuple[int, int], ids: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        first, count = group
        shape = (count, 2, len(ids), self.block_bytes)
        if self.stream is None:
            data = torch.empty(shape, dtype=torch.uint8)
            self.tables.gather(first, count, ids, data)
            return data, None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            data = torch.empty(shape, dtype=torch.uint8, device=self.device)
            self.tables.gather(first, count, ids, data)
            if self.to_host:
                # The caching host allocator keeps the pinned block until this copy is done and the
                # frames (which hold the tensor through their numpy base) are dropped by the transport.
                host = torch.empty(shape, dtype=torch.uint8, pin_memory=True)
                host.copy_(data, non_blocking=True)
                data = host
            done = torch.cuda.Event()
            done.record(self.stream)
        return data, done


class StagedLanding:
    """Pulling side: `buffer(layer)` is where a layer's frames land ([2, n, block_bytes]: K rows in
    [0], V in [1]); `commit(layer)` once they have; `finish()` waits until all are in the cache.
    `layers` is the reply's layer order; buffers are per group of consecutive layers."""

    def __init__(self, kv_caches: KVCaches, dest_block_ids: list[int], block_bytes: int, layers: list[int],
                 on_device: bool = False, groups: list[tuple[int, int]] | None = None) -> None:
        """`groups`: the buffers' (first layer, count) partition of `layers` (default: layer_groups)."""
        self.device = kv_caches[0][0].device
        self.tables = KVTables(kv_caches)
        self.num_blocks = len(dest_block_ids)
        self.block_bytes = block_bytes
        self.on_device = on_device and self.device.type == "cuda"
        self.stream = _side_stream(self.device)
        if self.stream is not None:
            # Work already queued on the device (a zeroing of fresh blocks) lands before ours.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self.ids = _ids_on(dest_block_ids, self.device, self.stream)
        self.group_of: dict[int, tuple[int, int]] = {}
        for group in layer_groups(layers, 2 * self.num_blocks * block_bytes) if groups is None else groups:
            for i in range(group[1]):
                self.group_of[group[0] + i] = group
        self._buffers: dict[tuple[int, int], torch.Tensor] = {}

    def buffer(self, layer: int) -> torch.Tensor:
        group = self.group_of[layer]
        return self.group_buffer(group)[layer - group[0]]

    def group_buffer(self, group: tuple[int, int]) -> torch.Tensor:
        """Group (first layer, count)'s [count, 2, n, block_bytes] buffer."""
        buf = self._buffers.get(group)
        if buf is None:
            shape = (group[1], 2, self.num_blocks, self.block_bytes)
            if self.on_device:
                with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                    buf = torch.empty(shape, dtype=torch.uint8, device=self.device)
            else:
                buf = torch.empty(shape, dtype=torch.uint8, pin_memory=self.device.type == "cuda")
            self._buffers[group] = buf
        return buf

    def commit(self, layer: int) -> None:
        """Layer `layer`'s frames have landed; the group's last layer sends the group to the cache."""
        group = self.group_of[layer]
        if layer != group[0] + group[1] - 1:
            return
        buf = self._buffers.pop(group)
        if self.stream is None:
            self.tables.scatter(group[0], group[1], self.ids, buf)
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            # A pinned source is kept by the caching host allocator until this copy is done.
            data = buf if buf.device.type == "cuda" else buf.to(self.device, non_blocking=True)
            self.tables.scatter(group[0], group[1], self.ids, data)

    def finish(self) -> None:
        """Wait until every committed group is in the cache."""
        if self.stream is not None:
            self.stream.synchronize()
