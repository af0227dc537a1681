"""Leases on a prefill worker's KV blocks: the blocks of a handed-off prompt stay allocated until
the decode worker releases them or the lease expires. The table only keeps books; the caller
frees the returned block ids in its BlockPool. Thread-safe (the KV server thread checks leases
while the engine thread grants and expires them); time is passed in, so tests control it."""

from __future__ import annotations

import secrets
import threading
from collections import OrderedDict
from dataclasses import dataclass

from tandem.kv_transfer.errors import KVTransferError

_REMEMBER_EXPIRED = 4096  # expired lease ids kept to answer "lease_expired" rather than "unknown_lease"


@dataclass(frozen=True)
class Lease:
    lease_id: str  # 128 random bits: unguessable, so a lease id is also the capability to read its blocks
    block_ids: tuple[int, ...]
    expiry: float  # same clock as the `now` the table is given


class LeaseTable:
    """`free_grace_s`: a lease stops serving pulls at its expiry, but its blocks are returned for
    reuse only `free_grace_s` later, so a pull that started just before the expiry still reads
    blocks nobody has overwritten (zero-copy frames are read by the transport after the check).
    Set it to at least the pull timeout."""

    def __init__(self, free_grace_s: float = 10.0) -> None:
        if free_grace_s < 0:
            raise ValueError(f"free_grace_s must be >= 0, got {free_grace_s}")
        self.free_grace_s = free_grace_s
        self._lock = threading.Lock()
        self._leases: dict[str, Lease] = {}
        self._expired: OrderedDict[str, None] = OrderedDict()
        self._released: list[int] = []  # blocks of leases ended by release_later, for take_released
        self.num_expired = 0  # leases that ended by expiry (nobody released them)
        self.num_released = 0  # leases ended by release_later (the puller was done)

    def __len__(self) -> int:
        return len(self._leases)

    def grant(self, block_ids: list[int], ttl: float, now: float) -> Lease:
        if ttl <= 0:
            raise ValueError(f"lease ttl must be positive, got {ttl}")
        lease = Lease(secrets.token_hex(16), tuple(block_ids), now + ttl)
        with self._lock:
            self._leases[lease.lease_id] = lease
        return lease

    def get(self, lease_id: str, now: float) -> Lease:
        """The live lease, or KVTransferError unknown_lease / lease_expired."""
        with self._lock:
            lease = self._leases.get(lease_id)
            expired = lease_id in self._expired
        if lease is None:
            if expired:
                raise KVTransferError("lease_expired", f"lease {lease_id[:8]}... expired and its blocks were freed")
            raise KVTransferError("unknown_lease", f"no lease {lease_id[:8]}... on this worker")
        if now >= lease.expiry:
            raise KVTransferError("lease_expired", f"lease {lease_id[:8]}... expired {now - lease.expiry:.3f}s ago")
        return lease

    def renew(self, lease_id: str, ttl: float, now: float) -> Lease:
        """Extend a live lease to now + ttl; an expired one is not revived."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None or now >= lease.expiry:
                code = "lease_expired" if lease is not None or lease_id in self._expired else "unknown_lease"
                raise KVTransferError(code, f"cannot renew lease {lease_id[:8]}...")
            lease = Lease(lease.lease_id, lease.block_ids, max(lease.expiry, now + ttl))
            self._leases[lease_id] = lease
            return lease

    def release(self, lease_id: str) -> list[int]:
        """End a lease; its block ids for the caller to free ([] if it was unknown or already gone)."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
        return list(lease.block_ids) if lease is not None else []

    def revoke(self, lease_id: str, now: float) -> bool:
        """Stop serving a lease at once (its request was aborted); its blocks are freed by
        expire_due after the grace, as for an expiry, since a pull may still be reading them."""
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is None:
                return False
            self._leases[lease_id] = Lease(lease.lease_id, lease.block_ids, min(lease.expiry, now))
        return True

    def release_later(self, lease_id: str, now: float) -> bool:
        """End a lease from a thread that does not own the BlockPool (the KV server's): its blocks
        wait in the table until the owner calls take_released. False if it was unknown or gone.
        A lease released after its expiry counts as expired (its puller came too late)."""
        with self._lock:
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._released.extend(lease.block_ids)
                if now >= lease.expiry:
                    self._expired[lease_id] = None
                    self.num_expired += 1
                else:
                    self.num_released += 1
        return lease is not None

    def take_released(self) -> list[int]:
        """The blocks of leases ended by release_later since the last call, for the caller to free."""
        with self._lock:
            released, self._released = self._released, []
        return released

    def expire_due(self, now: float) -> list[int]:
        """End every lease whose expiry (plus the grace) has passed; their block ids, for the
        caller to free."""
        freed: list[int] = []
        with self._lock:
            due = [i for i, lease in self._leases.items() if now >= lease.expiry + self.free_grace_s]
            for lease_id in due:
                freed.extend(self._leases.pop(lease_id).block_ids)
                self._expired[lease_id] = None
            self.num_expired += len(due)
            while len(self._expired) > _REMEMBER_EXPIRED:
                self._expired.popitem(last=False)
        return freed
