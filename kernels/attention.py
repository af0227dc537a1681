"""Attention over the paged KV cache: the backend interface and its torch implementation.

KV cache layout, per layer: key and value caches of [num_blocks, block_size, num_kv_heads,
head_dim]. A token's slot is block_id * block_size + offset. The runner builds one
AttentionMetadata per step, shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


@dataclass
class PrefillSeq:
    """One sequence whose query has more than one token (a prompt chunk, or a recompute)."""

    token_start: int  # first row in the flat batch
    num_query: int
    context_len: int  # tokens with KV after this step (cached prefix + this chunk)
    block_table: torch.Tensor  # [num_blocks] blocks of the cached prefix (empty when there is none)

    @property
    def prefix_len(self) -> int:
        return self.context_len - self.num_query


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    # Decode group: sequences with a single query token, attended as one padded batch.
    decode_rows: torch.Tensor  # [num_decode] rows of the flat batch
    decode_block_table: torch.Tensor  # [num_decode, max_blocks] padded with block 0
    decode_max_len: int  # longest decode context
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, decode_max_len] True where a slot is real;
    # None when every decode context has the same length (nothing to mask)
    prefills: list[PrefillSeq]

    @property
    def num_decode(self) -> int:
        return int(self.decode_rows.shape[0])


class AttentionBackend(Protocol):
    def store_kv(
        self, key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None: ...

    def forward(
        self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
        meta: AttentionMetadata, scale: float, logit_softcap: float | None = None,
    ) -> torch.Tensor: ...


def padded_block_table(block_tables: list[list[int]], context_lens: list[int], block_size: int):
    """[B, max_blocks] block ids (padded with 0) and a [B, 1, 1, max_len] validity mask, or None
    when all contexts have the same length."""
    max_len = max(context_lens)
    max_blocks = -(-max_len // block_size)
    table = torch.zeros(len(block_tables), max_blocks, dtype=torch.long)
    for i, (blocks, length) in enumerate(zip(block_tables, context_lens, strict=True)):
        n = -(-length // block_size)
        table[i, :n] = torch.tensor(blocks[:n], dtype=torch.long)
    if min(context_lens) == max_len:
        return table, None
    lens = torch.tensor(context_lens, dtype=torch.long)
    mask = torch.arange(max_len)[None, :] < lens[:, None]
    return table, mask[:, None, None, :]


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache [num_blocks, block_size, Hkv, D], block_table [..., n] -> [..., n * block_size, Hkv, D].
    Whole blocks are copied (contiguous runs), not single slots."""
    gathered = cache.index_select(0, block_table.flatten())  # [B * n, block_size, Hkv, D]
    return gathered.view(*block_table.shape[:-1], -1, cache.shape[2], cache.shape[3])


def reference_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
    scale: float, logit_softcap: float | None = None, is_causal: bool = False,
) -> torch.Tensor:
    """Plain softmax attention with GQA. query [B, H, Q, D], key/value [B, Hkv, K, D],
    mask [B or 1, 1, Q, K] bool (True = attend), or is_causal (Q == K). Returns [B, H, Q, D]."""
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_heads // num_kv_heads
    if logit_softcap is None:
        if group > 1:  # explicit repeat: the fused CPU kernel does not take enable_gqa
            key = key.repeat_interleave(group, dim=1)
            value = value.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale, is_causal=is_causal)
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / logit_softcap) * logit_softcap
    if is_causal:
        q_len, k_len = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.matmul(scores.softmax(-1), value.float()).to(query.dtype)


class TorchAttentionBackend:
    """The CPU path and the reference the Triton kernels are tested against."""

    def store_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        # key/value [T, Hkv, D]; caches [num_blocks, block_size, Hkv, D]
        num_kv_heads, head_dim = key.shape[1], key.shape[2]
        key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
        value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)

    def forward(self, query, key_cache, value_cache, meta, scale, logit_softcap=None, key=None, value=None):
        """query [T, H, D] -> [T, H, D]. `key`/`value` [T, Hkv, D] are this step's new K/V (also
        stored in the cache): a prefill chunk reads its own K/V from them and gathers only its
        cached prefix from the pages."""
        out = torch.empty_like(query)
        if meta.num_decode:
            num_decode, num_heads, head_dim = meta.num_decode, query.shape[1], query.shape[2]
            num_kv_heads = key_cache.shape[2]
            # GQA without repeating K/V: the `group` query heads of one KV head become that head's
            # query rows (one decode token each, so they share the mask).
            decode_only = num_decode == query.shape[0]  # rows are then 0..T-1 in order
            q = query if decode_only else query.index_select(0, meta.decode_rows)  # [Bd, H, D]
            q = q.view(num_decode, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [Bd, Hkv, G, D]
            length = meta.decode_max_len
            k = gather_blocks(key_cache, meta.decode_block_table)[:, :length].transpose(1, 2)  # [Bd, Hkv, L, D]
            v = gather_blocks(value_cache, meta.decode_block_table)[:, :length].transpose(1, 2)
            o = reference_attention(q, k, v, meta.decode_mask, scale, logit_softcap)  # [Bd, Hkv, G, D]
            o = o.reshape(num_decode, num_heads, head_dim)
            if decode_only:
                return o
            out.index_copy_(0, meta.decode_rows, o)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_query)
            q = query[rows].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
            if key is not None and seq.prefix_len == 0:
                k, v, mask = key[rows], value[rows], None  # [Q, Hkv, D]: causal, nothing cached
            else:
                k = gather_blocks(key_cache, seq.block_table)[: seq.context_len]  # [K, Hkv, D]
                v = gather_blocks(value_cache, seq.block_table)[: seq.context_len]
                # query i sits at context position prefix_len + i
                dev = query.device
                q_pos = torch.arange(seq.prefix_len, seq.context_len, device=dev)
                mask = (torch.arange(seq.context_len, device=dev)[None, :] <= q_pos[:, None])[None, None]
            k, v = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)  # [1, Hkv, K, D]
            o = reference_attention(q, k, v, mask, scale, logit_softcap, is_causal=mask is None)
            out[rows] = o[0].transpose(0, 1)
        return out
