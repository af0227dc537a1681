"""The offline LLM API end to end: seeded sampling and batch invariance, n>1, stop conditions,
logprobs, input validation and load errors (tiny random models, token-id prompts), plus stop
strings, chat and special tokens with the bundled SmolLM2."""

from __future__ import annotations

import json
import random
import shutil

import pytest

from tandem import LLM, SamplingParams
from tandem.shared.models.errors import ModelLoadError, UnsupportedModelError
from tandem.shared.sampling_params import InvalidParameterError
from tests.conftest import track

EOS = 5
VOCAB = 384
MAX_LEN = 64


def tokens(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(6, VOCAB) for _ in range(length)]  # no eos in prompts


def P(ids: list[int]) -> dict:
    return {"prompt_token_ids": ids}


@pytest.fixture(scope="module")
def tiny_folder(tiny_models, tmp_path_factory):
    """The tiny llama, with eos id 5 (generation_config.json)."""
    src, _ = tiny_models["llama"]
    folder = tmp_path_factory.mktemp("api") / "llama-eos"
    shutil.copytree(src, folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    return folder


@pytest.fixture(scope="module")
def llm(tiny_folder):
    # A small budget and 4-token blocks: batches are chunked and mixed prefill/decode.
    return track(LLM(str(tiny_folder), dtype="float32", skip_tokenizer_init=True, block_size=4,
                     num_kv_blocks=128, max_model_len=MAX_LEN, max_num_batched_tokens=48))


def gen(llm: LLM, prompt: list[int], **params) -> list:
    """The token ids of each choice."""
    out = llm.generate(P(prompt), SamplingParams(**params))[0]
    return [c.token_ids for c in out.outputs]


SEEDED = dict(temperature=0.8, top_p=0.9, seed=7, max_tokens=12, ignore_eos=True)


# --- seeded sampling ------------------------------------------------------------------------------


def test_seeded_sampling_reproducible(llm):
    prompt = tokens(1, 9)
    first = gen(llm, prompt, **SEEDED)
    assert len(first[0]) == 12
    assert gen(llm, prompt, **SEEDED) == first


def test_seeded_sampling_batch_invariant(llm):
    prompt = tokens(1, 9)
    alone = llm.generate(P(prompt), SamplingParams(**SEEDED))[0].outputs[0].token_ids
    others = [P(tokens(100 + i, 3 + 4 * i)) for i in range(10)]
    other_params = [
        SamplingParams(temperature=1.0, max_tokens=4 + i, seed=(None if i % 2 else 1000 + i), ignore_eos=True)
        for i in range(10)
    ]
    prompts = others[:4] + [P(prompt)] + others[4:]
    params = other_params[:4] + [SamplingParams(**SEEDED)] + other_params[4:]
    outs = llm.generate(prompts, params)
    assert outs[4].outputs[0].token_ids == alone
    assert [o.prompt_token_ids for o in outs] == [p["prompt_token_ids"] for p in prompts]  # order kept
    # and once more, with the request first in a different batch
    outs = llm.generate([P(prompt)] + others[:3], [SamplingParams(**SEEDED)] + other_params[5:8])
    assert outs[0].outputs[0].token_ids == alone


def test_different_seeds_differ(llm):
    prompt = tokens(2, 7)
    a = gen(llm, prompt, **{**SEEDED, "seed": 7})
    b = gen(llm, prompt, **{**SEEDED, "seed": 8})
    assert a != b


def test_unseeded_sampling_varies(llm):
    prompt = tokens(3, 7)
    params = dict(temperature=1.0, max_tokens=12, ignore_eos=True)
    assert gen(llm, prompt, **params) != gen(llm, prompt, **params)


# --- n > 1 ----------------------------------------------------------------------------------------


def test_n_choices_seeded(llm):
    prompt = tokens(4, 10)
    out = llm.generate(P(prompt), SamplingParams(n=3, **SEEDED))[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    ids = [tuple(c.token_ids) for c in out.outputs]
    assert all(len(t) == 12 for t in ids)
    assert len(set(ids)) == 3
    assert all(c.finish_reason == "length" for c in out.outputs)
    assert out.finished
    again = llm.generate(P(prompt), SamplingParams(n=3, **SEEDED))[0]
    assert [tuple(c.token_ids) for c in again.outputs] == ids


def test_n_choices_greedy_equal(llm):
    prompt = tokens(5, 10)
    single = gen(llm, prompt, temperature=0, max_tokens=8, ignore_eos=True)[0]
    choices = gen(llm, prompt, n=3, temperature=0, max_tokens=8, ignore_eos=True)
    assert choices == [single] * 3


# --- stop conditions ------------------------------------------------------------------------------


def test_max_tokens(llm):
    out = llm.generate(P(tokens(6, 5)), SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    c = out.outputs[0]
    assert len(c.token_ids) == 5 and c.finish_reason == "length" and c.stop_reason is None
    assert c.text == ""  # no tokenizer


def test_eos_stops_and_min_tokens(llm):
    prompt = tokens(7, 6)
    force_eos = {EOS: 100.0}
    c = llm.generate(P(prompt), SamplingParams(temperature=0, max_tokens=8, logit_bias=force_eos))[0].outputs[0]
    assert c.token_ids == [EOS] and c.finish_reason == "stop" and c.stop_reason is None
    # eos is suppressed until min_tokens tokens exist, then it stops
    c = llm.generate(P(prompt), SamplingParams(temperature=0, max_tokens=8, min_tokens=3,
                                               logit_bias=force_eos))[0].outputs[0]
    assert len(c.token_ids) == 4 and EOS not in c.token_ids[:3] and c.token_ids[3] == EOS
    assert c.finish_reason == "stop"
    # ignore_eos: runs to max_tokens
    c = llm.generate(P(prompt), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True,
                                               logit_bias=force_eos))[0].outputs[0]
    assert c.token_ids == [EOS] * 6 and c.finish_reason == "length"


def test_stop_token_ids(llm):
    prompt = tokens(8, 6)
    greedy = gen(llm, prompt, temperature=0, max_tokens=8, ignore_eos=True)[0]
    stop_id = greedy[3]
    first = greedy.index(stop_id)
    c = llm.generate(P(prompt), SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]))[0].outputs[0]
    assert c.token_ids == greedy[: first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == stop_id
    # min_tokens suppresses stop token ids too
    c = llm.generate(P(prompt), SamplingParams(temperature=0, max_tokens=8, min_tokens=first + 2,
                                               stop_token_ids=[stop_id]))[0].outputs[0]
    assert stop_id not in c.token_ids[: first + 2]


def test_logprobs(llm):
    out = llm.generate(P(tokens(9, 6)), SamplingParams(temperature=0, max_tokens=4, logprobs=3,
                                                       ignore_eos=True))[0]
    c = out.outputs[0]
    assert len(c.logprobs) == 4
    total = 0.0
    for token_id, position in zip(c.token_ids, c.logprobs, strict=True):
        assert token_id in position
        assert position[token_id].rank == 1  # greedy picks the top token
        assert 3 <= len(position) <= 4
        top = sorted((lp for t, lp in position.items()), key=lambda lp: lp.rank)[:3]
        assert [lp.rank for lp in top] == [1, 2, 3]
        values = [lp.logprob for lp in top]
        assert values == sorted(values, reverse=True) and all(v <= 0 for v in values)
        total += position[token_id].logprob
    assert c.cumulative_logprob == pytest.approx(total)
    # sampled (non-top) tokens keep their true rank
    c = llm.generate(P(tokens(9, 6)), SamplingParams(temperature=2.0, seed=3, max_tokens=8, logprobs=0,
                                                     ignore_eos=True))[0].outputs[0]
    for token_id, position in zip(c.token_ids, c.logprobs, strict=True):
        assert list(position) == [token_id] and position[token_id].rank >= 1


def test_prompt_logprobs(llm):
    prompt = tokens(10, 11)
    out = llm.generate(P(prompt), SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))[0]
    assert len(out.prompt_logprobs) == len(prompt)
    assert out.prompt_logprobs[0] is None
    for token_id, position in zip(prompt[1:], out.prompt_logprobs[1:], strict=True):
        assert token_id in position and 2 <= len(position) <= 3
        assert position[token_id].logprob <= 0
    # again, now that the prompt is in the prefix cache: the same values (no cached skip)
    again = llm.generate(P(prompt), SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2))[0]
    for a, b in zip(out.prompt_logprobs[1:], again.prompt_logprobs[1:], strict=True):
        assert {t: lp.logprob for t, lp in a.items()} == pytest.approx({t: lp.logprob for t, lp in b.items()})


# --- prefix cache, stats --------------------------------------------------------------------------


def test_prefix_cache_hits_and_stats(llm):
    shared = tokens(11, 20)
    prompts = [shared + tokens(200 + i, 3 + i) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    cold = [o.outputs[0].token_ids for o in llm.generate([P(prompts[0])], params)]
    before = llm.stats()
    outs = llm.generate([P(p) for p in prompts], params)
    after = llm.stats()
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    assert hits > 0 and queries >= hits
    assert queries == sum(len(p) for p in prompts)
    assert outs[0].num_cached_tokens > 0
    assert outs[0].outputs[0].token_ids == cold[0]  # a cache hit computes the same tokens
    assert after.num_used_blocks == 0 and after.num_running == 0 and after.num_waiting == 0
    assert after.generation_tokens - before.generation_tokens == 4 * 6
    assert after.prompt_tokens - before.prompt_tokens == sum(len(p) for p in prompts)


def test_greedy_same_under_preemption(tiny_folder):
    """A pool that forces preemption gives the same greedy tokens as a roomy one."""
    prompts = [tokens(300 + i, 9 + 3 * i) for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, prompt_logprobs=1)
    tight = track(LLM(str(tiny_folder), dtype="float32", skip_tokenizer_init=True, block_size=4,
                      num_kv_blocks=16, max_model_len=MAX_LEN, max_num_batched_tokens=32))
    roomy = track(LLM(str(tiny_folder), dtype="float32", skip_tokenizer_init=True, block_size=4,
                      num_kv_blocks=256, max_model_len=MAX_LEN))
    tight_out = tight.generate([P(p) for p in prompts], params)
    assert tight.stats().num_preemptions > 0
    roomy_out = roomy.generate([P(p) for p in prompts], params)
    a = [o.outputs[0].token_ids for o in tight_out]
    b = [o.outputs[0].token_ids for o in roomy_out]
    assert a == b
    for x, y in zip(tight_out, roomy_out, strict=True):  # chunked + preempted prompt logprobs too
        assert len(x.prompt_logprobs) == len(y.prompt_logprobs) == len(x.prompt_token_ids)
        for px, py in zip(x.prompt_logprobs[1:], y.prompt_logprobs[1:], strict=True):
            expected = {t: v.logprob for t, v in py.items()}
            assert {t: v.logprob for t, v in px.items()} == pytest.approx(expected, abs=1e-5)
    # n > 1 on the tight pool: every choice equals the greedy answer
    out = tight.generate(P(prompts[-1]), SamplingParams(n=4, temperature=0, max_tokens=10, ignore_eos=True))[0]
    assert [c.token_ids for c in out.outputs] == [b[-1]] * 4


def test_unwritten_kv_slots_do_not_leak(tiny_folder):
    """The KV pool is torch.empty: never-written memory may hold anything, NaN included, and
    attention reads whole blocks (masking their unwritten tails). Such garbage, or stale finite
    values left by earlier requests, must never reach the output."""
    llm = track(LLM(str(tiny_folder), dtype="float32", skip_tokenizer_init=True, block_size=4, num_kv_blocks=32,
                    max_model_len=MAX_LEN, max_num_batched_tokens=32, enable_prefix_caching=False))
    prompts = [P(tokens(500 + i, 5 + 4 * i)) for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def run_on_fresh_pool_filled(value: float) -> list[list[int]]:
        for key_cache, value_cache in llm.engine.runner.kv_caches:
            key_cache.fill_(value)
            value_cache.fill_(value)
        llm.engine.runner.num_zeroed_blocks = 0  # as if the memory had never been used
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    clean = run_on_fresh_pool_filled(0.0)
    assert run_on_fresh_pool_filled(float("nan")) == clean
    assert run_on_fresh_pool_filled(1e30) == clean
    # Stale finite values from the runs above stay in the pages: still the same outputs.
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == clean


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=0), "max_tokens"),
        (dict(max_tokens=-1), "max_tokens"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_p=0.0), "top_p"),
        (dict(temperature=-0.1), "temperature"),
        (dict(n=0), "n"),
        (dict(min_tokens=5, max_tokens=2), "min_tokens"),
        (dict(logprobs=21), "logprobs"),
        (dict(stop_token_ids=[-1]), "stop_token_ids"),
    ],
)
def test_bad_sampling_params(kwargs, param):
    with pytest.raises(InvalidParameterError) as e:
        SamplingParams(**kwargs)
    assert e.value.param == param
    assert param in str(e.value)


def test_bad_requests_then_good_one(llm):
    prompt = tokens(12, 8)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    expected = llm.generate(P(prompt), params)[0].outputs[0].token_ids

    with pytest.raises(InvalidParameterError) as e:
        llm.generate(P(tokens(13, 80)), params)
    assert e.value.param == "prompt" and "80" in str(e.value) and str(MAX_LEN) in str(e.value)
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(P(tokens(13, MAX_LEN)), params)  # no room for one generated token
    assert e.value.param == "prompt"
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(P([]), params)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(P([1, VOCAB]), params)
    assert e.value.param == "prompt" and str(VOCAB) in str(e.value)
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(P([1, -2]), params)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(P([1, 2]), SamplingParams(stop_token_ids=[VOCAB + 1]))
    assert e.value.param == "stop_token_ids"
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(P([1, 2]), SamplingParams(logit_bias={VOCAB: 1.0}))
    assert e.value.param == "logit_bias"
    with pytest.raises(InvalidParameterError) as e:
        llm.generate(P([1, 2]), SamplingParams(stop=["x"]))  # no tokenizer to find it with
    assert e.value.param == "stop"
    with pytest.raises(InvalidParameterError) as e:
        llm.generate("text needs a tokenizer", params)
    assert e.value.param == "prompt"
    with pytest.raises(InvalidParameterError) as e:
        llm.generate([P([1, 2]), P([3, 4])], [params])
    assert e.value.param == "sampling_params"
    # one bad prompt in a batch: nothing of the batch is queued
    with pytest.raises(InvalidParameterError):
        llm.generate([P(prompt), P([])], params)
    stats = llm.stats()
    assert stats.num_waiting == 0 and stats.num_running == 0 and stats.num_used_blocks == 0

    assert llm.generate(P(prompt), params)[0].outputs[0].token_ids == expected


def test_interrupted_generate_frees_everything(llm, monkeypatch):
    """An exception mid-generate (e.g. KeyboardInterrupt) aborts the batch: no blocks, no
    requests left behind, and the engine keeps serving."""
    prompts = [P(tokens(400 + i, 6 + i)) for i in range(4)]
    params = SamplingParams(n=2, temperature=0, max_tokens=8, ignore_eos=True)
    expected = [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)]
    real_step = llm.engine.step
    calls = 0

    def flaky_step():
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return real_step()

    monkeypatch.setattr(llm.engine, "step", flaky_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(prompts, params)
    monkeypatch.undo()
    stats = llm.stats()
    assert stats.num_used_blocks == 0 and stats.num_running == 0 and stats.num_waiting == 0
    assert not llm.engine.has_unfinished() and not llm.processor.states
    assert [[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params)] == expected


# --- load errors ----------------------------------------------------------------------------------


def edited_copy(tiny_models, tmp_path, **changes):
    src, _ = tiny_models["llama"]
    folder = tmp_path / "edited"
    shutil.copytree(src, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_unknown_model_path(tmp_path):
    with pytest.raises(ModelLoadError) as e:
        LLM(str(tmp_path / "no-such-model"), skip_tokenizer_init=True)
    assert "no-such-model" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError):
        LLM(str(empty), skip_tokenizer_init=True)


def test_unsupported_architecture(tiny_models, tmp_path):
    folder = edited_copy(tiny_models, tmp_path, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(UnsupportedModelError) as e:
        LLM(str(folder), skip_tokenizer_init=True)
    assert "GPT2LMHeadModel" in str(e.value)


def test_mistral_sliding_window(tiny_models, tmp_path):
    folder = edited_copy(tiny_models, tmp_path, architectures=["MistralForCausalLM"], model_type="mistral",
                         sliding_window=32)
    with pytest.raises(UnsupportedModelError) as e:
        LLM(str(folder), skip_tokenizer_init=True, max_model_len=128)
    assert "sliding" in str(e.value)
    # a window at least as wide as the context is a no-op: accepted
    track(LLM(str(folder), skip_tokenizer_init=True, max_model_len=32, num_kv_blocks=8, dtype="float32"))


def test_unsupported_rope_type(tiny_models, tmp_path):
    folder = edited_copy(tiny_models, tmp_path, rope_scaling={"rope_type": "yarn", "factor": 4.0},
                         rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    with pytest.raises(UnsupportedModelError) as e:
        LLM(str(folder), skip_tokenizer_init=True)
    assert "yarn" in str(e.value)


def test_max_model_len_beyond_model(tiny_models):
    folder, _ = tiny_models["llama"]
    with pytest.raises(UnsupportedModelError):
        LLM(str(folder), skip_tokenizer_init=True, max_model_len=100_000)


# --- SmolLM2 (tokenizer) --------------------------------------------------------------------------

PROMPT = "The capital of France is"
GREEDY_LEN = 10


@pytest.fixture(scope="module")
def greedy_text(smollm2):
    out = smollm2.generate(PROMPT, SamplingParams(temperature=0, max_tokens=GREEDY_LEN))[0].outputs[0]
    assert len(out.text) > 12, out.text
    return out


def test_stop_strings(smollm2, greedy_text):
    text = greedy_text.text
    stop = text[6:10]  # a string the greedy output contains
    cut = text.index(stop)
    params = SamplingParams(temperature=0, max_tokens=GREEDY_LEN, stop=[stop, "@@@never"])
    c = smollm2.generate(PROMPT, params)[0].outputs[0]
    assert c.text == text[:cut]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == greedy_text.token_ids[: len(c.token_ids)]
    assert len(c.token_ids) < len(greedy_text.token_ids)
    c = smollm2.generate(PROMPT, SamplingParams(temperature=0, max_tokens=GREEDY_LEN, stop=stop,
                                                include_stop_str_in_output=True))[0].outputs[0]
    assert c.text == text[: cut + len(stop)]
    assert c.finish_reason == "stop" and c.stop_reason == stop
    # n > 1: each choice stops on its own
    out = smollm2.generate(PROMPT, SamplingParams(n=2, temperature=0, max_tokens=GREEDY_LEN, stop=[stop]))[0]
    assert [c.text for c in out.outputs] == [text[:cut]] * 2
    assert smollm2.stats().num_used_blocks == 0


def test_stop_token_id_not_in_text(smollm2, greedy_text):
    ids = greedy_text.token_ids
    stop_id = ids[3]
    params = SamplingParams(temperature=0, max_tokens=GREEDY_LEN, stop_token_ids=[stop_id])
    c = smollm2.generate(PROMPT, params)[0].outputs[0]
    n = ids.index(stop_id) + 1
    assert c.token_ids == ids[:n] and c.stop_reason == stop_id
    tok = smollm2.get_tokenizer()
    assert c.text == tok.decode(ids[: n - 1], skip_special_tokens=True)


def test_chat(smollm2):
    out = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_tokens=5))[0]
    assert out.outputs[0].text.strip()
    assert "<|im_start|>" in out.prompt  # rendered with the chat template
    assert out.prompt_token_ids.count(smollm2.get_tokenizer().convert_tokens_to_ids("<|im_start|>")) >= 2


def test_skip_special_tokens(smollm2):
    tok = smollm2.get_tokenizer()
    special = tok.convert_tokens_to_ids("<|im_start|>")
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    params = dict(temperature=0, max_tokens=2, logit_bias={special: 100.0})
    c = smollm2.generate(PROMPT, SamplingParams(**params))[0].outputs[0]
    assert c.token_ids == [special, special] and c.text == ""
    c = smollm2.generate(PROMPT, SamplingParams(**params, skip_special_tokens=False))[0].outputs[0]
    assert c.text == "<|im_start|><|im_start|>"
    # eos ends the request; it is not part of the text even when special tokens are shown
    c = smollm2.generate(PROMPT, SamplingParams(temperature=0, max_tokens=4, logit_bias={eos: 100.0},
                                                skip_special_tokens=False))[0].outputs[0]
    assert c.token_ids == [eos] and c.finish_reason == "stop" and c.text == ""


def test_logprobs_decoded(smollm2):
    c = smollm2.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3, logprobs=2))[0].outputs[0]
    tok = smollm2.get_tokenizer()
    for token_id, position in zip(c.token_ids, c.logprobs, strict=True):
        assert position[token_id].decoded_token == tok.decode([token_id])
