"""KVEngine: an EngineCore that hands prompts off to, and takes them over from, other workers.

Prefill side (`AddRequestMsg.kv_export`): when a sequence has its first token, the engine keeps
its prompt blocks referenced, the producer puts them under a lease, and the output carries the
HandoffRecord. Leases end when the puller releases them (KVLeaseMsg, on the KV server's thread:
the blocks are freed here, on the engine's thread), when they expire, or when the request is
aborted (revoked: freed after the grace, since a pull may still be reading them).

Decode side (`AddRequestMsg.kv_import`): the sequence waits (WAITING_FOR_KV) until blocks are
free for its prompt; local prefix-cache hits are kept and only the rest is pulled, on a transfer
thread; the lease is released after the pull. A failed pull either recomputes the prompt locally
(policy "recompute") or ends the sequence with an error (policy "fail").

Everything here runs on the engine's thread except the pulls, whose outcomes come back through a
queue and are applied at the start of the next step.
"""

from __future__ import annotations

import logging
import queue
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tandem.kv_transfer.compat import compat_hash
from tandem.kv_transfer.connector import KVConnectorConsumer, KVConnectorProducer, PullOutcome
from tandem.kv_transfer.errors import KVTransferError
from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.transport import PULL_PHASES, KVBlockClient, KVBlockServer, KVDest
from tandem.shared.engine.engine_core import EngineCore
from tandem.shared.models.hf_folder import model_fingerprint
from tandem.shared.sampling_params import InvalidParameterError
from tandem.shared.wire.messages import AddRequestMsg, ErrorMsg, HandoffRecord, SeqOutput, params_from_wire

logger = logging.getLogger("tandem.worker")

TRANSPORTS = ("zmq", "socket", "ucx")
# Transfer-time histogram buckets (seconds).
TRANSFER_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True)
class KVTransferConfig:
    transport: str = "zmq"  # "zmq" or "socket" (tcp:// or ipc://), or "ucx" (ucx://HOST:PORT)
    bind_addr: str = "tcp://127.0.0.1:0"  # where the KV server listens (port 0: a free one)
    advertise_host: str | None = None  # the host peers dial, when it differs from the bind address'
    lease_ttl_s: float = 30.0
    lease_grace_s: float = 10.0  # freed this long after expiry: at least the pull timeout
    failure_policy: str = "recompute"  # or "fail"
    pull_timeout_s: float = 10.0
    max_concurrent_pulls: int = 4

    def __post_init__(self) -> None:
        if self.transport not in TRANSPORTS:
            raise ValueError(f"kv transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.failure_policy not in ("recompute", "fail"):
            raise ValueError(f"kv failure policy must be 'recompute' or 'fail', got {self.failure_policy!r}")
        if self.lease_ttl_s <= 0 or self.lease_grace_s < 0 or self.pull_timeout_s <= 0:
            raise ValueError("lease ttl and pull timeout must be positive, lease grace non-negative")
        if self.max_concurrent_pulls < 1:
            raise ValueError(f"max_concurrent_pulls must be at least 1, got {self.max_concurrent_pulls}")


@dataclass
class KVTransferStats:
    """Counters for /metrics (tandem:kv_transfer_*)."""

    bytes_pulled: int = 0
    blocks_pulled: int = 0
    pulls: int = 0
    failed_pulls: int = 0
    recomputed_handoffs: int = 0
    failed_handoffs: int = 0  # policy "fail": the sequence ended with an error
    local_hit_blocks: int = 0  # prompt blocks a decode worker already had: not pulled
    handoffs_exported: int = 0
    expired_leases: int = 0
    released_leases: int = 0
    active_leases: int = 0
    transfer_seconds_buckets: list[int] = field(default_factory=lambda: [0] * len(TRANSFER_BUCKETS))
    transfer_seconds_sum: float = 0.0
    transfer_seconds_count: int = 0
    # Where pull time went (kv_transfer.PULL_PHASES: connect, header, frames, landing), summed.
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PULL_PHASES, 0.0))
    gather_seconds: float = 0.0  # serving: gathering staged (GPU) frames and waiting for the GPU

    def observe_transfer(self, seconds: float) -> None:
        for i, bound in enumerate(TRANSFER_BUCKETS):
            if seconds <= bound:
                self.transfer_seconds_buckets[i] += 1
        self.transfer_seconds_sum += seconds
        self.transfer_seconds_count += 1


@dataclass(frozen=True)
class _PullDone:
    request_id: str
    handoff: HandoffRecord
    outcome: PullOutcome
    num_local_blocks: int


@dataclass
class StepResult:
    outputs: list[SeqOutput] = field(default_factory=list)
    errors: list[ErrorMsg] = field(default_factory=list)


def make_transport(cfg: KVTransferConfig, engine: EngineCore, leases: LeaseTable, compat: str,
                   ) -> tuple[KVBlockServer, KVBlockClient]:
    caches = engine.runner.kv_caches
    if cfg.transport == "ucx":
        from tandem.kv_transfer.ucx_transport import UcxKVBlockClient, UcxKVBlockServer

        server: KVBlockServer = UcxKVBlockServer(cfg.bind_addr, caches, leases, compat, lease_ttl_s=cfg.lease_ttl_s)
        client: KVBlockClient = UcxKVBlockClient(compat, timeout_s=cfg.pull_timeout_s)
    elif cfg.transport == "socket":
        from tandem.kv_transfer.socket_transport import SocketKVBlockClient, SocketKVBlockServer

        server = SocketKVBlockServer(cfg.bind_addr, caches, leases, compat, lease_ttl_s=cfg.lease_ttl_s)
        client = SocketKVBlockClient(compat, timeout_s=cfg.pull_timeout_s)
    else:
        from tandem.kv_transfer.zmq_transport import ZmqKVBlockClient, ZmqKVBlockServer

        server = ZmqKVBlockServer(cfg.bind_addr, caches, leases, compat, lease_ttl_s=cfg.lease_ttl_s)
        client = ZmqKVBlockClient(compat, timeout_s=cfg.pull_timeout_s)
    return server, client


def engine_compat_hash(engine: EngineCore) -> str:
    mc = engine.model_config
    fingerprint = model_fingerprint(engine.source, engine.config.load_format)
    return compat_hash(fingerprint, str(engine.model.compute_dtype), engine.kv.block_size, mc.num_layers,
                       mc.num_kv_heads, mc.head_dim)


def _advertised(address: str, host: str | None) -> str:
    """`tcp://0.0.0.0:5` bound, `tcp://10.0.0.3:5` told to peers."""
    if host is None or address.startswith("ipc://"):
        return address
    scheme, rest = address.split("://", 1)
    return f"{scheme}://{host}:{rest.rsplit(':', 1)[1]}"


class KVEngine:
    def __init__(self, engine: EngineCore, cfg: KVTransferConfig, engine_id: str | None = None) -> None:
        self.engine = engine
        self.cfg = cfg
        self.engine_id = engine_id or f"engine-{uuid.uuid4().hex[:8]}"
        self.compat_hash = engine_compat_hash(engine)
        self.leases = LeaseTable(free_grace_s=cfg.lease_grace_s)
        self.server, client = make_transport(cfg, engine, self.leases, self.compat_hash)
        self.server.start()
        self.kv_addr = _advertised(self.server.address, cfg.advertise_host)
        bs = engine.kv.block_size
        self.producer = KVConnectorProducer(self.engine_id, self.kv_addr, self.compat_hash, bs, self.leases,
                                            lease_ttl_s=cfg.lease_ttl_s)
        self.consumer = KVConnectorConsumer(self.compat_hash, bs, client, cfg.failure_policy)
        self.stats = KVTransferStats()
        self._handoffs: dict[str, HandoffRecord] = {}  # decode: sequence id -> its handoff, until pulled
        self._lease_of: dict[str, str] = {}  # prefill: sequence id -> its live lease
        self._pulls = ThreadPoolExecutor(cfg.max_concurrent_pulls, thread_name_prefix="kv-pull")
        self._done: queue.SimpleQueue[_PullDone] = queue.SimpleQueue()
        self._in_flight = 0

    def close(self) -> None:
        self._pulls.shutdown(wait=True, cancel_futures=False)
        self.server.close()
        self.consumer.client.close()

    # --- requests --------------------------------------------------------------------------
    def add_request(self, msg: AddRequestMsg) -> list[str]:
        """Queue a plain, an exporting (prefill) or an importing (decode) request; its sequence ids.
        Raises InvalidParameterError naming the bad field."""
        params = params_from_wire(msg.params)
        if msg.kv_import is None:
            return self.engine.add_request(msg.request_id, msg.prompt_token_ids, params, msg.cache_salt,
                                           kv_export=msg.kv_export)
        handoff = msg.kv_import
        if msg.kv_export:
            raise InvalidParameterError("kv_export", "a request cannot both import and export its prompt's KV")
        if handoff.num_tokens != len(msg.prompt_token_ids):
            raise InvalidParameterError(
                "kv_import", f"the handoff covers {handoff.num_tokens} tokens, the prompt has "
                f"{len(msg.prompt_token_ids)}",
            )
        if handoff.compat_hash != self.compat_hash:
            if self.cfg.failure_policy == "fail":
                raise InvalidParameterError(
                    "kv_import", f"the prefill worker {handoff.engine_id} is not KV-compatible with this one "
                    "(model, dtype, block size, KV layout or protocol version differ)",
                )
            logger.warning("handoff from %s has another compat hash: recomputing", handoff.engine_id)
        self.engine.add_prefilled_request(msg.request_id, msg.prompt_token_ids, params, handoff.first_token,
                                          msg.cache_salt)
        self._handoffs[msg.request_id] = handoff
        return [msg.request_id]

    def abort(self, request_ids: list[str]) -> None:
        self.engine.abort(request_ids)
        now = self.producer.clock()
        for request_id in request_ids:
            lease_id = self._lease_of.pop(request_id, None)
            if lease_id is not None:
                self.leases.revoke(lease_id, now)
            handoff = self._handoffs.pop(request_id, None)
            if handoff is not None:  # not pulled yet: let the prefill worker free its blocks now
                self._pulls.submit(self.consumer.release, handoff)

    # --- the loop --------------------------------------------------------------------------
    @property
    def has_work(self) -> bool:
        """Something to step now (not just pulls to wait for)."""
        s = self.engine.scheduler
        return bool(s.running or s.waiting)

    @property
    def busy(self) -> bool:
        return self.engine.has_unfinished() or self._in_flight > 0

    def step(self) -> StepResult:
        result = StepResult()
        self._free_lease_blocks()
        self._apply_finished_pulls(result)
        self._start_pulls()
        if self.has_work:
            for out in self.engine.step():
                handoff = None
                if out.handed_off_blocks is not None:
                    handoff = self.producer.export_blocks(out.request_id, out.handed_off_blocks,
                                                          out.handed_off_tokens, out.new_token_ids[0])
                    self._lease_of[out.request_id] = handoff.lease_id
                    self.stats.handoffs_exported += 1
                result.outputs.append(SeqOutput.of(out, handoff))
        self.stats.active_leases = len(self.leases)
        self.stats.gather_seconds = self.server.source.gather_seconds
        return result

    def _free_lease_blocks(self) -> None:
        released, expired = self.producer.collect_freed()
        if released:
            self.engine.free_blocks(released)
        if expired:
            self.engine.free_blocks(expired)
        self.stats.expired_leases = self.leases.num_expired
        self.stats.released_leases = self.leases.num_released
        if released or expired:
            self._lease_of = {r: lease for r, lease in self._lease_of.items() if self._lease_live(lease)}

    def _lease_live(self, lease_id: str) -> bool:
        try:
            self.leases.get(lease_id, self.producer.clock())
        except KVTransferError:
            return False
        return True

    def _start_pulls(self) -> None:
        for slot in self.engine.take_kv_pulls():
            handoff = self._handoffs.pop(slot.request_id)
            self._in_flight += 1
            self._pulls.submit(self._pull, slot.request_id, handoff, slot.num_local_blocks, slot.dest_block_ids)

    def _pull(self, request_id: str, handoff: HandoffRecord, num_local: int, dest_ids: list[int]) -> None:
        """On a transfer thread: pull, release the lease, report."""
        try:
            if handoff.compat_hash != self.compat_hash:  # before plan_pull reads its geometry
                raise KVTransferError("compat_mismatch", f"handoff from {handoff.engine_id}")
            plan = self.consumer.plan_pull(handoff, num_local)
            if len(plan.remote_block_ids) != len(dest_ids):
                raise KVTransferError(
                    "bad_block", f"{len(plan.remote_block_ids)} remote blocks for {len(dest_ids)} local ones",
                )
            outcome = self.consumer.pull(handoff, plan, KVDest(self.engine.runner.kv_caches, dest_ids))
        except KVTransferError as exc:
            outcome = PullOutcome(False, self.cfg.failure_policy, error=exc)
        except Exception as exc:  # a bug must not lose the request: recompute or fail it
            logger.exception("KV pull of %s failed", request_id)
            outcome = PullOutcome(False, self.cfg.failure_policy,
                                  error=KVTransferError("internal_error", f"{type(exc).__name__}: {exc}"))
        if outcome.error is None or outcome.error.code not in ("peer_gone", "compat_mismatch"):
            error = self.consumer.release(handoff)
            if error is not None:
                logger.info("lease release for %s failed (%s): it expires instead", request_id, error)
        self._done.put(_PullDone(request_id, handoff, outcome, num_local))

    def _apply_finished_pulls(self, result: StepResult) -> None:
        while True:
            try:
                done = self._done.get_nowait()
            except queue.Empty:
                return
            self._in_flight -= 1
            stats, outcome = self.stats, done.outcome
            stats.local_hit_blocks += done.num_local_blocks
            if outcome.ok:
                stats.pulls += 1
                if outcome.stats is not None:
                    stats.bytes_pulled += outcome.stats.num_bytes
                    stats.blocks_pulled += outcome.stats.num_blocks
                    stats.observe_transfer(outcome.stats.seconds)
                    for phase, seconds in outcome.stats.phases.items():
                        stats.phase_seconds[phase] = stats.phase_seconds.get(phase, 0.0) + seconds
                self.engine.finish_kv_pull(done.request_id, True)
                continue
            stats.failed_pulls += 1
            logger.warning("KV pull of %s from %s failed: %s (%s)", done.request_id, done.handoff.engine_id,
                           outcome.error, outcome.action)
            alive = self.engine.finish_kv_pull(done.request_id, False)
            if not alive:
                continue
            if outcome.action == "recompute":
                stats.recomputed_handoffs += 1
            else:
                stats.failed_handoffs += 1
                self.engine.fail_request(done.request_id)
                result.errors.append(ErrorMsg(
                    done.request_id, 502, f"the KV transfer from {done.handoff.engine_id} failed: {outcome.error}",
                ))


def wait_idle(kv_engine: KVEngine, timeout_s: float = 30.0) -> StepResult:
    """Step until nothing is left (tests and offline drivers); all outputs and errors."""
    total = StepResult()
    deadline = time.monotonic() + timeout_s
    while kv_engine.busy:
        if time.monotonic() > deadline:
            raise TimeoutError("the engine did not go idle")
        result = kv_engine.step()
        total.outputs.extend(result.outputs)
        total.errors.extend(result.errors)
        if not kv_engine.has_work:
            time.sleep(0.001)
    return total
