"""A pull between two processes: the prefill side in a spawned process serving over ZeroMQ tcp and
ipc (and UCX where ucxx imports), the decode side here."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from tandem.kv_transfer.transport import KVDest
from tests.kv_transfer.conftest import COMPAT, random_kv, zeros_like_kv

try:
    import ucxx  # noqa: F401

    HAS_UCX = True
except ImportError:
    HAS_UCX = False


def _serve(addrs, queue, stop):
    import time

    from tandem.kv_transfer.leases import LeaseTable
    from tandem.kv_transfer.zmq_transport import ZmqKVBlockServer

    kv = random_kv(8, torch.bfloat16, seed=3)
    leases = LeaseTable()
    lease = leases.grant([6, 0, 3], ttl=60, now=time.time())
    servers = [ZmqKVBlockServer(addrs[0], kv, leases, COMPAT).start(),
               ZmqKVBlockServer(addrs[1], kv, leases, COMPAT).start()]
    served = [s.address for s in servers]
    if len(addrs) > 2:
        try:
            from tandem.kv_transfer.ucx_transport import UcxKVBlockServer

            servers.append(UcxKVBlockServer(addrs[2], kv, leases, COMPAT).start())
            served.append(servers[-1].address)
        except Exception as exc:  # reported by the parent as a skip
            served.append(f"error: {exc}")
    queue.put((lease.lease_id, served))
    stop.wait(60)
    for s in servers:
        s.close()


def test_pull_from_another_process(tmp_path):
    from tandem.kv_transfer.zmq_transport import ZmqKVBlockClient

    ctx = mp.get_context("spawn")
    queue, stop = ctx.Queue(), ctx.Event()
    addrs = ["tcp://127.0.0.1:0", f"ipc://{tmp_path}/kv.sock"] + (["ucx://127.0.0.1:0"] if HAS_UCX else [])
    proc = ctx.Process(target=_serve, args=(addrs, queue, stop), daemon=True)
    proc.start()
    ucx_error = None
    try:
        lease_id, served = queue.get(timeout=60)
        src = random_kv(8, torch.bfloat16, seed=3)
        clients = [ZmqKVBlockClient(COMPAT), ZmqKVBlockClient(COMPAT)]
        if HAS_UCX:
            from tandem.kv_transfer.ucx_transport import UcxKVBlockClient

            clients.append(UcxKVBlockClient(COMPAT))
        if HAS_UCX and served[2].startswith("error:"):
            ucx_error = served.pop()
        for addr, client in zip(served, clients):
            dst = zeros_like_kv(src, 3)
            client.pull(addr, lease_id, [6, 0, 3], KVDest(dst, [2, 1, 0]))
            for layer in range(3):
                for r, d in zip([6, 0, 3], [2, 1, 0]):
                    assert torch.equal(dst[layer][0][d], src[layer][0][r]), addr
                    assert torch.equal(dst[layer][1][d], src[layer][1][r]), addr
    finally:
        stop.set()
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    if ucx_error:
        pytest.skip(f"UCX leg skipped: {ucx_error}")
