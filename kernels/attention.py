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
    context_slots: torch.Tensor  # [context_len] slots of every context token


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    # Decode group: sequences with a single query token, attended as one padded batch.
    decode_rows: torch.Tensor  # [num_decode] rows of the flat batch
    decode_slots: torch.Tensor  # [num_decode, max_context] slots, padded with slot 0
    decode_mask: torch.Tensor  # [num_decode, 1, 1, max_context] True where a slot is real
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


def context_slots(block_ids: list[int], context_len: int, block_size: int) -> torch.Tensor:
    """[context_len] slots of a sequence's first context_len tokens."""
    blocks = torch.tensor(block_ids[: -(-context_len // block_size)], dtype=torch.long)
    slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()
    return slots[:context_len]


def padded_context_slots(block_tables: list[list[int]], context_lens: list[int], block_size: int):
    """[B, max_context] slots and [B, max_context] validity mask for a batch of sequences."""
    max_len = max(context_lens)
    max_blocks = -(-max_len // block_size)
    table = torch.zeros(len(block_tables), max_blocks, dtype=torch.long)
    for i, blocks in enumerate(block_tables):
        n = min(len(blocks), max_blocks)
        table[i, :n] = torch.tensor(blocks[:n], dtype=torch.long)
    slots = (table[:, :, None] * block_size + torch.arange(block_size)).flatten(1)[:, :max_len]
    lens = torch.tensor(context_lens, dtype=torch.long)
    mask = torch.arange(max_len)[None, :] < lens[:, None]
    return slots, mask


def reference_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
    scale: float, logit_softcap: float | None = None,
) -> torch.Tensor:
    """Plain softmax attention with GQA. query [B, H, Q, D], key/value [B, Hkv, K, D],
    mask [B or 1, 1, Q, K] bool (True = attend). Returns [B, H, Q, D]."""
    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    if logit_softcap is None:
        return F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv_heads
        )
    group = num_heads // num_kv_heads
    key = key.repeat_interleave(group, dim=1)
    value = value.repeat_interleave(group, dim=1)
    scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / logit_softcap) * logit_softcap
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

    def forward(self, query, key_cache, value_cache, meta, scale, logit_softcap=None) -> torch.Tensor:
        # query [T, H, D] -> out [T, H, D]
        num_kv_heads, head_dim = key_cache.shape[2], key_cache.shape[3]
        flat_k = key_cache.view(-1, num_kv_heads, head_dim)
        flat_v = value_cache.view(-1, num_kv_heads, head_dim)
        out = torch.empty_like(query)
        if meta.num_decode:
            q = query[meta.decode_rows].unsqueeze(2)  # [Bd, H, 1, D]
            k = flat_k[meta.decode_slots].transpose(1, 2)  # [Bd, Hkv, L, D]
            v = flat_v[meta.decode_slots].transpose(1, 2)
            o = reference_attention(q, k, v, meta.decode_mask, scale, logit_softcap)
            out[meta.decode_rows] = o.squeeze(2)
        for seq in meta.prefills:
            rows = slice(seq.token_start, seq.token_start + seq.num_query)
            q = query[rows].transpose(0, 1).unsqueeze(0)  # [1, H, Q, D]
            k = flat_k[seq.context_slots].transpose(0, 1).unsqueeze(0)  # [1, Hkv, K, D]
            v = flat_v[seq.context_slots].transpose(0, 1).unsqueeze(0)
            # query i sits at context position (context_len - num_query + i)
            q_pos = torch.arange(seq.context_len - seq.num_query, seq.context_len)
            mask = (torch.arange(seq.context_len)[None, :] <= q_pos[:, None])[None, None]
            o = reference_attention(q, k, v, mask, scale, logit_softcap)
            out[rows] = o[0].transpose(0, 1)
        return out
