"""What completions and chat share: the served model, prompt checks, request fields to
SamplingParams, logprob formatting, streaming cursors, and running generations to the end (or
until the client goes away)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from tandem.services.openai.engine_client import EngineClient
from tandem.services.openai.errors import APIError
from tandem.services.openai.protocol import (
    ChatTokenLogprob,
    CompletionLogprobs,
    SamplingRequest,
    TopLogprob,
    UsageInfo,
)
from tandem.shared.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from tandem.shared.prompts import encode_text, render_chat
from tandem.shared.sampling_params import InvalidParameterError, SamplingParams

_MIN_LOGPROB = -9999.0  # JSON has no -inf


MAX_N = 64  # choices per request: each is an engine sequence holding its own KV blocks


@dataclass(frozen=True)
class ServedModel:
    names: tuple[str, ...]  # the first is what responses report
    root: str  # the model's path
    max_model_len: int
    vocab_size: int
    chat_template: str | None  # the model file's own, when the tokenizer has none


class OpenAIServing:
    def __init__(self, client: EngineClient, tokenizer: Any, model: ServedModel) -> None:
        self.client = client
        self.tokenizer = tokenizer
        self.model = model

    # --- request checks ----------------------------------------------------------------------------
    def model_name(self, requested: str | None) -> str:
        if requested is not None and requested not in self.model.names:
            raise APIError(404, f"The model `{requested}` does not exist.", "model", "model_not_found")
        return self.model.names[0]

    def check_prompt(self, ids: list[int], max_tokens: int | None, what: str = "prompt") -> None:
        """Length and vocabulary, with the numbers (the engine checks again)."""
        limit, vocab = self.model.max_model_len, self.model.vocab_size
        if not ids:
            raise APIError(400, f"the {what} is empty", what)
        if len(ids) >= limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, the prompt has {len(ids)} "
                f"tokens (at most {limit - 1} leave room for one generated token). Please shorten the {what}.",
                what, "context_length_exceeded",
            )
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise APIError(
                400, f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} in the completion). "
                f"Please reduce the length of the {what} or completion.",
                "max_tokens", "context_length_exceeded",
            )
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", what)

    def sampling_params(
        self, req: SamplingRequest, *, max_tokens: int | None, logprobs: int | None,
        prompt_logprobs: int | None = None, rename: dict[str, str] | None = None,
    ) -> SamplingParams:
        """The engine's params from the request's fields (unset fields keep the engine's defaults);
        a bad value is a 400 naming the request's own field (`rename` maps engine -> request names)."""
        if isinstance(req.n, int) and req.n > MAX_N:
            raise APIError(400, f"n is {req.n}, at most {MAX_N} choices per request", "n")
        fields: dict[str, Any] = dict(
            n=req.n, seed=req.seed, stop=req.stop, stop_token_ids=req.stop_token_ids, min_tokens=req.min_tokens,
            ignore_eos=req.ignore_eos, max_tokens=max_tokens, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output, skip_special_tokens=req.skip_special_tokens,
            spaces_between_special_tokens=req.spaces_between_special_tokens,
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(req, name)
            if value is not None:
                fields[name] = value
        try:
            if req.logit_bias:
                fields["logit_bias"] = {int(k): v for k, v in req.logit_bias.items()}
        except ValueError:
            raise APIError(400, "logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
        try:
            params = SamplingParams(**fields)
        except InvalidParameterError as exc:
            param = (rename or {}).get(exc.param, exc.param)
            raise APIError(400, str(exc).replace(f"{exc.param}:", f"{param}:", 1), param) from None
        vocab = self.model.vocab_size
        for name, ids in (("logit_bias", params.logit_bias or {}), ("stop_token_ids", params.stop_token_ids)):
            bad = next((t for t in ids if t >= vocab), None)
            if bad is not None:
                raise APIError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", name)
        return params

    # --- prompts -------------------------------------------------------------------------------------
    def render_chat(self, messages: list, *, add_generation_prompt: bool, continue_final_message: bool,
                    chat_template: str | None, template_kwargs: dict | None) -> str:
        return render_chat(
            self.tokenizer, [chat_message_dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message, chat_template=chat_template,
            fallback_template=self.model.chat_template, template_kwargs=template_kwargs,
        )

    def encode(self, text: str, *, chat_rendered: bool, add_special_tokens: bool | None = None) -> list[int]:
        return encode_text(self.tokenizer, text, chat_rendered=chat_rendered, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # --- logprobs ------------------------------------------------------------------------------------
    def completion_logprobs(
        self, token_ids: list[int], positions: list[PositionLogprobs | None], text_offset: int,
    ) -> CompletionLogprobs:
        """The legacy completions shape; `positions[i]` None (a prompt's first token) has no logprob."""
        out = CompletionLogprobs()
        for token_id, position in zip(token_ids, positions):
            if position is None:
                token, logprob, top = self.tokenizer.decode([token_id]), None, None
            else:
                chosen = position[token_id]
                token, logprob = _token_text(chosen, token_id, self.tokenizer), max(chosen.logprob, _MIN_LOGPROB)
                top = {_token_text(lp, tid, self.tokenizer): max(lp.logprob, _MIN_LOGPROB)
                       for tid, lp in position.items()}
            out.tokens.append(token)
            out.token_logprobs.append(logprob)
            out.top_logprobs.append(top)
            out.text_offset.append(text_offset)
            text_offset += len(token)
        return out

    def chat_logprobs(
        self, token_ids: list[int], positions: list[PositionLogprobs], top_n: int,
    ) -> list[ChatTokenLogprob]:
        entries = []
        for token_id, position in zip(token_ids, positions):
            chosen = position[token_id]
            ranked = sorted(
                ((lp.rank, tid, lp) for tid, lp in position.items() if lp.rank is not None and lp.rank <= top_n),
                key=lambda x: x[0],
            )
            token = _token_text(chosen, token_id, self.tokenizer)
            entries.append(ChatTokenLogprob(
                token=token, logprob=max(chosen.logprob, _MIN_LOGPROB), bytes=list(token.encode()),
                top_logprobs=[
                    TopLogprob(token=(t := _token_text(lp, tid, self.tokenizer)), logprob=max(lp.logprob, _MIN_LOGPROB),
                               bytes=list(t.encode()))
                    for _, tid, lp in ranked
                ],
            ))
        return entries


def _token_text(lp, token_id: int, tokenizer) -> str:
    return lp.decoded_token if lp.decoded_token is not None else tokenizer.decode([token_id])


def chat_message_dict(message) -> dict[str, Any]:
    """A message for the chat template: text parts joined into one string."""
    d = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text":
                raise APIError(400, f"content parts of type {part.type!r} are not supported (text only)",
                               "messages.content")
            texts.append(part.text or "")
        d["content"] = "\n".join(texts)
    elif content is None:
        d["content"] = ""
    return d


def usage(prompt_lens: list[int], outputs: list[CompletionOutput]) -> UsageInfo:
    prompt = sum(prompt_lens)
    completion = sum(len(o.token_ids) for o in outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --- streaming ----------------------------------------------------------------------------------------


@dataclass
class ChoiceCursor:
    """How much of one choice a stream has sent. Text that may be the start of a stop string is
    held back until the choice moves past it or ends (the text is then cut before the stop)."""

    holdback: int
    text_sent: int = 0
    tokens_sent: int = 0
    done: bool = False

    @classmethod
    def for_params(cls, params: SamplingParams) -> ChoiceCursor:
        holdback = 0
        if params.stop and not params.include_stop_str_in_output:
            holdback = max(len(s) for s in params.stop) - 1
        return cls(holdback)

    def advance(self, choice: CompletionOutput) -> tuple[str, int, int] | None:
        """(new text, first new token, end of new tokens), or None when there is nothing to send."""
        if self.done:
            return None
        finished = choice.finish_reason is not None
        text_end = len(choice.text) if finished else max(self.text_sent, len(choice.text) - self.holdback)
        delta = choice.text[self.text_sent:text_end]
        first, end = self.tokens_sent, len(choice.token_ids)
        if not delta and first == end and not finished:
            return None
        self.text_sent, self.tokens_sent, self.done = max(self.text_sent, text_end), end, finished
        return delta, first, end


def sse(payload: str) -> str:
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")


async def merge_streams(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several generations as they come; closing this closes them."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async with contextlib.aclosing(stream):
                async for out in stream:
                    queue.put_nowait((i, out, None))
            queue.put_nowait((i, None, None))
        except Exception as exc:
            queue.put_nowait((i, None, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                remaining -= 1
                continue
            yield i, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def final_outputs(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
    finals: dict[int, RequestOutput] = {}
    async with contextlib.aclosing(merge_streams(streams)) as merged:
        async for i, out in merged:
            finals[i] = out
    return [finals[i] for i in range(len(streams))]


async def unless_disconnected(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """Run `work` and return its result; if the client disconnects first, cancel it (its
    generations abort and free their blocks) and raise ClientDisconnected."""
    task = asyncio.ensure_future(work())

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
        watcher.cancel()
    if task.cancelled() or not task.done():
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise ClientDisconnected()
    return task.result()


class ClientDisconnected(Exception):
    pass
