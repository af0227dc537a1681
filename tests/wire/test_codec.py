"""The wire codec: every message round-trips; raw frames carry bytes; anything malformed,
mistyped, from another protocol version or of an unknown tag is refused with WireError."""

from __future__ import annotations

from dataclasses import dataclass

import msgpack
import pytest

from tandem.shared.sampling_params import InvalidParameterError, SamplingParams
from tandem.shared.wire.codec import PROTOCOL_VERSION, WireError, decode, encode
from tandem.shared.wire.messages import (
    MESSAGE_TYPES,
    AbortMsg,
    AddRequestMsg,
    EngineOutputsMsg,
    ErrorMsg,
    ReadyMsg,
    SeqOutput,
    ShutdownMsg,
    StatsMsg,
    StatsRequestMsg,
    WireLogprobs,
    decode_msg,
    encode_msg,
    params_from_wire,
    params_to_wire,
)

LP = WireLogprobs(7, -0.25, 1, [7, 9], [-0.25, -1.5])
EXAMPLES = [
    AddRequestMsg("r1", [1, 2, 3], {"temperature": 0.5, "stop": ["\n"], "logit_bias": {5: -100.0}}, "salt"),
    AddRequestMsg("r2", [4], {}),
    AbortMsg(["r1", "r2#1"]),
    StatsRequestMsg(3),
    ShutdownMsg("bye"),
    EngineOutputsMsg([
        SeqOutput("r1", [7], [LP], [None, LP], None, None, 16),
        SeqOutput("r2#1", [2], [], None, "stop", 2, 0),
        SeqOutput("r3", [3], [], None, "stop", "###", 0),
    ]),
    StatsMsg(0, 100, 3, 0.03, 64, 32, 1, 2, 0, 99, 12),
    ErrorMsg("r1", 400, "temperature: must be non-negative", "temperature"),
    ErrorMsg(None, 500, "boom"),
    ReadyMsg("engine-1", 123, "/models/x", 1024, 49152, [2], 16, 512),
]


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = encode_msg(msg)
    assert len(frames) == 1
    assert decode_msg(frames) == msg


def test_tags_are_unique_and_stable():
    assert len(set(MESSAGE_TYPES.values())) == len(MESSAGE_TYPES)
    assert MESSAGE_TYPES[1] is AddRequestMsg and MESSAGE_TYPES[16] is EngineOutputsMsg


@dataclass(frozen=True)
class BlobMsg:
    name: str
    data: bytes
    parts: list[bytes]


BLOB_TYPES = {1: BlobMsg}
BLOB_TAGS = {BlobMsg: 1}


def test_bytes_travel_as_raw_frames():
    big = bytes(range(256)) * 4096
    msg = BlobMsg("kv", big, [b"a", b"bc"])
    frames = encode(msg, BLOB_TAGS)
    assert len(frames) == 4 and frames[1] is big  # not copied into the msgpack header
    assert len(frames[0]) < 100
    back = decode(frames, BLOB_TYPES)
    assert back.name == "kv" and bytes(back.data) == big and [bytes(p) for p in back.parts] == [b"a", b"bc"]


def _header(version, tag, body) -> list[bytes]:
    return [msgpack.packb([version, tag, body], use_bin_type=True)]


BAD = {
    "empty": ([], "empty"),
    "not msgpack": ([b"\xc1\xc1\xc1"], "not a msgpack"),
    "not a list": ([msgpack.packb({"a": 1})], "expected [version, tag, fields]"),
    "old version": (_header(PROTOCOL_VERSION + 1, 2, [["x"]]), "protocol version"),
    "unknown tag": (_header(PROTOCOL_VERSION, 999, []), "unknown message tag 999"),
    "string tag": (_header(PROTOCOL_VERSION, "AbortMsg", [["x"]]), "unknown message tag"),
    "field count": (_header(PROTOCOL_VERSION, 2, [["x"], "extra"]), "expected 1 fields of AbortMsg"),
    "wrong type": (_header(PROTOCOL_VERSION, 2, [[1, 2]]), "AbortMsg.request_ids[0]: expected str, got int"),
    "bool for int": (_header(PROTOCOL_VERSION, 3, [True]), "expected int, got bool"),
    "float token id": (_header(PROTOCOL_VERSION, 1, ["r", [1, 2.5], {}, None, False, None]), "prompt_token_ids[1]"),
    "none for list": (_header(PROTOCOL_VERSION, 2, [None]), "expected a list"),
    "nested": (
        _header(PROTOCOL_VERSION, 16, [[["r", [1], [[1, "x", 1, [], []]], None, None, None, 0, None]]]),
        "EngineOutputsMsg.outputs[0].new_logprobs[0].logprob: expected a number",
    ),
    "bad union": (
        _header(PROTOCOL_VERSION, 16, [[["r", [1], [], None, None, 1.5, 0, None]]]),
        "stop_reason: float is not",
    ),
    "frame ref in plain field": (
        [msgpack.packb([PROTOCOL_VERSION, 2, [[msgpack.ExtType(1, (1).to_bytes(4, "little"))]]]), b"x"],
        "request_ids[0]",
    ),
    "unknown ext": ([msgpack.packb([PROTOCOL_VERSION, 2, [[msgpack.ExtType(9, b"")]]])], "unknown msgpack ext type 9"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_input_is_refused(name):
    frames, expected = BAD[name]
    with pytest.raises(WireError) as e:
        decode_msg(frames)
    assert expected in str(e.value)


def test_missing_raw_frame():
    frames = encode(BlobMsg("kv", b"data", []), BLOB_TAGS)
    with pytest.raises(WireError, match="frame 1 of 1"):
        decode(frames[:1], BLOB_TYPES)


def test_too_many_frames():
    with pytest.raises(WireError, match="frames"):
        decode_msg([encode_msg(StatsRequestMsg(1))[0]] + [b""] * 5000)


def test_unregistered_type_is_not_encoded():
    with pytest.raises(WireError, match="not a registered message type"):
        encode_msg(BlobMsg("x", b"", []))


def test_sampling_params_round_trip():
    params = SamplingParams(n=2, temperature=0.7, top_p=0.9, seed=3, stop=["x"], logit_bias={4: 1.5}, logprobs=2,
                            max_tokens=5, ignore_eos=True)
    wire = params_to_wire(params)
    assert "top_k" not in wire  # defaults do not travel
    back = params_from_wire(decode_msg(encode_msg(AddRequestMsg("r", [1], wire))).params)
    assert back == params


@pytest.mark.parametrize("fields, param", [
    ({"temperature": -1.0}, "temperature"),
    ({"temprature": 1.0}, "temprature"),
    ({"all_stop_token_ids": [1]}, "all_stop_token_ids"),
    ({"top_p": "high"}, "sampling_params"),
])
def test_bad_sampling_params(fields, param):
    with pytest.raises(InvalidParameterError) as e:
        params_from_wire(fields)
    assert e.value.param == param


def test_sockets_carry_messages_and_refuse_without_a_peer(tmp_path):
    zmq = pytest.importorskip("zmq")
    from tandem.shared.wire.sockets import MsgPull, MsgPush, PeerUnavailable, ipc_address

    ctx = zmq.Context()
    try:
        lonely = MsgPush(ctx, ipc_address(str(tmp_path), "nobody"), bind=True)
        with pytest.raises(PeerUnavailable):
            lonely.send(ShutdownMsg())
        lonely.close()
        pull = MsgPull(ctx, "tcp://127.0.0.1:0", bind=True)
        assert pull.address.startswith("tcp://127.0.0.1:") and not pull.address.endswith(":0")
        push = MsgPush(ctx, pull.address, bind=False)
        push.send(EXAMPLES[5])
        assert pull.poll(5000)
        assert pull.recv() == EXAMPLES[5]
        push.socket.send_multipart([b"garbage"])
        assert pull.poll(5000)
        with pytest.raises(WireError):
            pull.recv()
        push.close()
        pull.close()
    finally:
        ctx.term()
