"""Greedy outputs and logprobs equal HF transformers' (fp32, CPU) for every architecture, under
continuous batching with chunked prefill, preemption and prefix-cache hits."""

from __future__ import annotations

import random

import pytest
import torch

from tandem import LLM, SamplingParams
from tests.conftest import ARCHS, track

NUM_NEW = 12


def hf_greedy(model, prompt: list[int], num_new: int) -> tuple[list[int], list[torch.Tensor]]:
    """HF's greedy continuation and the log-softmax of the raw logits at each step."""
    ids = torch.tensor([prompt])
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False,
        output_scores=True, return_dict_in_generate=True, pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, [s[0].float().log_softmax(-1) for s in out.scores]


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(40)]
    prompts = []
    for i in range(44):
        length = rng.choice([3, 9, 17, 33, 70, 130])
        body = [rng.randrange(vocab) for _ in range(length)]
        prompts.append(shared + body if i % 3 == 0 else body)
    return prompts


def compare_greedy(ours_tokens, ours_logprobs, hf_tokens, hf_logprobs, where: str, lp_tol: float = 1e-4) -> bool:
    """True when equal token for token; False after an accepted near-tie."""
    for pos, (a, b) in enumerate(zip(ours_tokens, hf_tokens, strict=True)):
        if a != b:
            top2 = hf_logprobs[pos].topk(2).values
            gap = float(top2[0] - top2[1])
            assert gap < 0.01, f"{where}: diverged at {pos} ({a} vs HF {b}) with HF top-2 gap {gap:.4f}"
            return False  # a near-tie: the rest may legitimately differ
        hf_lp = float(hf_logprobs[pos][b])
        assert abs(ours_logprobs[pos] - hf_lp) < lp_tol, f"{where}: logprob at {pos}: {ours_logprobs[pos]} vs {hf_lp}"
    return True


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_equals_hf_under_batching_chunking_preemption(arch, tiny_models):
    folder, hf_model = tiny_models[arch]
    prompts = make_prompts(hf_model.config.vocab_size)
    # 4-token blocks and a 96-token budget: 130+ token prompts are chunked; 96 blocks (384
    # tokens) for 44 requests of up to ~180 tokens forces preemption.
    llm = track(LLM(str(folder), dtype="float32", skip_tokenizer_init=True, block_size=4, num_kv_blocks=96,
                    max_num_batched_tokens=96, max_model_len=256))
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, logprobs=1, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    stats = llm.stats()
    assert stats.num_preemptions > 0, "the KV pool was meant to force preemption"
    assert stats.prefix_cache_hits > 0, "shared prefixes were meant to hit the prefix cache"
    exact = 0
    for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        completion = out.outputs[0]
        assert completion.finish_reason == "length"
        chosen = [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs, strict=True)]
        hf_tokens, hf_lps = hf_greedy(hf_model, prompt, NUM_NEW)
        exact += compare_greedy(completion.token_ids, chosen, hf_tokens, hf_lps, f"{arch} prompt {i}")
    assert exact >= len(prompts) - 2, f"only {exact}/{len(prompts)} prompts matched HF exactly"


def test_prompt_logprobs_equal_hf(tiny_models):
    folder, hf_model = tiny_models["llama"]
    prompt = make_prompts(hf_model.config.vocab_size, seed=3)[4]
    llm = track(LLM(str(folder), dtype="float32", skip_tokenizer_init=True, block_size=4,
                    max_num_batched_tokens=16, max_model_len=256))
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, prompt_logprobs=2))[0]
    with torch.no_grad():
        ref = hf_model(torch.tensor([prompt])).logits[0].float().log_softmax(-1)  # [T, vocab]
    assert out.prompt_logprobs[0] is None
    assert len(out.prompt_logprobs) == len(prompt)
    for pos in range(1, len(prompt)):
        entry = out.prompt_logprobs[pos]
        assert abs(entry[prompt[pos]].logprob - float(ref[pos - 1, prompt[pos]])) < 1e-4
        assert len(entry) >= 2
