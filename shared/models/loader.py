"""Build a CausalLM from a ModelSource: real weights, or random ones (load_format="dummy")."""

from __future__ import annotations

import contextlib

import torch

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
    with _default_dtype(cfg.dtype), device:
        model = CausalLM(cfg)
    if load_format == "dummy":
        generator = torch.Generator(device=device).manual_seed(0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(0.0 if cfg.spec.norm_weight_offset else 1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
    else:
        with torch.no_grad():
            model.load_weights(iter_weights(source))
    return model.eval()
