"""Build a CausalLM from a ModelSource: real weights, or random ones (load_format="dummy")."""

from __future__ import annotations

import contextlib

import torch

from tandem.kernels.cpu_linear import cpu_has_native, use_cpu_linears
from tandem.shared.models.config import ModelConfig
from tandem.shared.models.decoder import CausalLM
from tandem.shared.models.hf_folder import ModelSource, iter_weights


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(source: ModelSource, cfg: ModelConfig, device: torch.device, load_format: str = "auto") -> CausalLM:
    """A model in cfg.dtype. On a CPU that only emulates bf16/fp16 matmuls, the model computes in
    fp32 with weights rounded to cfg.dtype (see kernels/cpu_linear.py); `model.compute_dtype`
    says which (the KV cache uses it)."""
    emulated = device.type == "cpu" and not cpu_has_native(cfg.dtype)
    compute_dtype = torch.float32 if emulated else cfg.dtype
    with _default_dtype(compute_dtype), device:
        model = CausalLM(cfg)
    model.compute_dtype = compute_dtype
    if load_format == "dummy":
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(0.0 if cfg.spec.norm_weight_offset else 1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
    else:
        weights = iter_weights(source)
        if emulated:
            weights = ((name, t.to(cfg.dtype)) for name, t in weights)  # round as a true bf16 model would
        with torch.no_grad():
            model.load_weights(weights)
    if device.type == "cpu" and compute_dtype == torch.float32:
        use_cpu_linears(model, cfg.dtype if emulated else None)
    return model.eval()
