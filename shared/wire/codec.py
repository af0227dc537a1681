"""msgpack codec for `*Msg` dataclasses: explicit tags, a protocol version, no pickle.

A message travels as one multipart ZeroMQ message:
    frame 0:   msgpack [PROTOCOL_VERSION, tag, [field values in declaration order]]
    frame 1..: raw buffers (`bytes` fields: tensors, KV blocks), referenced from frame 0 by an
               ext value (code RAW_FRAME, the frame index), so they are never copied into msgpack.
Nested dataclasses travel as arrays of their fields. Decoding checks every value against the
dataclass' type hints (and sizes against limits) before a message object exists: a peer can
make `decode` raise WireError, never build a half-valid message.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

PROTOCOL_VERSION = 1
RAW_FRAME = 1  # msgpack ext code: a `bytes` value carried in extra frame N

MAX_HEADER_BYTES = 64 << 20
MAX_FRAMES = 1024
MAX_ITEMS = 1 << 22  # elements of one array or map


class WireError(ValueError):
    """A message that cannot be encoded or decoded; the text says which field and why."""


@dataclasses.dataclass(frozen=True)
class _FrameRef:
    index: int


Frames = Sequence[bytes | memoryview]


def encode(msg: Any, tags: Mapping[type, int]) -> list[bytes | memoryview]:
    tag = tags.get(type(msg))
    if tag is None:
        raise WireError(f"{type(msg).__name__} is not a registered message type")
    extra: list[bytes | memoryview] = []
    header = msgpack.packb([PROTOCOL_VERSION, tag, _to_wire(msg, extra)], use_bin_type=True)
    return [header, *extra]


def _to_wire(value: Any, extra: list) -> Any:
    """Dataclasses become arrays of their fields; bytes move to extra frames."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [_to_wire(getattr(value, f.name), extra) for f in _fields_of(type(value))]
    if isinstance(value, bytes | bytearray | memoryview):
        extra.append(value)
        return msgpack.ExtType(RAW_FRAME, len(extra).to_bytes(4, "little"))
    if isinstance(value, list | tuple):
        if all(type(v) in (int, float, str) for v in value):  # token ids, logprobs: nothing to convert
            return value
        return [_to_wire(v, extra) for v in value]
    if isinstance(value, dict):
        return {k: _to_wire(v, extra) for k, v in value.items()}
    return value


def decode(frames: Frames, types_by_tag: Mapping[int, type]) -> Any:
    if not frames:
        raise WireError("empty message")
    if len(frames) > MAX_FRAMES:
        raise WireError(f"{len(frames)} frames, at most {MAX_FRAMES}")
    header = frames[0]
    if len(header) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(header)} bytes, at most {MAX_HEADER_BYTES}")
    try:
        obj = msgpack.unpackb(
            header, raw=False, strict_map_key=False, ext_hook=_ext_hook,
            max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS,
        )
    except WireError:
        raise
    except Exception as exc:  # msgpack raises several types (ValueError, ExtraData, FormatError...)
        raise WireError(f"not a msgpack message: {type(exc).__name__}: {exc}") from None
    if not isinstance(obj, list) or len(obj) != 3:
        raise WireError("expected [version, tag, fields]")
    version, tag, body = obj
    if version != PROTOCOL_VERSION:
        raise WireError(f"protocol version {version!r}, this side speaks {PROTOCOL_VERSION}")
    cls = types_by_tag.get(tag) if type(tag) is int else None
    if cls is None:
        raise WireError(f"unknown message tag {tag!r}")
    return _from_wire(cls, body, frames, cls.__name__)


def _ext_hook(code: int, data: bytes) -> _FrameRef:
    if code != RAW_FRAME or len(data) != 4:
        raise WireError(f"unknown msgpack ext type {code}")
    return _FrameRef(int.from_bytes(data, "little"))


@functools.cache
def _fields_of(cls: type) -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(cls)


@functools.cache
def _hints_of(cls: type) -> tuple[tuple[str, Any], ...]:
    hints = typing.get_type_hints(cls)
    return tuple((f.name, hints[f.name]) for f in _fields_of(cls))


def _from_wire(hint: Any, value: Any, frames: Frames, path: str) -> Any:
    """`value` as an instance of `hint`, or WireError naming the field."""
    origin = typing.get_origin(hint)
    if hint is Any:
        if isinstance(value, _FrameRef):
            raise WireError(f"{path}: raw frame where a plain value belongs")
        return value
    if dataclasses.is_dataclass(hint):
        fields = _hints_of(hint)
        if not isinstance(value, list) or len(value) != len(fields):
            raise WireError(f"{path}: expected {len(fields)} fields of {hint.__name__}")
        return hint(**{n: _from_wire(h, v, frames, f"{path}.{n}") for (n, h), v in zip(fields, value)})
    if origin in (typing.Union, types.UnionType):
        for alt in typing.get_args(hint):
            try:
                return _from_wire(alt, value, frames, path)
            except WireError:
                continue
        raise WireError(f"{path}: {_kind(value)} is not {_name(hint)}")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise WireError(f"{path}: expected a list, got {_kind(value)}")
        if item is int and all(type(v) is int for v in value):  # fast path: token ids
            return value
        return [_from_wire(item, v, frames, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        key, item = typing.get_args(hint)
        if not isinstance(value, dict):
            raise WireError(f"{path}: expected a map, got {_kind(value)}")
        return {
            _from_wire(key, k, frames, f"{path} key"): _from_wire(item, v, frames, f"{path}[{k!r}]")
            for k, v in value.items()
        }
    if hint is bytes:
        if isinstance(value, _FrameRef):
            if not 1 <= value.index < len(frames):
                raise WireError(f"{path}: frame {value.index} of {len(frames)}")
            return frames[value.index]
        if isinstance(value, bytes):
            return value
        raise WireError(f"{path}: expected bytes, got {_kind(value)}")
    if hint is float:
        if type(value) in (float, int):
            return float(value)
        raise WireError(f"{path}: expected a number, got {_kind(value)}")
    if hint in (int, str, bool, type(None)):
        if type(value) is hint:
            return value
        raise WireError(f"{path}: expected {_name(hint)}, got {_kind(value)}")
    raise WireError(f"{path}: no wire form for {hint!r}")  # a bug in a message definition


def _kind(value: Any) -> str:
    return "a raw frame" if isinstance(value, _FrameRef) else type(value).__name__


def _name(hint: Any) -> str:
    return "None" if hint is type(None) else getattr(hint, "__name__", str(hint))
