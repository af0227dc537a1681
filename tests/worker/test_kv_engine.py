"""Prefill -> decode through KVEngine in one process (engines stepped by the test, KV over real
sockets): for every architecture the disaggregated outputs equal the monolithic engine's token for
token, with 32 concurrent requests, prompts longer than the chunk size and shared prefixes; a decode
worker that already caches a prefix pulls fewer bytes; seeded sampling continues identically; both
workers end with zero used blocks."""

from __future__ import annotations

import random
import time

import pytest

from tandem.services.worker.kv_engine import KVEngine, KVTransferConfig, wait_idle
from tandem.shared.config import EngineConfig
from tandem.shared.engine.engine_core import EngineCore
from tandem.shared.sampling_params import InvalidParameterError, SamplingParams
from tandem.shared.wire.messages import AddRequestMsg, SeqOutput, params_to_wire
from tests.conftest import ARCHS, track

pytest.importorskip("zmq")

BS = 4
CHUNK = 24  # max_num_batched_tokens: most prompts are longer, so prefill is chunked


def engine_config(folder, **kw) -> EngineConfig:
    base = dict(model=str(folder), dtype="float32", block_size=BS, num_kv_blocks=600, max_num_batched_tokens=CHUNK,
                max_model_len=256, max_num_seqs=64)
    return EngineConfig(**{**base, **kw})


def workload(vocab: int, n: int = 32, seed: int = 0) -> list[list[int]]:
    """`n` prompts of 5..90 tokens; most start with one of 3 shared prefixes (some not block-aligned)."""
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, vocab) for _ in range(k)] for k in (17, 30, 9)]
    prompts = []
    for i in range(n):
        head = prefixes[i % 3] if i % 4 else []
        prompts.append(head + [rng.randrange(3, vocab) for _ in range(rng.randrange(5, 60))])
    return prompts


def run_monolithic(engine: EngineCore, prompts, params) -> dict[str, list[int]]:
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, params[i])
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].extend(out.new_token_ids)
    return tokens


def run_disaggregated(prefill: KVEngine, decode: KVEngine, prompts, params, timeout_s: float = 120.0):
    """The router's part: prompts to prefill (kv_export), handoffs to decode (kv_import), both
    stepped in turn as two workers would run; returns tokens per request and the outputs."""
    for i, p in enumerate(prompts):
        prefill.add_request(AddRequestMsg(f"r{i}", p, params_to_wire(params[i]), kv_export=True))
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    finished: set[str] = set()
    deadline = time.monotonic() + timeout_s
    outputs: list[SeqOutput] = []
    while len(finished) < len(prompts):
        assert time.monotonic() < deadline, "disaggregated run did not finish"
        for out in prefill.step().outputs:
            outputs.append(out)
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                finished.add(out.request_id)
            elif out.handoff is not None:
                i = int(out.request_id[1:])
                decode.add_request(AddRequestMsg(out.request_id, prompts[i], params_to_wire(params[i]),
                                                 kv_import=out.handoff))
        result = decode.step()
        assert not result.errors, result.errors
        for out in result.outputs:
            outputs.append(out)
            tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                finished.add(out.request_id)
        if not decode.has_work and not prefill.has_work:
            time.sleep(0.001)
    settle(prefill, decode)
    return tokens, outputs


def settle(*workers: KVEngine, timeout_s: float = 10.0) -> None:
    """Let released leases come back (the release reaches the prefill worker's KV server thread)."""
    deadline = time.monotonic() + timeout_s
    while any(w.engine.kv.pool.num_used_blocks or w.busy for w in workers) and time.monotonic() < deadline:
        for w in workers:
            w.step()
        time.sleep(0.002)


@pytest.fixture
def kv_pair(request):
    made = []

    def make(folder, transport="zmq", policy="recompute", bind="tcp://127.0.0.1:0", **engine_kw):
        workers = []
        for role in ("prefill", "decode"):
            engine = track(EngineCore(engine_config(folder, **engine_kw)))
            addr = bind.replace("ROLE", role)
            w = KVEngine(engine, KVTransferConfig(transport=transport, bind_addr=addr, failure_policy=policy,
                                                  pull_timeout_s=5.0), engine_id=role)
            made.append(w)
            workers.append(w)
        return workers

    yield make
    for w in made:
        w.close()


@pytest.mark.parametrize("arch", ARCHS)
def test_disaggregated_equals_monolithic(arch, tiny_models, kv_pair):
    folder = tiny_models[arch][0]
    mono = track(EngineCore(engine_config(folder)))
    prefill, decode = kv_pair(folder)
    vocab = mono.model_config.vocab_size
    prompts = workload(vocab)
    params = [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True) for _ in prompts]
    params[3] = SamplingParams(max_tokens=10, temperature=0.9, seed=7, ignore_eos=True)  # seeded: same draws
    params[5] = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)  # ends on the prefill worker
    want = run_monolithic(mono, prompts, params)
    got, outputs = run_disaggregated(prefill, decode, prompts, params)
    assert got == want
    handoffs = [o.handoff for o in outputs if o.handoff is not None]
    assert len(handoffs) == len(prompts) - 1  # r5 finished with its first token
    assert max(h.num_tokens for h in handoffs) > CHUNK
    ds = decode.stats
    assert ds.pulls == len(handoffs) and ds.failed_pulls == 0 and ds.bytes_pulled > 0
    # Every pull's time is split into its phases (connect, header, frames, landing).
    assert set(ds.phase_seconds) == {"connect", "header", "frames", "landing"}
    assert sum(ds.phase_seconds.values()) == pytest.approx(ds.transfer_seconds_sum, rel=1e-6)
    assert prefill.stats.released_leases == len(handoffs) and len(prefill.leases) == 0
    for w in (prefill, decode):
        assert w.engine.kv.pool.num_used_blocks == 0


def test_a_cached_prefix_is_not_pulled_again(tiny_models, kv_pair):
    folder = tiny_models["llama"][0]
    prefill, decode = kv_pair(folder)
    prompts = workload(prefill.engine.model_config.vocab_size, n=8, seed=1)
    params = [SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True) for _ in prompts]
    run_disaggregated(prefill, decode, prompts, params)
    first = (decode.stats.bytes_pulled, decode.stats.blocks_pulled)
    got, _ = run_disaggregated(prefill, decode, prompts, params)  # the same prompts again
    second = (decode.stats.bytes_pulled - first[0], decode.stats.blocks_pulled - first[1])
    # Only each prompt's trailing partial block travels; the full blocks are decode's own cache hits.
    partial = sum(1 for p in prompts if len(p) % BS)
    assert second[1] == partial and second[0] < first[0] / 3
    assert decode.stats.local_hit_blocks >= sum(len(p) // BS for p in prompts)


@pytest.mark.parametrize("transport", ["zmq-ipc", "socket-tcp", "socket-unix", "ucx"])
def test_other_transports(transport, tiny_models, kv_pair, tmp_path):
    if transport == "ucx":
        pytest.importorskip("ucxx")
        kw = dict(transport="ucx", bind="ucx://127.0.0.1:0")
    elif transport == "socket-tcp":
        kw = dict(transport="socket")
    elif transport == "socket-unix":
        kw = dict(transport="socket", bind=f"ipc://{tmp_path}/ROLE.kv")
    else:
        kw = dict(bind=f"ipc://{tmp_path}/ROLE.kv")
    folder = tiny_models["qwen3"][0]
    mono = track(EngineCore(engine_config(folder)))
    prefill, decode = kv_pair(folder, **kw)
    prompts = workload(mono.model_config.vocab_size, n=12, seed=2)
    params = [SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True) for _ in prompts]
    got, _ = run_disaggregated(prefill, decode, prompts, params)
    assert got == run_monolithic(mono, prompts, params)
    assert decode.stats.pulls == len(prompts) and decode.stats.failed_pulls == 0


def test_bad_imports_are_refused_by_field(tiny_models, kv_pair):
    folder = tiny_models["llama"][0]
    prefill, decode = kv_pair(folder)
    params = params_to_wire(SamplingParams(max_tokens=3, temperature=0.0))
    prefill.add_request(AddRequestMsg("a", [5, 6, 7, 8, 9], params, kv_export=True))
    handoff = wait_idle(prefill).outputs[0].handoff
    with pytest.raises(InvalidParameterError) as err:
        decode.add_request(AddRequestMsg("a", [5, 6, 7], params, kv_import=handoff))
    assert err.value.param == "kv_import"
    with pytest.raises(InvalidParameterError) as err:
        decode.add_request(AddRequestMsg("a", [5, 6, 7, 8, 9], params, kv_export=True, kv_import=handoff))
    assert err.value.param == "kv_export"
    bad_first = type(handoff)(**{**handoff.__dict__, "first_token": 10**9})
    with pytest.raises(InvalidParameterError) as err:
        decode.add_request(AddRequestMsg("a", [5, 6, 7, 8, 9], params, kv_import=bad_first))
    assert err.value.param == "first_token"
    decode.add_request(AddRequestMsg("a", [5, 6, 7, 8, 9], params, kv_import=handoff))  # the good one
    assert len(wait_idle(decode).outputs) == 2
    settle(prefill, decode)


@pytest.mark.parametrize("policy", ["recompute", "fail"])
def test_failed_pulls_recompute_over_local_hits_or_fail(policy, tiny_models, kv_pair):
    """The prefill worker's KV server is gone after its handoffs: decode recomputes (reusing the
    prefix blocks it caches from an earlier round) and still equals the monolithic engine, or
    fails each request with an error naming the transfer; no block stays allocated."""
    folder = tiny_models["llama"][0]
    mono = track(EngineCore(engine_config(folder)))
    prefill, decode = kv_pair(folder, policy=policy)
    prompts = workload(mono.model_config.vocab_size, n=12, seed=4)
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True) for _ in prompts]
    want = run_monolithic(mono, prompts, params)
    first = run_disaggregated(prefill, decode, prompts[:6], params[:6])[0]
    assert first == {f"r{i}": want[f"r{i}"] for i in range(6)}

    for i, p in enumerate(prompts):
        prefill.add_request(AddRequestMsg(f"s{i}", p, params_to_wire(params[i]), kv_export=True))
    handoffs = [o.handoff for o in wait_idle(prefill).outputs]
    prefill.server.close()  # the prefill worker's KV server dies after its replies
    pulls_before = decode.stats.pulls
    for h in handoffs:
        i = int(h.request_id[1:])
        decode.add_request(AddRequestMsg(h.request_id, prompts[i], params_to_wire(params[i]), kv_import=h))
    result = wait_idle(decode)
    tokens = {f"s{i}": [h.first_token] for i, h in enumerate(handoffs)}
    for out in result.outputs:
        tokens[out.request_id].extend(out.new_token_ids)
    if policy == "recompute":
        assert not result.errors
        assert tokens == {f"s{i}": want[f"r{i}"] for i in range(len(prompts))}
        # A prompt of whole blocks that decode caches entirely needs no pull: it is "pulled" at once.
        assert decode.stats.recomputed_handoffs + decode.stats.pulls - pulls_before == len(prompts)
        assert decode.stats.recomputed_handoffs >= len(prompts) // 2
    else:
        assert len(result.errors) >= len(prompts) // 2
        assert all(e.code == 502 and "peer_gone" in e.message for e in result.errors)
    assert decode.engine.kv.pool.num_used_blocks == 0
    prefill.engine.free_blocks(prefill.producer.leases.expire_due(float("inf")))  # nobody will release them


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("transport", ["zmq", "socket", "ucx", "ucx-host"])
def test_cuda_disaggregated_equals_monolithic(transport, tiny_models, kv_pair, monkeypatch):
    """Engines on the GPU (Triton path, CUDA graphs, caches in one allocation): KV staged through pinned
    memory (zmq, socket, ucx-host) or device memory (ucx); outputs equal the monolithic engine's."""
    kw = {}
    if transport.startswith("ucx"):
        pytest.importorskip("ucxx")
        monkeypatch.setenv("TANDEM_UCX_DEVICE_MEMORY", "0" if transport == "ucx-host" else "1")
        kw = dict(transport="ucx", bind="ucx://127.0.0.1:0")
    elif transport == "socket":
        kw = dict(transport="socket")
    folder = tiny_models["llama"][0]
    mono = track(EngineCore(engine_config(folder, device="cuda")))
    prefill, decode = kv_pair(folder, device="cuda", **kw)
    prompts = workload(mono.model_config.vocab_size, n=16, seed=3)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True) for _ in prompts]
    got, _ = run_disaggregated(prefill, decode, prompts, params)
    assert got == run_monolithic(mono, prompts, params)
    assert decode.stats.pulls == len(prompts) and decode.stats.failed_pulls == 0 and decode.stats.bytes_pulled > 0
    for w in (prefill, decode):
        assert w.engine.kv.pool.num_used_blocks == 0
