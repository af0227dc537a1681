"""OutputProcessor: the frontend's half of a request. It turns EngineCoreOutputs (token ids)
into RequestOutputs: incremental detokenization, stop strings, logprob decoding. A stop string
ends a choice here; the caller aborts that sequence in the engine (`to_abort`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from tandem.shared.engine.detokenizer import IncrementalDetokenizer
from tandem.shared.engine.engine_core import EngineCoreOutput
from tandem.shared.engine.sampler import TokenLogprobs
from tandem.shared.engine.stop_strings import StopStringMatcher
from tandem.shared.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestOutput
from tandem.shared.sampling_params import SamplingParams


@dataclass
class ChoiceState:
    index: int
    detokenizer: IncrementalDetokenizer | None
    stop_matcher: StopStringMatcher | None
    output: CompletionOutput
    text: str = ""


@dataclass
class RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    choices: list[ChoiceState]
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    num_unfinished: int = 0

    def snapshot(self) -> RequestOutput:
        outputs = []
        for c in self.choices:
            o = c.output
            outputs.append(
                CompletionOutput(
                    index=o.index, text=c.text, token_ids=list(o.token_ids),
                    cumulative_logprob=o.cumulative_logprob,
                    logprobs=list(o.logprobs) if o.logprobs is not None else None,
                    finish_reason=o.finish_reason, stop_reason=o.stop_reason,
                )
            )
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=outputs, finished=self.num_unfinished == 0, prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=self.num_cached_tokens,
        )


@dataclass
class ProcessedOutputs:
    updated: list[RequestState] = field(default_factory=list)
    to_abort: list[str] = field(default_factory=list)  # engine sequence ids stopped by a stop string


class OutputProcessor:
    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer  # None with skip_tokenizer_init
        self.states: dict[str, RequestState] = {}
        self._choice_of: dict[str, tuple[RequestState, ChoiceState]] = {}

    def add_request(
        self, request_id: str, seq_ids: list[str], prompt: str | None, prompt_token_ids: list[int],
        params: SamplingParams,
    ) -> RequestState:
        choices = []
        for index in range(len(seq_ids)):
            detok = None
            if self.tokenizer is not None:
                detok = IncrementalDetokenizer(
                    self.tokenizer, prompt_token_ids, params.skip_special_tokens, params.spaces_between_special_tokens
                )
            matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output) if params.stop else None
            output = CompletionOutput(
                index=index,
                cumulative_logprob=0.0 if params.logprobs is not None else None,
                logprobs=[] if params.logprobs is not None else None,
            )
            choices.append(ChoiceState(index, detok, matcher, output))
        state = RequestState(request_id, prompt, prompt_token_ids, params, choices, num_unfinished=len(seq_ids))
        self.states[request_id] = state
        for seq_id, choice in zip(seq_ids, choices, strict=True):
            self._choice_of[seq_id] = (state, choice)
        return state

    def abort_request(self, request_id: str) -> list[str]:
        """Forget a request; returns its engine sequence ids still unfinished."""
        state = self.states.pop(request_id, None)
        if state is None:
            return []
        seq_ids = [s for s, (st, _) in self._choice_of.items() if st is state]
        for seq_id in seq_ids:
            del self._choice_of[seq_id]
        return seq_ids

    def process(self, outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        result = ProcessedOutputs()
        seen: set[str] = set()
        for out in outputs:
            entry = self._choice_of.get(out.request_id)
            if entry is None:
                continue
            state, choice = entry
            stopped_by_string = self._apply(state, choice, out)
            if stopped_by_string:
                result.to_abort.append(out.request_id)
            if choice.output.finish_reason is not None:
                del self._choice_of[out.request_id]
                state.num_unfinished -= 1
                if state.num_unfinished == 0:
                    del self.states[state.request_id]
            if state.request_id not in seen:
                seen.add(state.request_id)
                result.updated.append(state)
        return result

    def _apply(self, state: RequestState, choice: ChoiceState, out: EngineCoreOutput) -> bool:
        o = choice.output
        if out.prompt_logprobs is not None and state.prompt_logprobs is None:
            state.prompt_logprobs = [self._position(lp) if lp is not None else None for lp in out.prompt_logprobs]
        state.num_cached_tokens = max(state.num_cached_tokens, out.num_cached_tokens)
        o.token_ids.extend(out.new_token_ids)
        for lp in out.new_logprobs:
            o.logprobs.append(self._position(lp))
            o.cumulative_logprob += lp.logprob
        if choice.detokenizer is not None:
            new_ids = out.new_token_ids
            if out.finish_reason == "stop" and not state.params.include_stop_str_in_output:
                new_ids = new_ids[:-1]  # an eos / stop token id ends the text without showing in it (vLLM)
            delta = choice.detokenizer.push(new_ids)
            choice.text += delta
            if choice.stop_matcher is not None and delta:
                hit = choice.stop_matcher.check(choice.text, len(delta))
                if hit is not None:
                    stop_str, truncate_to = hit
                    choice.text = choice.text[:truncate_to]
                    o.finish_reason, o.stop_reason = "stop", stop_str
                    return out.finish_reason is None  # still running in the engine: abort it
        if out.finish_reason is not None:
            o.finish_reason, o.stop_reason = out.finish_reason, out.stop_reason
        return False

    def _position(self, lp: TokenLogprobs) -> PositionLogprobs:
        decode = (lambda t: self.tokenizer.decode([t])) if self.tokenizer is not None else (lambda t: None)
        position: PositionLogprobs = {lp.token_id: Logprob(lp.logprob, lp.rank, decode(lp.token_id))}
        for rank, (tid, value) in enumerate(zip(lp.top_token_ids, lp.top_logprobs, strict=True), start=1):
            if tid not in position:
                position[tid] = Logprob(value, rank, decode(tid))
        return position
