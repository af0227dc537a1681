"""KV transfer between two GPUs: pulls of a handed-off prompt's blocks by a client process (GPU B)
from a KV server process (GPU A), per transport, beside copy ceilings measured in the same run.

Caches shaped like Llama-3.1-8B (32 layers, 8 KV heads of 128, bf16, 16-token blocks: 2 MiB per
block over all layers), random (seeded on the device: the client regenerates the server's caches
to check every pulled byte). Transports:
  zmq-tcp, zmq-ipc, socket-tcp, socket-unix   staged through pinned host memory (staging.py)
  ucx                                         device memory end to end (UCX picks cuda_ipc / cuda_copy)
  ucx-host                                    UCX, staged through pinned host memory
Two prompts: blocks consecutive in the server's cache, and scattered. Layouts: `shared` (both
processes see both GPUs and use cuda:A / cuda:B) and `isolated` (CUDA_VISIBLE_DEVICES names one GPU
per process, as workers are usually started). Ceilings: a peer copy GPU A -> GPU B of the same bytes
in one process (NVLink or PCIe), and pinned host <-> device copies.

    python loadtests/bench_kv_transfer_gpu.py [--tokens 4096] [--repeat 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import statistics
import tempfile
import time
import traceback

import torch

COMPAT = "bench-gpu"
HOST_TRANSPORTS = ("zmq-tcp", "zmq-ipc", "socket-tcp", "socket-unix")


def make_caches(num_blocks: int, args, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Seeded random caches: the same values on any GPU (Philox, same seed and order)."""
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    g = torch.Generator(device).manual_seed(0)
    return [tuple(torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(torch.bfloat16)
                  for _ in (0, 1)) for _ in range(args.layers)]


def server_main(args, device_name: str, patterns: dict[str, list[int]], ready, stop) -> None:
    from tandem.kv_transfer.leases import LeaseTable
    from tandem.kv_transfer.socket_transport import SocketKVBlockServer
    from tandem.kv_transfer.zmq_transport import ZmqKVBlockServer

    try:
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        caches = make_caches(args.server_blocks, args, device)
        leases = LeaseTable()
        lease_ids = {name: leases.grant(ids, 3600, time.time()).lease_id for name, ids in patterns.items()}
        folder = tempfile.mkdtemp(prefix="tandem-kvgpu-")
        servers = {
            "zmq-tcp": ZmqKVBlockServer("tcp://127.0.0.1:0", caches, leases, COMPAT),
            "zmq-ipc": ZmqKVBlockServer(f"ipc://{folder}/zmq", caches, leases, COMPAT),
            "socket-tcp": SocketKVBlockServer("tcp://127.0.0.1:0", caches, leases, COMPAT),
            "socket-unix": SocketKVBlockServer(f"ipc://{folder}/sock", caches, leases, COMPAT),
        }
        errors = {}
        if args.ucx:
            try:
                from tandem.kv_transfer.ucx_transport import UcxKVBlockServer

                servers["ucx"] = UcxKVBlockServer("ucx://127.0.0.1:0", caches, leases, COMPAT, device_memory=True)
                servers["ucx-host"] = UcxKVBlockServer("ucx://127.0.0.1:0", caches, leases, COMPAT,
                                                       device_memory=False)
            except Exception as exc:  # ucxx missing or UCX unusable: the other transports still run
                errors["ucx"] = errors["ucx-host"] = f"{type(exc).__name__}: {exc}"
        addrs = {name: server.start().address for name, server in servers.items()}
        ready.put({"addrs": addrs, "leases": lease_ids, "errors": errors})
        stop.get()
        for server in servers.values():
            server.close()
    except Exception:
        ready.put({"fatal": traceback.format_exc()})


def client_main(args, device_name: str, patterns: dict[str, list[int]], info: dict, results) -> None:
    from tandem.kv_transfer.socket_transport import SocketKVBlockClient
    from tandem.kv_transfer.transport import KVDest
    from tandem.kv_transfer.zmq_transport import ZmqKVBlockClient

    rows = []
    try:
        device = torch.device(device_name)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        num = args.tokens // args.block_size
        dest_caches = [(torch.zeros((num, *k.shape[1:]), dtype=k.dtype, device=device),
                        torch.zeros((num, *k.shape[1:]), dtype=k.dtype, device=device))
                       for k, _ in make_caches(1, args, device)]
        reference = make_caches(args.server_blocks, args, device)  # the server's caches, regenerated here
        dest = KVDest(dest_caches, list(range(num)))
        clients = {}
        for name in info["addrs"]:
            if name.startswith("zmq"):
                clients[name] = ZmqKVBlockClient(COMPAT, timeout_s=120)
            elif name.startswith("socket"):
                clients[name] = SocketKVBlockClient(COMPAT, timeout_s=120)
            else:
                from tandem.kv_transfer.ucx_transport import UcxKVBlockClient

                clients[name] = UcxKVBlockClient(COMPAT, timeout_s=120, device_memory=name == "ucx")
        nbytes = num * 2 * args.layers * args.block_size * args.kv_heads * args.head_dim * 2
        for name in args.transports:
            if name not in clients:
                rows.append({"transport": name, "error": info["errors"].get(name, "no server")})
                continue
            for pattern, ids in patterns.items():
                row = {"transport": name, "pattern": pattern}
                try:
                    for k, v in dest_caches:
                        k.zero_()
                        v.zero_()

                    def pull(name=name, pattern=pattern, ids=ids):
                        clients[name].pull(info["addrs"][name], info["leases"][pattern], ids, dest)

                    times = timed(pull, args.repeat)
                    exact = all(torch.equal(dest_caches[layer][kv], reference[layer][kv][ids])
                                for layer in range(args.layers) for kv in (0, 1))
                    row |= {"gbps": nbytes / statistics.median(times) / 1e9, "ms": statistics.median(times) * 1e3,
                            "best_gbps": nbytes / min(times) / 1e9, "exact": exact}
                except Exception as exc:
                    row["error"] = f"{type(exc).__name__}: {exc}"
                rows.append(row)
                print(f"  {name:<12}{pattern:<12}{row}", flush=True)
    except Exception:
        rows.append({"fatal": traceback.format_exc()})
    results.put(rows)


def timed(fn, repeat: int) -> list[float]:
    fn()  # warm-up: connections, pinned buffers, UCX registration caches
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def run_layout(args, layout: str, patterns) -> list[dict]:
    ctx = mp.get_context("spawn")
    ready, stop, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    if args.device == "cpu":  # a dry run of the script itself (CI): both processes on the CPU
        server_dev, client_dev, server_env, client_env = "cpu", "cpu", {}, {}
    elif layout == "shared":
        server_dev, client_dev, server_env, client_env = f"cuda:{args.server_gpu}", f"cuda:{args.client_gpu}", {}, {}
    else:
        server_dev = client_dev = "cuda:0"
        server_env = {"CUDA_VISIBLE_DEVICES": str(args.server_gpu)}
        client_env = {"CUDA_VISIBLE_DEVICES": str(args.client_gpu)}
    saved = dict(os.environ)
    try:
        os.environ.update(server_env)
        server = ctx.Process(target=server_main, args=(args, server_dev, patterns, ready, stop), daemon=True)
        server.start()
        os.environ.clear()
        os.environ.update(saved)
        info = ready.get(timeout=600)
        if "fatal" in info:
            return [{"layout": layout, "fatal": info["fatal"]}]
        os.environ.update(client_env)
        client = ctx.Process(target=client_main, args=(args, client_dev, patterns, info, results), daemon=True)
        client.start()
        os.environ.clear()
        os.environ.update(saved)
        rows = results.get(timeout=args.timeout)
        client.join(30)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        stop.put(True)
    server.join(30)
    for p in (server,):
        if p.is_alive():
            p.kill()
    return [{"layout": layout, **row} for row in rows]


def ceilings(args, nbytes: int) -> dict:
    """Copies of the pull's bytes: GPU A -> GPU B (one process), and pinned host <-> GPU A."""
    a, b = torch.device(f"cuda:{args.server_gpu}"), torch.device(f"cuda:{args.client_gpu}")
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=a)
    out = {}

    def bw(fn, sync_devices) -> float:
        fn()
        for d in sync_devices:
            torch.cuda.synchronize(d)
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            for d in sync_devices:
                torch.cuda.synchronize(d)
            times.append(time.perf_counter() - t0)
        return nbytes / statistics.median(times) / 1e9

    dst = torch.empty(nbytes, dtype=torch.uint8, device=b)
    out["peer_copy_gbps"] = bw(lambda: dst.copy_(src), (a, b))
    out["peer_access"] = torch.cuda.can_device_access_peer(a, b)
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    out["d2h_pinned_gbps"] = bw(lambda: host.copy_(src, non_blocking=True), (a,))
    out["h2d_pinned_gbps"] = bw(lambda: src.copy_(host, non_blocking=True), (a,))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--server-gpu", type=int, default=0)
    p.add_argument("--client-gpu", type=int, default=1)
    p.add_argument("--transports", default="zmq-tcp,zmq-ipc,socket-tcp,socket-unix,ucx,ucx-host")
    p.add_argument("--layouts", default="shared,isolated")
    p.add_argument("--timeout", type=float, default=540.0)
    p.add_argument("--json", default=None)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of this script")
    args = p.parse_args(argv)
    args.transports = [t for t in args.transports.split(",") if t]
    args.ucx = any(t.startswith("ucx") for t in args.transports)
    os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
    num = args.tokens // args.block_size
    args.server_blocks = 3 * num
    rng = random.Random(0)
    patterns = {"consecutive": list(range(num, 2 * num)), "scattered": rng.sample(range(args.server_blocks), num)}
    rows = []
    for layout in args.layouts.split(","):
        print(f"layout {layout}:", flush=True)
        rows += run_layout(args, layout, patterns)
    nbytes = num * 2 * args.layers * args.block_size * args.kv_heads * args.head_dim * 2
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    ceil = ceilings(args, nbytes) if gpus > max(args.server_gpu, args.client_gpu) else {}
    names = [torch.cuda.get_device_name(i) for i in range(gpus)] or ["cpu"]
    report = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "devices": names, "torch": torch.__version__,
              "bytes_per_pull": nbytes, "ceilings": ceil, "rows": rows, "args": vars(args)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    for row in rows:
        if "fatal" in row:
            print(f"FATAL in layout {row['layout']}:\n{row['fatal']}")
    print(f"\nKV pull of a {args.tokens}-token prompt, Llama-3.1-8B shape: {nbytes / 2**20:.0f} MiB; GPU "
          f"{args.server_gpu} -> GPU {args.client_gpu} ({', '.join(names)}); median of {args.repeat}; "
          f"torch {torch.__version__}")
    if ceil:
        print(f"ceilings: peer copy {ceil['peer_copy_gbps']:.1f} GB/s (peer access {ceil['peer_access']}), "
              f"pinned D2H {ceil['d2h_pinned_gbps']:.1f}, H2D {ceil['h2d_pinned_gbps']:.1f} GB/s")
    print(f"{'layout':<10}{'transport':<13}{'blocks':<13}{'GB/s':>8}{'best':>8}{'ms':>9}  exact")
    for r in rows:
        if "fatal" in r:
            continue
        if "error" in r:
            print(f"{r['layout']:<10}{r['transport']:<13}{r.get('pattern', ''):<13} error: {r['error'][:90]}")
            continue
        print(f"{r['layout']:<10}{r['transport']:<13}{r['pattern']:<13}{r['gbps']:>8.2f}{r['best_gbps']:>8.2f}"
              f"{r['ms']:>9.1f}  {r['exact']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
