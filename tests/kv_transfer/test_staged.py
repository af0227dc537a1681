"""Staged KV pulls (kv_transfer/staging.py): the path GPU caches take, a gather per layer into a
buffer on the serving side and a buffer per layer committed into the cache on the pulling side.
On CPU the same classes run with host buffers (forced with stage=True); on CUDA (GPU tests) the
caches live on the GPU, frames go through pinned host memory or, for UCX, device memory."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from tandem.kv_transfer import staging
from tandem.kv_transfer.errors import KVTransferError
from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.messages import KVBlocksMsg, KVPullMsg, decode_kv_msg, encode_kv_msg
from tandem.kv_transfer.transport import FrameTarget, KVBlockSink, KVBlockSource, KVDest, reply_runs
from tests.kv_transfer.conftest import COMPAT, Transport, random_kv, zeros_like_kv

# staged-cpu: both sides staged on CPU; server-staged / client-staged: one side staged, the other in
# place (a GPU prefill worker and a CPU decode worker, and the reverse); cuda: caches on the GPU.
MODES = ["staged-cpu", "server-staged", "client-staged", "cuda", "cuda-ucx-host"]


def on(kv, device, stacked=False):
    """The caches on `device`; stacked: as the runner allocates them, views of one tensor."""
    if not stacked:
        return [(k.to(device), v.to(device)) for k, v in kv]
    whole = torch.stack([torch.stack([k, v]) for k, v in kv]).to(device)  # [layers, 2, blocks, ...]
    return [(whole[layer, 0], whole[layer, 1]) for layer in range(len(kv))]


def make_pair(transport: Transport, mode: str, src, leases):
    """A started server over `src` and a client, both on the staged path of `mode`."""
    server_cls, client_cls = transport.classes
    extra = {}
    if transport.name == "ucx":
        extra = {"device_memory": mode == "cuda"}
    server = server_cls(transport.addr(), src, leases, COMPAT, **extra)
    client = client_cls(COMPAT, timeout_s=10.0, **extra)
    if mode in ("staged-cpu", "server-staged"):
        server.source = KVBlockSource(src, leases, COMPAT, stage=True)
    if mode in ("staged-cpu", "client-staged"):
        client.sink = KVBlockSink(COMPAT, stage=True)
    return server.start(), client


@pytest.fixture(params=MODES)
def mode(request):
    if request.param.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    return request.param


def device_of(mode: str) -> str:
    return "cuda" if mode.startswith("cuda") else "cpu"


@pytest.mark.parametrize("dtype,layout", [(torch.float32, "stacked"), (torch.bfloat16, "separate"),
                                          (torch.bfloat16, "stacked-groups")])
def test_staged_round_trip_with_every_kind_of_run(transport, mode, dtype, layout, monkeypatch):
    """Long consecutive runs (views on the direct path), short scattered ones (gathered), and
    destination ids consecutive or not: every block lands where asked, nothing else is written.
    Caches as separate tensors or views of one (one gather per group); groups of one or two layers."""
    if mode == "cuda-ucx-host" and transport.name != "ucx":
        pytest.skip("a UCX-only mode")
    if layout == "stacked-groups":  # a reply of 3 layers staged as groups of 2 + 1
        monkeypatch.setattr(staging, "GROUP_BYTES", 2 * 2 * 23 * 4 * 2 * 8 * 2)
    dev = device_of(mode)
    stacked = layout != "separate"
    src = on(random_kv(64, dtype), dev, stacked)
    dst = on(zeros_like_kv(src, 48), dev, stacked)
    rng = random.Random(1)
    src_ids = list(range(10, 22)) + rng.sample(range(30, 64), 9) + [3, 4]
    # A consecutive destination for the consecutive source run, scattered ones for the rest.
    dst_ids = list(range(30, 42)) + rng.sample(sorted(set(range(48)) - set(range(30, 42))), len(src_ids) - 12)
    leases = LeaseTable()
    lease = leases.grant(src_ids, ttl=30, now=time.time())
    server, client = make_pair(transport, mode, src, leases)
    try:
        stats = client.pull(server.address, lease.lease_id, src_ids, KVDest(dst, dst_ids))
        untouched = sorted(set(range(48)) - set(dst_ids))
        for layer in range(len(src)):
            for kv in (0, 1):
                assert torch.equal(dst[layer][kv][dst_ids], src[layer][kv][src_ids])
                assert not dst[layer][kv][untouched].any()
        assert stats.num_bytes == len(src_ids) * 3 * 2 * 4 * 2 * 8 * dtype.itemsize
        # A second pull of some layers only, over the same server.
        dst2 = on(zeros_like_kv(src, 48), dev, stacked)
        client.pull(server.address, lease.lease_id, src_ids[:5], KVDest(dst2, [7, 1, 2, 3, 9]), layers=[2, 0])
        for layer in (0, 2):
            assert torch.equal(dst2[layer][0][[7, 1, 2, 3, 9]], src[layer][0][src_ids[:5]])
        assert not dst2[1][0].any() and not dst2[1][1].any()
    finally:
        server.close()
        client.close()


def test_staged_failure_leaves_no_copy_in_flight(transport, mode):
    """A refused pull (blocks not leased) writes nothing, on the staged path too."""
    if mode == "cuda-ucx-host" and transport.name != "ucx":
        pytest.skip("a UCX-only mode")
    dev = device_of(mode)
    src = on(random_kv(8), dev)
    dst = on(zeros_like_kv(src, 8), dev)
    leases = LeaseTable()
    lease = leases.grant([0, 1], ttl=30, now=time.time())
    server, client = make_pair(transport, mode, src, leases)
    try:
        with pytest.raises(KVTransferError) as err:
            client.pull(server.address, lease.lease_id, [0, 5], KVDest(dst, [0, 1]))
        assert err.value.code == "bad_block"
        assert all(not k.any() and not v.any() for k, v in dst)
    finally:
        server.close()
        client.close()


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_group_frames_hold_the_direct_frames_bytes(device, monkeypatch):
    """The staged server's frames (one per group of layers: [layers][K, V][blocks in request order])
    hold byte for byte what the in-place server sends as run frames, and the header says so."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    src = random_kv(40, torch.bfloat16, num_layers=3)
    leases = LeaseTable()
    ids = [5, 6, 7, 8, 9, 10, 11, 12, 13, 30, 2, 17, 18]
    lease = leases.grant(ids, ttl=30, now=time.time())
    request = encode_kv_msg(KVPullMsg(COMPAT, lease.lease_id, ids, [1, 2, 0]))
    direct = KVBlockSource(src, leases, COMPAT).serve(request)
    layer_bytes = 2 * len(ids) * 4 * 2 * 8 * 2
    monkeypatch.setattr(staging, "GROUP_BYTES", layer_bytes)  # one layer a group
    staged = KVBlockSource(on(src, device), leases, COMPAT, stage=True).serve(request)
    assert reply_runs(ids) == [[0, 9], [9, 4]]  # a long consecutive run (a view), a gathered one
    d_header, s_header = decode_kv_msg(direct[0]), decode_kv_msg(staged[0])
    assert d_header.groups == [] and s_header.groups == [1, 1, 1]
    assert len(direct) == 1 + 3 * 2 * 2 and len(staged) == 1 + 3
    for i in range(3):  # per layer: direct frames K0 V0 K1 V1 -> group frame K0 K1 V0 V1
        k0, v0, k1, v1 = (bytes(f) for f in direct[1 + 4 * i:5 + 4 * i])
        assert bytes(staged[1 + i]) == k0 + k1 + v0 + v1
    monkeypatch.setattr(staging, "GROUP_BYTES", 2 * layer_bytes)  # layers 1, 2 in a group; 0 alone
    staged = KVBlockSource(on(src, device), leases, COMPAT, stage=True).serve(request)
    assert decode_kv_msg(staged[0]).groups == [2, 1] and len(staged) == 3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_frames_are_device_tensors():
    src = on(random_kv(8), "cuda")
    leases = LeaseTable()
    lease = leases.grant([1, 3], ttl=30, now=time.time())
    request = encode_kv_msg(KVPullMsg(COMPAT, lease.lease_id, [1, 3], None))
    (frame,) = KVBlockSource(src, leases, COMPAT, device_frames=True).serve(request)[1:]  # one group
    assert isinstance(frame, torch.Tensor) and frame.is_cuda
    assert torch.equal(frame.view(3, 2, 2, -1)[0, 0].cpu(), torch.stack([src[0][0][1], src[0][0][3]]).cpu()
                       .view(torch.uint8).view(2, -1))


def test_stacked_tables_and_layer_groups():
    kv = on(random_kv(6), "cpu", stacked=True)
    assert staging.KVTables(kv).stacked is not None
    assert staging.KVTables(on(random_kv(6), "cpu")).stacked is None  # separate allocations
    assert staging.KVTables(kv[::-1]).stacked is None  # views of one tensor, but not in layer order
    tables = staging.KVTables(kv)
    ids = torch.tensor([4, 1])
    out = torch.empty((2, 2, 2, tables.per_layer[0][0].shape[1]), dtype=torch.uint8)
    tables.gather(1, 2, ids, out)
    assert torch.equal(out[1, 1], staging.block_table(kv[2][1])[[4, 1]])
    assert staging.layer_groups([0, 1, 2, 3, 5, 4], 10, cap=25) == [(0, 2), (2, 2), (5, 1), (4, 1)]
    assert staging.layer_groups([0, 1], 100, cap=10) == [(0, 1), (1, 1)]  # at least one layer a group


@pytest.mark.parametrize("groups,why", [([2], "cover"), ([1, 1, 1, 1], "cover"), ([0, 3], "positive"),
                                        ([1, 2], "consecutive")])
def test_sink_refuses_bad_groups(groups, why):
    dst = zeros_like_kv(random_kv(4), 4)
    msg = KVBlocksMsg(COMPAT, "lease", [0], [0, 2, 1], 4 * 2 * 8 * 4, [[0, 1]], groups)
    with pytest.raises(KVTransferError) as err:
        KVBlockSink(COMPAT).write(msg, [b"\x01" * 10] * len(groups), KVDest(dst, [1]))
    assert err.value.code == "bad_message" and why in str(err.value)
    assert all(not k.any() and not v.any() for k, v in dst)


@pytest.mark.parametrize("staged", [False, True])
def test_zmq_pieces_of_big_frames(tmp_path, monkeypatch, staged):
    """ZeroMQ sends frames over PIECE_BYTES as pieces (here 100 bytes: uneven, many per frame); the
    puller fills consecutive and scattered destinations from them exactly."""
    from tandem.kv_transfer import zmq_transport

    monkeypatch.setattr(zmq_transport, "PIECE_BYTES", 100)
    transport = Transport("zmq-ipc", tmp_path)
    src = random_kv(64, torch.bfloat16)
    dst = zeros_like_kv(src, 48)
    src_ids = list(range(10, 22)) + [40, 33, 50, 3]
    dst_ids = list(range(30, 42)) + [1, 7, 2, 5]
    leases = LeaseTable()
    lease = leases.grant(src_ids, ttl=30, now=time.time())
    server, client = make_pair(transport, "staged-cpu" if staged else "direct", src, leases)
    try:
        client.pull(server.address, lease.lease_id, src_ids, KVDest(dst, dst_ids))
    finally:
        server.close()
        client.close()
    for layer in range(len(src)):
        for kv in (0, 1):
            assert torch.equal(dst[layer][kv][dst_ids], src[layer][kv][src_ids])


def test_write_pieces_straddling_targets():
    """Pieces that start and end anywhere (across target boundaries), in place and scattered."""
    table = np.zeros((6, 4), dtype=np.uint8)
    inplace = np.zeros(8, dtype=np.uint8)
    targets = [FrameTarget(8, None, None, inplace), FrameTarget(8, table, [4, 1], None)]
    data = np.arange(1, 17, dtype=np.uint8)
    KVBlockSink(COMPAT).write_pieces(targets, [data[:3].tobytes(), data[3:11].tobytes(), data[11:].tobytes()])
    assert inplace.tolist() == list(range(1, 9))
    assert table[4].tolist() == [9, 10, 11, 12] and table[1].tolist() == [13, 14, 15, 16]
    with pytest.raises(KVTransferError) as err:
        KVBlockSink(COMPAT).write_pieces(targets, [data[:15].tobytes()])
    assert err.value.code == "bad_message"
