"""The messages between a frontend (the `serve` HTTP process, later the router) and an engine
process. Frozen dataclasses named `*Msg`, grouped by direction; nested plain structs have no tag.
Every field is typed: the codec checks types against these hints when it decodes.

Sequence ids: a request with n > 1 runs as n engine sequences "<request_id>#<index>"; outputs,
aborts and errors name sequences, AddRequestMsg names the request (see EngineCore.add_request).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from tandem.shared.sampling_params import InvalidParameterError, SamplingParams
from tandem.shared.wire.codec import PROTOCOL_VERSION, Frames, decode, encode

# --- frontend -> engine ---------------------------------------------------------------------------


@dataclass(frozen=True)
class HandoffRecord:
    """What a prefill worker answers once a prompt is computed: where and under which lease a
    decode worker can pull the prompt's KV blocks. `block_ids` cover `num_tokens` tokens (the last
    block may be partial); `lease_expiry` is unix time. Also the KV protocol's tag 4."""

    request_id: str  # the engine sequence id on the prefill worker
    first_token: int
    engine_id: str
    kv_addr: str
    lease_id: str
    block_ids: list[int]
    num_tokens: int
    compat_hash: str
    lease_expiry: float


@dataclass(frozen=True)
class AddRequestMsg:
    """`kv_export`: a prefill worker computes the prompt, samples the first token, keeps the
    prompt's blocks under a lease and answers with a HandoffRecord (SeqOutput.handoff).
    `kv_import`: a decode worker continues a prompt prefilled elsewhere: `prompt_token_ids` is the
    prompt, the first token is `kv_import.first_token`, the KV is pulled from `kv_import.kv_addr`."""

    request_id: str
    prompt_token_ids: list[int]
    params: dict[str, Any]  # SamplingParams fields by name (params_to_wire)
    cache_salt: str | None = None
    kv_export: bool = False
    kv_import: HandoffRecord | None = None


@dataclass(frozen=True)
class AbortMsg:
    request_ids: list[str]  # engine sequence ids


@dataclass(frozen=True)
class StatsRequestMsg:
    request_seq: int  # echoed in the StatsMsg that answers it


@dataclass(frozen=True)
class ShutdownMsg:
    reason: str = ""


@dataclass(frozen=True)
class HelloMsg:
    """A client's first message to a worker; answered with ReadyMsg."""

    client_id: str


# --- engine -> frontend ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WireLogprobs:
    """One position's logprobs; the same fields as the sampler's TokenLogprobs."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class SeqOutput:
    """One engine step's result for one sequence; the same fields as EngineCoreOutput, so the
    frontend's OutputProcessor consumes either."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[WireLogprobs]
    prompt_logprobs: list[WireLogprobs | None] | None
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    handoff: HandoffRecord | None = None  # kv_export requests: the prompt is ready to pull

    @classmethod
    def of(cls, out: Any, handoff: HandoffRecord | None = None) -> SeqOutput:
        """From an EngineCoreOutput (duck-typed: this module must not import torch)."""

        def lp(x: Any) -> WireLogprobs:
            return WireLogprobs(x.token_id, x.logprob, x.rank, list(x.top_token_ids), list(x.top_logprobs))

        prompt = None
        if out.prompt_logprobs is not None:
            prompt = [None if x is None else lp(x) for x in out.prompt_logprobs]
        return cls(
            out.request_id, list(out.new_token_ids), [lp(x) for x in out.new_logprobs], prompt,
            out.finish_reason, out.stop_reason, out.num_cached_tokens, handoff,
        )


@dataclass(frozen=True)
class EngineOutputsMsg:
    outputs: list[SeqOutput]


@dataclass(frozen=True)
class StatsMsg:
    """EngineStats, plus the StatsRequestMsg it answers (0: sent unasked)."""

    request_seq: int
    num_total_blocks: int
    num_used_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_running: int
    num_waiting: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int


@dataclass(frozen=True)
class ErrorMsg:
    """A request the engine refused (code 400, `param` names the field), a message it could not
    decode (request_id None, 400), or a fatal engine failure (request_id None, 500: the engine
    exits after sending it)."""

    request_id: str | None
    code: int
    message: str
    param: str | None = None


@dataclass(frozen=True)
class ReadyMsg:
    """Sent once, when the engine has loaded its model and is taking requests."""

    engine_id: str
    pid: int
    model: str
    max_model_len: int
    vocab_size: int
    eos_token_ids: list[int]
    block_size: int
    num_kv_blocks: int
    role: str = "mixed"  # a worker's role: "prefill", "decode" or "mixed" (serve's engine: "mixed")
    kv_addr: str = ""  # where a worker serves KV pulls ("" for serve's engine)
    compat_hash: str = ""


# The tag table: tags are part of the protocol; never reuse or renumber one.
MESSAGE_TYPES: dict[int, type] = {
    1: AddRequestMsg,
    2: AbortMsg,
    3: StatsRequestMsg,
    4: ShutdownMsg,
    5: HelloMsg,
    16: EngineOutputsMsg,
    17: StatsMsg,
    18: ErrorMsg,
    19: ReadyMsg,
}
MESSAGE_TAGS: dict[type, int] = {cls: tag for tag, cls in MESSAGE_TYPES.items()}

__all__ = [
    "PROTOCOL_VERSION", "HandoffRecord", "AddRequestMsg", "AbortMsg", "StatsRequestMsg", "ShutdownMsg", "HelloMsg",
    "WireLogprobs", "SeqOutput",
    "EngineOutputsMsg", "StatsMsg", "ErrorMsg", "ReadyMsg", "MESSAGE_TYPES", "encode_msg", "decode_msg",
    "params_to_wire", "params_from_wire",
]


def encode_msg(msg: Any) -> list[bytes | memoryview]:
    return encode(msg, MESSAGE_TAGS)


def decode_msg(frames: Frames) -> Any:
    return decode(frames, MESSAGE_TYPES)


# --- sampling params ------------------------------------------------------------------------------

_PARAM_FIELDS = frozenset(f.name for f in dataclasses.fields(SamplingParams))


def params_to_wire(params: SamplingParams) -> dict[str, Any]:
    """Only the fields that differ from the defaults travel."""
    default = _DEFAULT_PARAMS
    out = {}
    for name in _PARAM_FIELDS:
        value = getattr(params, name)
        if value != getattr(default, name):
            out[name] = value
    return out


def params_from_wire(fields: dict[str, Any]) -> SamplingParams:
    """Build and validate SamplingParams; any bad field raises InvalidParameterError naming it."""
    unknown = sorted(set(fields) - _PARAM_FIELDS)
    if unknown:
        raise InvalidParameterError(unknown[0], "not a sampling parameter")
    try:
        return SamplingParams(**fields)
    except InvalidParameterError:
        raise
    except (TypeError, ValueError) as exc:  # a wrong type reaching a comparison or a conversion
        raise InvalidParameterError("sampling_params", f"bad value: {exc}") from None


_DEFAULT_PARAMS = SamplingParams()
