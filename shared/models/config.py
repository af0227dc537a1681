"""ModelConfig: the decoder's shape and per-family differences, read from an HF config dict.

One decoder serves every supported family; what differs between them is data (ArchSpec).
Anything we do not implement is refused here, at load, with a clear error.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tandem.shared.models.errors import UnsupportedModelError


@dataclass(frozen=True)
class ArchSpec:
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim of q and k
    norm_weight_offset: float = 0.0  # Gemma: x * (1 + w)
    embed_scale: bool = False  # Gemma: embeddings * sqrt(hidden_size)
    activation: str = "silu"  # "silu" or "gelu_tanh" (GeGLU)
    sandwich_norm: bool = False  # Gemma2: norms after attention and after the MLP too
    default_tied: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": ArchSpec(),
    "MistralForCausalLM": ArchSpec(),
    "Qwen2ForCausalLM": ArchSpec(qkv_bias=True, default_tied=False),
    "Qwen3ForCausalLM": ArchSpec(qk_norm=True),
    "GemmaForCausalLM": ArchSpec(norm_weight_offset=1.0, embed_scale=True, activation="gelu_tanh", default_tied=True),
    "Gemma2ForCausalLM": ArchSpec(
        norm_weight_offset=1.0, embed_scale=True, activation="gelu_tanh", sandwich_norm=True, default_tied=True
    ),
}

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    spec: ArchSpec
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_type: str
    rope_params: tuple[tuple[str, float], ...]
    partial_rotary_factor: float
    max_position_embeddings: int
    max_model_len: int
    tie_word_embeddings: bool
    attention_bias: bool  # q/k/v projections
    o_proj_bias: bool
    mlp_bias: bool
    attn_scale: float
    attn_logit_softcap: float | None
    final_logit_softcap: float | None
    dtype: torch.dtype

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def kv_bytes_per_token(self, kv_dtype: torch.dtype | None = None) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * (kv_dtype or self.dtype).itemsize

    def rope_inv_freq(self) -> torch.Tensor:
        """[rotary_dim / 2] fp32 inverse frequencies, as HF computes them."""
        dim = self.rotary_dim
        inv_freq = 1.0 / (self.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        params = dict(self.rope_params)
        if self.rope_type == "linear":
            inv_freq = inv_freq / params["factor"]
        elif self.rope_type == "llama3":
            factor = params["factor"]
            low, high = params["low_freq_factor"], params["high_freq_factor"]
            old_len = params["original_max_position_embeddings"]
            low_wavelen, high_wavelen = old_len / low, old_len / high
            wavelen = 2 * math.pi / inv_freq
            scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
            smooth = (old_len / wavelen - low) / (high - low)
            smoothed = (1 - smooth) * scaled / factor + smooth * scaled
            is_medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
            inv_freq = torch.where(is_medium, smoothed, scaled)
        return inv_freq


def _dtype_from(name: str | None, hf: dict) -> torch.dtype:
    want = (name or "auto").lower()
    if want == "auto":
        stored = str(hf.get("torch_dtype") or hf.get("dtype") or "bfloat16").replace("torch.", "")
        # fp16 has no fast CPU path and overflows more easily; serve bf16 instead.
        want = "float32" if stored == "float32" else "bfloat16"
    table = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "half": torch.float16}
    if want not in table:
        raise UnsupportedModelError(f"dtype {name!r} is not supported (use auto, float32, bfloat16 or float16)")
    return table[want]


def _rope(hf: dict) -> tuple[float, str, dict]:
    params = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        raise UnsupportedModelError("per-layer-type rope parameters are not supported")
    params = {**scaling, **params}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise UnsupportedModelError(f"rope type {rope_type!r} is not supported (supported: {', '.join(_ROPE_TYPES)})")
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 8192))
        for key in ("factor", "low_freq_factor", "high_freq_factor"):
            if key not in params:
                raise UnsupportedModelError(f"llama3 rope scaling lacks {key!r}")
    if rope_type == "linear" and "factor" not in params:
        raise UnsupportedModelError("linear rope scaling lacks 'factor'")
    keep = {k: float(v) for k, v in params.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    return theta, rope_type, keep


def model_config_from_hf(hf: dict, dtype: str | None = "auto", max_model_len: int | None = None) -> ModelConfig:
    archs = hf.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    spec = ARCHITECTURES[arch]
    act_name = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    if _ACTIVATIONS.get(act_name) != spec.activation:
        raise UnsupportedModelError(f"{arch} with activation {act_name!r} is not supported")
    hidden = int(hf["hidden_size"])
    num_heads = int(hf["num_attention_heads"])
    head_dim = int(hf.get("head_dim") or hidden // num_heads)
    max_pos = int(hf.get("max_position_embeddings") or 2048)
    model_len = int(max_model_len or max_pos)
    if model_len < 2:
        raise UnsupportedModelError(f"max_model_len must be at least 2, got {model_len}")
    if model_len > max_pos:
        raise UnsupportedModelError(
            f"max_model_len={model_len} exceeds the model's max_position_embeddings={max_pos}"
        )
    theta, rope_type, rope_params = _rope(hf)
    _check_sliding_window(hf, arch, model_len)
    if hf.get("num_experts") or hf.get("num_local_experts"):
        raise UnsupportedModelError(f"{arch} with mixture-of-experts layers is not supported yet")
    scale = head_dim**-0.5
    if hf.get("query_pre_attn_scalar") and spec.sandwich_norm:
        scale = float(hf["query_pre_attn_scalar"]) ** -0.5
    tied = hf.get("tie_word_embeddings")
    return ModelConfig(
        architecture=arch,
        spec=spec,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=num_heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
        head_dim=head_dim,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_params=tuple(sorted(rope_params.items())),
        partial_rotary_factor=float(hf.get("partial_rotary_factor") or 1.0),
        max_position_embeddings=max_pos,
        max_model_len=model_len,
        tie_word_embeddings=spec.default_tied if tied is None else bool(tied),
        attention_bias=bool(hf.get("attention_bias", False)) or spec.qkv_bias,
        o_proj_bias=bool(hf.get("attention_bias", False)) and not spec.qkv_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        attn_scale=scale,
        attn_logit_softcap=hf.get("attn_logit_softcapping") if spec.sandwich_norm else None,
        final_logit_softcap=hf.get("final_logit_softcapping") if spec.sandwich_norm else None,
        dtype=_dtype_from(dtype, hf),
    )


def _check_sliding_window(hf: dict, arch: str, model_len: int) -> None:
    """A sliding window narrower than the context would need windowed attention, which we do
    not implement: refuse it unless the context fits inside the window (then it is a no-op)."""
    window = hf.get("sliding_window")
    if not window:
        return
    uses_window = hf.get("use_sliding_window", True)
    layer_types = hf.get("layer_types") or []
    if layer_types:
        uses_window = uses_window and any(t == "sliding_attention" for t in layer_types)
    if uses_window and int(window) < model_len:
        raise UnsupportedModelError(
            f"{arch} uses sliding-window attention (window {window}) narrower than max_model_len={model_len}; "
            f"sliding windows are not supported: pass max_model_len <= {window}"
        )
