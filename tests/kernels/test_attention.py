"""The torch paged-attention backend equals dense causal attention on random inputs: decode and
prefill groups, cached prefixes, GQA, scattered block tables and logit soft-capping."""

from __future__ import annotations

import pytest
import torch

from tandem.kernels.attention import AttentionMetadata, PrefillSeq, TorchAttentionBackend, padded_block_table


def dense_attention(q, k, v, prefix_len, scale, softcap=None):
    """q [Q, H, D], k/v [K, Hkv, D]; query i sees keys 0..prefix_len+i."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    q_pos = torch.arange(q.shape[0])[:, None] + prefix_len
    scores = scores.masked_fill(torch.arange(k.shape[0])[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double())


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_paged_attention_matches_dense(heads, softcap):
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, bs, num_blocks = *heads, 16, 4, 64
    backend = TorchAttentionBackend()
    key_cache = torch.zeros(num_blocks, bs, num_kv_heads, head_dim)
    value_cache = torch.zeros_like(key_cache)
    # (prefix already cached, new tokens this step): decodes, a fresh prompt, a chunk after a prefix
    seqs = [(7, 1), (12, 1), (0, 9), (10, 6), (3, 1)]
    perm = torch.randperm(num_blocks).tolist()  # scattered block tables
    tables, contexts = [], []
    for prefix, new in seqs:
        n = -(-(prefix + new) // bs)
        tables.append([perm.pop() for _ in range(n)])
        contexts.append((torch.randn(prefix + new, num_kv_heads, head_dim), torch.randn(prefix + new, num_kv_heads,
                                                                                           head_dim)))
    # Cached prefixes are in the pages before the step.
    flat_k = key_cache.view(-1, num_kv_heads, head_dim)
    flat_v = value_cache.view(-1, num_kv_heads, head_dim)

    def slots(table, start, end):
        pos = torch.arange(start, end)
        return torch.tensor(table)[pos // bs] * bs + pos % bs

    for (prefix, _), table, (k, v) in zip(seqs, tables, contexts, strict=True):
        flat_k[slots(table, 0, prefix)] = k[:prefix]
        flat_v[slots(table, 0, prefix)] = v[:prefix]

    query = torch.cat([torch.randn(new, num_heads, head_dim) for _, new in seqs])
    new_k = torch.cat([k[prefix:] for (prefix, _), (k, _) in zip(seqs, contexts, strict=True)])
    new_v = torch.cat([v[prefix:] for (prefix, _), (_, v) in zip(seqs, contexts, strict=True)])
    slot_mapping = torch.cat([slots(t, p, p + n) for (p, n), t in zip(seqs, tables, strict=True)])

    decode_rows, dec_tables, dec_lens, prefills, row = [], [], [], [], 0
    for (prefix, new), table in zip(seqs, tables, strict=True):
        if new == 1:
            decode_rows.append(row)
            dec_tables.append(table)
            dec_lens.append(prefix + 1)
        else:
            t = torch.tensor(table) if prefix else torch.zeros(0, dtype=torch.long)
            prefills.append(PrefillSeq(row, new, prefix + new, t))
        row += new
    dtable, dmask = padded_block_table(dec_tables, dec_lens, bs)
    meta = AttentionMetadata(slot_mapping, torch.tensor(decode_rows), dtable, max(dec_lens), dmask, prefills)

    scale = head_dim**-0.5
    backend.store_kv(new_k, new_v, key_cache, value_cache, slot_mapping)
    out = backend.forward(query, key_cache, value_cache, meta, scale, softcap, new_k, new_v)

    row = 0
    for (prefix, new), (k, v) in zip(seqs, contexts, strict=True):
        ref = dense_attention(query[row:row + new], k, v, prefix, scale, softcap)
        torch.testing.assert_close(out[row:row + new].double(), ref, atol=1e-5, rtol=1e-5)
        row += new
