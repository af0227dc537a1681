"""On CUDA (the lent GPU): greedy outputs of the engine's torch path equal HF transformers' (fp32, CPU)
on tiny models, token for token (near-ties aside). Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tests.conftest import track
from tests.engine.test_hf_parity import compare_greedy, hf_greedy, make_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


GEMMA2_ON_CUDA = pytest.param(
    "gemma2",
    marks=pytest.mark.xfail(reason="2026-11-25 H100: first-token logprob 3.3e-3 off HF's (CPU) with soft-capped "
                                   "attention on CUDA; llama/qwen3 agree; not yet explained", strict=False),
)


@pytest.mark.parametrize("arch", ["llama", "qwen3", GEMMA2_ON_CUDA])
def test_cuda_greedy_equals_hf_fp32(arch, tiny_models):
    folder, hf_model = tiny_models[arch]
    prompts = make_prompts(hf_model.config.vocab_size)[:16]
    llm = track(LLM(str(folder), dtype="float32", device="cuda", skip_tokenizer_init=True, block_size=16,
                    num_kv_blocks=64, max_num_batched_tokens=96, max_model_len=256))
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=12, logprobs=1, ignore_eos=True))
    exact = 0
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        c = o.outputs[0]
        chosen = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
        hf_tokens, hf_lps = hf_greedy(hf_model, p, 12)
        # CUDA vs CPU fp32 reductions differ in order: logprobs agree to ~1e-4..1e-3 (soft-capped
        # Gemma2 logits amplify it), not bit for bit.
        exact += compare_greedy(c.token_ids, chosen, hf_tokens, hf_lps, f"{arch} cuda prompt {i}", lp_tol=2e-3)
    assert exact >= len(prompts) - 2
