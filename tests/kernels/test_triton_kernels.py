"""Each Triton kernel equals its torch reference on random inputs: the KV store, RMSNorm (+ residual,
Gemma's offset), RoPE (default, partial, llama3), the gated activations, and paged attention
(decode with split-KV, varlen causal prefill over a cached prefix, GQA, soft-capping) through
TritonAttentionBackend against TorchAttentionBackend.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set before triton is
imported) at small sizes; bf16 matmuls are wrong in the interpreter, so attention is checked there
in fp32 and fp16 only. Tests marked gpu run the compiled kernels at real sizes.
"""

from __future__ import annotations

import pytest
import torch

from tests.kernels import interpreter  # sets TRITON_INTERPRET=1 without CUDA, before triton is imported

pytest.importorskip("triton")
interpreter.setup()

from tandem.kernels import reference as ops  # noqa: E402
from tandem.kernels import triton_ops  # noqa: E402
from tandem.kernels.attention import (  # noqa: E402
    AttentionMetadata,
    PrefillSeq,
    TorchAttentionBackend,
    padded_block_table,
)
from tandem.kernels.triton_attention import (  # noqa: E402
    TritonAttentionBackend,
    TritonAttentionMetadata,
    build_triton_metadata,
    paged_decode_attention,
    paged_prefill_attention,
    prefill_tile_table,
)
from tandem.shared.models.config import model_config_from_hf  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")
# bf16 tl.dot is broken in the interpreter (triton 3.6); elementwise bf16 is fine.
ATTN_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
ATTN_TOL = {torch.float32: (2e-4, 2e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (3e-2, 3e-2)}


def randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


# --- ops --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_matches_torch(dtype):
    gen = torch.Generator().manual_seed(0)
    num_tokens, num_heads, num_kv_heads, head_dim, page_size, num_blocks = 9, 6, 2, 32, 4, 8
    qk = randn(num_tokens, num_heads + num_kv_heads, head_dim, dtype=dtype, gen=gen)
    key = qk[:, num_heads:]  # strided, as the model slices it
    value = randn(num_tokens, 3 * num_kv_heads * head_dim, dtype=dtype, gen=gen)[:, -num_kv_heads * head_dim:]
    value = value.view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * page_size, generator=gen)[:num_tokens].to(DEVICE)
    slots[4] = -1  # a padding token: stored nowhere
    caches = [torch.zeros(num_blocks, page_size, num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
              for _ in range(4)]
    triton_ops.store_kv(key, value, caches[0], caches[1], slots)
    real = slots >= 0
    TorchAttentionBackend().store_kv(key[real], value[real], caches[2], caches[3], slots[real])
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,weight_offset", [((5, 96), 0.0), ((5, 96), 1.0), ((3, 4, 64), 0.0)])
def test_rms_norm_matches_reference(shape, weight_offset, dtype):
    gen = torch.Generator().manual_seed(1)
    x = randn(*shape[:-1], 2 * shape[-1], dtype=dtype, gen=gen)[..., : shape[-1]]  # strided rows
    residual = randn(*shape, dtype=dtype, gen=gen)
    weight = (1 + 0.1 * randn(shape[-1], gen=gen)).to(dtype)
    rtol, atol = TOL[dtype]
    out = triton_ops.rms_norm(x, weight, 1e-6, weight_offset)
    torch.testing.assert_close(out, ops.rms_norm(x, weight, 1e-6, weight_offset), rtol=rtol, atol=atol)
    out, res = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-6, weight_offset)
    ref_out, ref_res = ops.fused_add_rms_norm(x, residual, weight, 1e-6, weight_offset)
    torch.testing.assert_close(res, ref_res, rtol=rtol, atol=atol)
    torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)


def _inv_freq(rope: str, rot_dim: int) -> torch.Tensor:
    hf = dict(architectures=["LlamaForCausalLM"], hidden_size=4 * rot_dim, num_attention_heads=4, vocab_size=8,
              intermediate_size=8, num_hidden_layers=1, max_position_embeddings=4096)
    if rope == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    return model_config_from_hf(hf).rope_inv_freq()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope,rot_dim,head_dim,inplace", [
    ("default", 32, 32, False), ("llama3", 32, 32, True), ("default", 16, 32, False), ("default", 16, 32, True),
])
def test_rope_matches_reference(rope, rot_dim, head_dim, inplace, dtype):
    gen = torch.Generator().manual_seed(2)
    num_tokens, num_heads, max_pos = 7, 6, 4096
    cache = ops.rope_cos_sin_cache(_inv_freq(rope, rot_dim), max_pos).to(DEVICE)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(DEVICE)
    x = randn(num_tokens, num_heads + 2, head_dim, dtype=dtype, gen=gen)[:, 1:-1]  # strided heads
    # the reference in fp32 on the same inputs: the kernel rounds once
    ref = ops.apply_rope(x.float(), *ops.rope_cos_sin(positions, cache, torch.float32)).to(dtype)
    out = triton_ops.apply_rope(x, positions, cache, inplace=inplace)
    assert (out is x) == inplace
    torch.testing.assert_close(out, ref, rtol=TOL[dtype][0], atol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
def test_act_and_mul_matches_reference(act, dtype):
    gen = torch.Generator().manual_seed(3)
    x = 2 * randn(5, 2 * 48, dtype=dtype, gen=gen)
    kernel, ref = {"silu": (triton_ops.silu_and_mul, ops.silu_and_mul),
                   "gelu_tanh": (triton_ops.gelu_tanh_and_mul, ops.gelu_tanh_and_mul)}[act]
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(kernel(x), ref(x.float()).to(dtype), rtol=rtol, atol=atol)


# --- attention --------------------------------------------------------------------------------
def paged_batch(seqs, num_heads, num_kv_heads, head_dim, page_size, dtype, seed=0):
    """A step over `seqs` ((cached prefix, new tokens) each, in batch order) with scattered block
    tables, laid out as ModelRunner does. Returns query [T, H, D], new key/value [T, Hkv, D], the
    caches holding the prefixes (never-written slots are NaN: kernels must not read them) and the
    AttentionMetadata."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-(p + n) // page_size) for p, n in seqs) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, page_size, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    value_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    flat_k, flat_v = key_cache.view(-1, num_kv_heads, head_dim), value_cache.view(-1, num_kv_heads, head_dim)
    new_k, new_v, slots, decode_rows, decode_tables, decode_lens, prefills, row = [], [], [], [], [], [], [], 0
    for prefix, new in seqs:
        table = torch.tensor([perm.pop() for _ in range(-(-(prefix + new) // page_size))], dtype=torch.long)
        pos = torch.arange(prefix + new)
        seq_slots = (table[pos // page_size] * page_size + pos % page_size).to(DEVICE)
        k = randn(prefix + new, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        v = randn(prefix + new, num_kv_heads, head_dim, dtype=dtype, gen=gen)
        flat_k[seq_slots[:prefix]], flat_v[seq_slots[:prefix]] = k[:prefix], v[:prefix]
        new_k.append(k[prefix:])
        new_v.append(v[prefix:])
        slots.append(seq_slots[prefix:])
        if new == 1:
            decode_rows.append(row)
            decode_tables.append(table.tolist())
            decode_lens.append(prefix + 1)
        else:
            prefills.append(PrefillSeq(row, new, prefix + new, (table if prefix else table[:0]).to(DEVICE)))
        row += new
    if decode_rows:
        dtable, dmask = padded_block_table(decode_tables, decode_lens, page_size)
    else:
        dtable, dmask = torch.zeros(0, 1, dtype=torch.long), None
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slots), decode_rows=torch.tensor(decode_rows, dtype=torch.long, device=DEVICE),
        decode_block_table=dtable.to(DEVICE), decode_max_len=max(decode_lens, default=0),
        decode_mask=None if dmask is None else dmask.to(DEVICE), prefills=prefills,
    )
    query = randn(row, num_heads, head_dim, dtype=dtype, gen=gen)
    return query, torch.cat(new_k), torch.cat(new_v), key_cache, value_cache, meta


def torch_reference(query, new_k, new_v, key_cache, value_cache, meta, scale, softcap):
    """TorchAttentionBackend in fp32 over zeroed copies of the caches (it reads whole pages)."""
    backend = TorchAttentionBackend()
    k_cache, v_cache = key_cache.float().nan_to_num(0.0), value_cache.float().nan_to_num(0.0)
    new_k, new_v = new_k.float(), new_v.float()
    backend.store_kv(new_k, new_v, k_cache, v_cache, meta.slot_mapping)
    return backend.forward(query.float(), k_cache, v_cache, meta, scale, softcap, new_k, new_v)


def check_close(out, ref, dtype):
    assert not out.isnan().any()
    rtol, atol = ATTN_TOL[dtype]
    torch.testing.assert_close(out.float(), ref, rtol=rtol, atol=atol)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_backend_matches_torch_mixed_batch(heads, softcap, dtype):
    """Decodes, a fresh prompt, a one-token prompt, chunks after a cached prefix, interleaved."""
    seqs = [(7, 1), (12, 1), (0, 9), (10, 6), (3, 1), (0, 1), (21, 17)]
    batch = paged_batch(seqs, *heads, head_dim=32, page_size=8, dtype=dtype)
    query, new_k, new_v, key_cache, value_cache, meta = batch
    scale = 32**-0.5
    ref = torch_reference(*batch, scale, softcap)
    backend = TritonAttentionBackend()
    backend.store_kv(new_k, new_v, key_cache, value_cache, meta.slot_mapping)
    out = backend.forward(query, key_cache, value_cache, meta, scale, softcap, new_k, new_v)
    check_close(out, ref, dtype)
    assert backend.metadata(meta) is backend.metadata(meta)  # built once per step


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("num_splits,block_n", [(1, 32), (3, 32), (8, 16)])
def test_decode_split_kv(num_splits, block_n, dtype):
    """Long and short contexts in one batch; with 8 splits the short ones leave splits empty."""
    seqs = [(299, 1), (36, 1), (128, 1), (0, 1), (200, 1)]
    batch = paged_batch(seqs, 8, 2, head_dim=64, page_size=16, dtype=dtype, seed=1)
    query, new_k, new_v, key_cache, value_cache, meta = batch
    scale = 64**-0.5
    ref = torch_reference(*batch, scale, None)
    triton_ops.store_kv(new_k, new_v, key_cache, value_cache, meta.slot_mapping)
    tmeta = build_triton_metadata(meta)
    out = paged_decode_attention(query, key_cache, value_cache, tmeta.decode_rows, tmeta.decode_block_table,
                                 tmeta.decode_context_lens, tmeta.decode_max_len, scale,
                                 num_splits=num_splits, block_n=block_n)
    check_close(out, ref, dtype)


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("head_dim", [16, 80])
def test_prefill_multi_tile(head_dim, dtype):
    """Chunks longer than a query tile, prefixes ending mid-page, int32 block tables, softcap."""
    seqs = [(0, 70), (45, 40), (100, 3)]
    batch = paged_batch(seqs, 4, 2, head_dim=head_dim, page_size=16, dtype=dtype, seed=2)
    query, new_k, new_v, key_cache, value_cache, meta = batch
    scale = head_dim**-0.5
    ref = torch_reference(*batch, scale, 20.0)
    triton_ops.store_kv(new_k, new_v, key_cache, value_cache, meta.slot_mapping)
    tmeta = build_triton_metadata(meta)
    out = paged_prefill_attention(query, key_cache, value_cache, tmeta.prefill_q_start, tmeta.prefill_q_len,
                                  tmeta.prefill_prefix_len, tmeta.prefill_block_table.int(), tmeta.slot_mapping,
                                  tmeta.prefill_max_q_len, scale, 20.0, block_m=32, block_n=32)
    check_close(out, ref, dtype)


def padded_metadata(meta, tmeta, pad_decode: int, pad_tiles: int, block_m: int):
    """tmeta as a CUDA graph sees it: decode entries padded with context length 0 (their rows point
    at row 0, which a real sequence owns), the prefill grid from a tile table padded with -1."""
    dev = tmeta.slot_mapping.device
    nd = tmeta.decode_rows.shape[0]
    i32 = dict(dtype=torch.int32, device=dev)
    rows = torch.cat([tmeta.decode_rows.int(), torch.zeros(pad_decode, **i32)])
    lens = torch.cat([tmeta.decode_context_lens, torch.zeros(pad_decode, **i32)])
    width = tmeta.decode_block_table.shape[1] if nd else 1
    table = torch.cat([tmeta.decode_block_table.int().reshape(nd, width), torch.zeros(pad_decode, width, **i32)])
    tiles = prefill_tile_table([s.num_query for s in meta.prefills], block_m=block_m)
    tiles = torch.tensor(tiles + [-1] * pad_tiles, **i32)
    return TritonAttentionMetadata(
        slot_mapping=tmeta.slot_mapping, decode_rows=rows, decode_block_table=table, decode_context_lens=lens,
        decode_max_len=tmeta.decode_max_len, prefill_q_start=tmeta.prefill_q_start, prefill_q_len=tmeta.prefill_q_len,
        prefill_prefix_len=tmeta.prefill_prefix_len, prefill_block_table=tmeta.prefill_block_table.int(),
        prefill_max_q_len=0, decode_num_splits=None, prefill_tiles=tiles,
    )


@pytest.mark.parametrize("dtype", ATTN_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 4])
def test_padded_metadata_matches_torch(num_splits, dtype):
    """Padding entries (CUDA graphs) are skipped: decode context length 0 (direct and split paths),
    prefill tile -1; the result equals the unpadded reference on every real row."""
    seqs = [(7, 1), (0, 9), (150, 1), (10, 70), (3, 1)]
    batch = paged_batch(seqs, 8, 2, head_dim=32, page_size=8, dtype=dtype, seed=6)
    query, new_k, new_v, key_cache, value_cache, meta = batch
    scale = 32**-0.5
    ref = torch_reference(*batch, scale, None)
    triton_ops.store_kv(new_k, new_v, key_cache, value_cache, meta.slot_mapping)
    pmeta = padded_metadata(meta, build_triton_metadata(meta), pad_decode=3, pad_tiles=4, block_m=64)
    pmeta.decode_num_splits = num_splits
    out = TritonAttentionBackend().forward(query, key_cache, value_cache, pmeta, scale)
    check_close(out, ref, dtype)


def test_prefill_tile_table():
    assert prefill_tile_table([3, 130, 64], block_m=64) == [0, 1 << 16, (1 << 16) | 1, (1 << 16) | 2, 2 << 16]
    assert prefill_tile_table([5], size=3) == [0, -1, -1]
    with pytest.raises(ValueError, match="do not fit"):
        prefill_tile_table([200], size=2)


# --- real sizes on the GPU --------------------------------------------------------------------
@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_splits", [1, 5])
def test_gpu_decode_real_size(num_splits, dtype):
    gen = torch.Generator().manual_seed(3)
    lens = torch.randint(1, 4096, (48,), generator=gen).tolist() + [4096, 1]
    batch = paged_batch([(n - 1, 1) for n in lens], 32, 8, head_dim=128, page_size=16, dtype=dtype, seed=3)
    query, new_k, new_v, key_cache, value_cache, meta = batch
    ref = torch_reference(*batch, 128**-0.5, None)
    triton_ops.store_kv(new_k, new_v, key_cache, value_cache, meta.slot_mapping)
    tmeta = build_triton_metadata(meta)
    out = paged_decode_attention(query, key_cache, value_cache, tmeta.decode_rows, tmeta.decode_block_table,
                                 tmeta.decode_context_lens, tmeta.decode_max_len, 128**-0.5, num_splits=num_splits)
    check_close(out, ref, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("softcap", [None, 50.0])
def test_gpu_backend_real_size(softcap, dtype):
    """Long prompts, chunks after long prefixes, and 3 decodes (the heuristic then splits the KV)."""
    seqs = [(0, 1000), (512, 700), (2000, 300), (0, 1), (3000, 1), (77, 1), (1500, 129)]
    batch = paged_batch(seqs, 32, 8, head_dim=128, page_size=16, dtype=dtype, seed=4)
    query, new_k, new_v, key_cache, value_cache, meta = batch
    ref = torch_reference(*batch, 128**-0.5, softcap)
    backend = TritonAttentionBackend()
    backend.store_kv(new_k, new_v, key_cache, value_cache, meta.slot_mapping)
    check_close(backend.forward(query, key_cache, value_cache, meta, 128**-0.5, softcap), ref, dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_ops_real_size(dtype):
    gen = torch.Generator().manual_seed(5)
    rtol, atol = TOL[dtype]
    x, residual = randn(512, 4096, dtype=dtype, gen=gen), randn(512, 4096, dtype=dtype, gen=gen)
    weight = (1 + 0.1 * randn(4096, gen=gen)).to(dtype)
    for offset in (0.0, 1.0):
        torch.testing.assert_close(triton_ops.rms_norm(x, weight, 1e-5, offset), ops.rms_norm(x, weight, 1e-5, offset),
                                   rtol=rtol, atol=atol)
        out, res = triton_ops.fused_add_rms_norm(x, residual, weight, 1e-5, offset)
        ref_out, ref_res = ops.fused_add_rms_norm(x, residual, weight, 1e-5, offset)
        torch.testing.assert_close(res, ref_res, rtol=rtol, atol=atol)
        torch.testing.assert_close(out, ref_out, rtol=rtol, atol=atol)
    cache = ops.rope_cos_sin_cache(_inv_freq("llama3", 128), 8192).to(DEVICE)
    positions = torch.randint(0, 8192, (512,), generator=gen).to(DEVICE)
    qk = randn(512, 40, 128, dtype=dtype, gen=gen)
    ref = ops.apply_rope(qk.float(), *ops.rope_cos_sin(positions, cache, torch.float32)).to(dtype)
    torch.testing.assert_close(triton_ops.apply_rope(qk, positions, cache), ref, rtol=rtol, atol=atol)
    gate_up = randn(64, 2 * 14336, dtype=dtype, gen=gen)
    torch.testing.assert_close(triton_ops.silu_and_mul(gate_up), ops.silu_and_mul(gate_up.float()).to(dtype),
                               rtol=rtol, atol=atol)
    key, value = randn(512, 8, 128, dtype=dtype, gen=gen), randn(512, 8, 128, dtype=dtype, gen=gen)
    slots = torch.randperm(1024 * 16, generator=gen)[:512].to(DEVICE)
    caches = [torch.zeros(1024, 16, 8, 128, dtype=dtype, device=DEVICE) for _ in range(4)]
    triton_ops.store_kv(key, value, caches[0], caches[1], slots)
    TorchAttentionBackend().store_kv(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0], caches[2]) and torch.equal(caches[1], caches[3])
