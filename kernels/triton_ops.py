"""Triton kernels for the per-token ops: KV store by slot mapping, RMSNorm (+ residual add), RoPE,
SiLU/GeLU-and-mul. The torch reference of each is in reference.py (store_kv: TorchAttentionBackend)
and tests/kernels/test_triton_kernels.py compares them on random inputs.

Every kernel computes in fp32 and rounds once on store. Inputs may be strided views (the model
slices q, k and v out of one projection) as long as the last dim is contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _row_warps(block: int) -> int:
    return min(max(block // 256, 1), 16)


# --- KV store ---------------------------------------------------------------------------------
@triton.jit
def _store_kv_kernel(
    key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    num_kv_heads,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cache_slot, stride_cache_head,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)  # < 0: a padding token, nothing stored
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < num_kv_heads) & (d[None, :] < HEAD_DIM) & (slot >= 0)
    cache_off = slot * stride_cache_slot + h[:, None] * stride_cache_head + d[None, :]  # [BLOCK_H, BLOCK_D]
    k = tl.load(key_ptr + token * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(key_cache_ptr + cache_off, k, mask=mask)
    v = tl.load(value_ptr + token * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(value_cache_ptr + cache_off, v, mask=mask)


def store_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """key/value [T, Hkv, D] into caches [num_blocks, block_size, Hkv, D] at slot_mapping [T]
    (slot = block_id * block_size + offset; a negative slot skips the token)."""
    num_tokens, num_kv_heads, head_dim = key.shape
    assert key.stride(-1) == 1 and value.stride(-1) == 1
    assert key_cache.is_contiguous() and value_cache.is_contiguous() and key_cache.dtype == key.dtype
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        num_kv_heads,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        key_cache.stride(1), key_cache.stride(2),
        HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


# --- RMSNorm ----------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr,
    hidden, eps, weight_offset,
    stride_x, stride_r, stride_o, stride_ro,
    ADD_RESIDUAL: tl.constexpr, WEIGHT_AFTER_CAST: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if ADD_RESIDUAL:
        # The new residual is rounded to the activation dtype before it is normalised, as in torch.
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / hidden + eps)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if WEIGHT_AFTER_CAST:
        # HF Llama: weight * x_normed.to(dtype), i.e. the normalised x is rounded first
        y = (xf * rstd).to(x.dtype).to(tl.float32) * w
    else:
        y = xf * rstd * (weight_offset + w)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, x.shape[-1])  # a view when possible
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def _rms_norm(x, residual, weight, eps, weight_offset):
    hidden = x.shape[-1]
    x2 = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, hidden)
    if residual is not None:
        r2 = _rows(residual)
        residual_out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        ro2 = residual_out.view(-1, hidden)
    else:
        r2 = ro2 = residual_out = x2
    if x2.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, r2, weight, out2, ro2,
            hidden, eps, float(weight_offset),
            x2.stride(0), r2.stride(0), out2.stride(0), ro2.stride(0),
            ADD_RESIDUAL=residual is not None, WEIGHT_AFTER_CAST=not weight_offset and x.dtype != torch.float32,
            BLOCK=block, num_warps=_row_warps(block),
        )
    return out, residual_out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """x [..., hidden] -> [..., hidden]; weight_offset=1 gives Gemma's (1 + w)."""
    return _rms_norm(x, None, weight, eps, weight_offset)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass over memory."""
    return _rms_norm(x, residual, weight, eps, weight_offset)


# --- RoPE -------------------------------------------------------------------------------------
@triton.jit
def _rope_kernel(
    x_ptr, out_ptr, positions_ptr, cos_sin_ptr,
    num_heads,
    stride_xt, stride_xh, stride_ot, stride_oh, stride_cache,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_PASS: tl.constexpr, COPY_PASS: tl.constexpr,
):
    token = tl.program_id(0)
    h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    pos = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * stride_cache + j, mask=j < HALF, other=0.0)[None, :]  # [1, HALF]
    sin = tl.load(cos_sin_ptr + pos * stride_cache + HALF + j, mask=j < HALF, other=0.0)[None, :]
    mask = (h[:, None] < num_heads) & (j[None, :] < HALF)
    x_row = x_ptr + token * stride_xt + h[:, None] * stride_xh  # [BLOCK_H, 1]
    o_row = out_ptr + token * stride_ot + h[:, None] * stride_oh
    # neox style: the rotated pairs are (j, j + HALF)
    x1 = tl.load(x_row + j[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF + j[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(o_row + j[None, :], (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(o_row + HALF + j[None, :], (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty), mask=mask)
    if COPY_PASS:  # partial rotary into a new tensor: dims [2 * HALF, HEAD_DIM) pass through
        p = 2 * HALF + tl.arange(0, BLOCK_PASS)
        pmask = (h[:, None] < num_heads) & (p[None, :] < HEAD_DIM)
        tl.store(o_row + p[None, :], tl.load(x_row + p[None, :], mask=pmask), mask=pmask)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
               inplace: bool = False) -> torch.Tensor:
    """Neox-style rotary embedding. x [T, heads, head_dim] (q and k may be rotated together),
    positions [T], cos_sin_cache [max_positions, rot_dim] fp32 from reference.rope_cos_sin_cache
    (llama3 / linear scaling live in its inverse frequencies). Dims past rot_dim pass through."""
    num_tokens, num_heads, head_dim = x.shape
    rot_dim = cos_sin_cache.shape[-1]
    assert x.stride(-1) == 1 and cos_sin_cache.stride(-1) == 1 and rot_dim <= head_dim and rot_dim % 2 == 0
    out = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if num_tokens == 0:
        return out
    half = rot_dim // 2
    block_h = min(triton.next_power_of_2(num_heads), 16)
    copy_pass = not inplace and rot_dim < head_dim
    _rope_kernel[(num_tokens, triton.cdiv(num_heads, block_h))](
        x, out, positions, cos_sin_cache,
        num_heads,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1), cos_sin_cache.stride(0),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), BLOCK_H=block_h,
        HEAD_DIM=head_dim, BLOCK_PASS=triton.next_power_of_2(max(head_dim - rot_dim, 1)), COPY_PASS=copy_pass,
    )
    return out


# --- gated activations ------------------------------------------------------------------------
@triton.jit
def _act_and_mul_kernel(
    x_ptr, out_ptr, inter, stride_x, stride_o,
    GELU_TANH: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU_TANH:
        # tanh(z) = 2 * sigmoid(2z) - 1
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate * tl.sigmoid(2.0 * z)  # = 0.5 * gate * (1 + tanh(z))
    else:
        act = gate * tl.sigmoid(gate)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def _act_and_mul(x: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    inter = x.shape[-1] // 2
    x2 = _rows(x)
    out = torch.empty(*x.shape[:-1], inter, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, inter)
    if x2.shape[0]:
        block = min(triton.next_power_of_2(inter), 1024)
        _act_and_mul_kernel[(x2.shape[0], triton.cdiv(inter, block))](
            x2, out2, inter, x2.stride(0), out2.stride(0), GELU_TANH=gelu_tanh, BLOCK=block, num_warps=4,
        )
    return out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [..., 2 * inter] (gate then up) -> [..., inter]."""
    return _act_and_mul(x, gelu_tanh=False)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Gemma's GeGLU: x [..., 2 * inter] -> [..., inter]."""
    return _act_and_mul(x, gelu_tanh=True)
