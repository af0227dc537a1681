"""Disaggregated prefill/decode against one monolithic worker, on the same workload: a prefill worker
on GPU A hands each prompt's KV to a decode worker on GPU B (once per KV transport), beside one
mixed worker on one GPU. Worker processes (`python -m tandem.cli prefill|decode|worker`), driven over
their request sockets as the router drives them; random weights of a real shape (config.json only,
`--load-format dummy`: seeded, the same in every process). Table printed last.

    python loadtests/bench_pd_gpu.py --json $OUT/bench_pd_gpu.json           # 2 GPUs: Llama-3.1-8B shape
    python loadtests/bench_pd_gpu.py --device cpu --dtype float32 --model F  # a dry run of the script

Each configuration (mono, pd-zmq, pd-socket, pd-ucx) runs three passes on its own fresh workers,
with the same prompts (seeded random ids) in every configuration; greedy, ignore_eos, max_tokens =
--output-len:
  warm-up: --warmup-requests requests (not reported beyond the JSON);
  check:   --check-requests requests one after another: batch shapes are the same in every
           configuration, so greedy tokens must equal mono's token for token;
  load:    --num-requests requests, at most --concurrency in flight (closed loop).
Per request: TTFT (send -> first token; in P/D the prefill worker's first token, which comes with the
handoff), the handoff gap (first -> second token; in P/D the KV pull and the decode worker's first
step), TPOT ((t_last - t_first) / (n - 1)) and ITL. KV figures are the decode worker's /metrics before
and after each pass (bytes, pulls, pull seconds: GB/s per pull = bytes / seconds sum), failures and
recomputed handoffs (must be 0). After each pass both workers must go idle with 0 used KV blocks.

A configuration that fails (a worker that does not start, e.g. ucx without ucxx, or dies) is recorded
with its error and the others run. Workers never outlive the script (SIGTERM, then SIGKILL; a parent
death signal on Linux). SIGTERM/Ctrl-C: the workers are stopped and what was measured is written and
printed. --time-limit bounds the whole run (configurations that would start after it are skipped).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import hashlib
import json
import math
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from tandem.services.worker import READY_PREFIX
from tandem.services.worker.client import WorkerClient
from tandem.shared.sampling_params import SamplingParams
from tandem.shared.wire.messages import EngineOutputsMsg, ErrorMsg

# Set for every worker: no NVLink multicast (NVLS) on the lent machines.
ALWAYS_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
KV_COUNTERS = {  # short name -> the decode (or prefill) worker's metric
    "bytes": "tandem:kv_transfer_bytes_total",
    "blocks": "tandem:kv_transfer_blocks_total",
    "pulls": "tandem:kv_transfer_pulls_total",
    "failures": "tandem:kv_transfer_failures_total",
    "recomputed": "tandem:kv_transfer_recomputed_handoffs_total",
    "failed_handoffs": "tandem:kv_transfer_failed_handoffs_total",
    "local_hit_blocks": "tandem:kv_transfer_local_hit_blocks_total",
    "seconds_sum": "tandem:kv_transfer_seconds_sum",
    "seconds_count": "tandem:kv_transfer_seconds_count",
    "handoffs_exported": "tandem:kv_handoffs_exported_total",
    "leases_released": "tandem:kv_leases_released_total",
    "leases_expired": "tandem:kv_leases_expired_total",
    "gather_s": "tandem:kv_serve_gather_seconds_total",  # the prefill worker's
    **{f"{phase}_s": f"tandem:kv_transfer_phase_seconds_total{{{phase}}}" for phase in
       ("connect", "header", "frames", "landing")},
}
ENGINE_STATS = ("num_preemptions", "prompt_tokens", "generation_tokens", "prefix_cache_queries", "prefix_cache_hits")


class Interrupted(BaseException):
    """SIGTERM: stop the run, keep what was measured."""


class WorkerFailed(RuntimeError):
    def __init__(self, message: str, worker: Worker | None = None) -> None:
        tail = worker.tail() if worker is not None else ""
        super().__init__(message)
        self.log_tail = tail


# --- worker processes ---------------------------------------------------------------------------
_LIVE: set[Worker] = set()
# Run before the worker's own command (exec'd in place): on Linux the worker gets SIGKILL when the
# thread that started it (this script's main thread) dies, even by SIGKILL; no preexec_fn (threads).
_LAUNCH = ("import ctypes, os, sys\n"
           "try:\n    ctypes.CDLL(None).prctl(1, 9)\nexcept Exception:\n    pass\n"
           "if os.getppid() != int(sys.argv[1]):\n    sys.exit(1)\n"
           "os.execv(sys.argv[2], sys.argv[2:])")


def _kill_all() -> None:
    for w in list(_LIVE):
        w.stop(timeout_s=5)


atexit.register(_kill_all)


class Worker:
    """One `python -m tandem.cli ...` process: stdout scanned for the ready line, everything else
    (stdout and stderr) in its log file."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name, self.cmd, self.log_path = name, cmd, log_path
        self.info: dict[str, Any] | None = None
        self.client: WorkerClient | None = None
        self.ready = threading.Event()
        self.started = time.perf_counter()
        self.ready_s: float | None = None
        self._log = open(log_path, "ab", buffering=0)
        shown = {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", *ALWAYS_ENV) if k in env}
        self._log.write(f"$ {' '.join(f'{k}={v}' for k, v in shown.items())} {' '.join(cmd)}\n".encode())
        launch = [sys.executable, "-c", _LAUNCH, str(os.getpid()), *cmd]
        self.proc = subprocess.Popen(launch, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
                                     env=env)
        _LIVE.add(self)
        self._reader = threading.Thread(target=self._read_stdout, name=f"{name}-stdout", daemon=True)
        self._reader.start()

    def _read_stdout(self) -> None:
        prefix = READY_PREFIX.encode()
        for raw in self.proc.stdout:
            if self.info is None and raw.startswith(prefix):
                try:
                    self.info = json.loads(raw[len(prefix):])
                except ValueError:
                    self._write(b"(bad ready line) " + raw)
                    continue
                self.ready_s = time.perf_counter() - self.started
                self.ready.set()
            else:
                self._write(raw)

    def _write(self, data: bytes) -> None:
        with contextlib.suppress(ValueError, OSError):  # closed after stop()
            self._log.write(data)

    def wait_ready(self, deadline: float) -> None:
        while not self.ready.wait(0.2):
            if self.proc.poll() is not None:
                raise WorkerFailed(f"{self.name} exited with code {self.proc.returncode} before it was ready", self)
            if time.monotonic() > deadline:
                raise WorkerFailed(f"{self.name} not ready after {time.perf_counter() - self.started:.0f}s", self)
        self.client = WorkerClient(self.info["zmq_addr"])
        self.client.hello(timeout_s=60)

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.info['http_port']}"

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise WorkerFailed(f"{self.name} exited with code {self.proc.returncode}", self)

    def tail(self, chars: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-chars:].decode(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._write(f"\n[bench] no exit {timeout_s:.0f}s after SIGTERM: SIGKILL\n".encode())
                self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(10)
        self._reader.join(5)
        _LIVE.discard(self)
        with contextlib.suppress(OSError):
            self._log.close()
        return self.proc.returncode


def visible_gpu(index: int) -> str:
    """GPU `index` as this process counts them (through an inherited CUDA_VISIBLE_DEVICES)."""
    ids = [p.strip() for p in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if p.strip()]
    if not ids:
        return str(index)
    if index >= len(ids):
        raise ValueError(f"GPU {index}: CUDA_VISIBLE_DEVICES={os.environ['CUDA_VISIBLE_DEVICES']} has {len(ids)}")
    return ids[index]


def worker_cmd(args, command: list[str], name: str, transport: str | None, ipc_dir: Path, device: str) -> list[str]:
    cmd = [sys.executable, "-m", "tandem.cli", *command, args.model, "--device", device, "--dtype", args.dtype,
           "--load-format", args.load_format, "--max-model-len", str(args.max_model_len),
           "--block-size", str(args.block_size), "--max-num-seqs", str(args.max_num_seqs),
           "--gpu-memory-utilization", str(args.gpu_memory_utilization), "--kv-cache-memory", args.kv_cache_memory,
           "--host", "127.0.0.1", "--port", "0", "--zmq-port", "0", "--kv-port", "0", "--worker-id", name,
           "--kv-failure-policy", args.kv_failure_policy, "--log-level", args.log_level]
    if args.max_num_batched_tokens is not None:
        cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if transport is not None:
        cmd += ["--kv-transport", transport]
        if args.kv_ipc and transport in ("zmq", "socket"):
            cmd += ["--kv-ipc", str(ipc_dir / f"{name}.kv")]
    return cmd + list(args.worker_arg)


def start_workers(args, specs: list[tuple[str, list[str], int, str | None]], log_dir: Path, ipc_dir: Path,
                  deadline: float) -> list[Worker]:
    """Start every (name, command, gpu, transport) at once (they load concurrently); wait for all."""
    workers: list[Worker] = []
    try:
        for name, command, gpu, transport in specs:
            env = {**os.environ, **ALWAYS_ENV}
            device = args.device
            if args.device == "cuda" and args.gpu_select == "visible":
                env["CUDA_VISIBLE_DEVICES"] = visible_gpu(gpu)
            elif args.device == "cuda":
                device = f"cuda:{gpu}"  # every GPU visible (UCX cuda_ipc maps the peer's memory)
            workers.append(Worker(name, worker_cmd(args, command, name, transport, ipc_dir, device), env,
                                  log_dir / f"{name}.log"))
        for w in workers:
            w.wait_ready(deadline)
    except BaseException:
        for w in workers:
            w.stop(timeout_s=10)
        raise
    return workers


# --- metrics ------------------------------------------------------------------------------------
def scrape(worker: Worker) -> dict[str, float]:
    """Every sample of /metrics, summed over label sets (one model per worker); no buckets."""
    with urllib.request.urlopen(worker.http + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        if name.endswith("_bucket"):
            continue
        if name == "tandem:kv_transfer_phase_seconds_total":  # one series per phase: keep them apart
            phase = name_labels.split('phase="', 1)[1].split('"', 1)[0]
            name = f"{name}{{{phase}}}"
        with contextlib.suppress(ValueError):
            out[name] = out.get(name, 0.0) + float(value)
    return out


def kv_counters(worker: Worker) -> dict[str, float]:
    m = scrape(worker)
    return {k: m.get(name, 0.0) for k, name in KV_COUNTERS.items()}


def engine_stats(worker: Worker) -> dict[str, int]:
    s = worker.client.stats(timeout_s=30)
    return {k: getattr(s, k) for k in ENGINE_STATS}


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after}


# --- the driver ---------------------------------------------------------------------------------
@dataclass
class Req:
    rid: str
    prompt: list[int]
    t_send: float = 0.0
    t_handoff: float | None = None
    handoff_blocks: int | None = None
    times: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None

    def record(self) -> dict:
        t0 = self.t_send
        return {"id": self.rid, "finish": self.finish, "error": self.error, "n_tokens": len(self.tokens),
                "ttft_ms": (self.times[0] - t0) * 1000 if self.times else None,
                "handoff_gap_ms": (self.times[1] - self.times[0]) * 1000 if len(self.times) > 1 else None,
                "tpot_ms": tpot(self) * 1000 if len(self.times) > 1 else None,
                "e2e_ms": (self.times[-1] - t0) * 1000 if self.times else None,
                "handoff_blocks": self.handoff_blocks,
                "token_ms": [round((t - t0) * 1000, 3) for t in self.times], "tokens": self.tokens}


def tpot(r: Req) -> float:
    return (r.times[-1] - r.times[0]) / (len(r.times) - 1)


def drive(entry: Worker, decode: Worker | None, reqs: list[Req], params: SamplingParams, concurrency: int,
          timeout_s: float) -> float:
    """Closed loop: at most `concurrency` requests in flight; in P/D each handoff goes to the decode
    worker the moment it arrives. Returns the pass' wall time (first send -> last token)."""
    clients = [entry.client] + ([decode.client] if decode is not None else [])
    poller = zmq.Poller()
    for c in clients:
        c.pending.clear()  # answers to an earlier pass
        poller.register(c.sock.socket, zmq.POLLIN)
    by_id = {r.rid: r for r in reqs}
    workers = [entry] + ([decode] if decode is not None else [])
    sent = done = 0
    t0 = time.perf_counter()
    deadline = time.monotonic() + timeout_s
    next_check = time.monotonic() + 1.0

    while done < len(reqs):
        while sent - done < concurrency and sent < len(reqs):
            r = reqs[sent]
            sent += 1
            r.t_send = time.perf_counter()
            entry.client.add(r.rid, r.prompt, params, kv_export=decode is not None)
        events = dict(poller.poll(50))
        for c in clients:
            if c.sock.socket not in events:
                continue
            while c.sock.poll(0):
                msg = c.sock.recv()
                now = time.perf_counter()
                if isinstance(msg, EngineOutputsMsg):
                    for out in msg.outputs:
                        r = by_id.get(out.request_id)
                        if r is None or r.finish is not None or r.error is not None:
                            continue
                        for tok in out.new_token_ids:
                            r.tokens.append(tok)
                            r.times.append(now)
                        if out.finish_reason is not None:
                            r.finish = out.finish_reason
                            done += 1
                        elif out.handoff is not None:
                            if decode is None:
                                r.error = "a handoff from a worker asked for no export"
                                done += 1
                                continue
                            r.t_handoff = now
                            r.handoff_blocks = len(out.handoff.block_ids)
                            decode.client.add(r.rid, r.prompt, params, kv_import=out.handoff)
                elif isinstance(msg, ErrorMsg):
                    if msg.request_id is None:
                        raise WorkerFailed(f"worker error {msg.code}: {msg.message}")
                    r = by_id.get(msg.request_id)
                    if r is not None and r.finish is None and r.error is None:
                        r.error = f"{msg.code}: {msg.message}"
                        done += 1
        now_m = time.monotonic()
        if now_m > next_check:
            next_check = now_m + 1.0
            for w in workers:
                w.check_alive()
        if now_m > deadline:
            raise TimeoutError(f"pass not finished after {timeout_s:.0f}s: {done} of {len(reqs)} done")
    return time.perf_counter() - t0


# --- statistics ---------------------------------------------------------------------------------
def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def dist_ms(xs: list[float]) -> dict | None:
    if not xs:
        return None
    ms = [x * 1000 for x in xs]
    return {"mean": sum(ms) / len(ms), "p50": percentile(ms, 50), "p90": percentile(ms, 90),
            "p99": percentile(ms, 99), "min": min(ms), "max": max(ms), "n": len(ms)}


def summarize(reqs: list[Req], wall_s: float) -> dict:
    ok = [r for r in reqs if r.error is None and r.finish is not None and r.times]
    multi = [r for r in ok if len(r.times) > 1]
    out_tokens = sum(len(r.tokens) for r in ok)
    return {
        "requests": len(reqs), "completed": len(ok), "errors": len(reqs) - len(ok), "wall_s": wall_s,
        "output_tokens": out_tokens, "out_tok_s": out_tokens / wall_s if wall_s > 0 else None,
        "req_s": len(ok) / wall_s if wall_s > 0 else None,
        "ttft_ms": dist_ms([r.times[0] - r.t_send for r in ok]),
        "handoff_gap_ms": dist_ms([r.times[1] - r.times[0] for r in multi]),
        "tpot_ms": dist_ms([tpot(r) for r in multi]),
        "itl_ms": dist_ms([b - a for r in multi for a, b in zip(r.times, r.times[1:])]),
        "e2e_ms": dist_ms([r.times[-1] - r.t_send for r in ok]),
        "error_samples": sorted({r.error or "unfinished" for r in reqs if r not in ok})[:5],
    }


def kv_summary(d: dict, n_handoffs: int) -> dict:
    secs, count = d["seconds_sum"], d["seconds_count"]
    return {**d, "handoffs": n_handoffs,
            "GBps_per_pull": d["bytes"] / secs / 1e9 if secs > 0 else None,
            "pull_ms_mean": secs / count * 1000 if count else None,
            "phase_ms_mean": {phase: d[f"{phase}_s"] / count * 1000 if count else None
                              for phase in ("connect", "header", "frames", "landing")},
            "bytes_per_pull": d["bytes"] / d["pulls"] if d["pulls"] else None}


def compare(ref: list[dict] | None, got: list[dict] | None) -> dict | None:
    """Token-for-token equality with the reference (mono) run, request by request."""
    if ref is None or got is None:
        return None
    ref_by = {r["id"]: r["tokens"] for r in ref}
    equal, mismatches = 0, []
    for r in got:
        want = ref_by.get(r["id"])
        if want is not None and r["tokens"] == want and r["error"] is None:
            equal += 1
            continue
        first = next((i for i, (a, b) in enumerate(zip(want or [], r["tokens"])) if a != b),
                     min(len(want or []), len(r["tokens"])))
        mismatches.append({"id": r["id"], "first_diff": first, "ref_len": len(want or []), "len": len(r["tokens"]),
                           "error": r["error"]})
    return {"equal": equal, "total": len(got), "mismatches": mismatches}


# --- one configuration --------------------------------------------------------------------------
def settle_kv(decode: Worker, prefill: Worker, before_d: dict, before_p: dict, n_handoffs: int,
              timeout_s: float = 5.0) -> tuple[dict, dict]:
    """/metrics is a snapshot refreshed a few times a second: wait until every handoff of the pass
    shows as a pull (or a failure) and as an export."""
    deadline = time.monotonic() + timeout_s
    while True:
        d, p = delta(kv_counters(decode), before_d), delta(kv_counters(prefill), before_p)
        if (d["pulls"] + d["failures"] >= n_handoffs and p["handoffs_exported"] >= n_handoffs) \
                or time.monotonic() > deadline:
            return d, p
        time.sleep(0.1)


def run_pass(name: str, entry: Worker, decode: Worker | None, prompts: list[list[int]], params: SamplingParams,
             concurrency: int, args, deadline: float) -> dict:
    workers = [entry] + ([decode] if decode is not None else [])
    reqs = [Req(f"{name}-{i}", p) for i, p in enumerate(prompts)]
    stats_before = {w.name: engine_stats(w) for w in workers}
    kv_before = {w.name: kv_counters(w) for w in workers} if decode is not None else {}
    timeout = max(1.0, min(args.pass_timeout, deadline - time.monotonic()))
    wall = drive(entry, decode, reqs, params, concurrency, timeout)
    result: dict[str, Any] = {"summary": summarize(reqs, wall), "concurrency": concurrency}
    idle, leaked = {}, {}
    for w in workers:
        s = w.client.wait_idle(timeout_s=args.idle_timeout)
        idle[w.name] = {"used_blocks": s.num_used_blocks, "running": s.num_running, "waiting": s.num_waiting}
        if s.num_used_blocks or s.num_running or s.num_waiting:
            leaked[w.name] = idle[w.name]
    result["idle"], result["leaked"] = idle, leaked
    result["engine"] = {w.name: delta(engine_stats(w), stats_before[w.name]) for w in workers}
    if decode is not None:
        n_handoffs = sum(r.t_handoff is not None for r in reqs)
        d, p = settle_kv(decode, entry, kv_before[decode.name], kv_before[entry.name], n_handoffs)
        result["kv"] = kv_summary(d, n_handoffs)
        result["kv_prefill"] = {k: p[k] for k in ("handoffs_exported", "leases_released", "leases_expired")}
        result["kv_prefill"]["gather_ms_mean"] = p["gather_s"] / n_handoffs * 1000 if n_handoffs else None
    result["requests"] = [r.record() for r in reqs]
    return result


def run_config(cfg: dict, args, workload: dict, params: SamplingParams, log_dir: Path, ipc_dir: Path,
               deadline: float, results: dict) -> None:
    """Start the configuration's workers, run its passes into cfg; errors end up in cfg["error"]."""
    specs = cfg["specs"]
    t0 = time.perf_counter()
    workers: list[Worker] = []
    try:
        workers = start_workers(args, specs, log_dir, ipc_dir,
                                min(time.monotonic() + args.worker_timeout, deadline))
        cfg["start_s"] = time.perf_counter() - t0
        cfg["workers"] = {w.name: {**w.info, "ready_s": w.ready_s} for w in workers}
        entry, decode = workers[0], (workers[1] if len(workers) > 1 else None)
        if decode is not None and entry.info.get("compat_hash") != decode.info.get("compat_hash"):
            loud(f"{cfg['name']}: prefill and decode compat hashes differ: every pull will be refused")
        print(f"[{cfg['name']}] workers ready in {cfg['start_s']:.1f}s: "
              + ", ".join(f"{w.name} {w.info.get('num_kv_blocks')} KV blocks" for w in workers), flush=True)
        for pass_name, concurrency in (("warmup", args.warmup_concurrency), ("check", 1),
                                       ("load", args.concurrency)):
            prompts = workload[pass_name]
            if not prompts:
                continue
            r = run_pass(pass_name, entry, decode, prompts, params, concurrency, args, deadline)
            cfg["passes"][pass_name] = r
            s, kv = r["summary"], r.get("kv")
            print(f"[{cfg['name']}] {pass_name}: {s['completed']}/{s['requests']} in {s['wall_s']:.2f}s, "
                  f"TTFT p50 {fmt(get(s, 'ttft_ms', 'p50'))} ms, TPOT p50 {fmt(get(s, 'tpot_ms', 'p50'), '.2f')} ms, "
                  f"gap p50 {fmt(get(s, 'handoff_gap_ms', 'p50'))} ms, {fmt(s['out_tok_s'], '.0f')} out tok/s"
                  + (f"; KV {fmt(kv['bytes'] / 1e6, '.1f')} MB in {int(kv['pulls'])} pulls, "
                     f"{fmt(kv['GBps_per_pull'], '.2f')} GB/s/pull" if kv else ""), flush=True)
            if kv and (kv["failures"] or kv["recomputed"] or kv["failed_handoffs"]):
                loud(f"{cfg['name']} {pass_name}: {int(kv['failures'])} KV pull failures, "
                     f"{int(kv['recomputed'])} recomputed handoffs, {int(kv['failed_handoffs'])} failed handoffs")
            if kv and kv["pulls"] + kv["failures"] < kv["handoffs"]:
                loud(f"{cfg['name']} {pass_name}: {kv['handoffs']} handoffs but {int(kv['pulls'])} pulls and "
                     f"{int(kv['failures'])} failures counted")
            if r["leaked"]:
                loud(f"{cfg['name']} {pass_name}: not idle after the pass: {r['leaked']}")
            if s["errors"]:
                loud(f"{cfg['name']} {pass_name}: {s['errors']} requests failed: {s['error_samples']}")
            write_json(args, results)
    except Interrupted:
        cfg["error"] = "interrupted (SIGTERM)"
        raise
    except KeyboardInterrupt:
        cfg["error"] = "interrupted (Ctrl-C)"
        raise
    except Exception as exc:  # noqa: BLE001 - recorded for this row; the other configurations run
        cfg["error"] = f"{type(exc).__name__}: {exc}"
        tail = getattr(exc, "log_tail", "")
        if not tail:
            tail = "\n".join(f"--- {w.name} ---\n{w.tail(2000)}" for w in workers)
        cfg["log_tail"] = tail
        loud(f"{cfg['name']} failed: {cfg['error']}\n{tail}")
    finally:
        for w in workers:
            code = w.stop(timeout_s=args.stop_timeout)
            cfg.setdefault("exit_codes", {})[w.name] = code
        cfg["logs"] = [str(log_dir / f"{name}.log") for name, *_ in specs]
        cfg["total_s"] = time.perf_counter() - t0


# --- report -------------------------------------------------------------------------------------
def loud(text: str) -> None:
    print(f"!!!!! {text}", file=sys.stderr, flush=True)


def get(d: dict | None, *keys: str):
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def fmt(x, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def table(results: dict) -> str:
    head = ["config", "TTFT p50", "TTFT p99", "TPOT p50", "gap p50", "gap@1", "out tok/s", "req/s", "KV GB/s",
            "GB/s@1", "pull ms", "check eq", "load eq", "fail/recomp", "leaked"]
    rows = [head]
    for cfg in results["configs"]:
        load, check = cfg["passes"].get("load", {}), cfg["passes"].get("check", {})
        s, sc = load.get("summary"), check.get("summary")
        kv, kvc = load.get("kv"), check.get("kv")

        def eq(c, mono=cfg["name"] == "mono"):
            return "ref" if mono else "-" if c is None else f"{c['equal']}/{c['total']}"

        fails = "-"
        if kv or kvc:
            fails = "/".join(str(int(sum((get(p, "kv", k) or 0) for p in cfg["passes"].values())))
                             for k in ("failures", "recomputed"))
        leaked = sum(sum(v["used_blocks"] for v in p.get("leaked", {}).values()) for p in cfg["passes"].values())
        rows.append([cfg["name"], fmt(get(s, "ttft_ms", "p50")), fmt(get(s, "ttft_ms", "p99")),
                     fmt(get(s, "tpot_ms", "p50"), ".2f"), fmt(get(s, "handoff_gap_ms", "p50")),
                     fmt(get(sc, "handoff_gap_ms", "p50")), fmt(get(s, "out_tok_s"), ".0f"),
                     fmt(get(s, "req_s"), ".2f"), fmt(get(kv, "GBps_per_pull"), ".2f"),
                     fmt(get(kvc, "GBps_per_pull"), ".2f"), fmt(get(kv, "pull_ms_mean"), ".2f"),
                     eq(cfg["compare"].get("check")), eq(cfg["compare"].get("load")), fails, str(leaked)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for cfg in results["configs"]:
        if cfg.get("error"):
            lines.append(f"{cfg['name']}: ERROR {cfg['error'][:300]}")
        for pass_name in ("check", "load"):  # where a pull's time goes, on average
            kv = get(cfg, "passes", pass_name, "kv")
            if kv and kv.get("phase_ms_mean"):
                phases = ", ".join(f"{k} {fmt(v, '.1f')}" for k, v in kv["phase_ms_mean"].items())
                gather = get(cfg, "passes", pass_name, "kv_prefill", "gather_ms_mean")
                lines.append(f"{cfg['name']} {pass_name}: pull phases (mean ms) {phases}; prefill gather+wait "
                             f"{fmt(gather, '.1f')} ms per handoff")
        for pass_name in ("check", "load"):
            c = cfg["compare"].get(pass_name)
            if c and c["mismatches"] and cfg["name"] != "mono":
                firsts = ", ".join(f"{m['id']}@{m['first_diff']}" for m in c["mismatches"][:8])
                lines.append(f"{cfg['name']} {pass_name}: {len(c['mismatches'])} differ from mono "
                             f"(request@first differing token: {firsts})")
    env, w = results["env"], results["workload"]
    devices = ", ".join(f"{k}: {v}" for k, v in env["devices"].items())
    head_lines = [
        f"{env['date']} | {env['host']} | torch {env.get('torch', '?')} | {devices}",
        f"model {w['model']} ({w['load_format']}, {w['dtype']}), prompt {w['prompt_len']} + output {w['output_len']} "
        f"tokens, load: {w['num_requests']} requests at concurrency {w['concurrency']}, check: {w['check_requests']} "
        f"one at a time; ms unless named; gap = first -> second token (P/D: KV pull + decode's first step), "
        f"@1 = check pass (one request at a time); KV GB/s = bytes / pull seconds; fail/recomp = KV pull failures / "
        f"recomputed handoffs (all passes); leaked = KV blocks still used after a pass; load eq: batches differ "
        f"with timing, so greedy tokens may diverge there (random weights: near-ties), unlike check eq",
    ]
    return "\n".join(head_lines + lines)


def write_json(args, results: dict) -> None:
    if not args.json:
        return
    path = Path(args.json)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(results, separators=(",", ":"), default=str))
    os.replace(tmp, path)


def probe_env(args) -> dict:
    """Device names and versions from a short child process (no CUDA context in this one)."""
    gpus = {"mono": args.mono_gpu, "prefill": args.prefill_gpu, "decode": args.decode_gpu}
    code = ("import json, torch\nd = {'torch': torch.__version__, 'names': []}\n"
            "if torch.cuda.is_available():\n"
            "    d['names'] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]\n"
            "print(json.dumps(d))")
    env: dict[str, Any] = {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
                           "host": platform.node(), "python": platform.python_version(),
                           "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES")}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                             env={**os.environ, **ALWAYS_ENV}, check=True)
        probe = json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as exc:
        probe = {"names": [], "error": f"{type(exc).__name__}: {exc}"}
    env["torch"] = probe.get("torch")
    if args.device == "cuda":
        names = probe["names"]
        env["devices"] = {f"{role} GPU {i}": (names[i] if i < len(names) else "not visible")
                          for role, i in gpus.items()}
        env["gpu_names"] = names
    else:
        env["devices"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()}
    if "error" in probe:
        env["probe_error"] = probe["error"]
    return env


# --- workload -----------------------------------------------------------------------------------
def model_limits(args) -> tuple[int, int | None]:
    """(vocab size, max_position_embeddings or None) from the model's config.json (--vocab-size wins)."""
    config = Path(args.model) / "config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, ValueError) as exc:
        if args.vocab_size:
            return args.vocab_size, None
        raise SystemExit(f"bench_pd_gpu: need {config} for the vocabulary size (or --vocab-size): {exc}") from None
    cfg = {**cfg.get("text_config", {}), **cfg}
    return int(args.vocab_size or cfg["vocab_size"]), cfg.get("max_position_embeddings")


def make_workload(args) -> dict[str, list[list[int]]]:
    vocab = args.vocab
    if vocab <= 200 + 1:
        raise SystemExit(f"bench_pd_gpu: vocabulary of {vocab} ids: prompts draw from [100, vocab - 100)")
    out = {}
    for seed, (name, n) in enumerate((("warmup", args.warmup_requests), ("check", args.check_requests),
                                      ("load", args.num_requests))):
        rng = random.Random(args.seed * 1000 + seed)  # different prompts per pass: no prefix-cache hits
        out[name] = [[rng.randrange(100, vocab - 100) for _ in range(args.prompt_len)] for _ in range(n)]
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="loadtests/configs/llama-3.1-8b")
    ap.add_argument("--load-format", default="dummy", choices=["auto", "dummy"])
    ap.add_argument("--dtype", default="bfloat16", choices=["auto", "float32", "bfloat16", "float16"])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--gpu-select", default="visible", choices=["visible", "index"],
                    help="visible: CUDA_VISIBLE_DEVICES names one GPU per worker; index: every worker sees every "
                         "GPU and gets --device cuda:N")
    ap.add_argument("--prefill-gpu", type=int, default=0)
    ap.add_argument("--decode-gpu", type=int, default=1)
    ap.add_argument("--mono-gpu", type=int, default=0)
    ap.add_argument("--transports", default="zmq,socket,ucx", help="comma list: one P/D run per KV transport")
    ap.add_argument("--no-mono", action="store_true", help="skip the monolithic run (no token comparison then)")
    ap.add_argument("--kv-ipc", action="store_true", help="ipc:// (Unix socket) KV addresses for zmq and socket")
    ap.add_argument("--kv-failure-policy", default="recompute", choices=["recompute", "fail"])
    ap.add_argument("--prompt-len", type=int, default=1024)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--check-requests", type=int, default=8)
    ap.add_argument("--warmup-requests", type=int, default=None, help="default: --concurrency")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--vocab-size", type=int, default=None, help="default: the model's config.json")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    ap.add_argument("--kv-cache-memory", default="4GiB", help="KV pool on CPU")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: max(2048, prompt + output + 16), at most the model's")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--worker-arg", action="append", default=[], help="one more worker argument (repeatable)")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--json", default=None, metavar="PATH", help="every number (per request too) as JSON")
    ap.add_argument("--log-dir", default=None, help="worker logs (default: a new temp folder)")
    ap.add_argument("--worker-timeout", type=float, default=600.0, help="seconds to wait for a worker's ready line")
    ap.add_argument("--pass-timeout", type=float, default=600.0, help="seconds one pass may take")
    ap.add_argument("--idle-timeout", type=float, default=30.0, help="seconds to wait for idle workers after a pass")
    ap.add_argument("--stop-timeout", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL")
    ap.add_argument("--time-limit", type=float, default=0.0,
                    help="seconds for the whole run (0: none); later configurations are skipped, the table printed")
    args = ap.parse_args(argv)
    if args.warmup_requests is None:
        args.warmup_requests = args.concurrency
    args.warmup_concurrency = max(1, min(args.concurrency, args.warmup_requests))
    args.vocab, max_pos = model_limits(args)
    need = args.prompt_len + args.output_len
    if args.max_model_len is None:
        args.max_model_len = max(2048, need + 16) if max_pos is None else min(max(2048, need + 16), max_pos)
    if args.max_model_len < need:
        ap.error(f"--max-model-len {args.max_model_len} (the model's limit: {max_pos}) < prompt + output = {need}")
    if args.concurrency < 1 or args.prompt_len < 1 or args.output_len < 2:
        ap.error("--concurrency and --prompt-len must be >= 1, --output-len >= 2 (a second token to time)")
    args.transport_list = [t.strip() for t in args.transports.split(",") if t.strip()]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.monotonic()
    deadline = start + args.time_limit if args.time_limit > 0 else math.inf

    def on_term(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise Interrupted()

    signal.signal(signal.SIGTERM, on_term)
    log_dir = Path(args.log_dir or tempfile.mkdtemp(prefix="bench_pd_logs_"))
    log_dir.mkdir(parents=True, exist_ok=True)
    ipc_dir = Path(tempfile.mkdtemp(prefix="tpd"))  # short: Unix socket paths are limited to ~107 bytes
    workload = make_workload(args)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    results: dict[str, Any] = {
        "env": probe_env(args),
        "args": {k: v for k, v in vars(args).items()},
        "workload": {"model": args.model, "load_format": args.load_format, "dtype": args.dtype,
                     "prompt_len": args.prompt_len, "output_len": args.output_len,
                     "num_requests": args.num_requests, "concurrency": args.concurrency,
                     "check_requests": args.check_requests, "warmup_requests": args.warmup_requests,
                     "seed": args.seed, "vocab_size": args.vocab,
                     "prompts_sha256": hashlib.sha256(json.dumps(workload).encode()).hexdigest()},
        "log_dir": str(log_dir),
        "configs": [],
    }
    print(f"bench_pd_gpu: {results['env']['devices']}; worker logs in {log_dir}", flush=True)
    configs = [] if args.no_mono else [
        {"name": "mono", "mode": "mono", "transport": None, "specs": [("mono", ["worker", "--role", "mixed"],
                                                                        args.mono_gpu, None)]}]
    for t in args.transport_list:
        configs.append({"name": f"pd-{t}", "mode": "pd", "transport": t,
                        "specs": [(f"prefill-{t}", ["prefill"], args.prefill_gpu, t),
                                  (f"decode-{t}", ["decode"], args.decode_gpu, t)]})
    for cfg in configs:
        cfg.update(passes={}, compare={}, error=None)
        results["configs"].append(cfg)
    interrupted = False
    try:
        for cfg in configs:
            if time.monotonic() > deadline - 5:
                cfg["error"] = "skipped: --time-limit reached"
                continue
            run_config(cfg, args, workload, params, log_dir, ipc_dir, deadline, results)
    except (Interrupted, KeyboardInterrupt):
        interrupted = True
        loud("interrupted: the workers are stopped; what was measured follows")
        for cfg in configs:
            if cfg["error"] is None and not cfg["passes"]:
                cfg["error"] = "not run (interrupted)"
    finally:
        _kill_all()
        shutil.rmtree(ipc_dir, ignore_errors=True)
    ref = next((c for c in configs if c["name"] == "mono"), None)
    for cfg in configs:
        for pass_name in ("check", "load"):
            got = get(cfg, "passes", pass_name, "requests")
            cfg["compare"][pass_name] = compare(get(ref, "passes", pass_name, "requests"), got) \
                if cfg is not ref else None
        cfg["specs"] = [list(s) for s in cfg["specs"]]
    results["elapsed_s"] = time.monotonic() - start
    write_json(args, results)
    print("\n" + table(results), flush=True)
    return 1 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
