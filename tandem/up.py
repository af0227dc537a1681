"""`tandem up`: the whole disaggregated stack on this machine, as processes: Redis (started if none
answers at --redis-url), N prefill and M decode workers (or K mixed ones), and the router. The
same commands as compose/ runs, with free ports on 127.0.0.1; CPU workers split the cores
(OMP_NUM_THREADS = cores / workers, unless set). Logs: one file per service in
--log-dir. Ctrl-C (or SIGTERM) stops everything; a worker that dies is reported and the router
fails over; if the router or Redis (when started here) dies, the stack stops.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from tandem.services.worker import READY_PREFIX


@dataclass
class Service:
    name: str
    cmd: list[str]
    log: Path
    proc: subprocess.Popen | None = None
    info: dict = field(default_factory=dict)
    ready: threading.Event = field(default_factory=threading.Event)


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The engine flags of `tandem serve` given to `tandem up`, as argv for the workers."""
    flags = ["--dtype", args.dtype, "--block-size", str(args.block_size), "--max-num-seqs", str(args.max_num_seqs),
             "--kv-cache-memory", str(args.kv_cache_memory), "--gpu-memory-utilization",
             str(args.gpu_memory_utilization), "--device", args.device, "--load-format", args.load_format]
    if args.max_model_len is not None:
        flags += ["--max-model-len", str(args.max_model_len)]
    if args.max_num_batched_tokens is not None:
        flags += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.no_enable_prefix_caching:
        flags.append("--no-enable-prefix-caching")
    if args.enforce_eager:
        flags.append("--enforce-eager")
    return flags


def stack_commands(args: argparse.Namespace, redis_url: str) -> dict[str, list[str]]:
    """Service name -> argv after `tandem` (the same subcommands and flags compose/ uses)."""
    model = [args.model_tag] if args.model_tag else ([args.model] if args.model else [])
    roles = [("prefill", args.prefill), ("decode", args.decode), ("mixed", args.mixed)]
    commands = {}
    for role, count in roles:
        for i in range(count):
            name = f"{role}-{i}"
            sub = [role] if role != "mixed" else ["worker", "--role", "mixed"]
            commands[name] = [*sub, *model, *engine_flags(args), "--host", "127.0.0.1", "--port", "0",
                              "--zmq-port", "0", "--kv-port", "0", "--kv-transport", args.kv_transport,
                              "--redis-url", redis_url, "--worker-id", name, "--log-level", args.log_level]
    router = ["router", *model, "--host", args.host, "--port", str(args.port), "--redis-url", redis_url,
              "--policy", args.policy, "--log-level", args.log_level]
    if args.api_key:
        router += ["--api-key", args.api_key]
    if args.served_model_name:
        router += ["--served-model-name", *args.served_model_name]
    commands["router"] = router
    return commands


def _redis_answers(url: str) -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1).ping())
    except (redis.RedisError, OSError):
        return False


def _start(service: Service, threads: int | None = None) -> None:
    log = open(service.log, "ab")
    env = dict(os.environ)
    if threads is not None and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(threads)  # CPU workers share the cores instead of oversubscribing them
    service.proc = subprocess.Popen(
        [sys.executable, "-m", "tandem.cli", *service.cmd], stdout=subprocess.PIPE, stderr=log, env=env,
        start_new_session=True,  # Ctrl-C reaches `tandem up` only; it stops the others in order
    )

    def pump() -> None:  # stdout to the log; the worker's ready line is parsed on the way
        for line in service.proc.stdout:
            log.write(line)
            log.flush()
            text = line.decode(errors="replace")
            if text.startswith(READY_PREFIX):
                service.info = json.loads(text[len(READY_PREFIX):])
                service.ready.set()
        log.close()

    threading.Thread(target=pump, daemon=True).start()


def _wait_router(service: Service, port: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if service.proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.3)
    return False


def _stop(services: list[Service]) -> None:
    for s in reversed(services):  # router first, then workers, Redis last
        if s.proc is not None and s.proc.poll() is None:
            s.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for s in reversed(services):
        if s.proc is None:
            continue
        try:
            s.proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()


def run(args: argparse.Namespace) -> int:
    if args.prefill + args.decode + args.mixed == 0:
        raise ValueError("give workers: --prefill N --decode M, or --mixed K")
    if (args.prefill == 0) != (args.decode == 0):
        raise ValueError("prefill and decode workers come together: --prefill N --decode M (N, M >= 1)")
    log_dir = Path(args.log_dir or f"tandem-logs/{time.strftime('%Y%m%d-%H%M%S')}")
    log_dir.mkdir(parents=True, exist_ok=True)
    redis_url = args.redis_url
    services: list[Service] = []
    stopping = threading.Event()

    def on_signal(signum, frame) -> None:
        stopping.set()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        if not _redis_answers(redis_url):
            parsed = urlparse(redis_url)
            if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.scheme != "redis":
                raise ValueError(f"no Redis answers at {redis_url} and it is not local: start it, or pass --redis-url")
            port = parsed.port or 6379
            redis_log = log_dir / "redis.log"
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                stdout=open(redis_log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            )
            services.append(Service("redis", [], redis_log, proc))
            deadline = time.monotonic() + 10
            while not _redis_answers(redis_url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start: see {redis_log}")
                time.sleep(0.1)
            print(f"started redis-server on port {port}", flush=True)
        commands = stack_commands(args, redis_url)
        workers = [Service(name, cmd, log_dir / f"{name}.log") for name, cmd in commands.items() if name != "router"]
        # On CPU, N workers on one machine get cores / N threads each (unless OMP_NUM_THREADS is set):
        # N processes each running one thread per core spend their time preempting each other.
        threads = max(1, (os.cpu_count() or 1) // len(workers)) if args.device == "cpu" else None
        for w in workers:
            _start(w, threads)
            services.append(w)
        deadline = time.monotonic() + args.start_timeout
        for w in workers:
            while not w.ready.wait(0.2):
                if stopping.is_set():
                    return 130
                if w.proc.poll() is not None or time.monotonic() > deadline:
                    print(f"tandem: error: {w.name} did not start: see {w.log}", file=sys.stderr)
                    return 1
            print(f"{w.name}: requests {w.info['zmq_addr']}, KV {w.info['kv_addr']}, "
                  f"http://127.0.0.1:{w.info['http_port']}", flush=True)
        router = Service("router", commands["router"], log_dir / "router.log")
        _start(router)
        services.append(router)
        if not _wait_router(router, args.port, args.start_timeout):
            print(f"tandem: error: the router did not start: see {router.log}", file=sys.stderr)
            return 1
        print(f"Tandem is up: http://{args.host}:{args.port}/v1 (policy {args.policy}); logs in {log_dir}",
              flush=True)
        reported: set[str] = set()
        while not stopping.wait(0.5):
            for s in services:
                if s.proc.poll() is None or s.name in reported:
                    continue
                reported.add(s.name)
                print(f"tandem: {s.name} exited with code {s.proc.returncode} (see {s.log})", file=sys.stderr,
                      flush=True)
                if s.name in ("router", "redis"):
                    return 1
        return 0
    finally:
        _stop(services)
        for s, handler in old.items():
            signal.signal(s, handler)


def add_up_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefill", type=int, default=0, help="prefill workers")
    p.add_argument("--decode", type=int, default=0, help="decode workers")
    p.add_argument("--mixed", type=int, default=0, help="mixed workers (prefill and decode each; data parallel)")
    p.add_argument("--policy", default="cache_aware", choices=["cache_aware", "least_loaded", "round_robin"])
    p.add_argument("--host", default="127.0.0.1", help="the router's interface")
    p.add_argument("--port", type=int, default=8000, help="the router's port")
    p.add_argument("--redis-url", default=os.environ.get("TANDEM_REDIS_URL", "redis://127.0.0.1:6379/0"))
    p.add_argument("--kv-transport", default="zmq", choices=["zmq", "socket", "ucx"])
    p.add_argument("--api-key", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--log-dir", default=None, help="default: tandem-logs/<date-time>")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
