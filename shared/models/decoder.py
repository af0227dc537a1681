"""The one decoder-only transformer behind every supported family (see config.ARCHITECTURES).

Module names follow HF's checkpoints so weights map by name; q/k/v and gate/up are fused at
load time into qkv_proj and gate_up_proj (one matmul each).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tandem.kernels import reference
from tandem.kernels.attention import AttentionBackend, AttentionMetadata
from tandem.kernels.model_ops import ModelOps, TorchOps
from tandem.shared.models.config import ModelConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # key, value: [num_blocks, block_size, num_kv_heads, head_dim]


@dataclass
class ForwardContext:
    """What every layer of one forward shares."""

    meta: Any  # the backend's attention metadata (AttentionMetadata or TritonAttentionMetadata)
    backend: AttentionBackend
    ops: ModelOps
    rope: Any  # ops.rope_context(...) of this forward's positions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_offset: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim) if not weight_offset else torch.zeros(dim))
        self.eps = eps
        self.weight_offset = weight_offset

    def forward(self, x: torch.Tensor, ops: ModelOps) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.weight_offset)

    def add(self, x: torch.Tensor, residual: torch.Tensor, ops: ModelOps) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x + residual), x + residual)"""
        return ops.fused_add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.q_size, cfg.hidden_size, bias=cfg.o_proj_bias)
        self.q_norm = self.k_norm = None
        if cfg.spec.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.spec.norm_weight_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, cfg.spec.norm_weight_offset)
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_logit_softcap

    def forward(self, x: torch.Tensor, kv_cache: KVCache, ctx: ForwardContext) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # [T, q_size + 2 * kv_size]
        qk = qkv[:, : self.q_size + self.kv_size].reshape(num_tokens, self.num_heads + self.num_kv_heads, -1)
        v = qkv[:, self.q_size + self.kv_size :].reshape(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, : self.num_heads], ctx.ops),
                            self.k_norm(qk[:, self.num_heads :], ctx.ops)], dim=1)
        qk = ctx.ops.apply_rope(qk, ctx.rope)  # [T, H + Hkv, D]: q and k rotated together
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]
        meta, backend = ctx.meta, ctx.backend
        backend.store_kv(k, v, kv_cache[0], kv_cache[1], meta.slot_mapping)
        out = backend.forward(q, kv_cache[0], kv_cache[1], meta, self.scale, self.softcap, k, v)  # [T, H, D]
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)
        self.activation = cfg.spec.activation

    def forward(self, x: torch.Tensor, ops: ModelOps) -> torch.Tensor:
        return self.down_proj(ops.act_and_mul(self.gate_up_proj(x), self.activation))  # [T, hidden]


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.spec.norm_weight_offset
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.sandwich = cfg.spec.sandwich_norm
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, kv_cache: KVCache, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden]: the previous layer's output, not yet added to `residual` (the stream;
        None at the first layer, where x is the embedding). Returns (this layer's output, the
        stream before it): the add happens in the next norm, fused on the GPU. Same sums as
        x = x + attn(norm(x)); x = x + mlp(norm(x))."""
        ops = ctx.ops
        if residual is None:
            residual, h = x, self.input_layernorm(x, ops)
        else:
            h, residual = self.input_layernorm.add(x, residual, ops)
        h = self.self_attn(h, kv_cache, ctx)
        if self.sandwich:
            h, residual = self.pre_feedforward_layernorm.add(self.post_attention_layernorm(h, ops), residual, ops)
            return self.post_feedforward_layernorm(self.mlp(h, ops), ops), residual
        h, residual = self.post_attention_layernorm.add(h, residual, ops)
        return self.mlp(h, ops), residual


class DecoderModel(nn.Module):
    """Embedding, layers and final norm, as HF's `model.*`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.spec.norm_weight_offset)


class CausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.compute_dtype = cfg.dtype  # activations and KV cache (the loader may choose fp32 on CPU)
        self.ops: ModelOps = TorchOps()  # the runner's CUDA path swaps in TritonOps
        self.model = DecoderModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.embed_scale = cfg.hidden_size**0.5 if cfg.spec.embed_scale else None
        self.register_buffer(
            "cos_sin_cache",
            reference.rope_cos_sin_cache(cfg.rope_inv_freq(), cfg.max_model_len),
            persistent=False,
        )

    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        if self.embed_scale is not None:
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        ops = self.ops
        ctx = ForwardContext(meta, backend, ops, ops.rope_context(positions, self.cos_sin_cache, x.dtype))
        residual = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            x, residual = layer(x, residual, kv_cache, ctx)
        return self.model.norm.add(x, residual, ops)[0]  # [T, hidden]

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [N, hidden] -> fp32 logits [N, vocab] (written into `out` when given: a CUDA
        graph's static buffer)."""
        if out is None:
            logits = self.lm_head(hidden).float()  # [N, vocab]
        else:
            logits = out
            logits.copy_(self.lm_head(hidden))
        cap = self.config.final_logit_softcap
        if cap:
            if out is None:
                logits = torch.tanh(logits / cap) * cap
            else:
                logits.div_(cap).tanh_().mul_(cap)
        return logits

    # --- weights ------------------------------------------------------------------------------
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy HF-named tensors in, fusing q/k/v and gate/up. Every parameter must be set."""
        params = dict(self.named_parameters())
        cfg = self.config
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        inter = cfg.intermediate_size
        fused = {
            "q_proj": ("qkv_proj", 0, q), "k_proj": ("qkv_proj", q, kv), "v_proj": ("qkv_proj", q + kv, kv),
            "gate_proj": ("gate_up_proj", 0, inter), "up_proj": ("gate_up_proj", inter, inter),
        }
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.startswith("model.") is False and name != "lm_head.weight":
                name = "model." + name
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            parts = name.split(".")
            target, offset, size = name, 0, None
            if len(parts) >= 2 and parts[-2] in fused:
                fused_name, offset, size = fused[parts[-2]]
                target = ".".join(parts[:-2] + [fused_name, parts[-1]])
            if target not in params:
                raise KeyError(f"checkpoint tensor {name!r} has no place in {cfg.architecture}")
            param = params[target]
            dest = param.data if size is None else param.data.narrow(0, offset, size)
            if dest.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dest.shape)}")
            dest.copy_(tensor)
            loaded.add(f"{target}@{offset}")
        expected = set()
        for pname in params:
            if pname == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            leaf = pname.split(".")[-2]
            if leaf == "qkv_proj":
                expected |= {f"{pname}@0", f"{pname}@{q}", f"{pname}@{q + kv}"}
            elif leaf == "gate_up_proj":
                expected |= {f"{pname}@0", f"{pname}@{inter}"}
            else:
                expected.add(f"{pname}@0")
        missing = sorted(expected - loaded)
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
