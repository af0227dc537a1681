"""The benchmark's pure parts on hand-made inputs: metric math (exact values, binary-exact
timings), goodput parsing, workload length plans, Poisson arrivals, the runner's concurrency cap and
duration limit, the SVG helpers."""

from __future__ import annotations

import asyncio
import math

import numpy as np
import pytest

from tandem.loadtests.bench_client import ApiRequest, RequestResult, build_body
from tandem.loadtests.bench_metrics import parse_goodput, per_request_fields, summarize
from tandem.loadtests.bench_runner import LoadShape, arrival_times, run_load
from tandem.loadtests.bench_svg import cdf_points, nice_ticks
from tandem.loadtests.bench_workloads import (
    Conversation,
    Turn,
    WorkloadSpec,
    lognormal_lengths,
    plan_workload,
)


def three_ok_two_failed() -> list[RequestResult]:
    return [
        # tpot (0.625 - 0.125) / 4 = 0.125
        RequestResult(True, 10, 5, start_time=0.0, ttft=0.125, itl=[0.0625, 0.0625, 0.125, 0.25], latency=0.625),
        # tpot (0.875 - 0.375) / 2 = 0.25
        RequestResult(True, 20, 3, start_time=0.5, ttft=0.375, itl=[0.25, 0.25], latency=0.875),
        # one token: no tpot sample; starts exactly when the first request ends
        RequestResult(True, 30, 1, start_time=0.625, ttft=0.25, itl=[], latency=0.25),
        RequestResult(False, 5, error_type="http_503", error="engine dead"),
        RequestResult(False, 7, error_type="timeout", error="slow"),
    ]


def test_summary_exact_values():
    m = summarize(three_ok_two_failed(), 2.0, percentiles=(90, 99), goodput_slos_ms={"ttft": 250, "tpot": 125})
    assert (m["completed"], m["failed"], m["total_input_tokens"], m["total_output_tokens"]) == (3, 2, 60, 9)
    assert m["duration"] == 2.0
    assert m["request_throughput"] == 1.5 and m["output_throughput"] == 4.5 and m["total_token_throughput"] == 34.5
    assert m["errors_by_type"] == {"http_503": 1, "timeout": 1}
    # TTFT ms [125, 375, 250]; sorted [125, 250, 375]: p90 at rank 1.8, p99 at 1.98
    assert m["mean_ttft_ms"] == 250 and m["median_ttft_ms"] == 250
    assert m["std_ttft_ms"] == pytest.approx(125 * math.sqrt(2 / 3), rel=1e-12)
    assert m["p90_ttft_ms"] == pytest.approx(350) and m["p99_ttft_ms"] == pytest.approx(372.5)
    # TPOT ms [125, 250]
    assert m["mean_tpot_ms"] == 187.5 and m["median_tpot_ms"] == 187.5 and m["std_tpot_ms"] == 62.5
    assert m["p90_tpot_ms"] == pytest.approx(237.5) and m["p99_tpot_ms"] == pytest.approx(248.75)
    # ITL ms [62.5, 62.5, 125, 250, 250, 250] (units of 62.5: 1 1 2 4 4 4, variance 17/9)
    assert m["mean_itl_ms"] == pytest.approx(1000 / 6) and m["median_itl_ms"] == 187.5
    assert m["std_itl_ms"] == pytest.approx(62.5 * math.sqrt(17) / 3, rel=1e-12)
    assert m["p90_itl_ms"] == 250 and m["p99_itl_ms"] == 250
    # E2E ms [625, 875, 250] (units of 125: 5 7 2, variance 38/9)
    assert m["mean_e2el_ms"] == pytest.approx(1750 / 3) and m["median_e2el_ms"] == 625
    assert m["std_e2el_ms"] == pytest.approx(125 * math.sqrt(38) / 3, rel=1e-12)
    assert m["p90_e2el_ms"] == pytest.approx(825) and m["p99_e2el_ms"] == pytest.approx(870)
    # good: request 1 (ttft 125, tpot 125: limits inclusive) and 3 (ttft 250, one token: tpot 0)
    assert m["request_goodput"] == 1.0
    # in flight: [0, .625) [.5, 1.375) [.625, .875): the end at .625 frees its slot before the start
    assert m["max_concurrent_requests"] == 2
    # token events in [0, 1) s: request 1's five, request 2's first (0.875), request 3's one (0.875)
    assert m["max_output_tokens_per_s"] == 7.0


def test_goodput_variants():
    results = three_ok_two_failed()
    assert summarize(results, 2.0, goodput_slos_ms={"ttft": 250, "tpot": 124.9})["request_goodput"] == 0.5
    assert summarize(results, 2.0, goodput_slos_ms={"e2el": 625})["request_goodput"] == 1.0
    assert summarize(results, 2.0, goodput_slos_ms={"ttft": 1})["request_goodput"] == 0.0
    assert summarize(results, 2.0)["request_goodput"] is None  # no SLOs given: as vLLM


def test_summary_of_only_failures_is_finite():
    m = summarize([RequestResult(False, 4, error_type="http_404")], 1.0, percentiles=(50, 99.9))
    assert m["completed"] == 0 and m["failed"] == 1 and m["errors_by_type"] == {"http_404": 1}
    numbers = [v for v in m.values() if isinstance(v, int | float)]
    assert all(math.isfinite(v) for v in numbers)
    assert m["p99.9_ttft_ms"] == 0.0 and m["p50_itl_ms"] == 0.0 and m["max_concurrent_requests"] == 0
    with pytest.raises(ValueError, match="duration"):
        summarize([], 0.0)


def test_per_request_fields():
    f = per_request_fields(three_ok_two_failed())
    assert f["input_lens"] == [10, 20, 30, 5, 7] and f["output_lens"] == [5, 3, 1, 0, 0]
    assert f["ttfts"][:3] == [0.125, 0.375, 0.25] and f["itls"][2] == [] and f["errors"][3] == "engine dead"
    assert f["errors"][:3] == ["", "", ""]


def test_parse_goodput():
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:0"]) == {"ttft": 500.0, "tpot": 50.5, "e2el": 0.0}
    for bad, msg in (["itl:5"], "one of"), (["ttft"], "NAME:MS"), (["ttft:fast"], "not a number"), \
                    (["tpot:-1"], ">= 0"), (["ttft:nan"], "finite"):
        with pytest.raises(ValueError, match=msg):
            parse_goodput(bad)


def test_build_body():
    b = build_body("completions", "m", "hi", 7, {"temperature": 0.0, "ignore_eos": True})
    assert b == {"model": "m", "max_tokens": 7, "stream": True, "stream_options": {"include_usage": True},
                 "temperature": 0.0, "ignore_eos": True, "prompt": "hi"}
    assert build_body("chat", "m", "hi", 7, {})["messages"] == [{"role": "user", "content": "hi"}]
    history = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert build_body("chat", "m", history, 7, {})["messages"] == history
    with pytest.raises(ValueError, match="prompt string"):
        build_body("completions", "m", history, 7, {})


# --- workloads -----------------------------------------------------------------------------------


def test_shared_prefix_plan():
    plans, prefix_lens = plan_workload(WorkloadSpec("shared-prefix", 10, num_prefixes=4, prefix_len=100))
    assert prefix_lens == [100] * 4
    ids = [c[0].prefix_id for c in plans]
    assert sorted(ids) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]  # P x S, the remainder on the first prefixes
    assert ids != sorted(ids)  # shuffled, so one prefix's requests are not back to back
    assert {(c[0].input_len, c[0].output_len) for c in plans} == {(32, 64)}
    with pytest.raises(ValueError, match="max_model_len is 150"):
        plan_workload(WorkloadSpec("shared-prefix", 4, prefix_len=100, max_model_len=150))


def test_multi_turn_plan_counts_turns():
    plans, _ = plan_workload(WorkloadSpec("multi-turn", 10, num_turns=4, input_len=8, output_len=4))
    assert [len(c) for c in plans] == [4, 4, 2]
    assert all((t.input_len, t.output_len) == (8, 4) for c in plans for t in c)
    # 4 turns x (64 + 64 + 32 template margin) = 640 tokens of history
    with pytest.raises(ValueError, match="4-turn conversation"):
        plan_workload(WorkloadSpec("multi-turn", 8, max_model_len=600, chat=True))


def test_sharegpt_lengths():
    plans, _ = plan_workload(WorkloadSpec("sharegpt", 20000, seed=3))
    ins = np.array([c[0].input_len for c in plans])
    outs = np.array([c[0].output_len for c in plans])
    assert ins.min() >= 4 and outs.min() >= 4 and ins.max() <= 1024 and outs.max() <= 1024
    assert (ins + outs).max() <= 2048
    assert 180 < ins.mean() < 205 and 160 < outs.mean() < 185  # lognormal means 202 / 179, tails clipped
    assert np.median(ins) < ins.mean()  # long right tail
    small, _ = plan_workload(WorkloadSpec("sharegpt", 500, max_model_len=256))
    assert max(c[0].input_len + c[0].output_len for c in small) <= 256
    again, _ = plan_workload(WorkloadSpec("sharegpt", 20000, seed=3))
    assert again == plans  # seeded


def test_random_and_long_context_plans():
    fixed, _ = plan_workload(WorkloadSpec("random", 5, input_len=30, output_len=6))
    assert [(c[0].input_len, c[0].output_len) for c in fixed] == [(30, 6)] * 5
    logn, _ = plan_workload(WorkloadSpec("random", 4000, input_len=100, output_len=50, length_dist="lognormal",
                                         length_sigma=0.5))
    assert len({c[0].input_len for c in logn}) > 50
    assert np.mean([c[0].input_len for c in logn]) == pytest.approx(100, rel=0.05)
    with pytest.raises(ValueError, match="input \\+ output needs 1100"):
        plan_workload(WorkloadSpec("random", 2, input_len=1000, output_len=100, max_model_len=1024))
    long, _ = plan_workload(WorkloadSpec("long-context", 2, max_model_len=1000))
    assert [(c[0].input_len, c[0].output_len) for c in long] == [(750, 32)] * 2
    with pytest.raises(ValueError, match="long-context needs --input-len"):
        plan_workload(WorkloadSpec("long-context", 2))


def test_workload_spec_errors():
    for kwargs, msg in (({"name": "nope"}, "unknown workload"), ({"num_prompts": 0}, "--num-prompts"),
                        ({"input_len": 0}, "--input-len"), ({"length_dist": "uniform"}, "--length-dist"),
                        ({"num_turns": 0}, "--num-turns")):
        args = {"name": "random", "num_prompts": 1, **kwargs}
        with pytest.raises(ValueError, match=msg):
            WorkloadSpec(**args)


def test_lognormal_lengths_mean():
    x = lognormal_lengths(np.random.default_rng(0), 200, 1.0, 200_000)
    assert x.min() >= 1 and x.mean() == pytest.approx(200, rel=0.02)


# --- arrivals and the runner ---------------------------------------------------------------------


def test_arrival_times():
    assert arrival_times(4, math.inf, 0) == [0.0] * 4
    t = arrival_times(20_000, 5.0, seed=1)
    assert t[0] == 0.0 and all(b >= a for a, b in zip(t, t[1:]))
    gaps = np.diff(t)
    assert gaps.mean() == pytest.approx(0.2, rel=0.03) and gaps.std() == pytest.approx(0.2, rel=0.05)  # exponential
    assert arrival_times(50, 5.0, seed=1) == t[:50] and arrival_times(50, 5.0, seed=2) != t[:50]


def _turns(n: int, with_history: bool = False) -> list[Conversation]:
    return [Conversation([Turn(f"p{i}", 3, 2)], with_history) for i in range(n)]


def _make(turn: Turn, history: list[dict[str, str]], history_tokens: int) -> ApiRequest:
    return ApiRequest("completions", {"prompt": turn.text, "history": len(history)}, history_tokens + turn.text_len)


def test_runner_caps_concurrency():
    in_flight = peak = 0

    async def send(req: ApiRequest) -> RequestResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return RequestResult(True, req.expected_prompt_len, 2, ttft=0.01, itl=[0.01], latency=0.02)

    out = asyncio.run(run_load(_turns(12), _make, send, LoadShape(max_concurrency=3)))
    assert peak == 3 and len(out.results) == 12 and out.not_sent == 0
    assert max(r.queue_time for r in out.results) > 0.03  # later arrivals waited for a slot
    assert [r.start_time for r in out.results] == sorted(r.start_time for r in out.results)


def test_runner_duration_limit_and_conversations():
    async def send(req: ApiRequest) -> RequestResult:
        await asyncio.sleep(0.01)
        ok = req.body["prompt"] != "p1"
        return RequestResult(ok, req.expected_prompt_len, 2 if ok else 0, ttft=0.005, itl=[0.005], latency=0.01,
                             generated_text="answer", error_type=None if ok else "http_500")

    # 40 requests at 20/s need ~2 s; the limit stops sending after 0.5 s
    out = asyncio.run(run_load(_turns(40), _make, send, LoadShape(request_rate=20, duration_limit_s=0.5)))
    assert 2 <= len(out.results) < 40 and len(out.results) + out.not_sent == 40 and out.duration_s < 1.0
    assert max(r.start_time for r in out.results) < 0.5

    convs = [Conversation([Turn("p0", 3, 2), Turn("p2", 3, 2), Turn("p3", 3, 2)], True),
             Conversation([Turn("p1", 3, 2), Turn("p4", 3, 2)], True)]
    seen: list[dict] = []

    async def send_recording(req: ApiRequest) -> RequestResult:
        seen.append(req.body)
        return await send(req)

    out = asyncio.run(run_load(convs, _make, send_recording, LoadShape()))
    # turn k of a conversation carries its 2k history messages; the failed first turn of the second
    # conversation aborts its second turn
    assert sorted((b["prompt"], b["history"]) for b in seen) == [("p0", 0), ("p1", 0), ("p2", 2), ("p3", 4)]
    kinds = sorted(r.error_type or "ok" for r in out.results)
    assert kinds == ["conversation_aborted", "http_500", "ok", "ok", "ok"]


def test_load_shape_errors():
    for kwargs, msg in (({"request_rate": 0}, "--request-rate"), ({"max_concurrency": 0}, "--max-concurrency"),
                        ({"duration_limit_s": 0}, "--duration-limit"), ({"think_time_s": -1}, "--think-time")):
        with pytest.raises(ValueError, match=msg):
            LoadShape(**kwargs)


# --- SVG helpers ---------------------------------------------------------------------------------


def test_nice_ticks_and_cdf_points():
    assert nice_ticks(4, 64) == [0, 20, 40, 60, 80]
    assert nice_ticks(0, 1) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(5, 5)[0] <= 5 <= nice_ticks(5, 5)[-1]
    assert cdf_points([3.0, 1.0, 2.0]) == ([1.0, 1.0, 2.0, 3.0], [0.0, 1 / 3, 2 / 3, 1.0])
    xs, ys = cdf_points([float(i) for i in range(10_000)], max_points=100)
    assert len(xs) == 101 and xs[-1] == 9999.0 and ys[-1] == 1.0 and ys == sorted(ys)


def test_token_events_of_chunks():
    from tandem.loadtests.bench_client import _chunk_text

    role = {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
    assert _chunk_text("chat", role) is None  # sent before any token exists
    assert _chunk_text("chat", {"choices": [{"delta": {"role": "assistant", "content": "Hi"}}]}) == "Hi"
    assert _chunk_text("chat", {"choices": [{"delta": {"content": ""}}]}) == ""  # a token whose text is held back
    assert _chunk_text("chat", {"choices": [], "usage": {"completion_tokens": 3}}) is None
    assert _chunk_text("completions", {"choices": [{"text": ""}]}) == ""
    assert _chunk_text("completions", {"choices": [{"text": "a"}, {"text": "b"}]}) == "ab"
    assert _chunk_text("completions", {"choices": []}) is None
