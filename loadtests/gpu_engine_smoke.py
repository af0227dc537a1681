"""Engine on CUDA (the Triton path with CUDA graphs, KV pool from gpu_memory_utilization): batch-1
and batch-64 decode with random weights of a real shape, a quick check. The benchmark of issue 6
is loadtests/bench_gpu.py.

    python loadtests/gpu_engine_smoke.py --model loadtests/configs/llama-3.1-8b
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from tandem import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="loadtests/configs/llama-3.1-8b")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    args = ap.parse_args()
    llm = LLM(args.model, dtype="bfloat16", device="cuda", load_format="dummy", skip_tokenizer_init=True,
              max_model_len=2048)
    vocab = llm.engine.model_config.vocab_size
    rng = random.Random(0)
    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        prompts = [{"prompt_token_ids": [rng.randrange(vocab) for _ in range(args.input_len)]} for _ in range(b)]
        llm.generate(prompts, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))  # warm-up
        times = []
        for n in (1, args.output_len + 1):
            torch.cuda.synchronize()
            t = time.perf_counter()
            llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        step_ms = (times[1] - times[0]) / args.output_len * 1000
        rows.append((b, step_ms, b / step_ms * 1000))
    print(f"\n{torch.cuda.get_device_name()} torch={torch.__version__} model={args.model} bf16 dummy weights")
    print("batch | decode step ms | decode tok/s")
    for b, ms, tps in rows:
        print(f"{b:5d} | {ms:14.2f} | {tps:12.0f}")


if __name__ == "__main__":
    main()
