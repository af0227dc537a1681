"""Messages of the KV pull protocol and the handoff record, encoded by the shared wire codec
(`[PROTOCOL_VERSION, tag, fields]`, type-checked on decode, no pickle). The tag table is this
protocol's own: these messages never share a socket with the engine messages.

A pull is one request and one reply:
    decode -> prefill   KVPullMsg                       (one frame)
    prefill -> decode   KVBlocksMsg + 2*R*L raw frames  (for each layer, for each run: K, V)
                        or KVErrorMsg                   (one frame)
After a pull (or instead of one), the puller ends or extends the lease:
    decode -> prefill   KVLeaseMsg(action "release" | "renew")
    prefill -> decode   KVLeaseAckMsg (the new expiry; 0 once released) or KVErrorMsg
A run is a stretch of the requested block ids, in request order; `runs` lists them as [first index
into block_ids, length], covering every requested block once. A run's frame holds those blocks of
one layer's K (or V) in that order, exactly `length * block_bytes` bytes, block_bytes = block_size *
num_kv_heads * head_dim * itemsize. The server sends a run that is consecutive in its cache as a
zero-copy view, and gathers short scattered stretches into one copied frame (transport.reply_runs).
A server that stages its caches (GPU memory, kv_transfer/staging.py) sends instead one frame per
group of consecutive layers (`groups`: the layer count of each): [count][K, V][blocks][block_bytes],
the blocks in request order; few large frames, so a pull costs few calls on either side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tandem.shared.wire.codec import WireError, decode, encode
from tandem.shared.wire.messages import HandoffRecord

# Limits checked before anything is allocated or written.
MAX_BLOCKS_PER_PULL = 1 << 16


@dataclass(frozen=True)
class KVPullMsg:
    compat_hash: str
    lease_id: str
    block_ids: list[int]  # the serving worker's block ids, all covered by the lease
    layers: list[int] | None  # None: every layer


@dataclass(frozen=True)
class KVBlocksMsg:
    compat_hash: str
    lease_id: str
    block_ids: list[int]  # echo of the request
    layers: list[int]  # resolved: never None
    block_bytes: int  # bytes of one block of one layer's K (or V)
    runs: list[list[int]]  # [first index into block_ids, length] per frame pair, see the module doc
    # Empty: frames per run (above). Else the reply is one frame per group of consecutive entries of
    # `layers`, these many each: [count][K, V][block in request order][block_bytes] (staged caches).
    groups: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class KVErrorMsg:
    code: str  # a kv_transfer.errors reason code
    message: str


LEASE_ACTIONS = ("release", "renew")


@dataclass(frozen=True)
class KVLeaseMsg:
    compat_hash: str
    lease_id: str
    action: str  # one of LEASE_ACTIONS


@dataclass(frozen=True)
class KVLeaseAckMsg:
    lease_id: str
    action: str
    expiry: float  # unix time; 0.0 after a release


KV_MESSAGE_TYPES: dict[int, type] = {
    1: KVPullMsg, 2: KVBlocksMsg, 3: KVErrorMsg, 4: HandoffRecord, 5: KVLeaseMsg, 6: KVLeaseAckMsg,
}
KV_MESSAGE_TAGS: dict[type, int] = {cls: tag for tag, cls in KV_MESSAGE_TYPES.items()}


def encode_kv_msg(msg: Any) -> bytes:
    (header,) = encode(msg, KV_MESSAGE_TAGS)  # these messages have no bytes fields
    return bytes(header)


def decode_kv_msg(header: bytes | memoryview) -> Any:
    """Decode frame 0 only (raw KV frames are checked by the receiver); raises WireError."""
    return decode([header], KV_MESSAGE_TYPES)


__all__ = ["KVPullMsg", "KVBlocksMsg", "KVErrorMsg", "HandoffRecord", "KVLeaseMsg", "KVLeaseAckMsg", "LEASE_ACTIONS",
           "encode_kv_msg", "decode_kv_msg", "WireError", "MAX_BLOCKS_PER_PULL"]
