"""One streamed request to an OpenAI-compatible server, timed on the client: `send_request` posts to
/v1/completions or /v1/chat/completions with `stream=True` and `stream_options.include_usage`, reads
the server-sent events and returns a `RequestResult` (never raises for a failed request: the failure
is the result, with an error type).

Timing (seconds, `time.perf_counter`):
- a *token event* is a chunk that carries generated output: a completions chunk with a choice, or a
  chat chunk with a choice whose delta has content (the role-only first chunk, which servers may send
  before any token exists, is not one);
- TTFT = first token event - send; ITL = the gaps between successive token events (a chunk may carry
  several tokens, e.g. after a stop-string holdback or when the server coalesces tokens for a reader
  that fell behind: then one gap spans them, as in `vllm bench serve`);
- latency (E2E) = the end of the stream (`[DONE]`) - send;
- token counts come from the server's final usage chunk; a server that sends none gets the
  workload's prompt count and the number of token events as the output count.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: dict[Endpoint, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


@dataclass
class RequestResult:
    """What the client saw of one request. Times are seconds; `start_time` is relative to the
    benchmark's start (the first arrival), the others are durations."""

    success: bool
    prompt_len: int
    output_len: int = 0
    start_time: float = 0.0
    queue_time: float = 0.0  # arrival -> sent: waiting for a --max-concurrency slot
    ttft: float = 0.0
    itl: list[float] = field(default_factory=list)
    latency: float = 0.0
    generated_text: str = ""
    error_type: str | None = None  # http_<status>, timeout, connect_error, connection_lost, stream_error, ...
    error: str | None = None


@dataclass(frozen=True)
class ApiRequest:
    """A request ready to send: which endpoint, its JSON body, and the prompt's token count as the
    workload built it (used only when the server reports no usage)."""

    endpoint: Endpoint
    body: dict[str, Any]
    expected_prompt_len: int


def build_body(endpoint: Endpoint, model: str, prompt: str | list[dict[str, str]], max_tokens: int,
               sampling: dict[str, Any]) -> dict[str, Any]:
    """The streamed request body: a prompt string for completions, a message list for chat."""
    body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, **sampling}
    if endpoint == "completions":
        if not isinstance(prompt, str):
            raise ValueError("the completions endpoint takes a prompt string, not messages")
        body["prompt"] = prompt
    else:
        body["messages"] = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return body


def _chunk_text(endpoint: Endpoint, chunk: dict[str, Any]) -> str | None:
    """The generated text a chunk carries, or None when it is not a token event."""
    choices = chunk.get("choices") or []
    if not choices:
        return None
    if endpoint == "completions":
        return "".join(c.get("text") or "" for c in choices)
    texts = []
    for c in choices:
        delta = c.get("delta") or {}
        content = delta.get("content")
        if content is None or (content == "" and delta.get("role")):
            continue
        texts.append(content)
    return "".join(texts) if texts else None


def _error_message(body: bytes) -> str:
    try:
        err = json.loads(body).get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
    except (ValueError, AttributeError):
        pass
    return body[:500].decode("utf-8", "replace")


class _StreamFailed(Exception):
    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(message)
        self.error_type = error_type


async def send_request(client: httpx.AsyncClient, base_url: str, request: ApiRequest, *, timeout_s: float,
                       headers: dict[str, str] | None = None) -> RequestResult:
    """Send one streamed request and time it; `start_time` is left 0 (the caller owns the clock)."""
    result = RequestResult(success=False, prompt_len=request.expected_prompt_len)
    url = base_url.rstrip("/") + ENDPOINT_PATHS[request.endpoint]
    sent = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            await _read_stream(client, url, request, headers, sent, result)
    except TimeoutError:
        result.error_type, result.error = "timeout", f"no complete answer within {timeout_s:g} s"
    except httpx.ConnectError as exc:
        result.error_type, result.error = "connect_error", str(exc) or type(exc).__name__
    except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
        result.error_type, result.error = "connection_lost", str(exc) or type(exc).__name__
    except httpx.HTTPError as exc:
        result.error_type, result.error = "http_error", f"{type(exc).__name__}: {exc}"
    except _StreamFailed as exc:
        result.error_type, result.error = exc.error_type, str(exc)
    return result


async def _read_stream(client: httpx.AsyncClient, url: str, request: ApiRequest, headers: dict[str, str] | None,
                       sent: float, result: RequestResult) -> None:
    last_event: float | None = None
    num_events = 0
    text: list[str] = []
    usage: dict[str, Any] | None = None
    done = False
    async with client.stream("POST", url, json=request.body, headers=headers) as response:
        if response.status_code != 200:
            raise _StreamFailed(f"http_{response.status_code}", _error_message(await response.aread()))
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue  # blank separators, comments, `event:` lines
            payload = line[5:].strip()
            if payload == "[DONE]":
                done = True
                break
            try:
                chunk = json.loads(payload)
            except ValueError as exc:
                raise _StreamFailed("bad_response", f"not JSON in the stream: {payload[:200]!r}") from exc
            if not isinstance(chunk, dict):
                raise _StreamFailed("bad_response", f"not a JSON object in the stream: {payload[:200]!r}")
            if "error" in chunk:
                err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": chunk["error"]}
                raise _StreamFailed("stream_error", str(err.get("message"))[:500])
            now = time.perf_counter()
            piece = _chunk_text(request.endpoint, chunk)
            if piece is not None:
                if last_event is None:
                    result.ttft = now - sent
                else:
                    result.itl.append(now - last_event)
                last_event = now
                num_events += 1
                text.append(piece)
            if chunk.get("usage"):
                usage = chunk["usage"]
    end = time.perf_counter()
    if not done:
        raise _StreamFailed("incomplete_stream", "the stream ended without [DONE]")
    if num_events == 0:
        raise _StreamFailed("no_output", "the stream carried no generated token")
    result.latency = end - sent
    result.generated_text = "".join(text)
    if usage is not None:
        result.prompt_len = int(usage.get("prompt_tokens") or result.prompt_len)
        result.output_len = int(usage.get("completion_tokens") or num_events)
    else:
        result.output_len = num_events
    result.success = True
