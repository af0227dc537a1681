"""Linear layers for models that compute in fp32 on a CPU.

Measured on a 2-core AVX2 EPYC (torch 2.13), the 30 layers of SmolLM2-135M, ms per call stack:
    rows    F.linear fp32   oneDNN prepacked fp32   F.linear bf16 (emulated)
    1       40              25                      14     <- batch-1 decode is memory bound
    8       55              32                      -
    64      185             127                     -      <- bf16 GEMM is ~7x slower than fp32 here
So every fp32 linear uses oneDNN with weights reordered once at load. A bf16/fp16 model on a CPU
without native bf16/fp16 matmul (no AVX512-BF16/AMX) computes in fp32 with its weights rounded
to bf16, and keeps a bf16 copy for calls with very few rows. On CPUs with native bf16 none of
this applies: the model runs in bf16 with plain nn.Linear.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# At or below this many rows the low-precision copy is used (see the table above).
LOW_PRECISION_MAX_ROWS = 1


@functools.cache
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_native(dtype: torch.dtype) -> bool:
    """Whether matmuls in `dtype` run natively (not emulated) on this CPU."""
    flags = cpu_flags()
    if dtype == torch.bfloat16:
        return bool({"avx512_bf16", "amx_bf16"} & flags)
    if dtype == torch.float16:
        return bool({"avx512_fp16", "amx_fp16"} & flags)
    return True


def _onednn_pack(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight [out, in] reordered for oneDNN's fp32 inner product, or None where unavailable."""
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight, None)
    except (RuntimeError, AttributeError):
        return None


class CpuLinear(nn.Module):
    """y = x W^T + b in fp32 on CPU: oneDNN-prepacked W, plus an optional low-precision copy of
    W (same values: W was rounded to it) for memory-bound calls with few rows."""

    def __init__(self, linear: nn.Linear, low_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.low_weight = None if low_dtype is None else weight.to(low_dtype)  # [out, in]
        weight = (weight if self.low_weight is None else self.low_weight).float().contiguous()
        bias = linear.bias
        if bias is not None:
            bias = bias.detach().float() if low_dtype is None else bias.detach().to(low_dtype).float()
        self.bias = bias
        self.packed = _onednn_pack(weight)
        self.weight = weight if self.packed is None else None
        self.out_features = weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [rows, in] fp32 -> [rows, out]
        if self.low_weight is not None and x.shape[0] <= LOW_PRECISION_MAX_ROWS:
            out = F.linear(x.to(self.low_weight.dtype), self.low_weight).float()
            return out if self.bias is None else out + self.bias
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x.contiguous(), self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def use_cpu_linears(model: nn.Module, low_dtype: torch.dtype | None = None) -> None:
    """Replace every nn.Linear of a fp32 CPU model in place (weights `low_dtype`-valued if given)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, CpuLinear(child, low_dtype))
