"""The engine's view of one sequence being generated."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from tandem.shared.block_hash import BlockHash
from tandem.shared.engine.sampler import TokenLogprobs
from tandem.shared.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Order carries meaning: everything above PREEMPTED is finished."""

    WAITING = 0
    WAITING_FOR_PARENT = 1  # an n>1 child waits until its parent's prompt blocks exist
    WAITING_FOR_KV = 2  # a decode worker's request whose prompt KV is pulled from a prefill worker
    RUNNING = 3
    PREEMPTED = 4
    FINISHED_STOPPED = 5  # eos, stop token id or stop string
    FINISHED_LENGTH = 6  # max_tokens or the context length
    FINISHED_ABORTED = 7
    FINISHED_ERROR = 8
    FINISHED_HANDED_OFF = 9  # a prefill worker's request: the prompt's KV is leased to a decode worker

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
            RequestStatus.FINISHED_ERROR: "error",
        }.get(self)


@dataclass(eq=False)
class Request:
    """One sequence. `all_token_ids` = prompt + output; KV exists for the first
    `num_computed_tokens` of them. In decode, num_computed_tokens == len(all_token_ids) - 1:
    the last sampled token is fed in the next step.

    Block table regions (block_size B):
        | computed, full & hashed | computed, partial | to compute this step | not yet allocated |
    `block_hashes` covers every full block of all_token_ids (computed or not), so a prefix-cache
    lookup and the registration of newly filled blocks read the same list.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_index: int = 0
    cache_salt: str | None = None
    parent_id: str | None = None  # n>1 children: the request whose prompt blocks they share
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at first schedule
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[BlockHash] = field(default_factory=list)
    num_preemptions: int = 0
    generator: torch.Generator | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    stop_reason: int | str | None = None
    kv_export: bool = False  # prefill role: hand the prompt's KV off after the first token
    kv_pull_in_flight: bool = False  # decode role: a transfer thread writes into this request's blocks

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def extra_keys(self) -> tuple | None:
        return (self.cache_salt,) if self.cache_salt else None

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
