"""`tandem bench serve` end to end against a real `tandem serve` process (tiny random Llama with
SmolLM2's tokenizer): three workloads at small scale, the JSON checked for every metric and its
sanity, error accounting, the duration limit, prompt token counts, and the HTML report."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path

import httpx
import pytest

from tandem import cli
from tandem.loadtests import bench_report, serve_bench
from tandem.loadtests.bench_client import ApiRequest, build_body, send_request
from tandem.loadtests.bench_text import LocalTokenizer, ServerTokenizer, TextMaker
from tandem.shared.models.hf_folder import load_tokenizer, resolve_model
from tests.conftest import save_tiny_model
from tests.services.conftest import ServerProcess, wait_blocks_free

KEY = "bench-key"
MODEL = "tiny"
MAX_LEN = 1024
VLLM_KEYS = ["duration", "completed", "failed", "total_input_tokens", "total_output_tokens", "request_throughput",
             "request_goodput", "output_throughput", "total_token_throughput", "max_concurrent_requests",
             "max_output_tokens_per_s"]
VLLM_KEYS += [f"{stat}_{m}_ms" for m in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "std", "p90",
                                                                                    "p99")]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bench") / "tiny-llama"
    save_tiny_model("llama", folder, vocab_size=49152, max_position_embeddings=MAX_LEN)
    load_tokenizer(resolve_model(None)).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(tiny_folder, tmp_path_factory):
    srv = ServerProcess([str(tiny_folder), "--dtype", "float32", "--max-model-len", str(MAX_LEN),
                         "--served-model-name", MODEL, "--kv-cache-memory", "256MiB", "--api-key", KEY],
                        tmp_path_factory.mktemp("bench-server") / "server.log")
    try:
        srv.wait_healthy()
        yield srv
        wait_blocks_free(srv.url)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]


def bench(server, tmp_path: Path, name: str, *args: str) -> tuple[int, dict]:
    out = tmp_path / f"{name}.json"
    rc = serve_bench.main(["--base-url", server.url, "--api-key", KEY, "--disable-tqdm", "--seed", "1",
                           "--result-file", str(out), *args])
    return rc, (json.loads(out.read_text()) if out.exists() else {})


def check_sane(r: dict, num: int, out_len: int | None) -> None:
    missing = [k for k in VLLM_KEYS if k not in r]
    assert not missing, missing
    for key in VLLM_KEYS:
        assert isinstance(r[key], int | float) and math.isfinite(r[key]), (key, r[key])
    assert r["completed"] == num and r["failed"] == 0 and r["not_sent"] == 0 and r["errors_by_type"] == {}
    assert r["mean_ttft_ms"] > 0 and r["median_ttft_ms"] > 0 and r["mean_tpot_ms"] >= 0 and r["mean_itl_ms"] >= 0
    assert r["mean_e2el_ms"] >= r["mean_ttft_ms"]
    for m in ("ttft", "tpot", "itl", "e2el"):
        assert r[f"p99_{m}_ms"] >= r[f"p90_{m}_ms"] >= r[f"median_{m}_ms"] >= 0, m
        assert r[f"std_{m}_ms"] >= 0
    assert r["request_throughput"] > 0 and r["output_throughput"] > 0
    assert r["total_token_throughput"] > r["output_throughput"]
    assert 0 <= r["request_goodput"] <= r["request_throughput"]
    assert r["request_throughput"] == pytest.approx(num / r["duration"])
    assert 1 <= r["max_concurrent_requests"] <= num
    for key in ("input_lens", "output_lens", "ttfts", "itls", "latencies", "start_times", "errors"):
        assert len(r[key]) == num, key
    assert sum(r["output_lens"]) == r["total_output_tokens"] and sum(r["input_lens"]) == r["total_input_tokens"]
    if out_len is not None:  # ignore_eos: every request generates exactly max_tokens
        assert r["output_lens"] == [out_len] * num
    # at most one gap per token after the first (the server may put several tokens in one chunk)
    assert all(len(g) <= n - 1 for g, n in zip(r["itls"], r["output_lens"])) and any(r["itls"])


@pytest.fixture(scope="module")
def results(server, tmp_path_factory):
    """name -> (exit code, result, file) of the runs the tests look at (run once: the server is shared)."""
    tmp = tmp_path_factory.mktemp("bench-results")
    runs = {
        # a sweep: two rates in one command, one file each (random-rate20.json, random-rate40.json)
        "random": ("random", "--num-prompts", "8", "--input-len", "48", "--output-len", "12",
                   "--request-rate", "20", "40", "--goodput", "ttft:60000", "tpot:60000", "--label", "tiny"),
        "shared-prefix": ("shared-prefix", "--num-prompts", "8", "--num-prefixes", "2", "--prefix-len", "64",
                          "--input-len", "16", "--output-len", "8", "--max-concurrency", "3",
                          "--goodput", "ttft:60000"),
        "multi-turn": ("multi-turn", "--num-prompts", "6", "--num-turns", "3", "--input-len", "24",
                       "--output-len", "10", "--request-rate", "10", "--goodput", "e2el:60000"),
    }
    out = {}
    for name, args in runs.items():
        rc, _ = bench(server, tmp, name, "--workload", *args)
        files = sorted(tmp.glob(f"{name}*.json"))
        for f in files:
            out[f.stem] = (rc, json.loads(f.read_text()), f)
    assert sorted(out) == ["multi-turn", "random-rate20", "random-rate40", "shared-prefix"]
    return out


def test_random_workload(results):
    rc, r, _ = results["random-rate20"]
    assert rc == 0
    check_sane(r, 8, 12)
    assert r["input_lens"] == [48] * 8  # the prompt texts tokenize to exactly --input-len (no BOS here)
    assert (r["workload"], r["backend"], r["model_id"], r["request_rate"]) == ("random", "openai", MODEL, 20.0)
    assert r["goodput_slos_ms"] == {"ttft": 60000.0, "tpot": 60000.0}
    assert r["request_goodput"] == r["request_throughput"]  # SLOs no request can miss
    assert r["workload_args"]["input_len"] == 48 and r["num_warmups"] == 1
    rc40, r40, _ = results["random-rate40"]
    assert rc40 == 0 and r40["request_rate"] == 40.0 and r40["seed"] == r["seed"] + 1
    check_sane(r40, 8, 12)


def test_shared_prefix_workload(results):
    rc, r, _ = results["shared-prefix"]
    assert rc == 0
    check_sane(r, 8, 8)
    assert r["max_concurrency"] == 3 and r["max_concurrent_requests"] <= 3
    # prefix + "\n" + suffix: 64 + 1 + 16 tokens, give or take a merge at the joins
    assert all(78 <= n <= 84 for n in r["input_lens"]), r["input_lens"]
    assert r["workload_args"]["num_prefixes"] == 2


def test_multi_turn_workload(results):
    rc, r, _ = results["multi-turn"]
    assert rc == 0
    check_sane(r, 6, 10)
    assert r["backend"] == "openai-chat" and r["workload_args"]["num_conversations"] == 2
    # history grows: the later turns of a conversation send more tokens than its first
    by_len = sorted(r["input_lens"])
    assert by_len[-1] > by_len[0] + 24 + 10


def test_report_renders(results, tmp_path):
    paths = [str(results[name][2]) for name in ("random-rate20", "random-rate40", "shared-prefix", "multi-turn")]
    out = tmp_path / "report.html"
    assert cli.main(["bench", "report", *paths, "-o", str(out), "--title", "bench test"]) == 0
    html = out.read_text()
    for section in ("summary", "latency-distributions", "throughput-vs-load", "errors"):
        assert f'id="{section}"' in html, section
    assert "<script" not in html and "http://" not in html.split("<body>")[1].split("<ul>")[0]
    svgs = re.findall(r"<svg .*?</svg>", html, re.S)
    cdfs = [s for s in svgs if "CDF" in s]
    assert len(cdfs) == 4 and all(s.count('class="series"') == 4 for s in cdfs)
    vs_rate = [s for s in svgs if "vs request rate" in s]
    assert vs_rate and all(s.count('class="series"') == 1 for s in vs_rate)  # one label ("tiny") with two rates
    table = html.split('id="summary-table"')[1].split("</table>")[0]
    assert "tiny (random-rate20)" in table and "tiny (random-rate40)" in table and "p99 TTFT (ms)" in table
    assert "No failed requests." in html
    # a file that is not a result is refused with its name
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert bench_report.main([str(bad), "-o", str(tmp_path / "x.html")]) == 2


def test_errors_by_type_and_warmup_failure(server, tmp_path, capsys):
    # an unknown model: no warm-up, every request fails with the server's 404
    rc, r = bench(server, tmp_path, "bad-model", "--workload", "random", "--num-prompts", "3", "--input-len", "8",
                  "--output-len", "2", "--model", "no-such-model", "--num-warmups", "0")
    assert rc == 1 and r["completed"] == 0 and r["failed"] == 3 and r["errors_by_type"] == {"http_404": 3}
    assert all("no-such-model" in e for e in r["errors"])
    # with a warm-up the benchmark stops before the run, naming the error
    rc, r = bench(server, tmp_path, "bad-model-warm", "--workload", "random", "--num-prompts", "3",
                  "--model", "no-such-model")
    assert rc == 1 and r == {} and "warm-up request failed (http_404)" in capsys.readouterr().err
    # a wrong key (through the `tandem` command)
    rc = cli.main(["bench", "serve", "--base-url", server.url, "--api-key", "wrong", "--workload", "random",
                   "--num-prompts", "2", "--disable-tqdm"])
    assert rc == 1 and "401" in capsys.readouterr().err
    # too long for the server
    rc = serve_bench.main(["--base-url", server.url, "--api-key", KEY, "--workload", "random", "--num-prompts", "2",
                           "--input-len", "1000", "--output-len", "100"])
    assert rc == 2 and "max_model_len is 1024" in capsys.readouterr().err


def test_duration_limit(server, tmp_path):
    rc, r = bench(server, tmp_path, "limited", "--workload", "random", "--num-prompts", "40", "--input-len", "16",
                  "--output-len", "4", "--request-rate", "10", "--duration-limit", "1.0")
    assert rc == 0 and 1 <= r["completed"] < 40 and r["completed"] + r["failed"] + r["not_sent"] == 40
    assert max(r["start_times"]) < 1.0 and len(r["ttfts"]) == r["completed"]


def test_stream_error_types(server):
    async def go() -> list:
        async with httpx.AsyncClient() as client:
            headers = {"Authorization": f"Bearer {KEY}"}
            ok = ApiRequest("chat", build_body("chat", MODEL, "hello", 3, {"ignore_eos": True}), 1)
            too_long = ApiRequest("completions", build_body("completions", MODEL, "hi " * 1100, 3, {}), 1100)
            refused = await send_request(client, "http://127.0.0.1:1", ok, timeout_s=5)
            return [await send_request(client, server.url, r, timeout_s=60, headers=headers) for r in (ok, too_long)] \
                + [refused]

    ok, too_long, refused = asyncio.run(go())
    # the role-only first chunk is no token: at most 2 gaps for 3 tokens (fewer if the server coalesced)
    assert ok.success and ok.output_len == 3 and ok.ttft > 0 and len(ok.itl) <= 2 and ok.latency >= ok.ttft
    assert ok.prompt_len > 1  # the server's usage (chat template included) replaced the estimate
    assert not too_long.success and too_long.error_type == "http_400" and "1024" in too_long.error
    assert not refused.success and refused.error_type == "connect_error"


def test_text_maker_exact_counts(server, tiny_folder):
    """Prompt texts round-trip to the asked token count, through the server and a local tokenizer alike."""
    lengths = [1, 7, 33, 128, 500]

    async def go(tokenizer_of) -> list[tuple[str, int]]:
        async with httpx.AsyncClient() as client:
            maker = await TextMaker.build(tokenizer_of(client), seed=5)
            return await maker.make_many(lengths, [0, 11, 2000, 4321, 17])

    via_server = asyncio.run(go(lambda c: ServerTokenizer(c, server.url, MODEL)))
    local = LocalTokenizer.load(str(tiny_folder))
    via_local = asyncio.run(go(lambda c: local))
    assert [n for _, n in via_server] == lengths
    assert via_local == via_server
    tok = load_tokenizer(resolve_model(str(tiny_folder)))
    assert [len(tok(t, add_special_tokens=False).input_ids) for t, _ in via_server] == lengths
