"""Drives the load: arrivals (Poisson at a rate, or all at once), a concurrency cap, a duration
limit, conversations whose turns follow each other, warm-up requests kept out of the results.

Arrivals: with `--request-rate R` conversations arrive as a Poisson process (exponential gaps of
mean 1/R, seeded; the first at t = 0); with R = inf they all arrive at t = 0. `--max-concurrency C`
caps the requests in flight (arrivals wait for a slot; that wait is the request's `queue_time`), so
`--max-concurrency C` alone is a closed loop of C clients. A multi-turn conversation sends its next
turn when the previous answer is complete (plus `think_time_s`); R then counts conversations.
Bounds: every request of the workload (count), or until `duration_limit_s` from the first arrival:
after it no request is sent (counted as `not_sent`), requests in flight finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from tandem.loadtests.bench_client import ApiRequest, RequestResult
from tandem.loadtests.bench_workloads import Conversation, Turn

# (the turn, the conversation so far as chat messages, their token count) -> the request to send
MakeRequest = Callable[[Turn, list[dict[str, str]], int], ApiRequest]
SendRequest = Callable[[ApiRequest], Awaitable[RequestResult]]


@dataclass(frozen=True)
class LoadShape:
    request_rate: float = math.inf
    max_concurrency: int | None = None
    duration_limit_s: float | None = None
    think_time_s: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.request_rate > 0:
            raise ValueError(f"--request-rate must be > 0 (or inf), got {self.request_rate}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"--max-concurrency must be >= 1, got {self.max_concurrency}")
        if self.duration_limit_s is not None and not self.duration_limit_s > 0:
            raise ValueError(f"--duration-limit must be > 0 s, got {self.duration_limit_s}")
        if self.think_time_s < 0:
            raise ValueError(f"--think-time must be >= 0 s, got {self.think_time_s}")


@dataclass
class RunOutcome:
    results: list[RequestResult]  # every request sent, plus the turns aborted with their conversation; send order
    not_sent: int
    duration_s: float  # first arrival -> last request done


class Progress(Protocol):
    """What the runner needs of a progress bar (tqdm fits)."""

    def update(self, n: int = 1) -> object: ...


def arrival_times(num: int, request_rate: float, seed: int) -> list[float]:
    """Seconds from the start: 0, then exponential gaps of mean 1/rate (all 0 for an infinite rate)."""
    if math.isinf(request_rate):
        return [0.0] * num
    gaps = np.random.default_rng(seed).exponential(1.0 / request_rate, size=max(0, num - 1))
    return [0.0, *np.cumsum(gaps).tolist()][:num]


async def run_load(conversations: list[Conversation], make_request: MakeRequest, send: SendRequest,
                   shape: LoadShape, progress: Progress | None = None) -> RunOutcome:
    arrivals = arrival_times(len(conversations), shape.request_rate, shape.seed)
    gate: asyncio.Semaphore | contextlib.nullcontext = (
        asyncio.Semaphore(shape.max_concurrency) if shape.max_concurrency else contextlib.nullcontext())
    results: list[RequestResult] = []
    not_sent = 0
    t0 = time.perf_counter()
    deadline = t0 + shape.duration_limit_s if shape.duration_limit_s else math.inf

    def record(result: RequestResult) -> None:
        results.append(result)
        if progress is not None:
            progress.update(1)

    async def converse(conv: Conversation, arrival: float) -> None:
        nonlocal not_sent
        if t0 + arrival >= deadline:
            not_sent += len(conv.turns)
            return
        await asyncio.sleep(max(0.0, t0 + arrival - time.perf_counter()))
        history: list[dict[str, str]] = []
        history_tokens = 0
        for i, turn in enumerate(conv.turns):
            request = make_request(turn, history, history_tokens)
            arrived = time.perf_counter()
            async with gate:
                sent = time.perf_counter()
                if sent >= deadline:
                    not_sent += len(conv.turns) - i
                    return
                result = await send(request)
            result.start_time, result.queue_time = sent - t0, sent - arrived
            record(result)
            if not result.success:
                for later in conv.turns[i + 1:]:  # they cannot be sent without this answer
                    record(RequestResult(success=False, prompt_len=later.text_len, start_time=result.start_time,
                                         error_type="conversation_aborted",
                                         error=f"an earlier turn failed ({result.error_type})"))
                return
            if conv.with_history:
                history = [*history, {"role": "user", "content": turn.text},
                           {"role": "assistant", "content": result.generated_text}]
                history_tokens += turn.text_len + result.output_len
                if shape.think_time_s and i + 1 < len(conv.turns):
                    await asyncio.sleep(shape.think_time_s)

    await asyncio.gather(*(converse(c, a) for c, a in zip(conversations, arrivals)))
    duration = time.perf_counter() - t0
    results.sort(key=lambda r: r.start_time)  # send order (stable: an aborted turn follows its cause)
    return RunOutcome(results, not_sent, duration)


async def warm_up(make_request: MakeRequest, send: SendRequest, turns: list[Turn]) -> None:
    """Send each warm-up turn in turn; the first failure stops the benchmark with its error."""
    for turn in turns:
        result = await send(make_request(turn, [], 0))
        if not result.success:
            raise RuntimeError(f"warm-up request failed ({result.error_type}): {result.error}")
