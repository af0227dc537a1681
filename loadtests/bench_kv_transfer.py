"""KV transfer throughput: pulls of a handed-off prompt between two processes, beside the raw
socket throughput measured the same way (same bytes, same frames, same process layout).

The serving process holds KV caches shaped like a large model (default: Llama-3.1-8B, 32 layers,
8 KV heads of 128, bf16, 16-token blocks: 2 MiB per block over all layers), random, with a lease on
the prompt's blocks. The pulling process (this one) times:
  kv pull         KVBlockClient.pull into its own caches (checks + copies into the cache)
  raw zmq         the same reply messages (header, one per layer; built once) from a plain ROUTER,
                  received by a DEALER and dropped: the transport alone, no checks, no cache writes
  raw socket      one plain stream socket (TCP, or a Unix socket for ipc) of the same bytes, recv_into
                  one buffer
over tcp loopback and ipc, with the ZeroMQ and the plain-socket KV transports (the latter's raw is the
plain stream), and over UCX (tcp; raw = ucxx sends of the same frames), for a prompt
whose blocks are consecutive in the server's cache (one frame per layer and K/V) and one whose
blocks are scattered (gathered by the server into frames of up to 64 blocks).

    python loadtests/bench_kv_transfer.py [--tokens 4096] [--layers 32] [--repeat 5] [--ucx]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import random
import socket
import statistics
import tempfile
import threading
import time

import numpy as np
import torch
import zmq

from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.messages import KVPullMsg, encode_kv_msg
from tandem.kv_transfer.socket_transport import SocketKVBlockClient, SocketKVBlockServer
from tandem.kv_transfer.transport import KVBlockSource, KVDest, reply_runs
from tandem.kv_transfer.zmq_transport import ZmqKVBlockClient, ZmqKVBlockServer

COMPAT = "bench"


def make_caches(num_blocks: int, args) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, args.block_size, args.kv_heads, args.head_dim)
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16),
             torch.randn(shape, generator=g, dtype=torch.float32).to(torch.bfloat16)) for _ in range(args.layers)]


def serve(args, pattern_ids: dict[str, list[int]], ready, stop) -> None:
    """The prefill side: a KV server, a raw zmq ROUTER and a raw TCP listener per address."""
    caches = make_caches(args.server_blocks, args)
    leases = LeaseTable()
    lease_ids = {name: leases.grant(ids, 3600, time.time()).lease_id for name, ids in pattern_ids.items()}
    source = KVBlockSource(caches, leases, COMPAT)
    ctx = zmq.Context()
    folder = tempfile.mkdtemp(prefix="tandem-kvbench-")
    addrs = {}
    servers = []
    for transport in ("tcp", "ipc"):
        kv_addr = "tcp://127.0.0.1:0" if transport == "tcp" else f"ipc://{folder}/kv"
        server = ZmqKVBlockServer(kv_addr, caches, leases, COMPAT, ctx=ctx).start()
        servers.append(server)
        raw = ctx.socket(zmq.ROUTER)
        raw_addr = "tcp://127.0.0.1" if transport == "tcp" else f"ipc://{folder}/raw"
        if transport == "tcp":
            raw_addr = f"{raw_addr}:{raw.bind_to_random_port(raw_addr)}"
        else:
            raw.bind(raw_addr)
        addrs[transport] = (server.address, raw_addr, raw)
    # The plain-socket KV transport (receives straight into the cache).
    sock_tcp = SocketKVBlockServer("tcp://127.0.0.1:0", caches, leases, COMPAT).start()
    sock_unix = SocketKVBlockServer(f"ipc://{folder}/kv-socket", caches, leases, COMPAT).start()
    servers += [sock_tcp, sock_unix]
    listener = socket.create_server(("127.0.0.1", 0))
    unix_path = f"{folder}/raw-unix"
    unix_listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix_listener.bind(unix_path)
    unix_listener.listen()
    ready.put({t: (a[0], a[1]) for t, a in addrs.items()} | {
        "leases": lease_ids, "raw_tcp": ("127.0.0.1", listener.getsockname()[1]), "raw_unix": unix_path,
        "socket": {"tcp": sock_tcp.address, "ipc": sock_unix.address}})
    total = {name: len(ids) * 2 * args.layers * source.spec.block_bytes for name, ids in pattern_ids.items()}
    blob = np.random.default_rng(0).integers(0, 255, max(total.values()), dtype=np.uint8)

    # The raw zmq reply: the KV server's messages for a pattern (header, one per layer), built once
    # and resent: the transport's own cost, without checks, gathering or cache writes.
    replies = {name: list(source.serve_messages(encode_kv_msg(KVPullMsg(COMPAT, lease_ids[name], ids, None))))
               for name, ids in pattern_ids.items()}

    def raw_zmq(sock) -> None:
        while stop.empty():
            if not sock.poll(50):
                continue
            identity, request = sock.recv_multipart()
            for message in replies[request.decode()]:
                sock.send_multipart([identity, *message], copy=False)

    def raw_stream(listener: socket.socket) -> None:  # a plain stream socket (TCP or Unix) of the same bytes
        listener.settimeout(0.05)
        while stop.empty():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                name = conn.recv(64).decode()
                conn.sendall(memoryview(blob)[: total[name]])

    if args.ucx:
        import asyncio

        from tandem.kv_transfer.ucx_transport import UcxKVBlockServer, UcxRuntime, _recv_msg, _send_msg

        ucx_server = UcxKVBlockServer("ucx://127.0.0.1:0", caches, leases, COMPAT).start()
        servers.append(ucx_server)
        flat = {name: [np.asarray(f) for message in reply for f in message] for name, reply in replies.items()}

        async def raw_ucx_handler(ep) -> None:
            try:
                while True:
                    name = (await _recv_msg(ep)).decode()
                    await _send_msg(ep, bytes(flat[name][0]))
                    await asyncio.gather(*(ep.send(frame) for frame in flat[name][1:]))
            except Exception:
                return

        async def listen():
            import ucxx

            return ucxx.create_listener(raw_ucx_handler)

        raw_listener = UcxRuntime.default().run(listen(), timeout=30)
        ready.put({"ucx": (ucx_server.address, f"ucx://127.0.0.1:{raw_listener.port}")})
    threads = [threading.Thread(target=raw_zmq, args=(a[2],), daemon=True) for a in addrs.values()]
    threads += [threading.Thread(target=raw_stream, args=(sock,), daemon=True) for sock in (listener, unix_listener)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for s in servers:
        s.close()


def bench_ucx(args, info, patterns, dest, nbytes) -> list[dict]:
    """KV pulls over UCX (received straight into the cache) beside raw ucxx sends of the same frames."""
    import asyncio

    import ucxx

    from tandem.kv_transfer.ucx_transport import UcxKVBlockClient, UcxRuntime, _recv_msg, _send_msg

    runtime = UcxRuntime.default()
    client = UcxKVBlockClient(COMPAT, timeout_s=120)
    kv_addr, raw_addr = info["ucx"]
    host, port = raw_addr.removeprefix("ucx://").rsplit(":", 1)
    ep = runtime.run(ucxx.create_endpoint(host, int(port)), timeout=30)
    rows = []
    block_bytes = args.block_size * args.kv_heads * args.head_dim * 2
    for name, ids in patterns.items():
        # The reply's frame sizes: per layer, per run, K and V.
        sizes = [length * block_bytes for _ in range(args.layers) for _, length in reply_runs(ids) for _ in (0, 1)]
        scratch = [np.empty(size, dtype=np.uint8) for size in sizes]  # one buffer per outstanding receive

        def pull(ids=ids, name=name):
            client.pull(kv_addr, info["leases"][name], ids, dest)

        async def raw_once(name=name, sizes=sizes, scratch=scratch):
            await _send_msg(ep, name.encode())
            await _recv_msg(ep)
            await asyncio.gather(*(ep.recv(scratch[i][:size]) for i, size in enumerate(sizes)))

        t_pull = timed(pull, args.repeat)
        t_raw = timed(lambda raw_once=raw_once: runtime.run(raw_once(), timeout=120), args.repeat)
        rows.append({"transport": "ucx-tcp", "pattern": name, "pull": nbytes / t_pull / 1e9,
                     "raw_zmq": nbytes / t_raw / 1e9, "raw_socket": None})
    runtime.run(asyncio.wait_for(ep.close(), 10), timeout=30)
    return rows


def timed(fn, repeat: int) -> float:
    fn()  # warm-up (connections, page faults in the destination)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="prompt length pulled per transfer")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--no-ucx", dest="ucx", action="store_false", help="skip UCX (default: on if ucxx imports)")
    args = p.parse_args(argv)
    if args.ucx:
        try:
            import ucxx  # noqa: F401
        except ImportError:
            args.ucx = False
    num = args.tokens // args.block_size
    args.server_blocks = 3 * num
    rng = random.Random(0)
    patterns = {"consecutive": list(range(num, 2 * num)),
                "scattered": rng.sample(range(args.server_blocks), num)}
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Queue()
    server = ctx.Process(target=serve, args=(args, patterns, ready, stop), daemon=True)
    server.start()
    info = ready.get(timeout=300)
    if args.ucx:
        info |= ready.get(timeout=300)
    dest_caches = make_caches(num, args)
    dest = KVDest(dest_caches, list(range(num)))
    client = ZmqKVBlockClient(COMPAT, timeout_s=120)
    zctx = zmq.Context.instance()
    block_bytes = args.block_size * args.kv_heads * args.head_dim * 2
    nbytes = num * 2 * args.layers * block_bytes
    rows = []
    for transport in ("tcp", "ipc"):
        kv_addr, raw_addr = info[transport]
        raw = zctx.socket(zmq.DEALER)
        raw.connect(raw_addr)
        for name, ids in patterns.items():
            def pull(ids=ids, name=name, kv_addr=kv_addr):
                client.pull(kv_addr, info["leases"][name], ids, dest)

            def raw_zmq(name=name, raw=raw):
                raw.send(name.encode())
                for _ in range(1 + args.layers):  # the header, then a message per layer
                    raw.recv_multipart(copy=False)

            t_pull, t_raw = timed(pull, args.repeat), timed(raw_zmq, args.repeat)
            row = {"transport": transport, "pattern": name, "pull": nbytes / t_pull / 1e9,
                   "raw_zmq": nbytes / t_raw / 1e9, "raw_socket": None}
            if transport in ("tcp", "ipc"):
                buf = bytearray(nbytes)

                def connect(transport=transport) -> socket.socket:
                    if transport == "tcp":
                        return socket.create_connection(info["raw_tcp"])
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.connect(info["raw_unix"])
                    return s

                def raw_socket(name=name, buf=buf, connect=connect):
                    with connect() as s:
                        s.sendall(name.encode())
                        view, got = memoryview(buf), 0
                        while got < nbytes:
                            n = s.recv_into(view[got:])
                            if not n:
                                raise ConnectionError("short raw read")
                            got += n

                row["raw_socket"] = nbytes / timed(raw_socket, args.repeat) / 1e9
            rows.append(row)
            # The socket transport over the same kind of stream: its raw is the plain stream above.
            sock_client = SocketKVBlockClient(COMPAT, timeout_s=120)

            def sock_pull(ids=ids, name=name, addr=info["socket"][transport], sock_client=sock_client):
                sock_client.pull(addr, info["leases"][name], ids, dest)

            t_sock = timed(sock_pull, args.repeat)
            rows.append({"transport": f"socket-{'tcp' if transport == 'tcp' else 'unix'}", "pattern": name,
                         "pull": nbytes / t_sock / 1e9, "raw_zmq": row["raw_socket"], "raw_socket": row["raw_socket"]})
        raw.close(linger=0)
    if args.ucx:
        rows.extend(bench_ucx(args, info, patterns, dest, nbytes))
    stop.put(True)
    server.join(10)
    # The last pull (scattered, ipc) is exact: compare with the server's (seeded) caches.
    source = make_caches(args.server_blocks, args)
    ids = patterns["scattered"]
    exact = all(torch.equal(dest_caches[layer][kv], source[layer][kv][ids]) for layer in range(args.layers)
                for kv in (0, 1))
    print(f"\nKV pull of a {args.tokens}-token prompt: {num} blocks x {args.layers} layers x K,V x "
          f"{block_bytes // 1024} KiB = {nbytes / 2**20:.0f} MiB per transfer; median of {args.repeat}; "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, pyzmq {zmq.__version__}")
    print("raw: the same bytes and frames over the same transport (zmq; ucxx for ucx-tcp; the plain stream for "
          "socket-*) without checks or cache writes")
    print(f"{'transport':<10}{'blocks':<13}{'kv pull GB/s':>13}{'raw GB/s':>14}{'pull/raw':>14}"
          f"{'raw socket GB/s':>17}{'pull/raw sock':>15}")
    print(f"pulled bytes equal the source: {exact}")
    for r in rows:
        sock = "" if r["raw_socket"] is None else f"{r['raw_socket']:.2f}"
        ratio_sock = "" if r["raw_socket"] is None else f"{r['pull'] / r['raw_socket']:.0%}"
        print(f"{r['transport']:<10}{r['pattern']:<13}{r['pull']:>13.2f}{r['raw_zmq']:>14.2f}"
              f"{r['pull'] / r['raw_zmq']:>14.0%}{sock:>17}{ratio_sock:>15}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
