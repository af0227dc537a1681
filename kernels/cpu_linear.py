"""Linear layers for a bf16/fp16 model on a CPU without native bf16/fp16 matmul (AVX2 parts).

Measured on a 2-core AVX2 EPYC (torch 2.13, MKL/oneDNN), 30 SmolLM2-135M layers of weights:
    rows    fp32 GEMM   bf16 GEMM
    1       37 ms       17 ms     <- decode at batch 1 is memory bound: half the bytes wins
    4       65 ms       47 ms
    8       54 ms       94 ms
    32      93 ms      382 ms     <- prefill/large batches are compute bound: bf16 is emulated
So such a model keeps its (bf16-rounded) weights twice: in fp32 for many rows and in bf16 for
few. Activations and the KV cache are fp32. Where the CPU has AVX512-BF16/AMX, none of this is
used: the model simply runs in bf16.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

# At or below this many rows the low-precision copy is used (see the table above).
LOW_PRECISION_MAX_ROWS = 4


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


class DualPrecisionLinear(nn.Module):
    """y = x W^T + b with W stored in fp32 (compute-bound calls) and in a low-precision copy
    (memory-bound calls with few rows). Both hold the same values: W was rounded to the
    low precision first."""

    def __init__(self, linear: nn.Linear, low_dtype: torch.dtype) -> None:
        super().__init__()
        weight = linear.weight.detach()
        self.low_weight = weight.to(low_dtype)  # [out, in]
        self.weight = self.low_weight.float()
        self.bias = None if linear.bias is None else linear.bias.detach().to(low_dtype).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= LOW_PRECISION_MAX_ROWS:
            out = F.linear(x.to(self.low_weight.dtype), self.low_weight).float()
            return out if self.bias is None else out + self.bias
        return F.linear(x, self.weight, self.bias)


def use_dual_precision_linears(model: nn.Module, low_dtype: torch.dtype) -> None:
    """Replace every nn.Linear of a fp32 model (whose weights are `low_dtype`-valued) in place."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, DualPrecisionLinear(child, low_dtype))
