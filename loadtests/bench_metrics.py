"""Benchmark metrics from per-request results, under `vllm bench serve`'s key names so the numbers
compare: `mean_ttft_ms`, `median_ttft_ms`, `std_ttft_ms`, `p99_ttft_ms`, ... for ttft, tpot, itl and
e2el; `request_throughput`, `request_goodput`, `output_throughput`, `total_token_throughput`,
`completed`, `failed`, `total_input_tokens`, `total_output_tokens`, `duration`.

Definitions (as vLLM's):
- TPOT of a request = (latency - ttft) / (output_len - 1), only for requests with output_len > 1
  (for goodput a request of one token has TPOT 0);
- ITL statistics pool every gap of every successful request;
- statistics of an empty sample are 0 (e.g. TPOT when every output is one token); percentiles are
  numpy's linear interpolation, std is the population std;
- a request is *good* when it succeeded and meets every SLO given (`ttft`, `tpot`, `e2el`, in ms,
  inclusive); request_goodput = good requests / duration;
- throughputs divide by `duration` (first send to last completion).
Added beyond vLLM's keys: `errors_by_type`, `max_concurrent_requests` (peak requests in flight),
`max_output_tokens_per_s` (token events in the busiest 1 s bucket).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tandem.loadtests.bench_client import RequestResult

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")


def parse_goodput(pairs: Sequence[str]) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> {"ttft": 500.0, "tpot": 50.0} (milliseconds)."""
    slos: dict[str, float] = {}
    for pair in pairs:
        name, sep, value = pair.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput {pair!r}: expected NAME:MS with NAME one of {', '.join(GOODPUT_METRICS)}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {pair!r}: {value!r} is not a number of milliseconds") from None
        if not math.isfinite(ms) or ms < 0:
            raise ValueError(f"--goodput {pair!r}: the SLO must be a finite number >= 0 ms")
        slos[name] = ms
    return slos


def request_tpot(r: RequestResult) -> float | None:
    """Seconds per output token after the first; None for a request of fewer than 2 tokens."""
    if r.output_len < 2:
        return None
    return (r.latency - r.ttft) / (r.output_len - 1)


def describe_ms(name: str, values_s: Sequence[float], percentiles: Sequence[float]) -> dict[str, float]:
    """mean/median/std/pNN of a sample given in seconds, in milliseconds, keyed `<stat>_<name>_ms`."""
    arr = np.asarray(values_s, dtype=np.float64) * 1000.0 if len(values_s) else np.zeros(1)
    out = {f"mean_{name}_ms": float(arr.mean()), f"median_{name}_ms": float(np.median(arr)),
           f"std_{name}_ms": float(arr.std())}
    for p in percentiles:
        out[f"p{percentile_word(p)}_{name}_ms"] = float(np.percentile(arr, p))
    return out


def percentile_word(p: float) -> str:
    """99 -> "99", 99.9 -> "99.9" (vLLM's key spelling)."""
    return str(int(p)) if float(p).is_integer() else str(p)


def is_good(r: RequestResult, slos_ms: dict[str, float]) -> bool:
    if not r.success:
        return False
    measured = {"ttft": r.ttft, "tpot": request_tpot(r) or 0.0, "e2el": r.latency}
    return all(measured[name] * 1000.0 <= limit for name, limit in slos_ms.items())


def peak_concurrency(results: Sequence[RequestResult]) -> int:
    """Most successful requests in flight at once, over half-open [start, start + latency)."""
    events = sorted([(r.start_time, 1) for r in results] + [(r.start_time + r.latency, -1) for r in results])
    current = peak = 0
    for _, delta in events:  # at equal times -1 sorts first: an end frees its slot before a start
        current += delta
        peak = max(peak, current)
    return peak


def peak_token_rate(results: Sequence[RequestResult]) -> float:
    """Token events in the busiest 1-second bucket counted from the first send."""
    if not results:
        return 0.0
    t0 = min(r.start_time for r in results)
    buckets: Counter[int] = Counter()
    for r in results:
        t = r.start_time + r.ttft
        buckets[int(t - t0)] += 1
        for gap in r.itl:
            t += gap
            buckets[int(t - t0)] += 1
    return float(max(buckets.values()))


def summarize(results: Sequence[RequestResult], duration_s: float, *, percentiles: Sequence[float] = (90, 99),
              goodput_slos_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """The metrics of one run (see the module docstring)."""
    if duration_s <= 0:
        raise ValueError(f"duration must be > 0 s, got {duration_s}")
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    out: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": (sum(is_good(r, goodput_slos_ms) for r in ok) / duration_s
                            if goodput_slos_ms else None),
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "max_concurrent_requests": peak_concurrency(ok),
        "max_output_tokens_per_s": peak_token_rate(ok),
        "errors_by_type": dict(sorted(Counter(r.error_type or "unknown" for r in results if not r.success).items())),
    }
    samples = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for t in (request_tpot(r) for r in ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    for name in LATENCY_METRICS:
        out.update(describe_ms(name, samples[name], percentiles))
    return out


def per_request_fields(results: Sequence[RequestResult]) -> dict[str, list[Any]]:
    """The per-request arrays of vLLM's result file (seconds), which the HTML report plots."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_len if r.success else 0 for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "latencies": [r.latency for r in results],
        "start_times": [r.start_time for r in results],
        "queue_times": [r.queue_time for r in results],
        "errors": [r.error or "" for r in results],
    }


def format_summary(result: dict[str, Any], percentiles: Sequence[float]) -> str:
    """The console table printed after a run."""
    rows: list[tuple[str, Any]] = [
        ("Workload", result.get("workload")), ("Endpoint", result.get("backend")),
        ("Successful requests", result["completed"]), ("Failed requests", result["failed"]),
        ("Not sent (duration limit)", result.get("not_sent", 0)),
        ("Request rate configured (RPS)", result.get("request_rate")),
        ("Maximum request concurrency", result.get("max_concurrency")),
        ("Benchmark duration (s)", result["duration"]), ("Total input tokens", result["total_input_tokens"]),
        ("Total generated tokens", result["total_output_tokens"]),
        ("Request throughput (req/s)", result["request_throughput"]),
        ("Request goodput (req/s)", result["request_goodput"]),
        ("Output token throughput (tok/s)", result["output_throughput"]),
        ("Total token throughput (tok/s)", result["total_token_throughput"]),
        ("Peak concurrent requests", result["max_concurrent_requests"]),
    ]
    lines = [" Serving Benchmark Result ".center(60, "=")]
    lines += [f"{label + ':':<44}{_fmt(value)}" for label, value in rows if value is not None]
    for err, count in result["errors_by_type"].items():
        lines.append(f"{'  errors ' + err + ':':<44}{count}")
    titles = {"ttft": ("TTFT", "Time to First Token"), "tpot": ("TPOT", "Time per Output Token (excl. 1st)"),
              "itl": ("ITL", "Inter-token Latency"), "e2el": ("E2EL", "End-to-end Latency")}
    for name in LATENCY_METRICS:
        short, header = titles[name]
        lines.append(f" {header} ".center(60, "-"))
        stats = [("Mean", f"mean_{name}_ms"), ("Median", f"median_{name}_ms"), ("Std", f"std_{name}_ms")]
        stats += [(f"P{percentile_word(p)}", f"p{percentile_word(p)}_{name}_ms") for p in percentiles]
        lines += [f"{f'{stat} {short} (ms):':<44}{result[key]:.2f}" for stat, key in stats]
    lines.append("=" * 60)
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.2f}" if isinstance(value, float) else str(value)
