"""On CUDA (the lent GPU): greedy outputs of the engine's torch path equal HF transformers' on tiny
models, fp32 exactly (near-ties aside) and bf16 up to bf16's near-ties. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tests.conftest import track
from tests.engine.test_hf_parity import compare_greedy, hf_greedy, make_prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2"])
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
        exact += compare_greedy(c.token_ids, chosen, hf_tokens, hf_lps, f"{arch} cuda prompt {i}")
    assert exact >= len(prompts) - 2
