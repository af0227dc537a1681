"""The KV connector: the policy over a transport, for both sides of a handoff.

Prefill side: `export` puts a computed prompt's blocks under a lease and returns the
HandoffRecord; `release` (the decode worker is done) and `expire_due` (it never came) end leases
and return the block ids for the caller to free in its BlockPool.

Decode side: `plan_pull` picks the remote blocks the local prefix cache lacks; `pull` moves them
and applies the failure policy: "recompute" (default: the caller recomputes the prompt locally)
or "fail" (the error goes to the user). A failed pull never leaves a half-valid cache in use:
the caller treats the destination blocks as unwritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tandem.kv_transfer.errors import KVTransferError
from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.messages import HandoffRecord
from tandem.kv_transfer.transport import KVBlockClient, KVDest, PullStats

FAILURE_POLICIES = ("recompute", "fail")


class KVConnectorProducer:
    """Prefill side. `clock` is unix time (lease_expiry crosses machines)."""

    def __init__(
        self, engine_id: str, kv_addr: str, compat_hash: str, block_size: int, leases: LeaseTable,
        lease_ttl_s: float = 30.0, clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine_id = engine_id
        self.block_size = block_size
        self.kv_addr = kv_addr
        self.compat_hash = compat_hash
        self.leases = leases
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock

    def export(self, request, first_token: int) -> HandoffRecord:
        """Lease a computed prompt's blocks (`request`: request_id, block_ids, num_prompt_tokens;
        an engine Request fits). The caller keeps its block references until the lease ends."""
        return self.export_blocks(request.request_id, request.block_ids, request.num_prompt_tokens, first_token)

    def export_blocks(self, request_id: str, block_ids: list[int], num_tokens: int, first_token: int) -> HandoffRecord:
        num_blocks = -(-num_tokens // self.block_size)
        if num_tokens < 1 or len(block_ids) < num_blocks:
            raise ValueError(f"request {request_id}: {len(block_ids)} blocks for {num_tokens} tokens")
        block_ids = list(block_ids[:num_blocks])  # the prompt's blocks, not a slot for the next token
        lease = self.leases.grant(block_ids, self.lease_ttl_s, self.clock())
        return HandoffRecord(
            request_id, first_token, self.engine_id, self.kv_addr, lease.lease_id, block_ids, num_tokens,
            self.compat_hash, lease.expiry,
        )

    def renew(self, lease_id: str) -> float:
        return self.leases.renew(lease_id, self.lease_ttl_s, self.clock()).expiry

    def release(self, lease_id: str) -> list[int]:
        return self.leases.release(lease_id)

    def expire_due(self) -> list[int]:
        return self.leases.expire_due(self.clock())

    def collect_freed(self) -> tuple[list[int], list[int]]:
        """(blocks of leases released by pullers, blocks of leases that expired): for the owner of
        the BlockPool to free, on its own thread."""
        return self.leases.take_released(), self.expire_due()


@dataclass(frozen=True)
class PullPlan:
    """Remote blocks [num_local_blocks:] of a handoff go to the puller's blocks of the same index;
    the first `num_local_blocks` are prefix-cache hits the puller already holds."""

    num_local_blocks: int
    remote_block_ids: list[int]


@dataclass(frozen=True)
class PullOutcome:
    ok: bool
    action: str  # "use" (the KV is in place), "recompute" or "fail"
    stats: PullStats | None = None
    error: KVTransferError | None = None


class KVConnectorConsumer:
    """Decode side."""

    def __init__(
        self, compat_hash: str, block_size: int, client: KVBlockClient, failure_policy: str = "recompute",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if failure_policy not in FAILURE_POLICIES:
            raise ValueError(f"failure_policy must be one of {FAILURE_POLICIES}, got {failure_policy!r}")
        self.compat_hash = compat_hash
        self.block_size = block_size
        self.client = client
        self.failure_policy = failure_policy
        self.clock = clock

    def plan_pull(self, handoff: HandoffRecord, num_local_blocks: int) -> PullPlan:
        """`num_local_blocks`: the local prefix-cache hits for the prompt (KVCacheManager.
        find_cached_prefix), i.e. the leading full blocks whose hashes this worker has. Only
        the rest is pulled; the trailing partial block is never a hit."""
        num_blocks = -(-handoff.num_tokens // self.block_size)
        if len(handoff.block_ids) != num_blocks:
            raise KVTransferError(
                "bad_block", f"handoff has {len(handoff.block_ids)} blocks for {handoff.num_tokens} tokens",
            )
        num_full = handoff.num_tokens // self.block_size
        num_local = min(num_local_blocks, num_full)
        return PullPlan(num_local, list(handoff.block_ids[num_local:]))

    def pull(self, handoff: HandoffRecord, plan: PullPlan, dest: KVDest) -> PullOutcome:
        """Pull the plan's blocks into `dest` (the puller's block ids for them, in order)."""
        try:
            if handoff.compat_hash != self.compat_hash:
                raise KVTransferError("compat_mismatch", f"handoff from {handoff.engine_id} has another compat hash")
            if self.clock() >= handoff.lease_expiry:
                raise KVTransferError("lease_expired", f"lease of {handoff.request_id} expired before the pull")
            if not plan.remote_block_ids:
                return PullOutcome(True, "use", PullStats(0, 0, 0, 0.0))
            stats = self.client.pull(handoff.kv_addr, handoff.lease_id, plan.remote_block_ids, dest)
            return PullOutcome(True, "use", stats)
        except KVTransferError as exc:
            return PullOutcome(False, self.failure_policy, error=exc)

    def release(self, handoff: HandoffRecord) -> KVTransferError | None:
        """Tell the prefill worker to free the handoff's blocks; the error if that failed (the
        lease then frees them when it expires)."""
        try:
            self.client.release(handoff.kv_addr, handoff.lease_id)
        except KVTransferError as exc:
            return exc
        return None
