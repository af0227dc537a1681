"""The `tandem` command: `tandem generate "PROMPT"` and `tandem serve [MODEL]` (the OpenAI server)."""

from __future__ import annotations

import argparse
import sys

from tandem.shared.sampling_params import InvalidParameterError


def add_engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF folder or .gguf file (default: the bundled SmolLM2-135M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--no-enable-prefix-caching", action="store_true")
    p.add_argument("--kv-cache-memory", default="4GiB", help="KV pool size on CPU: bytes or e.g. 4GiB")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--device", default="cpu")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy"])
    p.add_argument("--enforce-eager", action="store_true", help="CUDA: no CUDA graphs (also TANDEM_CUDA_GRAPHS=0)")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        dtype=args.dtype, max_model_len=args.max_model_len, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=not args.no_enable_prefix_caching, kv_cache_memory=args.kv_cache_memory,
        device=args.device, load_format=args.load_format, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from tandem import LLM, SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=args.stop or None, ignore_eos=args.ignore_eos,
    )
    llm = LLM(args.model, **engine_kwargs(args))
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params)[0]
    else:
        out = llm.generate(args.prompt, params)[0]
    print(out.outputs[0].text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    try:
        from tandem.services.serve.main import config_from_args, run
    except ImportError as exc:  # pyzmq, fastapi, uvicorn... are the `serve` extra
        print(f"tandem: error: serve needs the server dependencies ({exc}): pip install 'tandem[serve]'",
              file=sys.stderr)
        return 2
    return run(config_from_args(args, dict(os.environ)))


def cmd_worker(args: argparse.Namespace) -> int:
    """`tandem prefill|decode [MODEL]`, `tandem worker --role mixed [MODEL]`."""
    import os

    try:
        from tandem.services.worker.config import worker_config_from_args
        from tandem.services.worker.main import run
    except ImportError as exc:
        print(f"tandem: error: workers need the server dependencies ({exc}): pip install 'tandem[serve]'",
              file=sys.stderr)
        return 2
    role = args.role or args.command
    return run(worker_config_from_args(args, dict(os.environ), role, engine_kwargs(args)))


def cmd_router(args: argparse.Namespace) -> int:
    import os

    try:
        from tandem.services.router.main import config_from_args, run
    except ImportError as exc:  # redis, fastapi, uvicorn, pyzmq: the `serve` and `router` extras
        print(f"tandem: error: the router needs its dependencies ({exc}): pip install 'tandem[serve,router]'",
              file=sys.stderr)
        return 2
    return run(config_from_args(args, dict(os.environ)))


def cmd_up(args: argparse.Namespace) -> int:
    from tandem.up import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    """`tandem bench serve ...` / `tandem bench report ...`: the rest of argv goes to loadtests/."""
    try:
        if args.bench_command == "serve":
            from tandem.loadtests.serve_bench import main as bench_main
        else:
            from tandem.loadtests.bench_report import main as bench_main
    except ImportError as exc:  # httpx comes with the `bench` (or `test`) extra
        print(f"tandem: error: bench needs its dependencies ({exc}): pip install 'tandem[bench]'", file=sys.stderr)
        return 2
    return bench_main(args.bench_args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Tandem LLM inference engine")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="print the completion of one prompt")
    gen.add_argument("prompt")
    add_engine_args(gen)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="the OpenAI-compatible server (default model: the bundled SmolLM2)")
    serve.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="HF folder or .gguf file")
    add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", nargs="+", default=None,
                       help="names the API answers to (the first is reported); default: MODEL")
    serve.add_argument("--api-key", default=None, help="require this bearer key on /v1/* (or set TANDEM_API_KEY)")
    serve.add_argument("--engine-transport", default="ipc", choices=["ipc", "tcp"],
                       help="engine socket: ipc in a private temp folder, or tcp on 127.0.0.1")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(func=cmd_serve)

    from tandem.services.worker.config import ROLES, add_worker_args

    for name, text in (("prefill", "a prefill worker: computes prompts and hands their KV off"),
                       ("decode", "a decode worker: pulls handed-off KV and generates"),
                       ("worker", "a worker in any role (--role prefill|decode|mixed)")):
        w = sub.add_parser(name, help=text)
        w.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="HF folder or .gguf file")
        add_engine_args(w)
        add_worker_args(w)
        if name == "worker":
            w.add_argument("--role", default="mixed", choices=ROLES)
        else:
            w.set_defaults(role=None)
        w.set_defaults(func=cmd_worker)

    router = sub.add_parser("router", help="the OpenAI API over the workers registered in Redis")
    router.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="the workers' model (for the tokenizer and chat template)")
    router.add_argument("--model", default=None)
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8000)
    router.add_argument("--redis-url", default=None, help="default: $TANDEM_REDIS_URL or redis://127.0.0.1:6379/0")
    router.add_argument("--policy", default="cache_aware", choices=["cache_aware", "least_loaded", "round_robin"])
    router.add_argument("--prefill-weight", type=float, default=4.0,
                        help="cache_aware: cost of one uncached prompt block against one active block")
    router.add_argument("--served-model-name", nargs="+", default=None)
    router.add_argument("--api-key", default=None, help="require this bearer key on /v1/* (or set TANDEM_API_KEY)")
    router.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    router.set_defaults(func=cmd_router)

    from tandem.up import add_up_args

    up = sub.add_parser("up", help="the whole stack on this machine: Redis, workers, router (Ctrl-C stops it)")
    up.add_argument("model_tag", nargs="?", default=None, metavar="MODEL", help="HF folder or .gguf file")
    add_engine_args(up)
    add_up_args(up)
    up.set_defaults(func=cmd_up)

    bench = sub.add_parser("bench", help="benchmarks: `tandem bench serve --help`, `tandem bench report --help`")
    bench.add_argument("bench_command", choices=["serve", "report"], help="serve: load-test a server; report: HTML")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER, help="the benchmark's own arguments")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InvalidParameterError, ValueError, OSError) as e:
        print(f"tandem: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
