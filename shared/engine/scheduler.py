"""Continuous batching under one token budget: no prefill or decode phase. Each request's
`num_computed_tokens` chases its length; long prompts are chunked; when blocks run out, the
newest running request is preempted by recompute (its full blocks stay in the prefix cache).

`schedule()` returns a SchedulerOutput (plain data); `update()` consumes the runner's
RunnerOutput. Neither sees a tensor, so the scheduler is testable with a fake runner.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tandem.shared.engine.kv_cache_manager import KVCacheManager
from tandem.shared.engine.request import Request, RequestStatus
from tandem.shared.engine.sampler import TokenLogprobs


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True


@dataclass
class ScheduledSeq:
    """One request's slice of the flat batch. `token_ids` are all_token_ids[start:start+len];
    `block_ids` is the whole block table (it covers start + len tokens)."""

    request: Request  # read-only for the runner: ids, params, prompt/output ids, generator
    start: int
    num_tokens: int
    samples: bool  # this slice reaches the end of the request's tokens: sample the next one
    prompt_logprobs_from: int | None  # first position whose prompt logprob is still owed


@dataclass
class SchedulerOutput:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.seqs)


@dataclass(frozen=True)
class KVPullSlot:
    """A decode worker's request whose prompt blocks are allocated and whose KV is to be pulled:
    the first `num_local_blocks` blocks were local prefix-cache hits; the remote blocks
    [num_local_blocks:] of the handoff land in `dest_block_ids` (same order)."""

    request_id: str
    num_local_blocks: int
    dest_block_ids: list[int]


@dataclass
class RunnerOutput:
    """Per scheduled request id: the sampled token (only for seqs that sample), its logprobs,
    and prompt logprobs for the positions covered by this step."""

    sampled: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.children: dict[str, list[Request]] = {}  # parent id -> n>1 children not yet released
        self.requests: dict[str, Request] = {}
        self.awaiting_kv: dict[str, Request] = {}  # WAITING_FOR_KV, in arrival order
        self.orphaned_pulls: dict[str, Request] = {}  # finished while a transfer wrote into their blocks
        self.num_preemptions = 0

    # --- admission -------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        if request.parent_id is not None and request.parent_id in self.requests:
            request.status = RequestStatus.WAITING_FOR_PARENT
            self.children.setdefault(request.parent_id, []).append(request)
            return
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_awaiting_kv(self, request: Request) -> None:
        """A request whose prompt was computed elsewhere: it waits for blocks and its KV pull."""
        self.requests[request.request_id] = request
        request.status = RequestStatus.WAITING_FOR_KV
        self.awaiting_kv[request.request_id] = request

    def start_kv_pulls(self) -> list[KVPullSlot]:
        """Allocate the prompt blocks of awaiting requests, oldest first, while blocks last: local
        prefix-cache hits are taken, the rest is for the caller to pull (then finish_kv_pull)."""
        slots = []
        bs = self.kv.block_size
        for request in self.awaiting_kv.values():
            if request.kv_pull_in_flight or request.block_ids:
                continue
            hits = self.kv.find_cached_prefix(request)  # full prompt blocks only: the first token follows
            num_prompt = request.num_prompt_tokens
            if not self.kv.allocate_slots(request, num_prompt - len(hits) * bs, hits):
                break  # blocks free up as running requests finish; keep arrival order
            self.kv.record_prefix_query(num_prompt, len(hits) * bs)
            request.num_cached_tokens = len(hits) * bs
            request.kv_pull_in_flight = True
            slots.append(KVPullSlot(request.request_id, len(hits), request.block_ids[len(hits):]))
        return slots

    def finish_kv_pull(self, request_id: str, ok: bool) -> Request | None:
        """A pull ended. ok: the prompt's KV is in place and the request waits to decode; else it
        recomputes the prompt (its local hits are found again in the prefix cache). The request, or None if it
        had finished meanwhile (its blocks are freed now that nothing writes into them)."""
        orphan = self.orphaned_pulls.pop(request_id, None)
        if orphan is not None:
            orphan.kv_pull_in_flight = False
            self.kv.free(orphan)
            return None
        request = self.awaiting_kv.pop(request_id, None)
        if request is None:
            return None
        request.kv_pull_in_flight = False
        if ok:
            request.num_computed_tokens = request.num_prompt_tokens
            self.kv.cache_computed_blocks(request)
        else:  # recompute: as after a preemption (the prefix cache still has its local hits)
            self.kv.free(request)
            request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        return request

    def abort(self, request_ids: list[str]) -> list[Request]:
        aborted = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.is_finished:
                continue
            self.finish(request, RequestStatus.FINISHED_ABORTED)
            aborted.append(request)
        return aborted

    def finish(self, request: Request, status: RequestStatus) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        elif request.status == RequestStatus.WAITING_FOR_PARENT:
            self.children[request.parent_id].remove(request)
        elif request.status == RequestStatus.WAITING_FOR_KV:
            del self.awaiting_kv[request.request_id]
        request.status = status
        self._release_children(request)  # before the free: children take references first
        del self.requests[request.request_id]
        if request.kv_pull_in_flight:  # a transfer still writes into its blocks: free them after it
            self.orphaned_pulls[request.request_id] = request
            return
        self.kv.free(request)

    def hand_off(self, request: Request) -> list[int]:
        """A prefill worker's request has its first token: finish it here, keeping one more
        reference on each prompt block for the lease (the caller frees them when the lease ends)."""
        num_blocks = -(-request.num_prompt_tokens // self.kv.block_size)
        block_ids = list(request.block_ids[:num_blocks])
        self.kv.pool.touch(block_ids)
        self.finish(request, RequestStatus.FINISHED_HANDED_OFF)
        return block_ids

    @property
    def num_unfinished(self) -> int:
        return len(self.requests)

    # --- one step ----------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens

        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                if self._drop_waiting_blocks():  # cheaper than preempting a running request
                    continue
                victim = self.running.pop()
                self._preempt(victim, out)
                if victim is request:
                    break
            else:
                self._add_scheduled(out, request, num_new)
                budget -= num_new
                i += 1
                continue
            break

        while self.waiting and budget > 0 and not out.preempted_ids:
            if len(self.running) >= self.config.max_num_seqs:
                break
            request = self.waiting[0]
            cached: list[int] = []
            if request.num_computed_tokens == 0:
                cached = self.kv.find_cached_prefix(request)
            num_computed = request.num_computed_tokens + len(cached) * self.kv.block_size
            num_new = request.num_tokens - num_computed
            if num_new > budget:
                if not self.config.enable_chunked_prefill:
                    break
                num_new = budget
            if not self.kv.allocate_slots(request, num_new, cached):
                # Nothing running will free blocks: drop the prompt blocks that released n>1
                # children hold while they wait, or the queue deadlocks behind its head.
                if self.running or not self._drop_waiting_blocks():
                    break
                continue
            if request.num_preemptions == 0 and num_computed == len(cached) * self.kv.block_size:
                self.kv.record_prefix_query(request.num_prompt_tokens, len(cached) * self.kv.block_size)
                request.num_cached_tokens = len(cached) * self.kv.block_size
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            self._add_scheduled(out, request, num_new)
            budget -= num_new
        return out

    def _drop_waiting_blocks(self) -> bool:
        """Free the blocks of waiting requests (shared n>1 prompt blocks); they recompute or hit
        the prefix cache when admitted. False if none held any."""
        dropped = False
        for request in self.waiting:
            if request.block_ids:
                self.kv.free(request)
                request.num_computed_tokens = 0
                dropped = True
        return dropped

    def _add_scheduled(self, out: SchedulerOutput, request: Request, num_new: int) -> None:
        start = request.num_computed_tokens
        owed = None
        if request.wants_prompt_logprobs and start < request.num_prompt_tokens:
            owed = len(request.prompt_logprobs)
        out.seqs.append(
            ScheduledSeq(
                request=request,
                start=start,
                num_tokens=num_new,
                samples=start + num_new == request.num_tokens,
                prompt_logprobs_from=owed,
            )
        )
        request.num_computed_tokens += num_new

    def _preempt(self, request: Request, out: SchedulerOutput) -> None:
        self.kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)
        out.preempted_ids.append(request.request_id)

    # --- results -----------------------------------------------------------------------------
    def update(self, sched: SchedulerOutput, result: RunnerOutput) -> list[Request]:
        """Apply sampled tokens, register filled blocks, finish requests that stop.
        Returns the requests that got a new token or finished in this step."""
        touched: list[Request] = []
        for seq in sched.seqs:
            request = seq.request
            if request.status.is_finished:  # aborted while the step ran
                continue
            pl = result.prompt_logprobs.get(request.request_id)
            if pl:
                request.prompt_logprobs.extend(pl)
            token_id = result.sampled.get(request.request_id) if seq.samples else None
            if token_id is not None:
                request.append_output_token(token_id)
                if request.request_id in result.logprobs:
                    request.logprobs.append(result.logprobs[request.request_id])
                if request.num_output_tokens == 1:
                    self._release_children(request)
            self.kv.cache_computed_blocks(request)
            if token_id is None:
                continue
            touched.append(request)
            status = self._check_stop(request, token_id)
            if status is not None:
                self.finish(request, status)
        return touched

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.params
        num_out = request.num_output_tokens
        if num_out >= params.min_tokens:
            if not params.ignore_eos and token_id in request.eos_token_ids:
                request.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if token_id in params.stop_token_ids:
                request.stop_reason = token_id
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and num_out >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _release_children(self, parent: Request) -> None:
        """Once the parent's prompt is computed (or the parent ends), its n>1 children start,
        sharing the parent's full prompt blocks when they exist."""
        children = self.children.pop(parent.request_id, None)
        if not children:
            return
        num_shared = (parent.num_prompt_tokens - 1) // self.kv.block_size
        shared = parent.block_ids[:num_shared] if len(parent.block_ids) >= num_shared else []
        if parent.num_computed_tokens < num_shared * self.kv.block_size:
            shared = []
        for child in reversed(children):  # appendleft: the first child ends up first
            if shared:
                self.kv.share_prefix(child, shared)
            child.status = RequestStatus.WAITING
            self.waiting.appendleft(child)
