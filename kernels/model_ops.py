"""The per-token ops the decoder calls, as two interchangeable sets: TorchOps (reference.py: the CPU
path and the oracle) and TritonOps (triton_ops.py: the CUDA path). Same math; TritonOps fuses the
residual add into RMSNorm and rotates q/k in place from the fp32 cos/sin cache."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from tandem.kernels import reference


class ModelOps(Protocol):
    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor: ...

    def fused_add_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def rope_context(self, positions: torch.Tensor, cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> Any: ...

    def apply_rope(self, qk: torch.Tensor, rope: Any) -> torch.Tensor: ...

    def act_and_mul(self, x: torch.Tensor, activation: str) -> torch.Tensor: ...


class TorchOps:
    """reference.py: cos/sin gathered once per forward in the activation dtype (as HF)."""

    def rms_norm(self, x, weight, eps, weight_offset):
        return reference.rms_norm(x, weight, eps, weight_offset)

    def fused_add_rms_norm(self, x, residual, weight, eps, weight_offset):
        return reference.fused_add_rms_norm(x, residual, weight, eps, weight_offset)

    def rope_context(self, positions, cos_sin_cache, dtype):
        return reference.rope_cos_sin(positions, cos_sin_cache, dtype)  # (cos, sin) [T, 1, rot_dim]

    def apply_rope(self, qk, rope):
        return reference.apply_rope(qk, *rope)

    def act_and_mul(self, x, activation):
        return reference.silu_and_mul(x) if activation == "silu" else reference.gelu_tanh_and_mul(x)


class TritonOps:
    """triton_ops.py (imported on construction: triton is needed only here). RoPE reads cos/sin in
    fp32 from the cache by position and rotates q/k in place (they are a fresh projection)."""

    def __init__(self) -> None:
        from tandem.kernels import triton_ops

        self._k = triton_ops

    def rms_norm(self, x, weight, eps, weight_offset):
        return self._k.rms_norm(x, weight, eps, weight_offset)

    def fused_add_rms_norm(self, x, residual, weight, eps, weight_offset):
        return self._k.fused_add_rms_norm(x, residual, weight, eps, weight_offset)

    def rope_context(self, positions, cos_sin_cache, dtype):
        return positions, cos_sin_cache

    def apply_rope(self, qk, rope):
        positions, cache = rope
        return self._k.apply_rope(qk, positions, cache, inplace=True)

    def act_and_mul(self, x, activation):
        return self._k.silu_and_mul(x) if activation == "silu" else self._k.gelu_tanh_and_mul(x)
