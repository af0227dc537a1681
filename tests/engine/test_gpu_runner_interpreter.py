"""The runner's Triton path (the CUDA path: Triton ops and attention, inputs staged on the host,
padded CUDA-graph layouts) run on the CPU under TRITON_INTERPRET=1, against the torch path on the
same tiny models: same greedy tokens, logprobs within fp32 rounding, prompt logprobs too, through
chunked prefill, prefix hits and preemption. With `graphs`, every step that fits a graph layout
runs padded to it (eagerly: no CUDA), so the padding entries are exercised here as well."""

from __future__ import annotations

import pytest
import torch

from tests.kernels import interpreter  # sets TRITON_INTERPRET=1 without CUDA, before triton is imported

pytest.importorskip("triton")
interpreter.setup()

from tandem import LLM, SamplingParams  # noqa: E402
from tandem.kernels.attention import TorchAttentionBackend  # noqa: E402
from tandem.shared.engine.runner import ModelRunner  # noqa: E402
from tests.conftest import track  # noqa: E402
from tests.engine.test_hf_parity import make_prompts  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU runs the compiled path (test_gpu_parity)")

NUM_BLOCKS = 52


def engines(folder, graphs: bool):
    # 4-token blocks, a 64-token budget (chunked prefill, mixed layouts of 64 tokens), 52 blocks
    # for 8 prompts of up to ~170 tokens (preemption), 8 sequences at most.
    kw = dict(dtype="float32", skip_tokenizer_init=True, block_size=4, num_kv_blocks=NUM_BLOCKS,
              max_num_batched_tokens=64, max_model_len=192, max_num_seqs=8)
    ref = track(LLM(str(folder), **kw))
    fast = track(LLM(str(folder), **kw))
    core = fast.engine
    core.runner = ModelRunner(core.model, NUM_BLOCKS, 4, TorchAttentionBackend(), core.device, core.scheduler.config,
                              triton=True, cuda_graphs=graphs)
    return ref, fast


@pytest.mark.parametrize("arch,graphs", [("llama", False), ("llama", True), ("qwen3", True), ("gemma2", True)])
def test_triton_path_matches_torch_path(arch, graphs, tiny_models):
    folder, hf_model = tiny_models[arch]
    ref, fast = engines(folder, graphs)
    if graphs:
        assert fast.engine.runner.graphs.layouts[-1].num_prefill > 0  # a mixed layout exists
    prompts = [{"prompt_token_ids": p} for p in make_prompts(hf_model.config.vocab_size)[:8]]
    params = SamplingParams(temperature=0.0, max_tokens=5, logprobs=1, ignore_eos=True)
    want, got = ref.generate(prompts, params), fast.generate(prompts, params)
    assert fast.stats().num_preemptions > 0 and fast.stats().prefix_cache_hits > 0
    for i, (w, g) in enumerate(zip(want, got, strict=True)):
        wc, gc = w.outputs[0], g.outputs[0]
        assert gc.token_ids == wc.token_ids, f"prompt {i}"
        for t, wl, gl in zip(wc.token_ids, wc.logprobs, gc.logprobs, strict=True):
            assert abs(wl[t].logprob - gl[t].logprob) < 1e-4, f"prompt {i}"


def test_triton_path_prompt_logprobs_and_seeded_sampling(tiny_models):
    folder, hf_model = tiny_models["llama"]
    ref, fast = engines(folder, graphs=True)
    prompts = [{"prompt_token_ids": p} for p in make_prompts(hf_model.config.vocab_size, seed=1)[:4]]
    params = SamplingParams(temperature=0.8, top_p=0.9, seed=3, max_tokens=4, prompt_logprobs=2)
    want, got = ref.generate(prompts, params), fast.generate(prompts, params)
    for w, g in zip(want, got, strict=True):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        assert len(g.prompt_logprobs) == len(w.prompt_logprobs) == len(g.prompt_token_ids)
        for wl, gl in zip(w.prompt_logprobs[1:], g.prompt_logprobs[1:], strict=True):
            assert wl.keys() == gl.keys()
            assert all(abs(wl[t].logprob - gl[t].logprob) < 1e-4 for t in wl)
