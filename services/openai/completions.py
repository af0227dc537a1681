"""POST /v1/completions: one engine request per prompt; choice index = prompt index * n + i."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tandem.services.openai.errors import APIError, error_body, error_of
from tandem.services.openai.protocol import (
    CompletionChoice,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
)
from tandem.services.openai.serving import (
    SSE_DONE,
    ChoiceCursor,
    OpenAIServing,
    final_outputs,
    merge_streams,
    request_id,
    sse,
    unless_disconnected,
    usage,
)
from tandem.shared.outputs import CompletionOutput, RequestOutput
from tandem.shared.sampling_params import SamplingParams


def _prompts(serving: OpenAIServing, prompt) -> list[tuple[str | None, list[int]]]:
    """(text or None, token ids) per prompt: a string, strings, token ids, or lists of ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "the prompt is empty", "prompt")
    return [(p, serving.encode(p, chat_rendered=False)) if isinstance(p, str) else (None, list(p)) for p in prompt]


async def create_completion(serving: OpenAIServing, req: CompletionRequest, raw: Request) -> Response:
    model = serving.model_name(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported", "suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (only best_of == n)", "best_of")
    prompts = _prompts(serving, req.prompt)
    for _, ids in prompts:
        serving.check_prompt(ids, req.max_tokens)
    prompt_logprobs = req.prompt_logprobs
    if req.echo and req.logprobs is not None:
        prompt_logprobs = req.logprobs if prompt_logprobs is None else max(prompt_logprobs, req.logprobs)
    params = serving.sampling_params(req, max_tokens=req.max_tokens, logprobs=req.logprobs,
                                     prompt_logprobs=prompt_logprobs)
    rid = request_id("cmpl")
    streams = [serving.client.generate(f"{rid}-{i}", text, ids, params, req.cache_salt)
               for i, (text, ids) in enumerate(prompts)]
    if req.stream:
        body = _stream(serving, req, params, rid, model, prompts, streams)
        return StreamingResponse(body, media_type="text/event-stream")
    finals = await unless_disconnected(raw, lambda: final_outputs(streams))
    choices = []
    for i, out in enumerate(finals):
        text, ids = prompts[i]
        for c in out.outputs:
            choices.append(_choice(serving, req, i * req.n + c.index, c, out, text, ids))
    response = CompletionResponse(
        id=rid, model=model, choices=choices,
        usage=usage([len(ids) for _, ids in prompts], [c for out in finals for c in out.outputs]),
    )
    return JSONResponse(response.model_dump())


def _choice(serving: OpenAIServing, req: CompletionRequest, index: int, c: CompletionOutput, out: RequestOutput,
            prompt_text: str | None, prompt_ids: list[int]) -> CompletionChoice:
    prefix = ""
    if req.echo:
        prefix = prompt_text if prompt_text is not None else serving.decode(prompt_ids)
    logprobs = None
    if req.logprobs is not None:
        ids, positions = list(c.token_ids), list(c.logprobs or [])
        if req.echo:
            ids, positions = list(prompt_ids) + ids, list(out.prompt_logprobs or [None] * len(prompt_ids)) + positions
        logprobs = serving.completion_logprobs(ids, positions, 0)
    return CompletionChoice(index=index, text=prefix + c.text, logprobs=logprobs, finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason)


async def _stream(
    serving: OpenAIServing, req: CompletionRequest, params: SamplingParams, rid: str, model: str,
    prompts: list[tuple[str | None, list[int]]], streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[str]:
    created = int(time.time())
    n = params.n
    cursors = [ChoiceCursor.for_params(params) for _ in range(len(prompts) * n)]
    echo_pending = [req.echo] * len(cursors)  # each choice's first chunk starts with its prompt
    text_offsets = [0] * len(cursors)
    last: dict[int, RequestOutput] = {}
    try:
        async with contextlib.aclosing(merge_streams(streams)) as merged:
            async for i, out in merged:
                last[i] = out
                prompt_text, prompt_ids = prompts[i]
                choices = []
                for c in out.outputs:
                    index = i * n + c.index
                    step = cursors[index].advance(c)
                    if step is None:
                        continue
                    delta, first, end = step
                    prefix, ids, positions = "", c.token_ids[first:end], (c.logprobs or [])[first:end]
                    if echo_pending[index]:
                        echo_pending[index] = False
                        prefix = prompt_text if prompt_text is not None else serving.decode(prompt_ids)
                        ids = prompt_ids + ids
                        positions = list(out.prompt_logprobs or [None] * len(prompt_ids)) + positions
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = serving.completion_logprobs(ids, positions, text_offsets[index])
                        text_offsets[index] += sum(len(t) for t in logprobs.tokens)
                    choices.append(CompletionChoice(index=index, text=prefix + delta, logprobs=logprobs,
                                                    finish_reason=c.finish_reason, stop_reason=c.stop_reason))
                if choices:
                    yield sse(CompletionChunk(id=rid, created=created, model=model, choices=choices).model_dump_json())
        if req.stream_options and req.stream_options.include_usage:
            u = usage([len(ids) for _, ids in prompts], [c for out in last.values() for c in out.outputs])
            yield sse(CompletionChunk(id=rid, created=created, model=model, choices=[], usage=u).model_dump_json())
    except Exception as exc:
        err = error_of(exc)
        yield sse(json.dumps(error_body(err.status, err.message, err.param, err.code)))
    yield SSE_DONE
