"""load_format="dummy": a folder holding only config.json builds the model with random weights."""

from __future__ import annotations

from tandem import LLM, SamplingParams
from tests.conftest import tiny_hf_config, track


def test_dummy_weights_from_config_only(tmp_path):
    tiny_hf_config("llama").save_pretrained(tmp_path)  # config.json only, no weights
    assert not list(tmp_path.glob("*.safetensors"))
    llm = track(LLM(str(tmp_path), load_format="dummy", dtype="float32", skip_tokenizer_init=True,
                    max_model_len=128, num_kv_blocks=32))
    out = llm.generate({"prompt_token_ids": [1, 2, 3, 4]}, SamplingParams(temperature=0, max_tokens=5,
                                                                          ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 5
    assert all(0 <= t < 384 for t in out.outputs[0].token_ids)
