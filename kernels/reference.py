"""Torch reference ops: the CPU path, and the oracle the Triton kernels are tested against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    """x [..., hidden]; computed in fp32 like HF, result cast back to x's dtype.
    weight_offset=1 gives Gemma's (1 + w) scaling."""
    if x.dtype == torch.float32 and not weight_offset:
        return F.rms_norm(x, weight.shape, weight, eps)  # fused; same math as below
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight_offset:
        return (xf * (weight_offset + weight.float())).to(dtype)
    return weight * xf.to(dtype)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual)."""
    residual = x + residual
    return rms_norm(residual, weight, eps, weight_offset), residual


def rope_cos_sin_cache(inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0) -> torch.Tensor:
    """[max_positions, rot_dim] fp32: cos in the first half of the last dim, sin in the second."""
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq.float()[None, :]  # [P, rot_dim/2]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def rope_cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype):
    """cos and sin for a batch of positions: each [T, 1, rot_dim] in `dtype` (once per forward)."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [T, rot_dim/2] each
    cos = torch.cat([cos, cos], dim=-1)[:, None, :].to(dtype)
    sin = torch.cat([sin, sin], dim=-1)[:, None, :].to(dtype)
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Neox-style (rotate-half) rotary embedding, HF's layout. x [T, heads, head_dim],
    cos/sin [T, 1, rot_dim] from rope_cos_sin."""
    rot_dim = cos.shape[-1]
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    x1, x2 = x_rot.chunk(2, dim=-1)
    out = x_rot * cos + torch.cat([-x2, x1], dim=-1) * sin
    return torch.cat([out, x_pass], dim=-1) if x_pass.numel() else out


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2 * inter] (gate then up) -> [T, inter]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Gemma's GeGLU: x [T, 2 * inter] -> [T, inter]."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up
