"""POST /v1/chat/completions: the chat template, then one engine request with n choices."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tandem.services.openai.errors import APIError, error_body, error_of
from tandem.services.openai.protocol import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
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
from tandem.shared.outputs import RequestOutput
from tandem.shared.sampling_params import SamplingParams


def chat_prompt(serving: OpenAIServing, req: ChatCompletionRequest) -> tuple[str, list[int]]:
    text = serving.render_chat(
        req.messages, add_generation_prompt=req.add_generation_prompt,
        continue_final_message=req.continue_final_message, chat_template=req.chat_template,
        template_kwargs=req.chat_template_kwargs,
    )
    return text, serving.encode(text, chat_rendered=True)


def _check_unsupported(req: ChatCompletionRequest) -> None:
    if req.tools and req.tool_choice != "none":
        raise APIError(400, "tool calling is not supported", "tools")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise APIError(400, "only response_format {\"type\": \"text\"} is supported", "response_format")
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")


async def create_chat_completion(serving: OpenAIServing, req: ChatCompletionRequest, raw: Request) -> Response:
    model = serving.model_name(req.model)
    _check_unsupported(req)
    text, ids = chat_prompt(serving, req)
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    serving.check_prompt(ids, max_tokens, "messages")
    top_n = (req.top_logprobs or 0) if req.logprobs else None
    params = serving.sampling_params(
        req, max_tokens=max_tokens, logprobs=top_n,
        rename={"logprobs": "top_logprobs", "max_tokens": "max_completion_tokens"
                if req.max_completion_tokens is not None else "max_tokens"},
    )
    rid = request_id("chatcmpl")
    stream = serving.client.generate(rid, text, ids, params, req.cache_salt)
    if req.stream:
        return StreamingResponse(_stream(serving, req, params, rid, model, len(ids), stream),
                                 media_type="text/event-stream")
    (out,) = await unless_disconnected(raw, lambda: final_outputs([stream]))
    choices = [
        ChatCompletionChoice(
            index=c.index, message=ChatResponseMessage(content=c.text),
            logprobs=_logprobs(serving, c.token_ids, c.logprobs, top_n),
            finish_reason=c.finish_reason, stop_reason=c.stop_reason,
        )
        for c in out.outputs
    ]
    response = ChatCompletionResponse(id=rid, model=model, choices=choices, usage=usage([len(ids)], out.outputs))
    return JSONResponse(response.model_dump())


def _logprobs(serving: OpenAIServing, token_ids, positions, top_n: int | None) -> ChatChoiceLogprobs | None:
    if top_n is None:
        return None
    return ChatChoiceLogprobs(content=serving.chat_logprobs(list(token_ids), list(positions or []), top_n))


async def _stream(
    serving: OpenAIServing, req: ChatCompletionRequest, params: SamplingParams, rid: str, model: str,
    prompt_len: int, stream: AsyncIterator[RequestOutput],
) -> AsyncIterator[str]:
    created = int(time.time())
    top_n = params.logprobs

    def chunk(choices: list[ChatStreamChoice], usage_info=None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices,
                                       usage=usage_info).model_dump_json(exclude_unset=False))

    cursors = [ChoiceCursor.for_params(params) for _ in range(params.n)]
    last: RequestOutput | None = None
    try:
        # OpenAI's first chunk of each choice names the role.
        yield chunk([ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                     for i in range(params.n)])
        async with contextlib.aclosing(merge_streams([stream])) as merged:
            async for _, out in merged:
                last = out
                choices = []
                for c in out.outputs:
                    step = cursors[c.index].advance(c)
                    if step is None:
                        continue
                    delta, first, end = step
                    logprobs = _logprobs(serving, c.token_ids[first:end], (c.logprobs or [])[first:end], top_n)
                    choices.append(ChatStreamChoice(
                        index=c.index, delta=DeltaMessage(content=delta), logprobs=logprobs,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    ))
                if choices:
                    yield chunk(choices)
        if req.stream_options and req.stream_options.include_usage and last is not None:
            yield chunk([], usage([prompt_len], last.outputs))
    except Exception as exc:
        err = error_of(exc)
        yield sse(json.dumps(error_body(err.status, err.message, err.param, err.code)))
    yield SSE_DONE
