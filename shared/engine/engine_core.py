"""EngineCore: the loop of one engine, `schedule -> execute -> update`, over token ids only.
Tokenization, detokenization and stop strings live with the frontend (OutputProcessor)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from tandem.kernels.attention import TorchAttentionBackend
from tandem.shared.config import EngineConfig
from tandem.shared.engine.kv_cache_manager import KVCacheManager
from tandem.shared.engine.request import Request, RequestStatus
from tandem.shared.engine.runner import ModelRunner
from tandem.shared.engine.sampler import TokenLogprobs
from tandem.shared.engine.scheduler import KVPullSlot, Scheduler, SchedulerConfig
from tandem.shared.models.config import ModelConfig, model_config_from_hf
from tandem.shared.models.hf_folder import ModelSource, resolve_model
from tandem.shared.models.loader import build_model
from tandem.shared.sampling_params import InvalidParameterError, SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class EngineCoreOutput:
    """What one step produced for one sequence (an n>1 child is its own sequence)."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # once, with the first token
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    handed_off_blocks: list[int] | None = None  # kv_export: the prompt's blocks, referenced for a lease
    handed_off_tokens: int = 0  # the tokens those blocks hold (the prompt)


@dataclass
class EngineStats:
    num_total_blocks: int
    num_used_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens found cached
    num_running: int
    num_waiting: int
    num_preemptions: int
    prompt_tokens: int
    generation_tokens: int


def child_request_id(request_id: str, index: int, n: int) -> str:
    return request_id if n == 1 else f"{request_id}#{index}"


class EngineCore:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None) -> None:
        self.config = config
        self.source = source or resolve_model(config.model, require_weights=config.load_format != "dummy")
        self.model_config: ModelConfig = model_config_from_hf(
            self.source.hf_config, config.dtype, config.max_model_len
        )
        mc = self.model_config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and self.device.index is not None:
            # Kernels (Triton's included), graphs and streams go to the current device: make it ours.
            torch.cuda.set_device(self.device)
        self.model = build_model(self.source, mc, self.device, config.load_format)
        bs = config.block_size
        kv_bytes_per_block = bs * mc.kv_bytes_per_token(self.model.compute_dtype)
        num_blocks = ModelRunner.kv_blocks(config, self.model, kv_bytes_per_block, self.device)
        if num_blocks * bs < mc.max_model_len:
            raise ValueError(
                f"the KV pool holds {num_blocks * bs} tokens ({num_blocks} blocks of {bs}), less than "
                f"max_model_len={mc.max_model_len}: raise kv_cache_memory/num_kv_blocks or lower max_model_len"
            )
        self.kv = KVCacheManager(num_blocks, bs, config.enable_prefix_caching)
        # Chunked prefill makes any budget work; 2048 keeps activations cache-sized on CPU.
        max_batched = config.max_num_batched_tokens or 2048
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, max_batched, mc.max_model_len), self.kv
        )
        self.runner = ModelRunner(self.model, num_blocks, bs, TorchAttentionBackend(), self.device,
                                  self.scheduler.config, cuda_graphs=False if config.enforce_eager else None)
        self.eos_token_ids = frozenset(self.source.eos_token_ids)
        self._arrivals = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        logger.info("engine ready: %s, %d KV blocks of %d tokens", mc.architecture, num_blocks, bs)

    # --- requests ------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidParameterError (naming the field) for a request this engine cannot run."""
        mc = self.model_config
        if not prompt_token_ids:
            raise InvalidParameterError("prompt", "the prompt is empty")
        if len(prompt_token_ids) >= mc.max_model_len:
            raise InvalidParameterError(
                "prompt",
                f"the prompt has {len(prompt_token_ids)} tokens, but max_model_len is {mc.max_model_len} "
                f"(at most {mc.max_model_len - 1} prompt tokens leave room for one generated token)",
            )
        bad = [t for t in prompt_token_ids if not isinstance(t, int) or not 0 <= t < mc.vocab_size]
        if bad:
            raise InvalidParameterError("prompt", f"token id {bad[0]!r} is outside the vocabulary [0, {mc.vocab_size})")
        for token_id in list(params.logit_bias or {}) + list(params.stop_token_ids or []):
            if token_id >= mc.vocab_size:
                field_name = "logit_bias" if token_id in (params.logit_bias or {}) else "stop_token_ids"
                raise InvalidParameterError(field_name, f"token id {token_id} is outside the vocabulary")

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, cache_salt: str | None = None,
        kv_export: bool = False,
    ) -> list[str]:
        """Queue a request (n>1: one sequence per choice, children sharing the prompt blocks).
        Returns the sequence ids whose outputs will carry this request's choices, in index order.
        `kv_export` (prefill role): each sequence ends after its first token, handing its prompt
        blocks off (EngineCoreOutput.handed_off_blocks) unless that token already finished it."""
        self.validate(prompt_token_ids, params)
        running = self.scheduler.requests
        if request_id in running or child_request_id(request_id, 0, params.n) in running:
            raise InvalidParameterError("request_id", f"request {request_id!r} is already running")
        ids = []
        parent_id = None
        for index in range(params.n):
            seq_id = child_request_id(request_id, index, params.n)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            request = Request(
                request_id=seq_id,
                prompt_token_ids=list(prompt_token_ids),
                params=params,
                eos_token_ids=self.eos_token_ids,
                arrival_index=self._arrivals,
                cache_salt=cache_salt,
                parent_id=parent_id,
                generator=generator,
                kv_export=kv_export,
            )
            self._arrivals += 1
            self.scheduler.add_request(request)
            parent_id = parent_id or seq_id
            ids.append(seq_id)
        self.prompt_tokens += len(prompt_token_ids)
        return ids

    def add_prefilled_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, first_token: int,
        cache_salt: str | None = None,
    ) -> None:
        """Continue a sequence whose prompt was computed and first token sampled elsewhere (decode
        role). It waits for its KV (take_kv_pulls / finish_kv_pull); a failed pull recomputes."""
        self.validate(prompt_token_ids, params)
        if not isinstance(first_token, int) or not 0 <= first_token < self.model_config.vocab_size:
            raise InvalidParameterError("first_token", f"token id {first_token!r} is outside the vocabulary")
        if len(prompt_token_ids) + 1 >= self.model_config.max_model_len:
            raise InvalidParameterError("prompt", "a handed-off prompt must leave room after its first token")
        if request_id in self.scheduler.requests:
            raise InvalidParameterError("request_id", f"request {request_id!r} is already running")
        generator = None
        if params.seed is not None:
            index = int(request_id.rsplit("#", 1)[1]) if params.n > 1 and "#" in request_id else 0
            generator = torch.Generator(device=self.device).manual_seed(params.seed + index)
            if not params.is_greedy:  # the prefill worker drew once for the first token: draw the same
                torch.empty(self.model_config.vocab_size, device=self.device).exponential_(generator=generator)
        request = Request(
            request_id=request_id, prompt_token_ids=list(prompt_token_ids), params=params,
            eos_token_ids=self.eos_token_ids, arrival_index=self._arrivals, cache_salt=cache_salt,
            generator=generator,
        )
        request.append_output_token(first_token)
        self._arrivals += 1
        self.scheduler.add_awaiting_kv(request)

    def take_kv_pulls(self) -> list[KVPullSlot]:
        """Blocks for the prompts waiting for their KV, while blocks last; the caller pulls into them."""
        slots = self.scheduler.start_kv_pulls()
        self.runner.prepare_external_write([b for slot in slots for b in slot.dest_block_ids])
        return slots

    def finish_kv_pull(self, request_id: str, ok: bool) -> bool:
        """A pull ended (ok: the KV is in place; else the request recomputes it). False if the
        request had ended meanwhile."""
        return self.scheduler.finish_kv_pull(request_id, ok) is not None

    def fail_request(self, request_id: str) -> None:
        """End a sequence with an error (a failed KV pull under the "fail" policy)."""
        request = self.scheduler.requests.get(request_id)
        if request is not None:
            self.scheduler.finish(request, RequestStatus.FINISHED_ERROR)

    def free_blocks(self, block_ids: list[int]) -> None:
        """Drop the references a lease held (handed-off prompt blocks)."""
        self.kv.pool.free(block_ids)

    def abort(self, request_ids: list[str]) -> None:
        self.scheduler.abort(request_ids)

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # --- the loop ------------------------------------------------------------------------------
    def step(self) -> list[EngineCoreOutput]:
        if not self.has_unfinished():
            return []
        sched = self.scheduler.schedule()
        if not sched.seqs:
            return []
        result = self.runner.execute(sched)
        outputs = []
        for request in self.scheduler.update(sched, result):
            output = self._output_of(request)
            if request.kv_export and not request.status.is_finished:
                output.handed_off_blocks = self.scheduler.hand_off(request)
                output.handed_off_tokens = request.num_prompt_tokens
            outputs.append(output)
        return outputs

    def _output_of(self, request: Request) -> EngineCoreOutput:
        self.generation_tokens += 1
        # Prompt logprobs are complete once the first token is sampled: send them with it, once.
        prompt_lps = None
        if request.params.prompt_logprobs is not None and request.num_output_tokens == 1:
            prompt_lps = request.prompt_logprobs
        finished = request.status.is_finished
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=[request.output_token_ids[-1]],
            new_logprobs=[request.logprobs[-1]] if request.params.logprobs is not None else [],
            prompt_logprobs=prompt_lps,
            finish_reason=request.status.finish_reason if finished else None,
            stop_reason=request.stop_reason if request.status == RequestStatus.FINISHED_STOPPED else None,
            num_cached_tokens=request.num_cached_tokens,
        )

    def stats(self) -> EngineStats:
        pool = self.kv.pool
        return EngineStats(
            num_total_blocks=pool.num_blocks,
            num_used_blocks=pool.num_used_blocks,
            kv_cache_usage=pool.usage,
            prefix_cache_queries=self.kv.stats.queries,
            prefix_cache_hits=self.kv.stats.hits,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting) + len(self.scheduler.awaiting_kv)
            + sum(len(c) for c in self.scheduler.children.values()),
            num_preemptions=self.scheduler.num_preemptions,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
        )
