"""The transport interface, and the transport-independent halves of a pull.

`KVBlockSource` (serving side) turns a KVPullMsg into a reply: it checks the compat hash, the
lease and every peer-supplied block id and layer, then yields zero-copy views of the leased
blocks, one frame per layer, K or V and run of block ids (see reply_runs), or one per group of
layers for staged caches. `KVBlockSink`
(pulling side) checks a reply's header (runs included) and every frame's size against what it
asked for, and only then writes the bytes into its own KV caches at its own block ids.
A transport (ZeroMQ, UCX) only moves one request frame one way and the reply frames back.

KV caches are the runner's: per layer a (key, value) pair of contiguous
[num_blocks, block_size, num_kv_heads, head_dim] tensors. CPU caches are read and written in place
(numpy views); GPU caches go through staging.py (a gather per group of layers into a buffer: pinned
host memory for host transports, device memory for UCX), sent as one frame per group.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from tandem.kv_transfer.errors import KVTransferError
from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.messages import (
    LEASE_ACTIONS,
    MAX_BLOCKS_PER_PULL,
    KVBlocksMsg,
    KVErrorMsg,
    KVLeaseAckMsg,
    KVLeaseMsg,
    KVPullMsg,
    WireError,
    decode_kv_msg,
    encode_kv_msg,
)
from tandem.kv_transfer.staging import LayerGather, StagedLanding

KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]
logger = logging.getLogger("tandem.kv_transfer")


@dataclass(frozen=True)
class KVSpec:
    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def block_bytes(self) -> int:
        """Bytes of one block of one layer's K (or V)."""
        return self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @classmethod
    def of(cls, kv_caches: KVCaches) -> KVSpec:
        if not kv_caches:
            raise ValueError("no KV caches")
        key = kv_caches[0][0]
        if key.dim() != 4:
            raise ValueError(f"KV cache of shape {tuple(key.shape)}, expected [blocks, block_size, heads, head_dim]")
        for layer, (k, v) in enumerate(kv_caches):
            for t in (k, v):
                if t.shape != key.shape or t.dtype != key.dtype or not t.is_contiguous():
                    raise ValueError(f"layer {layer}: KV caches must be contiguous, of one shape and dtype")
        num_blocks, block_size, heads, head_dim = key.shape
        return cls(len(kv_caches), num_blocks, block_size, heads, head_dim, key.dtype)


@dataclass(frozen=True)
class KVDest:
    """Where pulled blocks land: the puller's KV caches at its own block ids (one per remote block)."""

    kv_caches: KVCaches
    block_ids: list[int]


@dataclass(frozen=True)
class PullStats:
    num_blocks: int
    num_layers: int
    num_bytes: int
    seconds: float
    # Where the seconds went (PULL_PHASES): connecting, waiting for the reply's header, receiving the
    # frames (and queuing their copies into the cache), waiting for the copies to land.
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def gbytes_per_s(self) -> float:
        return self.num_bytes / max(self.seconds, 1e-9) / 1e9


PULL_PHASES = ("connect", "header", "frames", "landing")


class PhaseClock:
    """Times a pull's phases: `mark(name)` ends the phase begun at the previous mark (or at start)."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.perf_counter()
        self.phases[phase] = self.phases.get(phase, 0.0) + now - self.last
        self.last = now

    def stats(self, num_blocks: int, num_layers: int, num_bytes: int) -> PullStats:
        return PullStats(num_blocks, num_layers, num_bytes, self.last - self.start, dict(self.phases))


def check_block_ids(block_ids: object, num_blocks: int, what: str) -> list[int]:
    """Untrusted block ids (or layers): a list of distinct ints in [0, num_blocks), else bad_block."""
    if not isinstance(block_ids, list) or not all(type(b) is int for b in block_ids):
        raise KVTransferError("bad_block", f"{what}: expected a list of ints")
    bad = [b for b in block_ids if not 0 <= b < num_blocks]
    if bad:
        raise KVTransferError("bad_block", f"{what}: {bad[:4]} out of range [0, {num_blocks})")
    if len(set(block_ids)) != len(block_ids):
        raise KVTransferError("bad_block", f"{what}: duplicate ids")
    return block_ids


# A stretch of blocks consecutive in the serving cache at least this long travels as one zero-copy
# view; shorter stretches (scattered blocks) are gathered into copied frames of up to
# GATHER_BLOCKS blocks: thousands of tiny frames cost far more than one copy on the server.
VIEW_MIN_BLOCKS = 8
GATHER_BLOCKS = 64


def block_runs(block_ids: Sequence[int]) -> list[list[int]]:
    """Maximal runs of ids consecutive in the cache (b, b+1, ...): [first index, length] each, in order."""
    runs: list[list[int]] = []
    for i, b in enumerate(block_ids):
        if runs and b == block_ids[i - 1] + 1:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return runs


def reply_runs(block_ids: Sequence[int]) -> list[list[int]]:
    """How a reply splits the requested ids into frames: [first index, length] each, in order.
    Long source-consecutive runs stay whole (views); short ones are merged up to GATHER_BLOCKS."""
    runs: list[list[int]] = []
    merging = False  # whether runs[-1] is a gathered frame that may take more short runs
    for first, length in block_runs(block_ids):
        if length >= VIEW_MIN_BLOCKS:
            runs.append([first, length])
            merging = False
        elif merging and runs[-1][1] + length <= GATHER_BLOCKS:
            runs[-1][1] += length
        else:
            runs.append([first, length])
            merging = True
    return runs


def _check_runs(runs: object, block_ids: list[int]) -> list[list[int]]:
    """A reply's runs must split the requested ids, in order, into non-empty stretches."""
    if not isinstance(runs, list):
        raise KVTransferError("bad_message", "reply runs: expected a list")
    next_index = 0
    for run in runs:
        if (not isinstance(run, list) or len(run) != 2 or not all(type(x) is int for x in run)
                or run[0] != next_index or run[1] < 1 or run[0] + run[1] > len(block_ids)):
            raise KVTransferError("bad_message", f"reply run {run!r} does not follow index {next_index}")
        next_index += run[1]
    if next_index != len(block_ids):
        raise KVTransferError("bad_message", f"reply runs cover {next_index} of {len(block_ids)} blocks")
    return runs


class FrameTarget(NamedTuple):
    """Where one reply frame lands: `inplace`, a contiguous buffer of `nbytes` to receive it into
    (the cache's own rows when the destination ids are consecutive, or a staging buffer), else
    None: receive it into a buffer, then `scatter` it (to `table[ids]`, or through `spread`)."""

    nbytes: int
    table: np.ndarray | None
    ids: list[int] | None
    inplace: np.ndarray | torch.Tensor | None
    spread: Callable[[np.ndarray], None] | None = None  # a group frame into per-layer, per-run rows

    def scatter(self, data: np.ndarray) -> None:
        """Copy a received frame (uint8, `nbytes`) into the destination rows."""
        if self.inplace is not None:
            self.inplace[:] = data
        elif self.spread is not None:
            self.spread(data)
        else:
            self.table[self.ids] = data.reshape(len(self.ids), -1)


def _block_rows(cache: torch.Tensor) -> np.ndarray:
    """A [num_blocks, block_bytes] uint8 numpy view of a contiguous CPU cache (bf16 included): no
    copy. Numpy row slices cost ~0.2 us where torch indexing costs ~10 us: pulls have thousands."""
    return cache.view(-1).view(torch.uint8).numpy().reshape(cache.shape[0], -1)


class KVBlockSource:
    """The serving half: answers pulls of leased blocks from `kv_caches` (CPU tensors)."""

    def __init__(
        self, kv_caches: KVCaches, leases: LeaseTable, compat_hash: str, clock: Callable[[], float] = time.time,
        lease_ttl_s: float = 30.0, device_frames: bool = False, stage: bool | None = None,
    ) -> None:
        """`device_frames`: GPU caches' frames may stay device tensors (the transport reads device
        memory); `stage`: gather every layer into a buffer (default: for GPU caches only)."""
        self.kv_caches = kv_caches
        self.lease_ttl_s = lease_ttl_s  # what a renew extends a lease by
        self.spec = KVSpec.of(kv_caches)
        self.leases = leases
        self.compat_hash = compat_hash
        self.clock = clock
        staged = kv_caches[0][0].device.type != "cpu" if stage is None else stage
        self._gather = LayerGather(kv_caches, to_host=not device_frames) if staged else None
        self._rows = [(_block_rows(k), _block_rows(v)) for k, v in kv_caches] if self._gather is None else []

    @property
    def gather_seconds(self) -> float:
        """Time the serving threads spent gathering staged frames and waiting for the GPU to do so."""
        return self._gather.seconds if self._gather is not None else 0.0

    @property
    def staged(self) -> bool:
        """Whether building a reply's frames runs GPU work and waits for it (not zero-copy views)."""
        return self._gather is not None

    def serve(self, request: bytes | memoryview) -> list[bytes | memoryview]:
        """The reply frames to one request frame, flat; every refusal becomes a KVErrorMsg."""
        return [frame for message in self.serve_messages(request) for frame in message]

    def serve_messages(self, request: bytes | memoryview) -> Iterator[list[bytes | memoryview | torch.Tensor]]:
        """The reply as messages: [header], then one per unit (built lazily, so a transport can send
        unit i while unit i+1 is gathered): a layer's 2*R run frames, or a group's one frame when the
        caches are staged. Frames are host buffers, or device tensors when built with `device_frames`."""
        try:
            header, layers = self._serve(request)
        except KVTransferError as exc:
            yield [encode_kv_msg(KVErrorMsg(exc.code, exc.reason))]
            return
        except Exception as exc:  # never let one request kill the server thread
            yield [encode_kv_msg(KVErrorMsg("internal_error", f"{type(exc).__name__}: {exc}"))]
            return
        yield [header]
        try:
            yield from layers
        except Exception:  # after the header no error can be sent: the puller times out and recovers
            logger.exception("a KV reply failed after its header")

    def _serve(self, request: bytes | memoryview) -> tuple[bytes, Iterator[list[memoryview | torch.Tensor]]]:
        try:
            msg = decode_kv_msg(request)
        except WireError as exc:
            raise KVTransferError("bad_message", str(exc)) from None
        if isinstance(msg, KVLeaseMsg):
            return encode_kv_msg(self._lease_action(msg)), iter(())
        if not isinstance(msg, KVPullMsg):
            raise KVTransferError("bad_message", f"expected KVPullMsg or KVLeaseMsg, got {type(msg).__name__}")
        if msg.compat_hash != self.compat_hash:
            raise KVTransferError(
                "compat_mismatch",
                f"peer compat {msg.compat_hash[:12]} != ours {self.compat_hash[:12]} "
                "(model, dtype, block size, KV layout or protocol version differ)",
            )
        spec = self.spec
        if len(msg.block_ids) > MAX_BLOCKS_PER_PULL:
            raise KVTransferError("bad_block", f"{len(msg.block_ids)} blocks, at most {MAX_BLOCKS_PER_PULL}")
        block_ids = check_block_ids(msg.block_ids, spec.num_blocks, "block_ids")
        layers = list(range(spec.num_layers)) if msg.layers is None else msg.layers
        check_block_ids(layers, spec.num_layers, "layers")
        lease = self.leases.get(msg.lease_id, self.clock())
        foreign = sorted(set(block_ids) - set(lease.block_ids))
        if foreign:
            raise KVTransferError("bad_block", f"blocks {foreign[:4]} are not under lease {msg.lease_id[:8]}...")
        runs = reply_runs(block_ids)
        groups = [] if self._gather is None else self._gather.groups(layers, len(block_ids))
        header = KVBlocksMsg(self.compat_hash, msg.lease_id, block_ids, layers, spec.block_bytes, runs,
                             [count for _, count in groups])
        if self._gather is not None:
            return encode_kv_msg(header), ([frame] for frame in self._gather.group_frames(groups, block_ids))
        # Per run: a slice of the cache if its blocks are consecutive there (zero copy), else the
        # ids to gather (one copy, on this thread).
        sources: list[slice | np.ndarray] = []
        for first, length in runs:
            ids = block_ids[first:first + length]
            if all(ids[i + 1] == ids[i] + 1 for i in range(length - 1)):
                sources.append(slice(ids[0], ids[0] + length))
            else:
                sources.append(np.array(ids))
        return encode_kv_msg(header), self._layer_frames(layers, sources)

    def _layer_frames(self, layers: list[int], sources: list[slice | np.ndarray]) -> Iterator[list[memoryview]]:
        for layer in layers:
            key, value = self._rows[layer]
            frames = []
            for src in sources:
                # A view stays valid while the transport reads it: the lease keeps its blocks from
                # being reused (and a revoked or expired lease frees them only after the grace).
                frames.append(memoryview(key[src].reshape(-1)))
                frames.append(memoryview(value[src].reshape(-1)))
            yield frames

    def _lease_action(self, msg: KVLeaseMsg) -> KVLeaseAckMsg:
        if msg.compat_hash != self.compat_hash:
            raise KVTransferError("compat_mismatch", f"peer compat {msg.compat_hash[:12]} != ours")
        if msg.action == "release":
            # The blocks are freed by the engine thread (take_released); a release of a lease that
            # is already gone is not an error: the puller's goal holds.
            self.leases.release_later(msg.lease_id, self.clock())
            return KVLeaseAckMsg(msg.lease_id, msg.action, 0.0)
        if msg.action == "renew":
            return KVLeaseAckMsg(msg.lease_id, msg.action, self.leases.renew(msg.lease_id, self.lease_ttl_s,
                                                                             self.clock()).expiry)
        raise KVTransferError("bad_message", f"lease action must be one of {LEASE_ACTIONS}, got {msg.action!r}")


def _decode_reply(header: bytes | memoryview):
    """A reply's header message; a KVErrorMsg raises the server's KVTransferError, garbage bad_message."""
    try:
        msg = decode_kv_msg(header)
    except WireError as exc:
        raise KVTransferError("bad_message", f"reply: {exc}") from None
    if isinstance(msg, KVErrorMsg):
        raise KVTransferError(msg.code, f"from server: {msg.message}")
    return msg


def check_lease_ack(header: bytes | memoryview, lease_id: str, action: str) -> float:
    """A KVLeaseAckMsg answering our KVLeaseMsg: its expiry; raises the server's KVTransferError."""
    msg = _decode_reply(header)
    if not isinstance(msg, KVLeaseAckMsg) or msg.lease_id != lease_id or msg.action != action:
        raise KVTransferError("bad_message", f"expected the ack of {action} {lease_id[:8]}...")
    return msg.expiry


class KVBlockSink:
    """The pulling half: builds requests and writes checked replies into local KV caches."""

    def __init__(self, compat_hash: str, device_frames: bool = False, stage: bool | None = None) -> None:
        """`device_frames`: frames for GPU caches may land in device memory (the transport writes
        device memory); `stage`: land every layer in a buffer first (default: for GPU caches only)."""
        self.compat_hash = compat_hash
        self.device_frames = device_frames
        self.stage = stage

    def request(self, lease_id: str, block_ids: list[int], dest: KVDest, layers: list[int] | None) -> bytes:
        spec = KVSpec.of(dest.kv_caches)
        if len(dest.block_ids) != len(block_ids):
            raise ValueError(f"{len(block_ids)} remote blocks but {len(dest.block_ids)} destination blocks")
        check_block_ids(list(dest.block_ids), spec.num_blocks, "destination block_ids")
        if layers is not None:
            check_block_ids(list(layers), spec.num_layers, "layers")
        return encode_kv_msg(KVPullMsg(self.compat_hash, lease_id, list(block_ids), layers))

    def check_reply(
        self, header: bytes | memoryview, lease_id: str, block_ids: list[int], dest: KVDest, layers: list[int] | None,
    ) -> KVBlocksMsg:
        """The reply's header, checked against the request and the destination; raises the
        server's KVTransferError for a KVErrorMsg."""
        spec = KVSpec.of(dest.kv_caches)
        msg = _decode_reply(header)
        if not isinstance(msg, KVBlocksMsg):
            raise KVTransferError("bad_message", f"expected KVBlocksMsg, got {type(msg).__name__}")
        if msg.compat_hash != self.compat_hash:
            raise KVTransferError("compat_mismatch", f"server compat {msg.compat_hash[:12]} != ours")
        want_layers = list(range(spec.num_layers)) if layers is None else list(layers)
        if msg.lease_id != lease_id or msg.block_ids != list(block_ids) or msg.layers != want_layers:
            raise KVTransferError("bad_message", "reply names other blocks, layers or lease than requested")
        if msg.block_bytes != spec.block_bytes:
            raise KVTransferError(
                "bad_message", f"server blocks are {msg.block_bytes} bytes, ours {spec.block_bytes}",
            )
        _check_runs(msg.runs, list(block_ids))
        _check_groups(msg.groups, list(msg.layers))
        return msg

    def num_frames(self, msg: KVBlocksMsg) -> int:
        return len(msg.groups) if msg.groups else 2 * len(msg.runs) * len(msg.layers)

    def landing(self, msg: KVBlocksMsg, dest: KVDest) -> Landing:
        """Where a checked reply's frames land, unit by unit."""
        staged = dest.kv_caches[0][0].device.type != "cpu" if self.stage is None else self.stage
        return StagedFrames(msg, dest, self.device_frames) if staged else DirectLanding(msg, dest)

    def write_layer(self, msg: KVBlocksMsg, targets: Sequence[FrameTarget], frames: Sequence[bytes | memoryview],
                    ) -> None:
        """Frames with their targets (one unit's, or all): every size checked, then copied."""
        if len(frames) != len(targets):
            raise KVTransferError("bad_message", f"{len(frames)} KV frames for a unit, expected {len(targets)}")
        for i, (target, frame) in enumerate(zip(targets, frames)):
            size = memoryview(frame).nbytes
            if size != target.nbytes:
                raise KVTransferError("bad_message", f"KV frame {i} of {size} bytes, expected {target.nbytes}")
        for target, frame in zip(targets, frames):
            target.scatter(np.frombuffer(frame, dtype=np.uint8))

    def write_pieces(self, targets: Sequence[FrameTarget], pieces: Sequence[bytes | memoryview]) -> None:
        """One unit's frames as they came, big ones possibly cut in pieces by the transport: the total
        is checked before a byte is written, then each target is filled in order."""
        views = [np.frombuffer(piece, dtype=np.uint8) for piece in pieces]
        want = sum(t.nbytes for t in targets)
        if (got := sum(len(v) for v in views)) != want:
            raise KVTransferError("bad_message", f"{got} KV bytes for a unit, expected {want}")
        i, filled, partial = 0, 0, None  # target, bytes of it filled, its buffer when it has no inplace
        for data in views:
            offset = 0
            while offset < len(data):
                target = targets[i]
                n = min(target.nbytes - filled, len(data) - offset)
                if filled == 0 and n == target.nbytes:  # the whole target in this piece: one copy
                    target.scatter(data[offset:offset + n])
                else:
                    if target.inplace is not None:
                        target.inplace[filled:filled + n] = data[offset:offset + n]
                    else:
                        if partial is None:
                            partial = np.empty(target.nbytes, dtype=np.uint8)
                        partial[filled:filled + n] = data[offset:offset + n]
                    if filled + n == target.nbytes and partial is not None:
                        target.scatter(partial)
                        partial = None
                filled += n
                offset += n
                if filled == target.nbytes:
                    i, filled = i + 1, 0

    def write(self, msg: KVBlocksMsg, frames: Sequence[bytes | memoryview], dest: KVDest) -> int:
        """Check the runs and every frame's size, then copy the frames into the destination; bytes written."""
        _check_runs(msg.runs, list(msg.block_ids))
        _check_groups(msg.groups, list(msg.layers))
        want = self.num_frames(msg)
        if len(frames) != want:
            raise KVTransferError("bad_message", f"{len(frames)} KV frames, expected {want}")
        for i, (frame, size) in enumerate(zip(frames, frame_sizes(msg))):  # all before a byte is written
            if (got := memoryview(frame).nbytes) != size:
                raise KVTransferError("bad_message", f"KV frame {i} of {got} bytes, expected {size}")
        landing = self.landing(msg, dest)
        first = 0
        for u in range(landing.num_units):
            targets = landing.unit_targets(u)
            self.write_layer(msg, targets, frames[first:first + len(targets)])
            first += len(targets)
            landing.commit_unit(u)
        landing.finish()
        return len(msg.block_ids) * len(msg.layers) * 2 * msg.block_bytes


def frame_sizes(msg: KVBlocksMsg) -> list[int]:
    """Every reply frame's size, in order."""
    if msg.groups:
        return [count * 2 * len(msg.block_ids) * msg.block_bytes for count in msg.groups]
    return [length * msg.block_bytes for _ in msg.layers for _, length in msg.runs for _ in (0, 1)]


def _check_groups(groups: object, layers: list[int]) -> list[tuple[int, int]]:
    """A reply's groups must split `layers`, in order, into runs of consecutive layers: (first, count) each."""
    if not isinstance(groups, list) or not all(type(g) is int and g > 0 for g in groups):
        raise KVTransferError("bad_message", "reply groups: expected positive ints")
    if groups and sum(groups) != len(layers):
        raise KVTransferError("bad_message", f"reply groups cover {sum(groups)} of {len(layers)} layers")
    out, i = [], 0
    for count in groups:
        part = layers[i:i + count]
        if part != list(range(part[0], part[0] + count)):
            raise KVTransferError("bad_message", f"reply group {part[:4]}... is not consecutive layers")
        out.append((part[0], count))
        i += count
    return out


class Landing(abc.ABC):
    """Where one pull's frames land. The reply's frames come in units (a layer's 2*R run frames, or one
    frame per group of layers): for each unit u in order, a transport receives the frames into
    `unit_targets(u)`, then calls `commit_unit(u)`; after the last, `finish()`, which returns once
    the destination blocks hold the bytes (call it after a failure too)."""

    def __init__(self, msg: KVBlocksMsg) -> None:
        self.msg = msg
        self.groups = _check_groups(msg.groups, list(msg.layers))
        self.num_units = len(self.groups) if self.groups else len(msg.layers)

    def unit_targets(self, u: int) -> list[FrameTarget]:
        if not self.groups:
            return self.layer_targets(u)
        return [self.group_target(u)]

    @abc.abstractmethod
    def layer_targets(self, i: int) -> list[FrameTarget]:
        """The run frames of the reply's i-th layer: per run, K then V."""

    @abc.abstractmethod
    def group_target(self, g: int) -> FrameTarget:
        """The frame of the reply's g-th group of layers."""

    def commit_unit(self, u: int) -> None:  # noqa: B027 (optional hook)
        pass

    def finish(self) -> None:  # noqa: B027 (optional hook)
        pass


class DirectLanding(Landing):
    """CPU caches: frames land in the cache's own rows (consecutive destination ids) or are scattered."""

    def __init__(self, msg: KVBlocksMsg, dest: KVDest) -> None:
        super().__init__(msg)
        self.dest = dest
        self.runs = []  # per run: (nbytes, destination ids, first id if they are consecutive else None)
        for first, length in msg.runs:
            ids = list(dest.block_ids[first:first + length])
            consecutive = all(ids[i + 1] == ids[i] + 1 for i in range(len(ids) - 1))
            self.runs.append((len(ids) * msg.block_bytes, ids, ids[0] if consecutive else None))

    def layer_targets(self, i: int) -> list[FrameTarget]:
        layer = self.msg.layers[i]
        key_rows, value_rows = _block_rows(self.dest.kv_caches[layer][0]), _block_rows(self.dest.kv_caches[layer][1])
        targets = []
        for nbytes, ids, start in self.runs:
            for rows in (key_rows, value_rows):
                if start is None:
                    inplace = None
                elif len(ids) == 1:
                    inplace = rows[start]
                else:
                    inplace = rows[start:start + len(ids)].reshape(-1)
                targets.append(FrameTarget(nbytes, rows, ids, inplace))
        return targets

    def group_target(self, g: int) -> FrameTarget:
        first, count = self.groups[g]
        n, bb = len(self.msg.block_ids), self.msg.block_bytes

        def spread(data: np.ndarray) -> None:
            rows = data.reshape(count, 2, n, bb)
            for i in range(count):
                layer = self.dest.kv_caches[first + i]
                for kv in (0, 1):
                    _block_rows(layer[kv])[self.dest.block_ids] = rows[i, kv]

        return FrameTarget(count * 2 * n * bb, None, None, None, spread)


class StagedFrames(Landing):
    """GPU caches (staging.StagedLanding): frames land in a buffer per group of layers (the reply's
    groups when it has them: each frame is then received straight into its buffer)."""

    def __init__(self, msg: KVBlocksMsg, dest: KVDest, device_frames: bool) -> None:
        super().__init__(msg)
        self.staged = StagedLanding(dest.kv_caches, list(dest.block_ids), msg.block_bytes, list(msg.layers),
                                    on_device=device_frames, groups=self.groups or None)

    def layer_targets(self, i: int) -> list[FrameTarget]:
        buf = self.staged.buffer(self.msg.layers[i])  # [2, n, block_bytes]
        view = buf.numpy() if buf.device.type == "cpu" else buf
        targets = []
        for first, length in self.msg.runs:
            for kv in (0, 1):
                targets.append(FrameTarget(length * self.msg.block_bytes, None, None,
                                           view[kv, first:first + length].reshape(-1)))
        return targets

    def group_target(self, g: int) -> FrameTarget:
        buf = self.staged.group_buffer(self.groups[g])  # [count, 2, n, block_bytes]
        view = buf.numpy() if buf.device.type == "cpu" else buf
        return FrameTarget(buf.numel(), None, None, view.reshape(-1))

    def commit_unit(self, u: int) -> None:
        if self.groups:
            first, count = self.groups[u]
            self.staged.commit(first + count - 1)
        else:
            self.staged.commit(self.msg.layers[u])

    def finish(self) -> None:
        self.staged.finish()


class KVBlockServer(abc.ABC):
    """Serves pulls of leased blocks on `address` from a background thread."""

    address: str
    source: KVBlockSource

    @abc.abstractmethod
    def start(self) -> KVBlockServer: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> KVBlockServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class KVBlockClient(abc.ABC):
    compat_hash: str

    @abc.abstractmethod
    def pull(
        self, addr: str, lease_id: str, block_ids: list[int], dest: KVDest, layers: list[int] | None = None,
    ) -> PullStats:
        """Pull the remote `block_ids` (under `lease_id`) into `dest`; raises KVTransferError.
        Nothing is written unless the whole reply checked out."""

    def release(self, addr: str, lease_id: str) -> None:
        """End the lease (the serving worker frees its blocks); raises KVTransferError."""
        self._lease_request(addr, lease_id, "release")

    def renew(self, addr: str, lease_id: str) -> float:
        """Extend the lease by the server's TTL; the new expiry (unix time). Raises KVTransferError."""
        return self._lease_request(addr, lease_id, "renew")

    def _lease_request(self, addr: str, lease_id: str, action: str) -> float:
        reply = self._request_reply(addr, encode_kv_msg(KVLeaseMsg(self.compat_hash, lease_id, action)))
        return check_lease_ack(reply, lease_id, action)

    @abc.abstractmethod
    def _request_reply(self, addr: str, request: bytes) -> bytes:
        """Send one request frame, return the one reply frame (lease messages)."""

    def close(self) -> None:  # noqa: B027 (optional hook)
        pass
