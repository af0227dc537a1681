"""Hash-chained block hashes: the engine's prefix cache and the router compute the same values.

For each *full* block i of a token sequence:
    h_i = sha256(msgpack([h_{i-1} or SEED, token_ids_i, extra_keys]))
The seed is fixed cluster-wide, the serialization is stable (msgpack) and the hash is strong, so
two processes (engine, router) agree on every hash without talking to each other.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgpack

BlockHash = bytes  # 32 bytes (sha256 digest)

# Changing this invalidates every cache in the cluster: bump it with the KV layout version.
HASH_SEED: bytes = b"tandem-block-hash-v1"


def hash_block(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: tuple | None = None) -> BlockHash:
    payload = msgpack.packb([parent or HASH_SEED, list(token_ids), list(extra_keys or ())], use_bin_type=True)
    return hashlib.sha256(payload).digest()


def hash_block_chain(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: tuple | None = None,
    parent: BlockHash | None = None,
) -> list[BlockHash]:
    """Hashes of every full block of `token_ids` (a trailing partial block is not hashed)."""
    hashes: list[BlockHash] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block(parent, token_ids[start : start + block_size], extra_keys)
        hashes.append(parent)
    return hashes
