"""Shared fixtures: tiny random HF models per architecture, and the zero-blocks check that runs
after every test on every engine a test touched."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch

from tandem import LLM

_ENGINES: list[LLM] = []


def track(llm: LLM) -> LLM:
    """Register an engine for the after-test check that its block pool is empty."""
    _ENGINES.append(llm)
    return llm


@pytest.fixture(autouse=True)
def no_blocks_leak():
    yield
    leaked = [(llm.config.model, llm.stats().num_used_blocks) for llm in _ENGINES if llm.stats().num_used_blocks]
    assert not leaked, f"KV blocks still allocated after the test: {leaked}"


def pytest_sessionfinish(session, exitstatus):
    _ENGINES.clear()
    gc.collect()


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=384, max_position_embeddings=512)


def tiny_hf_config(arch: str, **overrides):
    """A small random config of the given architecture; weights init wide enough that greedy
    choices are rarely near-ties."""
    import transformers

    common = dict(TINY, initializer_range=0.25, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    common.update(overrides)
    if arch == "llama":
        return transformers.LlamaConfig(**common, architectures=["LlamaForCausalLM"])
    if arch == "llama3":
        return transformers.LlamaConfig(
            **common, architectures=["LlamaForCausalLM"], tie_word_embeddings=True,
            rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        )
    if arch == "mistral":
        return transformers.MistralConfig(**common, architectures=["MistralForCausalLM"], sliding_window=None)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, architectures=["Qwen2ForCausalLM"], tie_word_embeddings=True)
    if arch == "qwen3":
        return transformers.Qwen3Config(**common, architectures=["Qwen3ForCausalLM"], head_dim=32)
    if arch == "gemma":
        return transformers.GemmaConfig(**common, architectures=["GemmaForCausalLM"], head_dim=16,
                                        hidden_activation="gelu_pytorch_tanh")
    if arch == "gemma2":
        return transformers.Gemma2Config(
            **common, architectures=["Gemma2ForCausalLM"], head_dim=16, hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=16, sliding_window=4096, attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        )
    raise ValueError(arch)


ARCHS = ["llama", "llama3", "mistral", "qwen2", "qwen3", "gemma", "gemma2"]


def save_tiny_model(arch: str, path: Path, seed: int = 0, **overrides):
    """Build a tiny random HF model of `arch`, save it (fp32 safetensors) and return it."""
    import transformers

    torch.manual_seed(seed)
    config = tiny_hf_config(arch, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Norm weights init to ones/zeros; perturb them so their loading is tested too.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> (folder, HF model), built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: (root / arch, save_tiny_model(arch, root / arch)) for arch in ARCHS}


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct GGUF (fp32), loaded once per session and tracked."""
    return track(LLM(dtype="float32", max_model_len=512))
