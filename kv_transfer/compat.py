"""The compat hash: two workers exchange KV blocks only if every fact that shapes a block's bytes
(model, dtype, block size, layer/head geometry, memory layout, protocol version) is the same."""

from __future__ import annotations

import hashlib

import msgpack

KV_LAYOUT_VERSION = 1  # per layer, K and V caches of [num_blocks, block_size, num_kv_heads, head_dim]
KV_PROTOCOL_VERSION = 5  # kv_transfer.messages (2: frame per run; 3: lease messages; 4: gathered runs; 5: groups)


def compat_hash(
    model_id: str,
    dtype: str,
    block_size: int,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    layout_version: int = KV_LAYOUT_VERSION,
    protocol_version: int = KV_PROTOCOL_VERSION,
) -> str:
    """A hex sha256 over a stable msgpack encoding of the arguments (dtype by name, e.g. "bfloat16")."""
    dtype = str(dtype).removeprefix("torch.")
    fields = [model_id, dtype, block_size, num_layers, num_kv_heads, head_dim, layout_version, protocol_version]
    return hashlib.sha256(msgpack.packb(["tandem-kv-compat", *fields], use_bin_type=True)).hexdigest()
