"""The cluster's state in Redis: key names and records, shared by workers (who write them) and
routers (who read them). Plain data and strings only; neither side's Redis client lives here.

Keys (prefix `tandem:`):
    tandem:workers                 set of worker ids ever registered (routers drop the dead ones)
    tandem:worker:{id}             hash: WorkerRecord (rewritten, with the set, every heartbeat)
    tandem:alive:{id}              string: the worker's epoch; expires HEARTBEAT_TTL_S after the
                                   last heartbeat (a missing key = the worker is gone)
    tandem:load:{id}               hash: WorkerLoad (each heartbeat)
    tandem:kv_events:{id}          stream of KV events: fields {epoch, kind, hashes}; kind "stored" /
                                   "removed" (block hashes that entered / left the worker's prefix
                                   cache), or "reset" (the worker's whole cache now: sent at start
                                   and after a reconnect, replacing what a router knew; a large cache
                                   continues in the "stored" entries right after it); `hashes` is a
                                   msgpack list of 32-byte block hashes. Trimmed to ~EVENTS_MAXLEN
                                   (a worker sends a new reset before trimming could reach the last).
A worker stopped cleanly deletes its four keys and leaves the set; a killed one leaves its alive key
to expire.

An epoch is the worker's start time in ns: a router that sees a new epoch for an id forgets
everything it knew about the old one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import msgpack

PREFIX = "tandem:"
WORKERS_KEY = PREFIX + "workers"
HEARTBEAT_S = 0.5
HEARTBEAT_TTL_S = 2.0  # three missed heartbeats and a worker leaves the pool
EVENTS_MAXLEN = 100_000
MAX_HASHES_PER_EVENT = 4096
EVENT_KINDS = ("stored", "removed", "reset")


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


def alive_key(worker_id: str) -> str:
    return f"{PREFIX}alive:{worker_id}"


def load_key(worker_id: str) -> str:
    return f"{PREFIX}load:{worker_id}"


def events_key(worker_id: str) -> str:
    return f"{PREFIX}kv_events:{worker_id}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _from_hash(cls: type, raw: Mapping[bytes | str, bytes | str]):
    """A dataclass of str/int/float fields from a Redis hash; ValueError naming a bad field."""
    fields = {_text(k): _text(v) for k, v in raw.items()}
    values = {}
    for f in dataclasses.fields(cls):
        if f.name not in fields:
            if f.default is not dataclasses.MISSING:
                continue
            raise ValueError(f"{cls.__name__}: field {f.name!r} is missing")
        text = fields[f.name]
        try:
            values[f.name] = int(text) if f.type == "int" else float(text) if f.type == "float" else text
        except ValueError:
            raise ValueError(f"{cls.__name__}.{f.name}: {text[:40]!r} is not a {f.type}") from None
    return cls(**values)


def _to_hash(record) -> dict[str, str]:
    return {f.name: str(getattr(record, f.name)) for f in dataclasses.fields(record)}


@dataclass(frozen=True)
class WorkerRecord:
    worker_id: str
    role: str  # "prefill", "decode" or "mixed"
    model: str
    zmq_addr: str  # requests (the worker's ROUTER socket)
    kv_addr: str  # its KV block server
    http_addr: str  # http://host:port (/health, /metrics)
    block_size: int
    compat_hash: str
    max_model_len: int
    epoch: int  # the worker's start time, ns

    def to_redis(self) -> dict[str, str]:
        return _to_hash(self)

    @classmethod
    def from_redis(cls, raw: Mapping[bytes | str, bytes | str]) -> WorkerRecord:
        return _from_hash(cls, raw)


@dataclass(frozen=True)
class WorkerLoad:
    running: int = 0
    waiting: int = 0  # incl. sequences waiting for their KV
    used_blocks: int = 0
    total_blocks: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up (cumulative)
    prefix_cache_hits: int = 0  # of those, found cached (cumulative)
    prompt_tokens: int = 0
    generation_tokens: int = 0
    updated: float = 0.0  # unix time of the report

    def to_redis(self) -> dict[str, str]:
        return _to_hash(self)

    @classmethod
    def from_redis(cls, raw: Mapping[bytes | str, bytes | str]) -> WorkerLoad:
        return _from_hash(cls, raw)


@dataclass(frozen=True)
class KVEvent:
    epoch: int
    kind: str  # one of EVENT_KINDS
    hashes: list[bytes]

    def to_redis(self) -> dict[str, bytes | str]:
        return {"epoch": str(self.epoch), "kind": self.kind, "hashes": msgpack.packb(self.hashes, use_bin_type=True)}

    @classmethod
    def from_redis(cls, raw: Mapping[bytes | str, bytes | str]) -> KVEvent:
        fields = {_text(k): v for k, v in raw.items()}
        try:
            epoch = int(_text(fields["epoch"]))
            kind = _text(fields["kind"])
            hashes = msgpack.unpackb(fields["hashes"], raw=True) if isinstance(fields["hashes"], bytes) else None
        except (KeyError, ValueError, msgpack.UnpackException) as exc:
            raise ValueError(f"KV event: {type(exc).__name__}: {exc}") from None
        if kind not in EVENT_KINDS:
            raise ValueError(f"KV event kind {kind!r} is not one of {EVENT_KINDS}")
        if not isinstance(hashes, list) or not all(isinstance(h, bytes) and len(h) == 32 for h in hashes):
            raise ValueError("KV event hashes: expected a list of 32-byte hashes")
        return cls(epoch, kind, hashes)
