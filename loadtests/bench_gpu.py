"""The GPU benchmark of issue 6, in one process: random weights of a real shape (config.json only,
`load_format="dummy"`), bf16, beside HF transformers on the same GPU in the same run, beside the
HBM floor from a copy bandwidth and the matmul peak measured in the same run. Table printed last.

    python loadtests/bench_gpu.py                                  # Llama-3.1-8B shape, H100
    python loadtests/bench_gpu.py --json $OUT/bench_gpu.json       # also every number as JSON
    python loadtests/bench_gpu.py --device cpu --small --model F   # a dry run of the script

(a) batch-1 decode TPOT (128-token prompt); (b) decode throughput at batch 64 and 256, ~1k context
(1000-token prompts, 64 steps timed); (c) offline throughput: 500 requests, lognormal lengths
(mean 202 in / 179 out), all submitted at once; (d) prefill throughput: 8 x 1k and 1 x 8k prompts.
Decode steps are timed on EngineCore.step() once every sequence decodes (host work included);
"device ms" times the CUDA graph's replay alone. HF runs bounded: (a)/(b) by the difference of two
generate() calls (1 and 1+N new tokens), (c) on 32 of the requests (outputs cut at 256) as one padded generate() batch,
(d) as one forward pass (generate's prefill).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import logging
import math
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch

from tandem import LLM, SamplingParams
from tandem.shared.models.config import ModelConfig


# --- helpers ------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def device_ms(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median device time of fn (CUDA events), ms."""
    if device.type != "cuda":
        return statistics.median(timed(fn, device) for _ in range(reps)) * 1000
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Shape:
    """Byte and FLOP counts of a dense decoder from its ModelConfig."""

    def __init__(self, mc: ModelConfig) -> None:
        h, q, kv, i = mc.hidden_size, mc.num_heads * mc.head_dim, mc.num_kv_heads * mc.head_dim, mc.intermediate_size
        self.layer_params = h * (q + 2 * kv) + q * h + 3 * h * i
        self.matmul_params = mc.num_layers * self.layer_params  # without embedding and lm_head
        self.lm_head = mc.vocab_size * h
        self.mc = mc

    def decode_floor_bytes(self, batch: int, context: int) -> int:
        """Each weight read once (bf16) + each sequence's K/V read once."""
        return 2 * (self.matmul_params + self.lm_head) + batch * context * self.mc.kv_bytes_per_token(torch.bfloat16)

    def prefill_flops(self, prompt_lens: list[int]) -> float:
        mc = self.mc
        linear = 2 * self.matmul_params * sum(prompt_lens) + 2 * self.lm_head * len(prompt_lens)
        attn = sum(4 * mc.num_heads * mc.head_dim * n * (n + 1) / 2 for n in prompt_lens) * mc.num_layers
        return linear + attn


def lognormal_lengths(rng: random.Random, n: int, mean: float, sigma: float, lo: int, hi: int) -> list[int]:
    mu = math.log(mean) - sigma * sigma / 2
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


# --- ceilings -----------------------------------------------------------------------------------
def measure_ceilings(device: torch.device, small: bool) -> dict:
    n = (1 << 24) if small else (1 << 31)  # bf16 elements: 4 GiB per buffer on the GPU
    src = torch.randn(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = device_ms(lambda: dst.copy_(src), device, reps=10)
    copy_gbs = 2 * src.numel() * 2 / ms / 1e6  # bytes read + written
    m = 1024 if small else 8192
    a, b = (torch.randn(m, m, dtype=torch.bfloat16, device=device) for _ in range(2))
    ms = device_ms(lambda: a @ b, device, reps=20)
    tflops = 2 * m**3 / ms / 1e9
    return {"copy_GBps": copy_gbs, "matmul_bf16_TFLOPs": tflops, "matmul_size": m}


# --- HF transformers ------------------------------------------------------------------------------
def hf_benchmarks(args, device: torch.device, prompts: dict, results: dict) -> None:
    import transformers

    config = transformers.AutoConfig.from_pretrained(args.model)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = dict(do_sample=False, pad_token_id=0)

    def generate(ids: torch.Tensor, new: int, mask: torch.Tensor | None = None, **kw) -> None:
        mask = torch.ones_like(ids) if mask is None else mask
        model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, **gen, **kw)

    def step_ms(ids: torch.Tensor, steps: int, **kw) -> float:
        generate(ids, 2, **kw)  # warm-up
        t1 = timed(lambda: generate(ids, 1, **kw), device)
        tn = timed(lambda: generate(ids, 1 + steps, **kw), device)
        return (tn - t1) / steps * 1000

    def attempt(name: str, fn: Callable[[], dict]) -> None:
        try:
            with torch.inference_mode():
                results[name] = fn()
        except Exception as exc:  # noqa: BLE001 - OOM or an unsupported option: recorded, the run goes on
            results[name] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            free_memory(device)
        print(name, results[name], flush=True)

    def tensor(rows: list[list[int]]) -> torch.Tensor:
        return torch.tensor(rows, device=device)

    attempt("hf_a", lambda: {"tpot_ms": step_ms(tensor(prompts["a"]), args.hf_steps)})
    for batch in args.batches:
        def decode(batch=batch):
            ids = tensor(prompts[f"b{batch}"])
            try:
                ms = step_ms(ids, args.hf_steps // 2, prefill_chunk_size=args.hf_prefill_chunk)
                chunked = True
            except (TypeError, ValueError, NotImplementedError, AttributeError):
                ms, chunked = step_ms(ids, args.hf_steps // 2), False
            return {"step_ms": ms, "tok_s": batch / ms * 1000, "prefill_chunked": chunked}
        attempt(f"hf_b{batch}", decode)

    def offline() -> dict:
        ins, outs = prompts["c_hf"]
        width = max(len(p) for p in ins)
        ids = tensor([[0] * (width - len(p)) + p for p in ins])  # left padding
        mask = tensor([[0] * (width - len(p)) + [1] * len(p) for p in ins])
        new = max(outs)
        generate(ids[:2], 2, mask[:2])  # warm-up
        seconds = timed(lambda: generate(ids, new, mask), device)
        return {"requests": len(ins), "seconds": seconds, "req_s": len(ins) / seconds,
                "out_tok_s": sum(outs) / seconds, "max_new_tokens": new}
    attempt("hf_c", offline)

    for name, rows in (("d1k", prompts["d1k"]), ("d8k", prompts["d8k"])):
        def prefill(rows=rows) -> dict:
            ids = tensor(rows)
            model(ids[:, :128], logits_to_keep=1)  # warm-up
            seconds = statistics.median(timed(lambda: model(ids, logits_to_keep=1), device) for _ in range(3))
            tokens = ids.numel()
            return {"seconds": seconds, "tok_s": tokens / seconds}
        attempt(f"hf_{name}", prefill)


# --- Tandem -------------------------------------------------------------------------------------
def decode_steps(llm: LLM, prompts: list[list[int]], steps: int, device: torch.device, tag: str,
                 profile: Callable | None = None) -> dict:
    """Prefill every prompt, then time `steps` engine steps where every sequence decodes."""
    core = llm.engine
    # Early prompts decode while later ones prefill: room for those steps too, so none finishes.
    params = SamplingParams(temperature=0.0, max_tokens=steps + len(prompts) + 32, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts, strict=True):
        core.add_request(rid, p, params)
    started: set[str] = set()
    while len(started) < len(ids):
        started.update(o.request_id for o in core.step())
    sync(device)
    t0 = time.perf_counter()
    produced = [len(core.step()) for _ in range(steps)]
    sync(device)
    step_ms = (time.perf_counter() - t0) / steps * 1000
    assert min(produced) == len(prompts), f"the batch changed while timed: {min(produced)} of {len(prompts)}"
    result = {"step_ms": step_ms, "tok_s": len(prompts) / step_ms * 1000}
    if profile is not None:
        profile(core)
    runner = core.runner
    graphs = getattr(runner, "graphs", None)
    layout = getattr(runner, "last_layout", None)
    if graphs is not None and layout in graphs.graphs:
        # replays the last step's inputs: rewrites the same KV slots with the same values
        result["device_ms"] = device_ms(graphs.graphs[layout].replay, device, reps=20)
        result["graph_layout"] = str(layout)
    core.abort(ids)
    while core.has_unfinished():
        core.step()
    return result


class Profiler:
    """After a timed decode loop: the host's Python profile of 10 steps (graphs as configured), and
    the device kernels of 2 eager steps (torch.profiler), appended to `path`."""

    def __init__(self, path: str | None, device: torch.device) -> None:
        self.path, self.device = path, device

    def __call__(self, tag: str) -> Callable:
        return lambda core: self.run(core, tag) if self.path else None

    def run(self, core, tag: str) -> None:
        import cProfile
        import io
        import pstats

        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            core.step()
        prof.disable()
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(25)
        runner = core.runner
        graphs, runner.graphs = getattr(runner, "graphs", None), None
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as kprof:
            for _ in range(2):
                core.step()
        runner.graphs = graphs
        kernels = kprof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
        with open(self.path, "a") as f:
            f.write(f"\n===== {tag}: host, 10 steps (cProfile, by own time) =====\n{text.getvalue()}\n"
                    f"===== {tag}: 2 eager steps (torch.profiler) =====\n{kernels}\n")


def offline(llm: LLM, requests: tuple[list[list[int]], list[int]], device: torch.device) -> dict:
    """(c): every request submitted at once through LLM.generate; where the time goes."""
    ins, outs = requests
    reqs = [{"prompt_token_ids": p} for p in ins]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in outs]
    llm.generate(reqs[:16], params[:16])  # warm-up
    core = llm.engine
    step, in_steps = core.step, [0.0]

    def timed_step():
        t = time.perf_counter()
        try:
            return step()
        finally:
            in_steps[0] += time.perf_counter() - t

    stats = getattr(core.runner, "step_stats", None)
    if stats is not None:
        stats.clear()
    core.step = timed_step
    seconds = timed(lambda: llm.generate(reqs, params), device)
    del core.step
    return {"requests": len(ins), "seconds": seconds, "req_s": len(ins) / seconds,
            "out_tok_s": sum(outs) / seconds, "total_tok_s": (sum(outs) + sum(map(len, ins))) / seconds,
            "mean_in": statistics.mean(map(len, ins)), "mean_out": statistics.mean(outs), "max_out": max(outs),
            "max_num_seqs": llm.config.max_num_seqs, "in_engine_steps_s": in_steps[0], "runner": dict(stats or {})}


def make_llm(args, device: torch.device, max_num_seqs: int) -> LLM:
    return LLM(args.model, dtype="bfloat16", device=device.type, load_format="dummy", skip_tokenizer_init=True,
               max_model_len=args.max_model_len, max_num_seqs=max_num_seqs,
               max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False,
               gpu_memory_utilization=args.gpu_memory_utilization)


def tandem_benchmarks(args, device: torch.device, prompts: dict, shape: Shape, results: dict) -> None:
    profiler = Profiler(args.profile, device)
    t0 = time.perf_counter()
    llm = make_llm(args, device, args.max_num_seqs)
    runner = llm.engine.runner
    graphs = getattr(runner, "graphs", None)
    results["engine"] = {
        "start_s": time.perf_counter() - t0, "kv_blocks": llm.engine.kv.pool.num_blocks,
        "kv_tokens": llm.engine.kv.pool.num_blocks * llm.config.block_size,
        "cuda_graphs": len(graphs.graphs) if graphs is not None else 0,
    }
    print("engine", results["engine"], flush=True)
    decode_steps(llm, prompts["a"], 4, device, "warm")

    def record(name: str, value: dict) -> None:
        results[name] = value
        print(name, value, flush=True)

    a = decode_steps(llm, prompts["a"], args.steps_a, device, "a", profiler("a: batch 1"))
    a["floor_ms"] = shape.decode_floor_bytes(1, len(prompts["a"][0]) + args.steps_a // 2) / results["ceilings"][
        "copy_GBps"] / 1e6
    record("tandem_a", a)
    for batch in args.batches:
        rows = prompts[f"b{batch}"]
        b = decode_steps(llm, rows, args.steps_b, device, f"b{batch}", profiler(f"b: batch {batch}"))
        b["floor_ms"] = shape.decode_floor_bytes(batch, len(rows[0]) + args.steps_b // 2) / results["ceilings"][
            "copy_GBps"] / 1e6
        record(f"tandem_b{batch}", b)

    record("tandem_c", offline(llm, prompts["c"], device))

    one = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    for name in ("d1k", "d8k"):
        rows = prompts[name]
        llm.generate([{"prompt_token_ids": p[:256]} for p in rows], one)  # warm-up
        seconds = statistics.median(
            timed(lambda rows=rows: llm.generate([{"prompt_token_ids": p} for p in rows], one), device)
            for _ in range(3))
        flops = shape.prefill_flops([len(p) for p in rows])
        record(f"tandem_{name}", {"seconds": seconds, "tok_s": sum(map(len, rows)) / seconds,
                                  "TFLOPs": flops / seconds / 1e12,
                                  "pct_peak": 100 * flops / seconds / 1e12 / results["ceilings"]["matmul_bf16_TFLOPs"]})

    if graphs is not None:  # the same steps without CUDA graphs
        runner.disable_cuda_graphs()
        record("tandem_a_eager", decode_steps(llm, prompts["a"], min(args.steps_a, 32), device, "ae"))
        rows = prompts[f"b{args.batches[0]}"]
        record(f"tandem_b{args.batches[0]}_eager", decode_steps(llm, rows, 16, device, "be"))
    # (c) again with twice the concurrency: every request admitted at once, none waits in the queue
    del llm, runner, graphs
    free_memory(device)
    try:
        llm = make_llm(args, device, 2 * args.max_num_seqs)
        record("tandem_c2", offline(llm, prompts["c"], device))
    except Exception as exc:  # noqa: BLE001 - recorded; the table still prints
        record("tandem_c2", {"error": f"{type(exc).__name__}: {str(exc)[:200]}"})


# --- report -------------------------------------------------------------------------------------
def table(results: dict, args) -> str:
    def get(name: str, key: str) -> float | None:
        value = results.get(name, {}).get(key) if isinstance(results.get(name), dict) else None
        return value if isinstance(value, int | float) else None

    def fmt(x: float | None, spec: str = ".1f") -> str:
        return "-" if x is None else format(x, spec)

    def ratio(a: float | None, b: float | None, invert: bool = False) -> str:
        if a is None or b is None or not a or not b:
            return "-"
        return f"{(b / a if invert else a / b):.1f}x"

    rows = ["| case | Tandem | HF generate | Tandem/HF | HBM floor | target |", "|---|---|---|---|---|---|"]
    a, ha = get("tandem_a", "step_ms"), get("hf_a", "tpot_ms")
    rows.append(f"| (a) batch-1 TPOT, ms | {fmt(a, '.2f')} (device {fmt(get('tandem_a', 'device_ms'), '.2f')}) | "
                f"{fmt(ha, '.2f')} | {ratio(a, ha, invert=True)} faster | {fmt(get('tandem_a', 'floor_ms'), '.2f')} "
                f"| <= 5.8 |")
    for batch in args.batches:
        t, h = get(f"tandem_b{batch}", "tok_s"), get(f"hf_b{batch}", "tok_s")
        rows.append(f"| (b) decode batch {batch}, ~1k ctx, tok/s | {fmt(t, '.0f')} "
                    f"(step {fmt(get(f'tandem_b{batch}', 'step_ms'), '.2f')} ms, device "
                    f"{fmt(get(f'tandem_b{batch}', 'device_ms'), '.2f')}) | {fmt(h, '.0f')} | {ratio(t, h)} | "
                    f"step {fmt(get(f'tandem_b{batch}', 'floor_ms'), '.2f')} ms | "
                    f"{'>= 12000 and >= 6x HF' if batch == 256 else ''} |")
    c, hc = get("tandem_c", "req_s"), get("hf_c", "req_s")
    rows.append(f"| (c) offline 500 req, req/s | {fmt(c, '.1f')} "
                f"({fmt(get('tandem_c', 'out_tok_s'), '.0f')} out tok/s) | {fmt(hc, '.2f')} "
                f"({get('hf_c', 'requests') or '-'} req, padded batch) | {ratio(c, hc)} | - | >= 40 |")
    c2 = get("tandem_c2", "req_s")
    rows.append(f"| (c) the same, max_num_seqs {get('tandem_c2', 'max_num_seqs')} | {fmt(c2, '.1f')} "
                f"({fmt(get('tandem_c2', 'out_tok_s'), '.0f')} out tok/s) | | {ratio(c2, hc)} | - | >= 40 |")
    for name, label in (("d1k", "8 x 1k"), ("d8k", "1 x 8k")):
        t, h = get(f"tandem_{name}", "tok_s"), get(f"hf_{name}", "tok_s")
        rows.append(f"| (d) prefill {label}, tok/s | {fmt(t, '.0f')} ({fmt(get(f'tandem_{name}', 'TFLOPs'), '.0f')} "
                    f"TFLOP/s, {fmt(get(f'tandem_{name}', 'pct_peak'), '.0f')}% of peak) | {fmt(h, '.0f')} | "
                    f"{ratio(t, h)} | - | {'>= 60% of peak' if name == 'd8k' else ''} |")
    if "tandem_a_eager" in results:
        rows.append(f"| eager (no CUDA graphs): batch-1 step ms / batch-{args.batches[0]} step ms | "
                    f"{fmt(get('tandem_a_eager', 'step_ms'), '.2f')} / "
                    f"{fmt(get(f'tandem_b{args.batches[0]}_eager', 'step_ms'), '.2f')} | | | | |")
    ceil = results["ceilings"]
    head = (f"{results['env']['device']} | torch {results['env']['torch']} | triton {results['env']['triton']} | "
            f"transformers {results['env']['transformers']} | {results['env']['date']}\n"
            f"measured here: copy {ceil['copy_GBps']:.0f} GB/s (read + write), bf16 matmul "
            f"{ceil['matmul_bf16_TFLOPs']:.0f} TFLOP/s ({ceil['matmul_size']}^3); engine start "
            f"{results.get('engine', {}).get('start_s', 0):.1f} s, {results.get('engine', {}).get('cuda_graphs', 0)} "
            f"CUDA graphs, {results.get('engine', {}).get('kv_tokens', 0)} KV tokens\n")
    return head + "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="loadtests/configs/llama-3.1-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="tiny sizes (a dry run of the script)")
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, help="append host and kernel profiles of (a) and (b) to this file")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    small = args.small
    args.batches = [4, 8] if small else [64, 256]
    args.steps_a = 8 if small else 128
    args.steps_b = 4 if small else 64
    args.hf_steps = 4 if small else 32
    args.hf_prefill_chunk = 256
    args.max_num_seqs = 8 if small else 256
    args.max_num_batched_tokens = 256 if small else 8192
    prompt_a, prompt_b, long_d = (16, 64, 256) if small else (128, 1000, 8192)
    args.max_model_len = long_d + 128
    num_c = 24 if small else 500

    device = torch.device(args.device)
    import transformers
    import triton

    results: dict = {"env": {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "triton": triton.__version__, "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }}
    print(results["env"], flush=True)
    results["ceilings"] = measure_ceilings(device, small)
    print("ceilings", results["ceilings"], flush=True)

    mc_vocab = transformers.AutoConfig.from_pretrained(args.model).vocab_size
    rng = random.Random(0)

    def rand_prompts(n: int, length: int) -> list[list[int]]:
        return [[rng.randrange(mc_vocab) for _ in range(length)] for _ in range(n)]

    c_in = lognormal_lengths(rng, num_c, 202 if not small else 24, 0.8, 4, 2048 if not small else 128)
    c_out = lognormal_lengths(rng, num_c, 179 if not small else 12, 0.8, 4, 1024 if not small else 32)
    prompts = {
        "a": rand_prompts(1, prompt_a),
        **{f"b{b}": rand_prompts(b, prompt_b) for b in args.batches},
        "c": ([[rng.randrange(mc_vocab) for _ in range(n)] for n in c_in], c_out),
        "d1k": rand_prompts(8, long_d // 8),
        "d8k": rand_prompts(1, long_d),
    }
    hf_n = 8 if small else 32
    prompts["c_hf"] = (prompts["c"][0][:hf_n], [min(n, 256) for n in c_out[:hf_n]])

    free_memory(device)  # the ceilings' buffers
    if not args.skip_hf:
        hf_benchmarks(args, device, prompts, results)
        free_memory(device)  # the HF model
    tandem_benchmarks(args, device, prompts, Shape(_model_config(args)), results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("\n" + table(results, args))


def _model_config(args) -> ModelConfig:
    from tandem.shared.models.config import model_config_from_hf
    from tandem.shared.models.hf_folder import resolve_model

    source = resolve_model(args.model, require_weights=False)
    return model_config_from_hf(source.hf_config, "bfloat16", args.max_model_len)


if __name__ == "__main__":
    main()
