"""`tandem bench serve`: load-test any OpenAI-compatible server (tandem serve, tandem up, vLLM) and
write a result file with `vllm bench serve`'s key names.

    tandem bench serve --base-url http://127.0.0.1:8000 --workload shared-prefix --num-prompts 200 \\
        --request-rate 4 --goodput ttft:500 tpot:50 --result-file results/serve-rate4.json
    tandem bench report results/*.json -o report.html

Steps: ask /v1/models for the model (unless --model) and its max_model_len; tokenize a seeded corpus
(server's /tokenize, or --tokenizer PATH) and build the workload's prompts (bench_workloads.py); send
--num-warmups warm-up requests (not measured; a failure stops here with its error); run the load
(bench_runner.py) with a progress bar; print the summary and write --result-file (JSON, one key a
line; per-request arrays in seconds as vLLM's: ttfts, itls, latencies, ...). Several --request-rate values
make a sweep, one result file per rate (see --request-rate). Exit status 0 when every run completed at
least one request, 1 when one completed none (or the server failed us), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from tandem.loadtests.bench_client import ApiRequest, Endpoint, build_body, send_request
from tandem.loadtests.bench_metrics import format_summary, parse_goodput, per_request_fields, summarize
from tandem.loadtests.bench_runner import LoadShape, run_load, warm_up
from tandem.loadtests.bench_text import LocalTokenizer, PromptTokenizer, ServerTokenizer, TextMaker
from tandem.loadtests.bench_workloads import WORKLOADS, Conversation, Turn, WorkloadSpec, build_conversations

WARMUP_INPUT_LEN = 32
WARMUP_OUTPUT_LEN = 8
RESULT_FORMAT_VERSION = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tandem bench serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000 (no /v1)")
    p.add_argument("--workload", required=True, choices=WORKLOADS)
    p.add_argument("--num-prompts", type=int, required=True, help="requests to send (multi-turn: turns)")
    p.add_argument("--request-rate", type=float, nargs="+", default=[math.inf], metavar="R",
                   help="Poisson arrivals per second (multi-turn: conversations per second); default inf. "
                        "Several rates run one after the other, run i with seed + i (fresh prompts, so no run "
                        "hits the prefix cache an earlier one filled), each to RESULT-rate<R>.json")
    p.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    p.add_argument("--duration-limit", type=float, default=None, help="stop sending after this many seconds")
    p.add_argument("--result-file", default=None, help="write the JSON result here")
    p.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    p.add_argument("--tokenizer", default=None,
                   help="local tokenizer (HF folder or .gguf) instead of the server's /tokenize + /detokenize")
    p.add_argument("--endpoint-type", choices=["completions", "chat"], default=None,
                   help="default: chat for multi-turn, completions otherwise")
    p.add_argument("--input-len", type=int, default=None,
                   help="prompt tokens (random/long-context), their mean (sharegpt), suffix (shared-prefix), "
                        "user message (multi-turn)")
    p.add_argument("--output-len", type=int, default=None, help="max_tokens per request (mean for sharegpt)")
    p.add_argument("--length-dist", choices=["fixed", "lognormal"], default="fixed",
                   help="random and multi-turn lengths: fixed, or lognormal with the given mean")
    p.add_argument("--length-sigma", type=float, default=0.5, help="sigma of the lognormal lengths")
    p.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes")
    p.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens per prefix")
    p.add_argument("--num-turns", type=int, default=4, help="multi-turn: turns per conversation")
    p.add_argument("--think-time", type=float, default=0.0,
                   help="multi-turn: seconds between an answer and the next turn")
    p.add_argument("--goodput", nargs="+", default=[], metavar="NAME:MS",
                   help="SLOs for request_goodput: ttft:MS tpot:MS e2el:MS")
    p.add_argument("--metric-percentiles", default="90,99", help="comma-separated percentiles to report")
    p.add_argument("--num-warmups", type=int, default=1, help="warm-up requests before the run (not measured)")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request before it fails")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--no-ignore-eos", action="store_true", help="let requests stop at EOS (default: ignore_eos)")
    p.add_argument("--extra-body", type=json.loads, default=None, help="JSON merged into every request body")
    p.add_argument("--api-key", default=None, help="bearer key (default: $TANDEM_API_KEY or $OPENAI_API_KEY)")
    p.add_argument("--label", default=None, help="name of this setup in reports (default: the base URL)")
    p.add_argument("--metadata", nargs="+", default=[], metavar="KEY=VALUE", help="extra fields for the result")
    p.add_argument("--disable-tqdm", action="store_true")
    return p


def _percentiles(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--metric-percentiles {text!r}: expected numbers like 90,99") from None
    if not values or any(not 0 < v < 100 for v in values):
        raise ValueError(f"--metric-percentiles {text!r}: each must be in (0, 100)")
    return values


def _metadata(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--metadata {pair!r}: expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


async def _server_model(client: httpx.AsyncClient, base_url: str, headers: dict[str, str]) -> tuple[str, int | None]:
    try:
        r = await client.get(f"{base_url}/v1/models", headers=headers)
    except httpx.HTTPError as exc:
        raise RuntimeError(f"cannot reach {base_url}/v1/models: {exc}") from exc
    if r.status_code != 200:
        raise RuntimeError(f"{base_url}/v1/models answered {r.status_code}: {r.text[:300]}")
    data = r.json().get("data") or []
    if not data:
        raise RuntimeError(f"{base_url}/v1/models lists no model")
    return str(data[0]["id"]), data[0].get("max_model_len")


def _request_maker(endpoint: Endpoint, model: str, sampling: dict[str, Any]):
    def make(turn: Turn, history: list[dict[str, str]], history_tokens: int) -> ApiRequest:
        if history:
            prompt: str | list[dict[str, str]] = [*history, {"role": "user", "content": turn.text}]
        else:
            prompt = turn.text
        body = build_body(endpoint, model, prompt, turn.output_len, sampling)
        return ApiRequest(endpoint, body, history_tokens + turn.text_len)
    return make


async def run_benchmark(args: argparse.Namespace, request_rate: float, seed: int) -> dict[str, Any]:
    """One run at one request rate; the result dict as written to the result file."""
    percentiles = _percentiles(args.metric_percentiles)
    slos = parse_goodput(args.goodput)
    metadata = _metadata(args.metadata)
    shape = LoadShape(request_rate, args.max_concurrency, args.duration_limit, args.think_time, seed)
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups must be >= 0, got {args.num_warmups}")
    if not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be > 0 s, got {args.request_timeout}")
    endpoint: Endpoint = args.endpoint_type or ("chat" if args.workload == "multi-turn" else "completions")
    if args.workload == "multi-turn" and endpoint != "chat":
        raise ValueError("the multi-turn workload needs --endpoint-type chat (it sends message histories)")
    base_url = args.base_url.rstrip("/")
    if base_url.endswith("/v1"):
        raise ValueError(f"--base-url {args.base_url!r}: give the server root, without /v1")
    api_key = args.api_key or os.environ.get("TANDEM_API_KEY") or os.environ.get("OPENAI_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    limits = httpx.Limits(max_connections=args.max_concurrency, max_keepalive_connections=args.max_concurrency)
    timeout = httpx.Timeout(args.request_timeout, pool=None)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        served_model, max_model_len = await _server_model(client, base_url, headers)
        model = args.model or served_model
        tokenizer: PromptTokenizer = (LocalTokenizer.load(args.tokenizer) if args.tokenizer
                                      else ServerTokenizer(client, base_url, served_model, headers))
        spec = WorkloadSpec(
            name=args.workload, num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
            length_dist=args.length_dist, length_sigma=args.length_sigma, num_prefixes=args.num_prefixes,
            prefix_len=args.prefix_len, num_turns=args.num_turns, max_model_len=max_model_len,
            chat=endpoint == "chat", seed=seed,
        )
        print(f"Building {args.num_prompts} {args.workload} prompts for {model} at {base_url} ...", file=sys.stderr)
        text = await TextMaker.build(tokenizer, seed)
        conversations = await build_conversations(spec, text)
        warmups = await _warmup_turns(text, args.num_warmups, seed)

        sampling: dict[str, Any] = {"temperature": args.temperature, "ignore_eos": not args.no_ignore_eos}
        if args.top_p is not None:
            sampling["top_p"] = args.top_p
        if args.top_k is not None:
            sampling["top_k"] = args.top_k
        sampling.update(args.extra_body or {})
        make = _request_maker(endpoint, model, sampling)
        send = partial(send_request, client, base_url, timeout_s=args.request_timeout, headers=headers)
        if warmups:
            print(f"Warming up with {len(warmups)} request(s) ...", file=sys.stderr)
            await warm_up(make, send, warmups)
        total = sum(len(c.turns) for c in conversations)
        with tqdm(total=total, disable=args.disable_tqdm, desc=f"{args.workload}", unit="req") as bar:
            outcome = await run_load(conversations, make, send, shape, bar)

    result: dict[str, Any] = {
        "date": datetime.now().strftime("%Y%m%d-%H%M%S"),
        "backend": "openai-chat" if endpoint == "chat" else "openai",
        "endpoint_type": "openai-chat" if endpoint == "chat" else "openai",
        "label": args.label or base_url,
        "base_url": base_url,
        "model_id": model,
        "tokenizer_id": args.tokenizer or "server /tokenize",
        "num_prompts": args.num_prompts,
        "request_rate": "inf" if math.isinf(request_rate) else request_rate,
        "burstiness": 1.0,
        "max_concurrency": args.max_concurrency,
        "duration_limit": args.duration_limit,
        "workload": args.workload,
        "workload_args": _workload_args(spec, conversations),
        "seed": seed,
        "num_warmups": len(warmups),
        "ignore_eos": not args.no_ignore_eos,
        "temperature": args.temperature,
        "goodput_slos_ms": slos or None,
        "percentiles": percentiles,
        "not_sent": outcome.not_sent,
        "result_format": f"tandem-bench-serve/{RESULT_FORMAT_VERSION}",
        **metadata,
    }
    result.update(summarize(outcome.results, outcome.duration_s, percentiles=percentiles, goodput_slos_ms=slos))
    result.update(per_request_fields(outcome.results))
    return result


def _workload_args(spec: WorkloadSpec, conversations: list[Conversation]) -> dict[str, Any]:
    lens = [t.text_len for c in conversations for t in c.turns]
    outs = [t.output_len for c in conversations for t in c.turns]
    in_len, out_len = spec.effective_lens()
    args: dict[str, Any] = {"input_len": in_len, "output_len": out_len,
                            "mean_prompt_text_tokens": float(np.mean(lens)), "mean_max_tokens": float(np.mean(outs))}
    if spec.name in ("random", "multi-turn"):
        args.update(length_dist=spec.length_dist, length_sigma=spec.length_sigma)
    if spec.name == "shared-prefix":
        args.update(num_prefixes=spec.num_prefixes, prefix_len=spec.prefix_len)
    if spec.name == "multi-turn":
        args.update(num_turns=spec.num_turns, num_conversations=len(conversations))
    return args


async def _warmup_turns(text: TextMaker, num: int, seed: int) -> list[Turn]:
    """Short warm-up prompts from corpus windows of their own random stream (a workload prompt shares
    cached blocks with one only if both drew the same window start)."""
    rng = np.random.default_rng(seed + 2)
    starts = [int(s) for s in rng.integers(0, len(text.corpus_ids), num)]
    made = await text.make_many([WARMUP_INPUT_LEN] * num, starts)
    return [Turn(t, n, WARMUP_OUTPUT_LEN) for t, n in made]


def write_result(result: dict[str, Any], path: str) -> None:
    """JSON with one top-level key a line (arrays stay on their line); NaN is refused."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value, allow_nan=False)}" for key, value in result.items()]
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("{\n" + ",\n".join(lines) + "\n}\n")


def result_path(path: str, request_rate: float, several: bool) -> str:
    """The result file of one rate: PATH itself, or PATH with -rate<R> before its suffix when several run."""
    if not several:
        return path
    p = Path(path)
    return str(p.with_name(f"{p.stem}-rate{request_rate:g}{p.suffix or '.json'}"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rates: list[float] = args.request_rate
    worst = 0
    for i, rate in enumerate(rates):
        try:
            result = asyncio.run(run_benchmark(args, rate, args.seed + i))
        except (ValueError, RuntimeError, OSError) as exc:
            print(f"tandem bench serve: error: {exc}", file=sys.stderr)
            return 2 if isinstance(exc, ValueError) else 1
        print(format_summary(result, result["percentiles"]))
        if args.result_file:
            path = result_path(args.result_file, rate, len(rates) > 1)
            write_result(result, path)
            print(f"Result written to {path}", file=sys.stderr)
        worst = max(worst, 0 if result["completed"] > 0 else 1)
    return worst


if __name__ == "__main__":
    sys.exit(main())
