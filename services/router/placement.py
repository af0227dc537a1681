"""Placement: which worker of a pool gets a request. One cost in block units, lowest wins, no
threshold cliffs:

    cost = prefill_weight * uncached_prompt_blocks + active_blocks + queued_prefill_tokens / block_size

`uncached_prompt_blocks`: the prompt's full blocks the worker does not cache (the prefix index from
its KV events, plus what this router sent it since); `active_blocks`: the larger of the worker's
reported used blocks and this router's requests on it (prompt + max new tokens); queued prefill
tokens: prompts this router sent it that have not produced their first token yet.

prefill_weight (default 4): computing a prompt block costs more than holding one block of a running
sequence; at 1 a single running request (its prompt + output blocks) outweighs a cached 300-token
prefix, and requests of one system prompt scatter over every worker (measured: docs/perf.md).

Policies: cache_aware (the cost above), least_loaded (the cost without the cache term),
round_robin (in turn). Ties go to the worker this router sent fewer requests to.
"""

from __future__ import annotations

import itertools

from tandem.services.router.state import ClusterView, WorkerState
from tandem.shared.block_hash import BlockHash

POLICIES = ("cache_aware", "least_loaded", "round_robin")


class Placement:
    def __init__(self, policy: str, view: ClusterView, prefill_weight: float = 4.0) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
        self.policy = policy
        self.view = view
        self.prefill_weight = prefill_weight
        self._turn = itertools.count()

    def cost(self, worker: WorkerState, hashes: list[BlockHash], num_prompt_tokens: int) -> float:
        bs = worker.record.block_size
        active = max(worker.load.used_blocks, worker.inflight_blocks)
        queued = sum(worker.queued.values()) / bs
        if self.policy != "cache_aware":
            return active + queued
        num_blocks = -(-num_prompt_tokens // bs)
        uncached = num_blocks - self.view.cached_prefix_blocks(worker.worker_id, hashes)
        return self.prefill_weight * uncached + active + queued

    def pick(self, candidates: list[WorkerState], hashes: list[BlockHash], num_prompt_tokens: int) -> WorkerState:
        if not candidates:
            raise LookupError("no candidate worker")
        if self.policy == "round_robin":
            ordered = sorted(candidates, key=lambda w: w.worker_id)
            return ordered[next(self._turn) % len(ordered)]
        return min(candidates, key=lambda w: (self.cost(w, hashes, num_prompt_tokens), w.routed, w.worker_id))
