"""Prefill and decode workers as real processes (`tandem worker --role ...`), driven over their
request sockets as the router drives them: outputs equal the monolithic engine's; /health and
/metrics answer; and the fault cases — prefill killed after its reply, a delayed or dropped
transfer, an expired lease, an abort mid-transfer — end in a correct output (recompute) or a clear
error (fail), with both workers back to zero used blocks."""

from __future__ import annotations

import dataclasses
import time

import httpx
import pytest

from tandem.shared.config import EngineConfig
from tandem.shared.engine.engine_core import EngineCore
from tandem.shared.sampling_params import SamplingParams
from tests.conftest import track
from tests.worker.conftest import (
    DriveResult,
    TcpProxy,
    decode_all,
    drive,
    metric,
    prefill_all,
    wait_decoded,
)
from tests.worker.test_kv_engine import run_monolithic, workload


@pytest.fixture(scope="module")
def model(tiny_models):
    return tiny_models["llama"][0]


@pytest.fixture(scope="module")
def expected(model):
    """Monolithic greedy outputs of the shared workload (the in-process engine, same settings)."""
    engine = track(EngineCore(EngineConfig(model=str(model), dtype="float32", block_size=4,
                                           max_num_batched_tokens=24, max_model_len=256, num_kv_blocks=800)))
    prompts = workload(engine.model_config.vocab_size, n=32, seed=3)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True) for _ in prompts]
    return prompts, params, run_monolithic(engine, prompts, params)


def eventually(check, timeout_s: float = 3.0) -> bool:
    """/metrics is a snapshot the worker refreshes a few times a second."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def assert_idle(*workers) -> None:
    for w in workers:
        s = w.client.wait_idle(timeout_s=20)
        assert s.num_used_blocks == 0 and s.num_running == 0 and s.num_waiting == 0, (w.info["role"], s)


@pytest.mark.parametrize("transport", ["zmq", "socket", "ucx"])
def test_prefill_then_decode_equals_monolithic(transport, model, expected, workers):
    if transport == "ucx":
        pytest.importorskip("ucxx")
    prompts, params, want = expected
    args = ("--kv-transport", transport)
    prefill = workers("prefill", model, *args)
    decode = workers("decode", model, *args)
    for w, role in ((prefill, "prefill"), (decode, "decode")):
        ready = w.client.hello()
        assert ready.role == role and ready.block_size == 4 and ready.kv_addr == w.info["kv_addr"]
        health = httpx.get(w.http + "/health", timeout=5)
        assert health.status_code == 200 and health.json()["role"] == role
    assert prefill.info["compat_hash"] == decode.info["compat_hash"]

    result = drive(prefill, decode, prompts, params)  # 32 concurrent requests
    assert not result.errors and result.tokens == want
    assert max(h.num_tokens for h in result.handoffs.values()) > 24  # chunked on the prefill worker
    assert_idle(prefill, decode)

    text = httpx.get(decode.http + "/metrics", timeout=5).text
    first_bytes = metric(text, "tandem:kv_transfer_bytes_total")
    assert metric(text, "tandem:kv_transfer_pulls_total") == len(prompts) and first_bytes > 0
    assert metric(text, "tandem:kv_transfer_seconds_count") == len(prompts)
    phases = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("tandem:kv_transfer_phase_seconds_total{")]
    assert len(phases) == 4 and sum(phases) == pytest.approx(metric(text, "tandem:kv_transfer_seconds_sum"), rel=1e-3)
    assert eventually(lambda: metric(httpx.get(decode.http + "/metrics").text, "tandem:kv_cache_used_blocks") == 0)
    prefill_text = httpx.get(prefill.http + "/metrics", timeout=5).text
    assert metric(prefill_text, "tandem:kv_leases_released_total") == len(prompts)

    # Again: decode now caches the prompts' full blocks, so only the partial tail blocks travel.
    again = drive(prefill, decode, prompts, params)
    assert again.tokens == want
    text = httpx.get(decode.http + "/metrics", timeout=5).text
    assert metric(text, "tandem:kv_transfer_bytes_total") - first_bytes < first_bytes / 3
    assert metric(text, "tandem:kv_transfer_local_hit_blocks_total") >= sum(len(p) // 4 for p in prompts)
    assert_idle(prefill, decode)


def test_prefill_killed_before_the_pull(model, expected, workers):
    """Recompute: every output is still right. Fail: every request gets a clear error."""
    prompts, params, want = expected
    n = 8
    prefill = workers("prefill", model)
    recompute = workers("decode", model)
    failing = workers("decode", model, "--kv-failure-policy", "fail", "--kv-pull-timeout", "2")
    result = DriveResult()
    prefill_all(prefill, prompts[:n], params[:n], result)
    assert len(result.handoffs) == n
    prefill.kill()  # after its reply, before any pull

    decode_all(recompute, prompts, params, result, list(result.handoffs.values())[: n // 2])
    failed = DriveResult(tokens={k: [] for k in result.tokens})
    decode_all(failing, prompts, params, failed, list(result.handoffs.values())[n // 2:])
    for rid in list(result.handoffs)[: n // 2]:
        assert result.tokens[rid] == want[rid] and result.finish[rid] == "length"
    assert set(failed.errors) == set(list(result.handoffs)[n // 2:])
    for error in failed.errors.values():
        assert error.code == 502 and "KV transfer" in error.message and "peer_gone" in error.message
    text = httpx.get(recompute.http + "/metrics", timeout=5).text
    assert metric(text, "tandem:kv_transfer_recomputed_handoffs_total") == n // 2
    assert metric(text, "tandem:kv_transfer_failures_total") == n // 2
    assert_idle(recompute, failing)


@pytest.mark.parametrize("fault", ["delayed", "dropped"])
def test_delayed_or_dropped_transfer_recomputes(fault, model, expected, workers):
    prompts, params, want = expected
    n = 6
    # A lease nobody can release (the network is broken both ways) frees at its expiry + grace.
    prefill = workers("prefill", model, "--kv-lease-ttl", "3", "--kv-pull-timeout", "2")
    decode = workers("decode", model, "--kv-pull-timeout", "1")
    proxy = TcpProxy(prefill.info["kv_addr"], delay_s=3.0, drop=fault == "dropped")
    try:
        result = DriveResult()
        prefill_all(prefill, prompts[:n], params[:n], result)
        decode_all(decode, prompts, params, result, result.handoffs.values(),
                   rewrite=lambda h: dataclasses.replace(h, kv_addr=proxy.address))
        assert not result.errors
        for rid in result.handoffs:
            assert result.tokens[rid] == want[rid]
        text = httpx.get(decode.http + "/metrics", timeout=5).text
        assert metric(text, "tandem:kv_transfer_recomputed_handoffs_total") == n
        assert proxy.connections >= 1
        # Prefill's leases were released (a release that got through) or expired.
        assert_idle(prefill, decode)
    finally:
        proxy.close()


def test_expired_lease_recomputes_and_frees_prefill_blocks(model, expected, workers):
    prompts, params, want = expected
    n = 4
    prefill = workers("prefill", model, "--kv-lease-ttl", "0.5", "--kv-pull-timeout", "1")
    decode = workers("decode", model)
    result = DriveResult()
    prefill_all(prefill, prompts[:n], params[:n], result)
    assert prefill.client.stats().num_used_blocks > 0  # held by the leases
    time.sleep(1.0)  # the leases expire before decode ever asks
    decode_all(decode, prompts, params, result, result.handoffs.values())
    for rid in result.handoffs:
        assert result.tokens[rid] == want[rid]
    assert_idle(prefill, decode)  # freed after the grace, nobody released them
    def expired():
        return metric(httpx.get(prefill.http + "/metrics", timeout=5).text, "tandem:kv_leases_expired_total")
    assert eventually(lambda: expired() == n), expired()
    text = httpx.get(decode.http + "/metrics", timeout=5).text
    assert metric(text, "tandem:kv_transfer_recomputed_handoffs_total") == n


def test_abort_mid_transfer_frees_both_sides(model, expected, workers):
    prompts, params, want = expected
    prefill = workers("prefill", model)
    decode = workers("decode", model, "--kv-pull-timeout", "5")
    proxy = TcpProxy(prefill.info["kv_addr"], delay_s=1.5)
    try:
        result = DriveResult()
        prefill_all(prefill, prompts[:3], params[:3], result)
        handoffs = list(result.handoffs.values())
        for h in handoffs:
            i = int(h.request_id[1:])
            decode.client.add(h.request_id, prompts[i], params[i],
                              kv_import=dataclasses.replace(h, kv_addr=proxy.address))
        time.sleep(0.5)  # the pulls are in flight, held by the proxy
        assert decode.client.stats().num_waiting == 3
        decode.client.abort(["r0"])  # the client went away: the router aborts on both sides
        prefill.client.abort(["r0"])
        rest = DriveResult(tokens={k: [] for k in result.tokens})
        wait_decoded(decode, rest, 2)
        for rid in ("r1", "r2"):
            assert result.tokens[rid] + rest.tokens[rid] == want[rid]
        assert "r0" not in rest.finish
        assert_idle(prefill, decode)
    finally:
        proxy.close()


def test_bad_messages_and_requests_get_clear_errors(model, workers):
    decode = workers("decode", model)
    sock = decode.client.sock.socket
    sock.send_multipart([b"\x93garbage"])  # not a message
    error = decode.client.recv(5)
    assert error.code == 400 and "bad message" in error.message
    handoff_less = SamplingParams(max_tokens=2, temperature=0.0)
    decode.client.add("x", [], handoff_less)
    error = decode.client.recv(5)
    assert error.request_id == "x" and error.code == 400 and error.param == "prompt"
    decode.client.add("ok", [5, 6, 7], handoff_less)  # still serving; a plain request runs here too
    result = DriveResult(tokens={"ok": []})
    wait_decoded(decode, result, 1)
    assert len(result.tokens["ok"]) == 2
    assert httpx.get(decode.http + "/nope", timeout=5).status_code == 404
