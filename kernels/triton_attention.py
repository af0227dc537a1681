"""Triton attention over the paged KV cache, and TritonAttentionBackend (the GPU twin of
attention.TorchAttentionBackend, which is its reference in tests/kernels/test_triton_kernels.py).

KV cache layout, per layer (as attention.py): [num_blocks, block_size, num_kv_heads, head_dim],
slot = block_id * block_size + offset. The kernels read K/V only from the pages, never from the
step's new key/value tensors: store_kv runs first.

- Decode (one query token per sequence): one program per (sequence, KV head, KV split). The
  GROUP query heads of a KV head are the rows of one tile, so each K/V page is read once for all
  of them (GQA without repeating K/V). Long contexts are cut into splits that run in parallel;
  each writes its partial output and log-sum-exp, and a second kernel combines them.
- Prefill (varlen, causal, with a cached prefix): flash attention, one program per (query tile,
  head, sequence). Context position p < prefix_len is read through the sequence's block table;
  p >= prefix_len is this step's own token, read through its slot in slot_mapping.

Softmax runs in base 2 (exp2) with fp32 accumulators; Gemma-2's logit soft-capping is optional.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tandem.kernels import triton_ops
from tandem.kernels.attention import AttentionMetadata

PREFILL_BLOCK_M = 64  # query rows per prefill program (the tile table's tile size)


@triton.jit
def _tanh(x):
    # 1 - 2 / (exp(2x) + 1): saturates cleanly at both ends (exp overflow gives 1, underflow -1)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _scores_log2(q, k, scale, softcap, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr):
    """q [M, D], k [N, D] -> scaled (and soft-capped) scores [M, N] in base-2 units, fp32."""
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    if USE_SOFTCAP:
        s = softcap * _tanh(s * (scale / softcap))
        return s * 1.4426950408889634
    return s * (scale * 1.4426950408889634)


# --- decode -----------------------------------------------------------------------------------
@triton.jit
def _paged_decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, lse_ptr,
    rows_ptr, block_table_ptr, context_lens_ptr,
    scale, softcap, num_splits,
    stride_qt, stride_qh,
    stride_cache_slot, stride_cache_head,
    stride_bt,
    stride_ob, stride_oh, stride_os,
    stride_lb, stride_lh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    DIRECT: tl.constexpr,
):
    """DIRECT (one split): out is the final [T, H, D], written at the sequence's row.
    Otherwise out is the partial [B, H, num_splits, D] fp32 and lse [B, H, num_splits].
    Each sequence's context is cut into num_splits equal parts (rounded up to BLOCK_N), so the
    work follows the real length, not the batch's longest. A context length of 0 marks a padding
    entry (CUDA graphs): nothing is read or written."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(context_lens_ptr + seq)
    if context_len == 0:
        return
    split_len = tl.cdiv(tl.cdiv(context_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, context_len)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    g_mask = g < GROUP
    d_mask = d < HEAD_DIM
    heads = kv_head * GROUP + g  # [BLOCK_G] query heads sharing this KV head
    row = tl.load(rows_ptr + seq).to(tl.int64)
    q = tl.load(q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max (base 2)
    l_i = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp2
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for tile_start in range(start, end, BLOCK_N):
        # 1. slots of this tile's context positions, through the block table
        pos = tile_start + tl.arange(0, BLOCK_N)
        n_mask = pos < end
        page = tl.load(block_table_ptr + seq * stride_bt + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        kv_off = ((page * PAGE_SIZE + pos % PAGE_SIZE) * stride_cache_slot + kv_head * stride_cache_head)[:, None] \
            + d[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # 2. scores of every query head of the group against the tile
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = _scores_log2(q, k, scale, softcap, USE_SOFTCAP, PRECISION)  # [BLOCK_G, BLOCK_N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        # 3. online softmax: rescale what was accumulated to the new max
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out_mask = g_mask[:, None] & d_mask[None, :]
    if DIRECT:
        o = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        # A split past the end of a short context saw nothing: output 0, log-sum-exp -inf.
        seen = l_i > 0
        o = acc / tl.where(seen, l_i, 1.0)[:, None]
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(out_ptr + seq * stride_ob + heads[:, None] * stride_oh + split * stride_os + d[None, :],
                 o, mask=out_mask)
        tl.store(lse_ptr + seq * stride_lb + heads * stride_lh + split, lse, mask=g_mask)


@triton.jit
def _combine_splits_kernel(
    part_ptr, lse_ptr, out_ptr, rows_ptr, context_lens_ptr,
    num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ot, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Weights each split's normalised output by exp2(lse_split - lse_max): exact softmax."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    if tl.load(context_lens_ptr + seq) == 0:  # padding entry
        return
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    s_mask = s < num_splits
    d_mask = d < HEAD_DIM
    lse = tl.load(lse_ptr + seq * stride_lb + head * stride_lh + s, mask=s_mask, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # [BLOCK_S]; split 0 always saw tokens, so the max is finite
    part = tl.load(part_ptr + seq * stride_pb + head * stride_ph + s[:, None] * stride_ps + d[None, :],
                   mask=s_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_S, BLOCK_D]
    o = tl.sum(part * w[:, None], 0) / tl.sum(w, 0)
    row = tl.load(rows_ptr + seq).to(tl.int64)
    tl.store(out_ptr + row * stride_ot + head * stride_oh + d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def decode_num_splits(num_seqs: int, num_kv_heads: int, max_len: int, device: torch.device,
                      min_split_len: int = 256, max_splits: int = 16) -> int:
    """KV splits per sequence: enough (sequence, KV head, split) programs for about two waves over
    the GPU, never a split shorter than min_split_len tokens."""
    if device.type != "cuda":
        return 1
    num_sms = _num_sms(device.index if device.index is not None else torch.cuda.current_device())
    wanted = triton.cdiv(2 * num_sms, max(num_seqs * num_kv_heads, 1))
    return max(1, min(wanted, triton.cdiv(max_len, min_split_len), max_splits))


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # 16-bit inputs ignore it


def paged_decode_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, rows: torch.Tensor,
    block_table: torch.Tensor, context_lens: torch.Tensor, max_len: int, scale: float,
    logit_softcap: float | None = None, out: torch.Tensor | None = None, num_splits: int | None = None,
    block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
) -> torch.Tensor:
    """One query token per sequence over its paged context.

    query [T, H, D] (rows [B] pick each sequence's row; other rows are left alone in out),
    caches [num_blocks, block_size, Hkv, D], block_table [B, max_blocks] int32/int64,
    context_lens [B] int32 (tokens with KV, this step's included; 0 = a padding entry, skipped),
    max_len >= max(context_lens) (only picks num_splits when it is not given).
    Returns out [T, H, D]. Reads no tensor on the host: CUDA-graph safe."""
    num_seqs = rows.shape[0]
    _, page_size, num_kv_heads, head_dim = key_cache.shape
    num_heads = query.shape[1]
    assert num_heads % num_kv_heads == 0 and query.stride(-1) == 1
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    out = torch.empty_like(query) if out is None else out
    if num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, max_len, query.device)
    common = dict(
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE_SIZE=page_size, BLOCK_N=block_n,
        USE_SOFTCAP=bool(logit_softcap), PRECISION=_precision(query.dtype), num_warps=num_warps,
        num_stages=num_stages,
    )
    grid = (num_seqs, num_kv_heads, num_splits)
    softcap = float(logit_softcap or 0.0)
    if num_splits == 1:
        _paged_decode_kernel[grid](
            query, key_cache, value_cache, out, out,
            rows, block_table, context_lens,
            scale, softcap, num_splits,
            query.stride(0), query.stride(1),
            key_cache.stride(1), key_cache.stride(2),
            block_table.stride(0),
            out.stride(0), out.stride(1), 0,
            0, 0,
            DIRECT=True, **common,
        )
        return out
    part = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=query.device)
    lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=query.device)
    _paged_decode_kernel[grid](
        query, key_cache, value_cache, part, lse,
        rows, block_table, context_lens,
        scale, softcap, num_splits,
        query.stride(0), query.stride(1),
        key_cache.stride(1), key_cache.stride(2),
        block_table.stride(0),
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        DIRECT=False, **common,
    )
    _combine_splits_kernel[(num_seqs, num_heads)](
        part, lse, out, rows, context_lens,
        num_splits,
        part.stride(0), part.stride(1), part.stride(2),
        lse.stride(0), lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_S=triton.next_power_of_2(num_splits),
    )
    return out


# --- prefill ----------------------------------------------------------------------------------
@triton.jit
def _paged_prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    q_start_ptr, q_len_ptr, prefix_len_ptr, block_table_ptr, slot_mapping_ptr, tiles_ptr,
    scale, softcap,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_cache_slot, stride_cache_head,
    stride_bt,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, USE_SOFTCAP: tl.constexpr, PRECISION: tl.constexpr,
    TILE_TABLE: tl.constexpr,
):
    """Grid (tiles, heads, sequences), or with TILE_TABLE (table entries, heads, 1): entry e of
    tiles_ptr is seq << 16 | tile, or -1 for a padding entry (CUDA graphs)."""
    head = tl.program_id(1)
    if TILE_TABLE:
        entry = tl.load(tiles_ptr + tl.program_id(0))
        if entry < 0:
            return
        seq = entry >> 16
        tile = entry & 0xFFFF
    else:
        tile = tl.program_id(0)
        seq = tl.program_id(2)
    q_len = tl.load(q_len_ptr + seq)
    if tile * BLOCK_M >= q_len:
        return
    q_start = tl.load(q_start_ptr + seq).to(tl.int64)
    prefix_len = tl.load(prefix_len_ptr + seq)
    kv_head = head // GROUP

    i = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # query index within the sequence's chunk
    d = tl.arange(0, BLOCK_D)
    i_mask = i < q_len
    d_mask = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + i)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=i_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    q_pos = prefix_len + i  # context position of each query
    kv_end = prefix_len + tl.minimum((tile + 1) * BLOCK_M, q_len)  # the tile's last query sees < kv_end

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for tile_start in range(0, kv_end, BLOCK_N):
        # 1. slots: the cached prefix through the block table, this chunk through slot_mapping
        pos = tile_start + tl.arange(0, BLOCK_N)
        n_mask = pos < kv_end
        in_prefix = pos < prefix_len
        page = tl.load(block_table_ptr + seq * stride_bt + pos // PAGE_SIZE, mask=in_prefix, other=0).to(tl.int64)
        new_slot = tl.load(slot_mapping_ptr + q_start + (pos - prefix_len), mask=n_mask & ~in_prefix, other=0)
        slot = tl.where(in_prefix, page * PAGE_SIZE + pos % PAGE_SIZE, new_slot.to(tl.int64))
        kv_off = (slot * stride_cache_slot + kv_head * stride_cache_head)[:, None] + d[None, :]  # [BLOCK_N, BLOCK_D]
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # 2. causal scores: query at q_pos sees positions <= q_pos
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        s = _scores_log2(q, k, scale, softcap, USE_SOFTCAP, PRECISION)  # [BLOCK_M, BLOCK_N]
        s = tl.where((pos[None, :] <= q_pos[:, None]) & n_mask[None, :], s, float("-inf"))
        # 3. online softmax (position 0 is in the first tile and visible to all: m_i is finite after it)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]
    tl.store(out_ptr + (q_start + i)[:, None] * stride_ot + head * stride_oh + d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=i_mask[:, None] & d_mask[None, :])


def paged_prefill_attention(
    query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, q_start: torch.Tensor,
    q_len: torch.Tensor, prefix_len: torch.Tensor, block_table: torch.Tensor, slot_mapping: torch.Tensor,
    max_q_len: int, scale: float, logit_softcap: float | None = None, out: torch.Tensor | None = None,
    block_m: int = PREFILL_BLOCK_M, block_n: int = 64, num_warps: int = 4, num_stages: int = 2,
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal varlen attention of multi-token chunks over the paged cache (their K/V stored first).

    Sequence s owns query rows [q_start[s], q_start[s] + q_len[s]) of query [T, H, D]; its query i
    sits at context position prefix_len[s] + i. block_table [S, max_blocks] covers at least the
    cached prefix; slot_mapping [T] locates the chunk's own K/V. Returns out [T, H, D] (rows of
    other sequences left alone). With `tiles` (int32 [NT], from prefill_tile_table with the same
    block_m) one program runs per table entry and max_q_len is not used: the launch reads no
    tensor on the host and its grid does not depend on the lengths (CUDA-graph safe)."""
    num_seqs = q_start.shape[0]
    _, page_size, num_kv_heads, head_dim = key_cache.shape
    num_heads = query.shape[1]
    assert num_heads % num_kv_heads == 0 and query.stride(-1) == 1
    assert key_cache.is_contiguous() and value_cache.is_contiguous()
    out = torch.empty_like(query) if out is None else out
    if tiles is not None:
        if tiles.shape[0] == 0:
            return out
        grid = (tiles.shape[0], num_heads, 1)
    elif num_seqs == 0 or max_q_len == 0:
        return out
    else:
        grid = (triton.cdiv(max_q_len, block_m), num_heads, num_seqs)
    _paged_prefill_kernel[grid](
        query, key_cache, value_cache, out,
        q_start, q_len, prefix_len, block_table, slot_mapping, q_start if tiles is None else tiles,
        scale, float(logit_softcap or 0.0),
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(1), key_cache.stride(2),
        block_table.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
        PAGE_SIZE=page_size, BLOCK_M=block_m, BLOCK_N=block_n, USE_SOFTCAP=bool(logit_softcap),
        PRECISION=_precision(query.dtype), TILE_TABLE=tiles is not None, num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def prefill_tile_table(q_lens: list[int], size: int | None = None, block_m: int = PREFILL_BLOCK_M) -> list[int]:
    """The prefill programs of chunks of q_lens tokens: one entry seq << 16 | tile per query tile,
    padded with -1 to `size` entries (at most cdiv(sum(q_lens), block_m) + len(q_lens) are used)."""
    table = [(seq << 16) | tile for seq, n in enumerate(q_lens) for tile in range(-(-n // block_m))]
    if size is not None:
        if len(table) > size:
            raise ValueError(f"{len(table)} prefill tiles do not fit a table of {size}")
        table += [-1] * (size - len(table))
    return table


# --- backend ----------------------------------------------------------------------------------
@dataclass
class TritonAttentionMetadata:
    """One step's attention inputs as device tensors, shared by every layer. The runner's CUDA
    path builds it directly (padded, in static buffers when a CUDA graph replays it);
    build_triton_metadata converts the torch backend's AttentionMetadata (tests)."""

    slot_mapping: torch.Tensor  # [T] where each token's K/V goes (< 0: a padding token, not stored)
    decode_rows: torch.Tensor  # [Bd] row of each single-token sequence
    decode_block_table: torch.Tensor  # [Bd, max_blocks]
    decode_context_lens: torch.Tensor  # [Bd] int32, this step's token included (0: padding entry)
    decode_max_len: int  # picks num_splits when decode_num_splits is None
    prefill_q_start: torch.Tensor  # [Np] int32: first row of each multi-token chunk
    prefill_q_len: torch.Tensor  # [Np] int32
    prefill_prefix_len: torch.Tensor  # [Np] int32: cached tokens before the chunk
    prefill_block_table: torch.Tensor  # [Np, max_blocks] (at least one column)
    prefill_max_q_len: int  # 0: no chunk (ignored with prefill_tiles)
    decode_num_splits: int | None = None  # fixed KV splits (CUDA graphs), else from decode_max_len
    prefill_tiles: torch.Tensor | None = None  # [NT] int32 from prefill_tile_table, or None


def build_triton_metadata(meta: AttentionMetadata) -> TritonAttentionMetadata:
    """From the torch backend's AttentionMetadata, on the device of its slot_mapping. The decode
    context lengths come from decode_mask (one reduction); the prefill scalars go over in one copy."""
    device = meta.slot_mapping.device
    num_decode = meta.num_decode
    if meta.decode_mask is None:
        decode_lens = torch.full((num_decode,), meta.decode_max_len, dtype=torch.int32, device=device)
    else:
        decode_lens = meta.decode_mask.reshape(num_decode, -1).sum(-1, dtype=torch.int32)
    seqs = meta.prefills
    scalars = torch.tensor([[s.token_start for s in seqs], [s.num_query for s in seqs],
                            [s.prefix_len for s in seqs]], dtype=torch.int32).reshape(3, len(seqs))
    scalars = scalars.to(device, non_blocking=True)
    width = max([int(s.block_table.shape[0]) for s in seqs] + [1])
    table = torch.zeros(len(seqs), width, dtype=torch.long, device=device)
    for i, s in enumerate(seqs):
        if s.block_table.shape[0]:
            table[i, : s.block_table.shape[0]] = s.block_table
    return TritonAttentionMetadata(
        slot_mapping=meta.slot_mapping,
        decode_rows=meta.decode_rows,
        decode_block_table=meta.decode_block_table,
        decode_context_lens=decode_lens,
        decode_max_len=meta.decode_max_len,
        prefill_q_start=scalars[0],
        prefill_q_len=scalars[1],
        prefill_prefix_len=scalars[2],
        prefill_block_table=table,
        prefill_max_q_len=max([s.num_query for s in seqs], default=0),
    )


class TritonAttentionBackend:
    """The AttentionBackend of the CUDA path: TorchAttentionBackend's interface and results.

    `meta` is a TritonAttentionMetadata (the runner's CUDA path), or an AttentionMetadata whose
    kernel metadata is built once and reused while the same object comes back."""

    def __init__(self) -> None:
        self._meta: AttentionMetadata | None = None
        self._triton_meta: TritonAttentionMetadata | None = None

    def metadata(self, meta: AttentionMetadata | TritonAttentionMetadata) -> TritonAttentionMetadata:
        if isinstance(meta, TritonAttentionMetadata):
            return meta
        if meta is not self._meta:
            self._meta, self._triton_meta = meta, build_triton_metadata(meta)
        return self._triton_meta

    def store_kv(self, key, value, key_cache, value_cache, slot_mapping) -> None:
        triton_ops.store_kv(key, value, key_cache, value_cache, slot_mapping)

    def forward(self, query, key_cache, value_cache, meta, scale, logit_softcap=None, key=None, value=None):
        """query [T, H, D] -> [T, H, D]. K/V come from the pages (store_kv ran first), so the
        step's `key`/`value` are not needed. Rows no sequence owns (padding) are left unset."""
        tmeta = self.metadata(meta)
        out = torch.empty_like(query)
        if tmeta.decode_rows.shape[0]:
            paged_decode_attention(
                query, key_cache, value_cache, tmeta.decode_rows, tmeta.decode_block_table,
                tmeta.decode_context_lens, tmeta.decode_max_len, scale, logit_softcap, out=out,
                num_splits=tmeta.decode_num_splits,
            )
        if tmeta.prefill_tiles is not None or tmeta.prefill_max_q_len:
            paged_prefill_attention(
                query, key_cache, value_cache, tmeta.prefill_q_start, tmeta.prefill_q_len,
                tmeta.prefill_prefix_len, tmeta.prefill_block_table, tmeta.slot_mapping,
                tmeta.prefill_max_q_len, scale, logit_softcap, out=out, tiles=tmeta.prefill_tiles,
            )
        return out
