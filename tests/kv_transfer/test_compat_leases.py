"""The compat hash and the lease table (time injected)."""

from __future__ import annotations

import pytest

from tandem.kv_transfer.compat import compat_hash
from tandem.kv_transfer.errors import KVTransferError
from tandem.kv_transfer.leases import LeaseTable

BASE = dict(model_id="m", dtype="bfloat16", block_size=16, num_layers=30, num_kv_heads=3, head_dim=64,
            layout_version=1, protocol_version=1)


def test_compat_hash_is_stable_and_covers_every_field():
    assert compat_hash(**BASE) == compat_hash(**BASE)
    assert compat_hash(**{**BASE, "dtype": "torch.bfloat16"}) == compat_hash(**BASE)
    changed = {"model_id": "other", "dtype": "float32", "block_size": 32, "num_layers": 31, "num_kv_heads": 4,
               "head_dim": 128, "layout_version": 2, "protocol_version": 2}
    hashes = {compat_hash(**{**BASE, k: v}) for k, v in changed.items()}
    assert len(hashes) == len(changed) and compat_hash(**BASE) not in hashes


def test_compat_hash_defaults_to_the_current_protocol():
    """Peers of different KV protocols never exchange blocks (5: group frames from staged caches,
    4: gathered runs, 3: lease messages, 2: one frame per source run, 1: one frame per block)."""
    from tandem.kv_transfer.compat import KV_PROTOCOL_VERSION

    assert KV_PROTOCOL_VERSION == 5
    fields = {k: v for k, v in BASE.items() if k != "protocol_version"}
    assert compat_hash(**fields) == compat_hash(**fields, protocol_version=5) != compat_hash(**BASE)


def test_lease_grant_renew_release():
    table = LeaseTable(free_grace_s=0)
    lease = table.grant([3, 1, 4], ttl=30, now=100.0)
    assert lease.expiry == 130.0 and table.get(lease.lease_id, 129.9).block_ids == (3, 1, 4)
    assert table.renew(lease.lease_id, ttl=30, now=120.0).expiry == 150.0
    assert table.expire_due(140.0) == []
    assert table.release(lease.lease_id) == [3, 1, 4]
    assert table.release(lease.lease_id) == []  # a second release frees nothing twice
    with pytest.raises(KVTransferError) as err:
        table.get(lease.lease_id, 141.0)
    assert err.value.code == "unknown_lease"


def test_lease_expiry_returns_blocks_once():
    table = LeaseTable(free_grace_s=0)
    a = table.grant([1, 2], ttl=10, now=0.0)
    b = table.grant([5], ttl=20, now=0.0)
    with pytest.raises(KVTransferError) as err:
        table.get(a.lease_id, 10.0)  # due but not yet swept
    assert err.value.code == "lease_expired"
    assert sorted(table.expire_due(15.0)) == [1, 2]
    assert table.expire_due(15.0) == []
    with pytest.raises(KVTransferError) as err:
        table.get(a.lease_id, 15.0)
    assert err.value.code == "lease_expired"
    with pytest.raises(KVTransferError) as err:
        table.renew(a.lease_id, 10, 15.0)
    assert err.value.code == "lease_expired"
    assert table.get(b.lease_id, 15.0).block_ids == (5,)
    assert len(table) == 1
    with pytest.raises(KVTransferError) as err:
        table.get("nope", 0.0)
    assert err.value.code == "unknown_lease"
    with pytest.raises(ValueError):
        table.grant([1], ttl=0, now=0.0)


def test_expired_blocks_are_freed_only_after_the_grace():
    """Serving stops at the expiry; the blocks come back only after the grace, so a pull that
    passed the lease check just before the expiry never reads reused blocks."""
    table = LeaseTable(free_grace_s=5)
    lease = table.grant([7], ttl=10, now=0.0)
    with pytest.raises(KVTransferError):
        table.get(lease.lease_id, 10.0)
    assert table.expire_due(14.9) == []
    assert table.expire_due(15.0) == [7]
    with pytest.raises(ValueError):
        LeaseTable(free_grace_s=-1)
