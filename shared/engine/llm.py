"""The offline API, vLLM-shaped: `LLM(...).generate(prompts, params)` and `.chat(...)`."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tandem.shared.config import EngineConfig, GiB, parse_bytes
from tandem.shared.engine.engine_core import EngineCore, EngineStats
from tandem.shared.engine.output_processor import OutputProcessor
from tandem.shared.models.hf_folder import load_tokenizer
from tandem.shared.outputs import RequestOutput
from tandem.shared.prompts import encode_text, render_chat
from tandem.shared.sampling_params import InvalidParameterError, SamplingParams

PromptType = str | dict[str, Any]


class LLM:
    def __init__(
        self,
        model: str | None = None,
        *,
        dtype: str = "auto",
        max_model_len: int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        skip_tokenizer_init: bool = False,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int | None = None,
        kv_cache_memory: int | str = 4 * GiB,
        num_kv_blocks: int | None = None,
        device: str = "cpu",
        load_format: str = "auto",
        gpu_memory_utilization: float = 0.9,
        seed: int = 0,
        enforce_eager: bool = False,
    ) -> None:
        self.config = EngineConfig(
            model=None if model is None else str(model), dtype=dtype, device=device, max_model_len=max_model_len,
            block_size=block_size, enable_prefix_caching=enable_prefix_caching, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, kv_cache_memory=parse_bytes(kv_cache_memory),
            num_kv_blocks=num_kv_blocks, gpu_memory_utilization=gpu_memory_utilization, load_format=load_format,
            skip_tokenizer_init=skip_tokenizer_init, seed=seed, enforce_eager=enforce_eager,
        )
        self.engine = EngineCore(self.config)
        self.tokenizer = None if skip_tokenizer_init else load_tokenizer(self.engine.source)
        self.processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    # --- public API ------------------------------------------------------------------------------
    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str | dict):
            prompts = [prompts]
        prompts = list(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        params_list = (
            [sampling_params] * len(prompts) if isinstance(sampling_params, SamplingParams) else list(sampling_params)
        )
        if len(params_list) != len(prompts):
            raise InvalidParameterError(
                "sampling_params", f"got {len(params_list)} for {len(prompts)} prompts"
            )
        # Validate everything before queuing anything: a bad request leaves the engine untouched.
        inputs = [self._tokenize(p, sp) for p, sp in zip(prompts, params_list, strict=True)]
        for (_, ids), sp in zip(inputs, params_list, strict=True):
            self.engine.validate(ids, sp)
        order = []
        for (text, ids), sp in zip(inputs, params_list, strict=True):
            request_id = str(next(self._ids))
            seq_ids = self.engine.add_request(request_id, ids, sp)
            self.processor.add_request(request_id, seq_ids, text, ids, sp)
            order.append(request_id)
        return self._run(order, use_tqdm)

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
    ) -> list[RequestOutput]:
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [{"prompt": self.render_chat(c, add_generation_prompt, chat_template)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def render_chat(self, messages, add_generation_prompt: bool = True, chat_template: str | None = None) -> str:
        return render_chat(
            self.tokenizer, messages, add_generation_prompt=add_generation_prompt, chat_template=chat_template,
            fallback_template=self.engine.source.chat_template,
        )

    def get_tokenizer(self):
        return self.tokenizer

    def stats(self) -> EngineStats:
        return self.engine.stats()

    # --- internals -------------------------------------------------------------------------------
    def _tokenize(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        if params.stop and self.tokenizer is None:
            raise InvalidParameterError("stop", "stop strings need a tokenizer (skip_tokenizer_init=True)")
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                ids = prompt["prompt_token_ids"]
                if not isinstance(ids, list) or not all(isinstance(t, int) for t in ids):
                    raise InvalidParameterError("prompt_token_ids", "must be a list of integers")
                return None, list(ids)
            if "prompt" not in prompt:
                raise InvalidParameterError("prompt", "a dict prompt needs 'prompt' or 'prompt_token_ids'")
            text, chat_rendered = prompt["prompt"], True
        else:
            text, chat_rendered = prompt, False
        if not isinstance(text, str):
            raise InvalidParameterError("prompt", f"must be a string, got {type(text).__name__}")
        return text, encode_text(self.tokenizer, text, chat_rendered=chat_rendered)

    def _run(self, order: list[str], use_tqdm: bool) -> list[RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(order), desc="Generating", disable=not use_tqdm)
        try:
            while len(finished) < len(order):
                outputs = self.engine.step()
                if not outputs and not self.engine.has_unfinished():
                    raise RuntimeError("engine stopped with requests unfinished")
                processed = self.processor.process(outputs)
                if processed.to_abort:
                    self.engine.abort(processed.to_abort)
                for state in processed.updated:
                    if state.num_unfinished == 0:
                        finished[state.request_id] = state.snapshot()
                        bar.update(1)
        except BaseException:
            for request_id in order:
                if request_id not in finished:
                    self.engine.abort(self.processor.abort_request(request_id))
            raise
        finally:
            bar.close()
        return [finished[r] for r in order]
