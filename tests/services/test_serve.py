"""`tandem serve` end to end: a real server process (bundled SmolLM2, float32) driven with the
official `openai` client. Results equal the offline LLM's for the same parameters; streaming,
n=2, stop strings, logprobs, usage, seeds; errors in OpenAI's envelope; auth; tokenize;
metrics; 64 concurrent streams; a client disconnect frees its blocks."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

from tandem import SamplingParams  # noqa: E402
from tests.services.conftest import ServerProcess, metrics, wait_blocks_free  # noqa: E402

KEY = "test-key-123"
MODEL = "smollm2"
MAX_LEN = 1024
PROMPT = "The capital of France is"
CHAT = [{"role": "user", "content": "Name three fruits."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = ServerProcess(
        ["--dtype", "float32", "--max-model-len", str(MAX_LEN), "--served-model-name", MODEL, "other-name",
         "--kv-cache-memory", "512MiB", "--api-key", KEY],
        log,
    )
    try:
        srv.wait_healthy()
        yield srv
        wait_blocks_free(srv.url)  # after every test of the module: no request, no block left
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def offline_completion(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**params))[0]


def offline_chat(llm, messages, **params):
    return llm.chat(messages, SamplingParams(**params))[0]


# --- endpoints --------------------------------------------------------------------------------------


def test_models_health_version(server, client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "other-name"]
    assert models.data[0].max_model_len == MAX_LEN
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_tokenize_detokenize(server, smollm2):
    tok = smollm2.get_tokenizer()
    r = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": PROMPT}).json()
    assert r["tokens"] == tok(PROMPT).input_ids and r["count"] == len(r["tokens"]) and r["max_model_len"] == MAX_LEN
    r2 = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": r["tokens"]}).json()
    assert r2["prompt"] == tok.decode(r["tokens"])
    chat = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "messages": CHAT}).json()
    assert chat["tokens"] == tok(smollm2.render_chat(CHAT), add_special_tokens=False).input_ids
    bad = httpx.post(f"{server.url}/detokenize", json={"model": MODEL, "tokens": [10**9]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# --- parity with the offline API --------------------------------------------------------------------


def test_completion_matches_offline(client, smollm2):
    expected = offline_completion(smollm2, PROMPT, temperature=0, max_tokens=16)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0)
    assert r.choices[0].text == expected.outputs[0].text
    assert r.choices[0].finish_reason == expected.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_completion_stream_matches_offline(client, smollm2):
    expected = offline_completion(smollm2, PROMPT, temperature=0, max_tokens=16)
    chunks = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == expected.outputs[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == len(expected.prompt_token_ids)


def test_chat_matches_offline(client, smollm2):
    expected = offline_chat(smollm2, CHAT, temperature=0, max_tokens=24)
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_completion_tokens=24, temperature=0)
    assert r.choices[0].message.content == expected.outputs[0].text
    assert r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert r.usage.completion_tokens == len(expected.outputs[0].token_ids)

    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.outputs[0].text
    assert chunks[-1].usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_n2_seeded_sampling_is_reproducible(client, smollm2):
    params = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=12)
    expected = [c.text for c in offline_chat(smollm2, CHAT, n=2, **params).outputs]
    r1 = client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=12, temperature=0.9, top_p=0.95,
                                        seed=1234, extra_body={"top_k": 50})
    assert [c.message.content for c in sorted(r1.choices, key=lambda c: c.index)] == expected
    assert expected[0] != expected[1]
    chunks = list(client.chat.completions.create(model=MODEL, messages=CHAT, n=2, max_tokens=12, temperature=0.9,
                                                 top_p=0.95, seed=1234, extra_body={"top_k": 50}, stream=True))
    texts = ["", ""]
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
    assert texts == expected


def test_completion_extras_match_offline(client, smollm2):
    """vLLM's extra fields pass through: penalties, min_p, logit_bias, min_tokens, ignore_eos."""
    params = dict(temperature=0.7, seed=3, min_p=0.05, repetition_penalty=1.2, presence_penalty=0.5,
                  frequency_penalty=0.3, logit_bias={"11": -100.0}, min_tokens=4, max_tokens=10, ignore_eos=True)
    bias = {int(k): v for k, v in params["logit_bias"].items()}
    expected = offline_completion(smollm2, PROMPT, **{**params, "logit_bias": bias})
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0.7, seed=3, presence_penalty=0.5, frequency_penalty=0.3,
        logit_bias={"11": -100}, max_tokens=10,
        extra_body={"min_p": 0.05, "repetition_penalty": 1.2, "min_tokens": 4, "ignore_eos": True},
    )
    assert r.choices[0].text == expected.outputs[0].text
    assert r.usage.completion_tokens == 10


def test_stop_strings(client, smollm2):
    full = offline_completion(smollm2, PROMPT, temperature=0, max_tokens=24).outputs[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop.strip(), full
    for include in (False, True):
        expected = offline_completion(smollm2, PROMPT, temperature=0, max_tokens=24, stop=[stop, "@@@@"],
                                      include_stop_str_in_output=include).outputs[0]
        assert expected.finish_reason == "stop" and expected.stop_reason == stop
        extra = {"include_stop_str_in_output": include}
        r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                      stop=[stop, "@@@@"], extra_body=extra)
        assert r.choices[0].text == expected.text
        assert r.choices[0].finish_reason == "stop"
        assert r.choices[0].model_extra["stop_reason"] == stop
        chunks = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=0,
                                           stop=[stop, "@@@@"], stream=True, extra_body=extra)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected.text


def test_stop_token_ids(client, smollm2):
    ids = offline_completion(smollm2, PROMPT, temperature=0, max_tokens=12).outputs[0].token_ids
    expected = offline_completion(smollm2, PROMPT, temperature=0, max_tokens=12, stop_token_ids=[ids[3]]).outputs[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"stop_token_ids": [ids[3]]})
    assert r.choices[0].text == expected.text and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == ids[3]


def test_chat_logprobs(client, smollm2):
    expected = offline_chat(smollm2, CHAT, temperature=0, max_tokens=8, logprobs=3).outputs[0]
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(expected.token_ids) == 8
    for entry, token_id, position in zip(content, expected.token_ids, expected.logprobs):
        assert entry.logprob == pytest.approx(position[token_id].logprob, abs=1e-4)
        assert entry.token == position[token_id].decoded_token
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the chosen token ranks first
        assert entry.bytes == list(entry.token.encode())
    streamed = []
    for c in client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                            top_logprobs=3, stream=True):
        if c.choices and c.choices[0].logprobs:
            streamed.extend(c.choices[0].logprobs.content)
    assert [e.token for e in streamed] == [e.token for e in content]


def test_completion_logprobs_with_echo(client, smollm2):
    expected = offline_completion(smollm2, PROMPT, temperature=0, max_tokens=5, logprobs=2, prompt_logprobs=2)
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=2, echo=True)
    choice = r.choices[0]
    n_prompt = len(expected.prompt_token_ids)
    assert choice.text == PROMPT + expected.outputs[0].text
    lp = choice.logprobs
    assert len(lp.tokens) == n_prompt + 5 and lp.token_logprobs[0] is None
    for got, token_id, position in zip(lp.token_logprobs[n_prompt:], expected.outputs[0].token_ids,
                                       expected.outputs[0].logprobs):
        assert got == pytest.approx(position[token_id].logprob, abs=1e-4)
    prompt_expected = [p[t].logprob for t, p in zip(expected.prompt_token_ids[1:], expected.prompt_logprobs[1:])]
    assert lp.token_logprobs[1:n_prompt] == pytest.approx(prompt_expected, abs=1e-4)
    assert all(2 <= len(top) <= 3 for top in lp.top_logprobs[n_prompt:])
    assert lp.text_offset[n_prompt] == len("".join(lp.tokens[:n_prompt]))


def test_several_prompts_and_token_ids(client, smollm2):
    prompts = [PROMPT, "Once upon a time"]
    expected = [o.outputs[0].text for o in smollm2.generate(prompts, SamplingParams(temperature=0, max_tokens=8))]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=8, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == expected
    ids = smollm2.get_tokenizer()(PROMPT).input_ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=8, temperature=0)
    assert r.choices[0].text == expected[0]
    assert r.usage.prompt_tokens == len(ids)


# --- errors -----------------------------------------------------------------------------------------


def _post(server, path, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def test_bad_parameters_are_400_with_param(server, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
    assert e.value.status_code == 400 and e.value.body["param"] == "temperature"
    r = _post(server, "/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True,
                                               "top_logprobs": 50})
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": "two"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "n" and err["type"] == "invalid_request_error"
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "logit_bias": {"x": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias"
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": [10**9]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    r = httpx.post(f"{server.url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()


def test_too_long_prompt_names_the_numbers(server, client, smollm2):
    long_prompt = "hello " * 1500
    num_tokens = len(smollm2.get_tokenizer()(long_prompt).input_ids)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=4)
    message = e.value.body["message"]
    assert "1024" in message and str(num_tokens) in message
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1020)
    assert e.value.body["code"] == "context_length_exceeded" and "1020" in e.value.body["message"]


def test_huge_body_is_not_echoed(server):
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "stop": [{"x": "A" * 200_000}] * 5})
    assert r.status_code == 400
    assert len(r.text) < 2000 and "AAAA" not in r.text


def test_oversized_body_is_413_and_n_is_capped(server, client):
    from tandem.services.openai.api import MAX_BODY_BYTES
    from tandem.services.openai.serving import MAX_N

    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    big = b'{"model": "x", "prompt": "' + b"a" * (MAX_BODY_BYTES + 10) + b'"}'
    r = httpx.post(f"{server.url}/v1/completions", content=big, headers=headers, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: refused once the stream passes the limit
        for _ in range(MAX_BODY_BYTES // (1 << 20) + 2):
            yield b"a" * (1 << 20)

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), headers=headers, timeout=60)
    assert r.status_code == 413
    r = _post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "n": MAX_N + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices  # still serving


def test_auth_and_unknown_model(server):
    for key in (None, "wrong-key"):
        r = _post(server, "/v1/completions", {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}, key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()
    r = _post(server, "/v1/completions", {"model": "gpt-4", "prompt": PROMPT})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(server, "/v1/completions", {"model": "other-name", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == MODEL


# --- load, disconnects, metrics --------------------------------------------------------------------------


def test_64_concurrent_streams(server, smollm2):
    prompts = [f"Fact number {i}: the {['sun', 'moon', 'sea', 'sky'][i % 4]} is" for i in range(64)]
    expected = [o.outputs[0].text for o in smollm2.generate(prompts, SamplingParams(temperature=0, max_tokens=12))]

    async def all_of() -> list[str]:
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=300) as ac:

            async def one(prompt: str) -> str:
                stream = await ac.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                     stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])

            return await asyncio.gather(*(one(p) for p in prompts))

    t0 = time.monotonic()
    got = asyncio.run(all_of())
    elapsed = time.monotonic() - t0
    assert got == expected, f"{sum(a != b for a, b in zip(got, expected))} of 64 differ"
    print(f"64 concurrent streams x 12 tokens: {elapsed:.1f} s")
    m = wait_blocks_free(server.url)
    assert m["tandem:request_success_total{finished_reason=\"length\"}"] >= 64


def test_disconnect_mid_stream_frees_blocks(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{server.url}/v1/completions", json=body, headers=headers) as r:
            lines = r.iter_lines()
            data = []
            for line in lines:
                if line.startswith("data:"):
                    data.append(json.loads(line[5:]))
                    if len(data) == 3:
                        break
            during = metrics(server.url)
            assert during["tandem:num_requests_running"] == 1 and during["tandem:kv_cache_used_blocks"] > 0
        # leaving the block closes the connection mid-stream
    after = wait_blocks_free(server.url, timeout_s=10)
    assert after["tandem:request_success_total{finished_reason=\"abort\"}"] >= 1


def test_disconnect_while_waiting_for_a_full_response(server):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(10, read=1.5))
    wait_blocks_free(server.url, timeout_s=10)


def test_metrics_names(server, client):
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0)
    m = metrics(server.url)
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "kv_cache_used_blocks",
                 "prefix_cache_queries_total", "prefix_cache_hits_total", "prompt_tokens_total",
                 "generation_tokens_total", "num_preemptions_total", "time_to_first_token_seconds_count",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count"):
        assert f"tandem:{name}" in m, name
    assert m["tandem:prefix_cache_hits_total"] > 0  # the same prompt ran many times
    assert m["tandem:generation_tokens_total"] >= 2 and m["tandem:time_to_first_token_seconds_count"] >= 1
