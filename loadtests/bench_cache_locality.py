"""Serving setups side by side on one workload: monolithic `tandem serve`, `tandem up` with P/D
workers, and `tandem up --mixed 2` under each routing policy; the cluster's prefix-cache hit rate
(from the workers' metrics, summed by the router) and the serving metrics of `tandem bench serve`.

Default workload (issue 5's cache-locality check): 8 distinct ~300-token system prompts x many
short user turns (`--workload shared-prefix`), at a fixed concurrency. With a KV pool per worker
that holds about 8 / workers of the prompts (--kv-cache-memory), a policy that spreads every prompt
over every worker evicts, and one that keeps each prompt on one worker does not. "ideal" is one
worker whose cache holds everything: every prompt computed once.

    python loadtests/bench_cache_locality.py --out-dir OUT --workers 4 --kv-cache-memory 37MiB \
        --max-model-len 512 --setups ideal cache_aware round_robin least_loaded
    python loadtests/bench_cache_locality.py --out-dir OUT --setups serve pd cache_aware round_robin
    tandem bench report docs/bench/cache-locality/*.json -o docs/bench/cache-locality/report.html
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

SETUPS = ("ideal", "cache_aware", "round_robin", "least_loaded", "pd", "serve")


def setup_command(name: str, workers: int) -> tuple[str, list[str], str | None]:
    """(label, argv after `tandem`, KV pool override) of a setup."""
    if name == "ideal":
        return "ideal (1 worker, big cache)", ["up", "--mixed", "1"], "1GiB"
    if name == "pd":
        return "P/D 1+1 cache_aware", ["up", "--prefill", "1", "--decode", "1"], None
    if name == "serve":
        return "serve (monolithic)", ["serve"], None
    return f"mixed x{workers} {name}", ["up", "--mixed", str(workers), "--policy", name], None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def metric_sum(text: str, name: str) -> float:
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))


def start(cmd: list[str], port: int, redis_url: str, kv_memory: str, args, log: Path) -> subprocess.Popen:
    common = ["--dtype", args.dtype, "--max-model-len", str(args.max_model_len), "--kv-cache-memory", kv_memory,
              "--port", str(port)]
    if cmd[0] == "up":
        common += ["--redis-url", redis_url, "--log-dir", str(log.with_suffix(""))]
    proc = subprocess.Popen([sys.executable, "-m", "tandem.cli", *cmd, *common], stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd} exited: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{cmd} did not start: see {log}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--num-prompts", type=int, default=160)
    p.add_argument("--max-concurrency", type=int, default=4)
    p.add_argument("--num-prefixes", type=int, default=8)
    p.add_argument("--prefix-len", type=int, default=300)
    p.add_argument("--input-len", type=int, default=24, help="user turn tokens after the system prompt")
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--kv-cache-memory", default="80MiB",
                   help="KV pool per worker (SmolLM2 fp32: 720 KiB a 16-token block; 80MiB = 113 blocks, ~5 prompts)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    p.add_argument("--workers", type=int, default=2, help="mixed workers of the policy setups")
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/11", help="a Redis DB this script may flush")
    args = p.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for setup in args.setups:
        name, cmd, kv_memory = setup_command(setup, args.workers)
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        import redis

        redis.Redis.from_url(args.redis_url).flushdb()  # no stale registrations from an earlier setup
        port = free_port()
        proc = start(cmd, port, args.redis_url, kv_memory or args.kv_cache_memory, args, out / f"{slug}.log")
        try:
            result_file = out / f"{slug}.json"
            bench = [sys.executable, "-m", "tandem.cli", "bench", "serve", "--base-url", f"http://127.0.0.1:{port}",
                     "--workload", "shared-prefix", "--num-prompts", str(args.num_prompts),
                     "--num-prefixes", str(args.num_prefixes), "--prefix-len", str(args.prefix_len),
                     "--input-len", str(args.input_len), "--output-len", str(args.output_len),
                     "--max-concurrency", str(args.max_concurrency), "--seed", "0", "--label", name,
                     "--result-file", str(result_file), "--disable-tqdm"]
            subprocess.run(bench, check=True, stdout=subprocess.DEVNULL)
            time.sleep(1.5)  # the workers' last load reports reach the router
            text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
            queries = metric_sum(text, "tandem:prefix_cache_queries_total")
            hits = metric_sum(text, "tandem:prefix_cache_hits_total")
            result = json.loads(result_file.read_text())
            result["prefix_cache_queries"], result["prefix_cache_hits"] = queries, hits
            result_file.write_text(json.dumps(result, indent=1))
            rows.append((name, hits / queries if queries else 0.0, result))
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
    ideal = next((r[1] for r in rows if r[0].startswith("ideal")), None)
    print(f"\n{args.workers} workers in the policy setups; shared-prefix: {args.num_prefixes} prompts of "
          f"{args.prefix_len} tokens x {args.num_prompts} requests "
          f"(+{args.input_len} tokens, {args.output_len} out), concurrency {args.max_concurrency}, KV pool "
          f"{args.kv_cache_memory} per worker, {args.dtype}")
    print(f"{'setup':<30}{'hit rate':>9}{'/ideal':>8}{'req/s':>8}{'mean TTFT ms':>14}{'p99 TTFT ms':>13}"
          f"{'mean TPOT ms':>14}{'errors':>8}")
    for name, rate, r in rows:
        rel = f"{rate / ideal:.0%}" if ideal else ""
        print(f"{name:<30}{rate:>9.1%}{rel:>8}{r['request_throughput']:>8.2f}{r['mean_ttft_ms']:>14.0f}"
              f"{r['p99_ttft_ms']:>13.0f}{r['mean_tpot_ms']:>14.1f}{r.get('failed', 0):>8}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
