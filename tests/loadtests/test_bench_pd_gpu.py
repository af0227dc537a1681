"""loadtests/bench_pd_gpu.py end to end on CPU: a tiny random Llama (config.json only, dummy weights),
mono beside P/D over zmq and plain sockets, plus a transport whose workers cannot start (recorded,
the others still run). The JSON has every row, greedy tokens of the check pass equal mono's, KV
bytes were pulled and add up to the handed-off blocks, no failures, no leaked blocks, no worker left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("zmq")

ROOT = Path(__file__).resolve().parents[2]
TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu",
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "vocab_size": 384, "torch_dtype": "float32",
}
PROMPT_LEN, OUTPUT_LEN, BLOCK = 40, 8, 4


def test_bench_pd_end_to_end_on_cpu(tmp_path):
    model = tmp_path / "tiny-llama"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_LLAMA))
    out = tmp_path / "pd.json"
    logs = tmp_path / "logs"
    cmd = [sys.executable, "-m", "tandem.loadtests.bench_pd_gpu", "--model", str(model), "--device", "cpu",
           "--dtype", "float32", "--transports", "zmq,bogus,socket", "--num-requests", "6", "--concurrency", "3",
           "--check-requests", "3", "--warmup-requests", "2", "--prompt-len", str(PROMPT_LEN),
           "--output-len", str(OUTPUT_LEN), "--block-size", str(BLOCK), "--kv-cache-memory", "16MiB",
           "--json", str(out), "--log-dir", str(logs), "--time-limit", "150"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=180, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    configs = {c["name"]: c for c in results["configs"]}
    assert list(configs) == ["mono", "pd-zmq", "pd-bogus", "pd-socket"]

    # The transport no worker takes: an error row with the worker's complaint, the run went on.
    bogus = configs.pop("pd-bogus")
    assert "exited with code 2" in bogus["error"] and "invalid choice: 'bogus'" in bogus["log_tail"]
    assert not bogus["passes"]

    mono = configs["mono"]
    for name, cfg in configs.items():
        assert cfg["error"] is None, (name, cfg["error"], cfg.get("log_tail"))
        assert set(cfg["passes"]) == {"warmup", "check", "load"}
        assert all(code == 0 for code in cfg["exit_codes"].values()), cfg["exit_codes"]  # SIGTERM: clean exit
        for pass_name, n in (("warmup", 2), ("check", 3), ("load", 6)):
            p = cfg["passes"][pass_name]
            s = p["summary"]
            assert (s["requests"], s["completed"], s["errors"]) == (n, n, 0), (name, pass_name, s)
            assert s["output_tokens"] == n * OUTPUT_LEN and s["out_tok_s"] > 0 and s["req_s"] > 0
            assert s["ttft_ms"]["p50"] > 0 and s["tpot_ms"]["p50"] > 0 and s["handoff_gap_ms"]["n"] == n
            assert s["itl_ms"]["n"] == n * (OUTPUT_LEN - 1)
            assert p["leaked"] == {}, (name, pass_name, p["leaked"])
            assert all(v["used_blocks"] == 0 for v in p["idle"].values())
            for r in p["requests"]:
                assert r["n_tokens"] == OUTPUT_LEN and r["finish"] == "length" and len(r["token_ms"]) == OUTPUT_LEN
            if cfg["mode"] == "pd":
                kv = p["kv"]
                assert kv["failures"] == 0 and kv["recomputed"] == 0 and kv["failed_handoffs"] == 0, kv
                assert kv["handoffs"] == kv["pulls"] == kv["seconds_count"] == n, kv
                assert kv["bytes"] > 0 and kv["GBps_per_pull"] > 0 and kv["pull_ms_mean"] > 0
                blocks = -(-PROMPT_LEN // BLOCK)
                assert all(r["handoff_blocks"] == blocks for r in p["requests"])
                assert kv["blocks"] == n * blocks and kv["local_hit_blocks"] == 0
                assert p["kv_prefill"]["handoffs_exported"] == n
            else:
                assert "kv" not in p
        if name != "mono":
            check = cfg["compare"]["check"]
            assert (check["equal"], check["total"], check["mismatches"]) == (3, 3, []), check
            assert cfg["compare"]["load"]["total"] == 6
            # same prompts, same weights: the first token comes from a prefill of the same shape
            for got, want in zip(cfg["passes"]["load"]["requests"], mono["passes"]["load"]["requests"]):
                assert got["id"] == want["id"] and got["tokens"][0] == want["tokens"][0]

    # The table comes last: a row per configuration and the failed one's error.
    lines = proc.stdout.strip().splitlines()
    tail = lines[max(i for i, line in enumerate(lines) if line.startswith("| config")):]
    assert len(tail) == 11 and [line.split("|")[1].strip() for line in tail[2:6]] == [
        "mono", "pd-zmq", "pd-bogus", "pd-socket"]
    assert tail[6].startswith("pd-zmq check: pull phases (mean ms) connect ")  # then pd-zmq load
    assert tail[8].startswith("pd-bogus: ERROR") and tail[10].startswith("pd-socket load: pull phases")
    assert "3/3" in tail[3] and "3/3" in tail[5]
    assert sorted(p.name for p in logs.iterdir()) == sorted(
        f"{w}.log" for w in ("mono", "prefill-zmq", "decode-zmq", "prefill-bogus", "decode-bogus",
                             "prefill-socket", "decode-socket"))
    assert "[mono]" in (logs / "mono.log").read_text()  # the worker's own log lines, not the ready line
