"""The bundled SmolLM2-135M-Instruct GGUF: our greedy outputs, logprobs and tokenizer equal HF
transformers' loading the same GGUF itself (fp32, CPU)."""

from __future__ import annotations

import pytest
import torch

from tandem import LLM, SamplingParams
from tandem.shared.models.hf_folder import default_model_path
from tests.conftest import track
from tests.engine.test_hf_parity import compare_greedy

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "Water boils at",
    "Here is a list of three fruits:",
]
CHATS = [
    [{"role": "user", "content": "What is the tallest mountain in the world?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a primary color."}],
]
NUM_NEW = 24


@pytest.fixture(scope="module")
def hf():
    import transformers

    path = default_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return tok, model.eval()


@pytest.fixture(scope="module")
def llm():
    return track(LLM(dtype="float32", max_model_len=512))


def hf_greedy(model, ids: list[int], num_new: int):
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=num_new, do_sample=False,
                         output_scores=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[0, len(ids):].tolist(), [s[0].float().log_softmax(-1) for s in out.scores]


def check(llm, hf_model, prompts_ids, outputs):
    for ids, out in zip(prompts_ids, outputs, strict=True):
        c = out.outputs[0]
        hf_tokens, hf_lps = hf_greedy(hf_model, ids, len(c.token_ids))
        # HF stops at eos too; compare the common length (ours stops at the same eos when equal).
        assert len(hf_tokens) >= len(c.token_ids)
        chosen = [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs, strict=True)]
        compare_greedy(c.token_ids, chosen, hf_tokens[: len(c.token_ids)], hf_lps, repr(out.prompt))


def test_tokenizer_equals_hf(llm, hf):
    tok, _ = hf
    for text in PROMPTS + ["naïve café — 東京 🙂 \n\n  spaces", "<|im_start|>user"]:
        assert llm.get_tokenizer()(text).input_ids == tok(text).input_ids
    assert llm.render_chat(CHATS[0]) == tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)


def test_text_prompts_greedy_equal_hf(llm, hf):
    tok, model = hf
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, logprobs=1)
    outputs = llm.generate(PROMPTS, params)
    check(llm, model, [tok(p).input_ids for p in PROMPTS], outputs)
    assert all(o.outputs[0].text for o in outputs)
    assert outputs[0].outputs[0].text == tok.decode(outputs[0].outputs[0].token_ids, skip_special_tokens=True)


def test_chat_greedy_equal_hf(llm, hf):
    tok, model = hf
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW, logprobs=1)
    outputs = llm.chat(CHATS, params)
    ids = [tok.apply_chat_template(c, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
           for c in CHATS]
    assert [o.prompt_token_ids for o in outputs] == ids
    check(llm, model, ids, outputs)
