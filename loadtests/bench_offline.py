"""Offline throughput and batch-1 decode latency of the engine (no server).

    python loadtests/bench_offline.py                # SmolLM2-135M (bundled GGUF), bf16
    python loadtests/bench_offline.py --hf           # also HF transformers generate, same run

Workload (as vLLM's `benchmark_throughput --dataset-name random`): N prompts of random token
ids, `--input-len` in / `--output-len` out, ignore_eos. Prints a table last.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import time

import torch

from tandem import LLM, SamplingParams


def random_prompts(vocab: int, num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    # Skip the first ids: SmolLM2 keeps its special tokens there.
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(num)]


def bench_throughput(llm: LLM, prompts: list[list[int]], output_len: int) -> tuple[float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(o.outputs[0].token_ids) for o in outs)


def bench_decode_latency(llm: LLM, prompt: list[int], output_len: int, repeats: int = 3) -> float:
    """ms per output token after the first (TTFT excluded), batch 1; median of `repeats`."""
    p = {"prompt_token_ids": prompt}
    llm.generate(p, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(p, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))
        t1 = time.perf_counter()
        llm.generate(p, SamplingParams(temperature=0.0, max_tokens=output_len + 1, ignore_eos=True))
        t2 = time.perf_counter()
        samples.append(((t2 - t1) - (t1 - t0)) / output_len * 1000)
    return sorted(samples)[len(samples) // 2]


def bench_hf(model_path: str | None, prompt: list[int], output_len: int, dtype: torch.dtype) -> float:
    import transformers

    from tandem.shared.models.hf_folder import resolve_model

    source = resolve_model(model_path)
    kw = {"gguf_file": source.path.name} if source.is_gguf else {}
    folder = source.path.parent if source.is_gguf else source.path
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw).eval()
    ids = torch.tensor([prompt])

    def run(n: int) -> float:
        t = time.perf_counter()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - t

    run(4)
    return (run(output_len + 1) - run(1)) / output_len * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--kv-cache-memory", default="4GiB")
    ap.add_argument("--hf", action="store_true", help="also time HF transformers generate at batch 1")
    args = ap.parse_args()

    llm = LLM(args.model, dtype=args.dtype, kv_cache_memory=args.kv_cache_memory)
    vocab = llm.engine.model_config.vocab_size
    prompts = random_prompts(vocab, args.num_prompts, args.input_len)
    # Warm up on other prompts: the timed ones must not hit the prefix cache.
    bench_throughput(llm, random_prompts(vocab, 4, args.input_len, seed=1), 8)
    elapsed, out_tokens = bench_throughput(llm, prompts, args.output_len)
    total_tokens = out_tokens + args.num_prompts * args.input_len
    decode_ms = bench_decode_latency(llm, prompts[0], args.output_len)
    rows = [
        ("tandem", f"{args.num_prompts} x {args.input_len}/{args.output_len}", f"{out_tokens / elapsed:,.0f}",
         f"{total_tokens / elapsed:,.0f}", f"{args.num_prompts / elapsed:.2f}", f"{decode_ms:.1f}"),
    ]
    if args.hf:
        hf_ms = bench_hf(args.model, prompts[0], args.output_len, llm.engine.model_config.dtype)
        rows.append(("hf transformers", "batch 1", "-", "-", "-", f"{hf_ms:.1f}"))

    print(f"\nmodel={llm.engine.model_config.architecture} dtype={args.dtype} torch={torch.__version__} "
          f"threads={torch.get_num_threads()} cpu={platform.processor() or platform.machine()} "
          f"cores={os.cpu_count()}")
    header = ("engine", "workload", "output tok/s", "total tok/s", "req/s", "batch-1 decode ms/token")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    for r in [header, tuple("-" * w for w in widths), *rows]:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)))


if __name__ == "__main__":
    main()
