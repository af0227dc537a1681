"""KV-block pulls over real sockets (server thread, client in the test), for every transport:
bytes land exactly at the puller's block ids; every bad request or reply is refused before a
single byte is written."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from tandem.kv_transfer.compat import compat_hash
from tandem.kv_transfer.errors import KVTransferError
from tandem.kv_transfer.leases import LeaseTable
from tandem.kv_transfer.messages import KVBlocksMsg, KVErrorMsg, KVPullMsg, decode_kv_msg, encode_kv_msg
from tandem.kv_transfer.transport import GATHER_BLOCKS, KVBlockSink, KVBlockSource, KVDest, block_runs, reply_runs
from tests.kv_transfer.conftest import COMPAT, FakeClock, random_kv, zeros_like_kv


def assert_pulled(src, dst, src_ids, dst_ids, layers=None):
    layers = range(len(src)) if layers is None else layers
    for layer in layers:
        for s, d in zip(src_ids, dst_ids):
            assert torch.equal(dst[layer][0][d], src[layer][0][s])
            assert torch.equal(dst[layer][1][d], src[layer][1][s])


def assert_untouched(dst):
    assert all(not k.any() and not v.any() for k, v in dst)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip(transport, dtype):
    src = random_kv(8, dtype)
    dst = zeros_like_kv(src, 6)
    leases = LeaseTable()
    lease = leases.grant([5, 2, 7], ttl=30, now=time.time())
    with transport.server(src, leases) as server:
        stats = transport.client().pull(server.address, lease.lease_id, [5, 2, 7], KVDest(dst, [0, 3, 1]))
    assert_pulled(src, dst, [5, 2, 7], [0, 3, 1])
    for layer in dst:  # blocks nobody asked for stay zero
        assert not layer[0][[2, 4, 5]].any() and not layer[1][[2, 4, 5]].any()
    assert stats.num_blocks == 3 and stats.num_layers == 3
    assert stats.num_bytes == 3 * 3 * 2 * 4 * 2 * 8 * dtype.itemsize


def test_partial_pull_of_blocks_and_layers(transport):
    src = random_kv(8)
    dst = zeros_like_kv(src, 4)
    leases = LeaseTable()
    lease = leases.grant([1, 2, 3, 4], ttl=30, now=time.time())
    with transport.server(src, leases) as server:
        client = transport.client()
        client.pull(server.address, lease.lease_id, [3, 4], KVDest(dst, [2, 0]), layers=[0, 2])
        assert_pulled(src, dst, [3, 4], [2, 0], layers=[0, 2])
        assert not dst[1][0].any() and not dst[1][1].any()
        client.pull(server.address, lease.lease_id, [1], KVDest(dst, [3]))  # a second pull, same server
    assert_pulled(src, dst, [1], [3])


def test_compat_mismatch_is_refused(transport):
    src = random_kv(4)
    dst = zeros_like_kv(src, 4)
    leases = LeaseTable()
    lease = leases.grant([0, 1], ttl=30, now=time.time())
    other = compat_hash("another-model", "float32", 4, 3, 2, 8)
    with transport.server(src, leases) as server, pytest.raises(KVTransferError) as err:
        transport.client(compat=other).pull(server.address, lease.lease_id, [0, 1], KVDest(dst, [0, 1]))
    assert err.value.code == "compat_mismatch" and "model" in str(err.value)
    assert_untouched(dst)


@pytest.mark.parametrize("block_ids", [[99], [-1], [1, 1], [3], [0, 1, 2, 3, 4, 5, 6, 7, 8]],
                         ids=["out-of-range", "negative", "duplicate", "not-leased", "too-many"])
def test_bad_remote_block_ids_are_refused(transport, block_ids):
    src = random_kv(8)
    dst = zeros_like_kv(src, 16)
    leases = LeaseTable()
    lease = leases.grant([0, 1, 2], ttl=30, now=time.time())
    with transport.server(src, leases) as server, pytest.raises(KVTransferError) as err:
        transport.client().pull(server.address, lease.lease_id, block_ids, KVDest(dst, list(range(len(block_ids)))))
    assert err.value.code == "bad_block"
    assert_untouched(dst)


def test_bad_layers_and_destination_ids_are_refused_locally(transport):
    src = random_kv(4)
    dst = zeros_like_kv(src, 4)
    client = transport.client()
    for block_ids, dest_ids, layers in [([0], [4], None), ([0, 1], [2, 2], None), ([0], [0], [3]), ([0, 1], [0], None)]:
        with pytest.raises((KVTransferError, ValueError)):
            client.pull("tcp://127.0.0.1:1", "x" * 32, block_ids, KVDest(dst, dest_ids), layers)
    assert_untouched(dst)


def test_server_refuses_bad_layers(transport):
    src = random_kv(4, num_layers=3)
    dst = zeros_like_kv(src, 4) + zeros_like_kv(src, 4)  # a 6-layer puller asking for layer 5
    leases = LeaseTable()
    lease = leases.grant([0], ttl=30, now=time.time())
    with transport.server(src, leases, compat=COMPAT) as server, pytest.raises(KVTransferError) as err:
        transport.client().pull(server.address, lease.lease_id, [0], KVDest(dst, [0]), layers=[5])
    assert err.value.code == "bad_block"
    assert_untouched(dst)


def test_wrong_block_size_is_refused(transport):
    """A misconfigured peer (same compat hash, other head_dim): the sizes give it away."""
    src = random_kv(4, head_dim=16)
    dst = zeros_like_kv(random_kv(4, head_dim=8), 4)
    leases = LeaseTable()
    lease = leases.grant([0, 1], ttl=30, now=time.time())
    with transport.server(src, leases) as server, pytest.raises(KVTransferError) as err:
        transport.client().pull(server.address, lease.lease_id, [0, 1], KVDest(dst, [0, 1]))
    assert err.value.code == "bad_message" and "bytes" in str(err.value)
    assert_untouched(dst)


def test_sink_checks_every_frame_size_before_writing():
    dst = zeros_like_kv(random_kv(4), 4)
    sink = KVBlockSink(COMPAT)
    block_bytes = 4 * 2 * 8 * 4
    msg = KVBlocksMsg(COMPAT, "lease", [0], [0, 1, 2], block_bytes, [[0, 1]])
    good = bytes(block_bytes)
    frames = [b"\x01" * block_bytes] * 5 + [good[:-4]]  # the last frame is short
    with pytest.raises(KVTransferError) as err:
        sink.write(msg, frames, KVDest(dst, [1]))
    assert err.value.code == "bad_message"
    with pytest.raises(KVTransferError):
        sink.write(msg, frames[:4], KVDest(dst, [1]))  # too few frames
    assert_untouched(dst)


@pytest.mark.parametrize("bad", ["short", "long", "one-block"])
def test_sink_refuses_a_run_frame_of_the_wrong_size_before_writing(bad):
    """Runs [0, 3] and [3, 1]: the run frames are 3 and 1 blocks; one wrong-sized frame (the last
    one, so every earlier frame would be writable) and nothing is written."""
    dst = zeros_like_kv(random_kv(8), 8)
    sink = KVBlockSink(COMPAT)
    block_bytes = 4 * 2 * 8 * 4
    msg = KVBlocksMsg(COMPAT, "lease", [2, 3, 4, 7], [0, 1, 2], block_bytes, [[0, 3], [3, 1]])
    frames = [b"\x01" * (3 * block_bytes), b"\x01" * (3 * block_bytes), b"\x01" * block_bytes,
              b"\x01" * block_bytes] * 3
    wrong = {"short": 3 * block_bytes - 4, "long": 3 * block_bytes + block_bytes, "one-block": block_bytes}[bad]
    frames[-4] = b"\x01" * wrong  # the last layer's K frame of the 3-block run
    with pytest.raises(KVTransferError) as err:
        sink.write(msg, frames, KVDest(dst, [0, 5, 2, 6]))
    assert err.value.code == "bad_message" and "bytes" in str(err.value)
    assert_untouched(dst)
    frames[-4] = b"\x01" * (3 * block_bytes)
    assert sink.write(msg, frames, KVDest(dst, [0, 5, 2, 6])) == 4 * 3 * 2 * block_bytes  # now it fits


@pytest.mark.parametrize("runs", [[[0, 2]], [[0, 1], [1, 1]], [[0, 3], [3, 1], [4, 1]], [[1, 3], [0, 1]],
                                  [[0, 4]], [[0, 0], [0, 3], [3, 1]], [[0, 3], [3]], "x"],
                         ids=["short", "split-consecutive-ok", "past-end", "out-of-order", "gathered-ok",
                              "empty-run", "malformed", "not-a-list"])
def test_sink_checks_reply_runs(runs):
    sink = KVBlockSink(COMPAT)
    dst = zeros_like_kv(random_kv(8), 8)
    block_bytes = 4 * 2 * 8 * 4
    header = encode_kv_msg(KVBlocksMsg(COMPAT, "lease", [2, 3, 4, 7], [0, 1, 2], block_bytes, runs))
    dest = KVDest(dst, [0, 1, 2, 3])
    if runs == [[0, 4]]:  # a run need not be consecutive at the source (the server gathers it)
        assert sink.check_reply(header, "lease", [2, 3, 4, 7], dest, None).runs == runs
        return
    if runs == [[0, 1], [1, 1]]:  # covers 2 of 4: refused; a non-maximal split that covers all is fine
        with pytest.raises(KVTransferError):
            sink.check_reply(header, "lease", [2, 3, 4, 7], dest, None)
        ok = encode_kv_msg(KVBlocksMsg(COMPAT, "lease", [2, 3, 4, 7], [0, 1, 2], block_bytes,
                                       [[0, 1], [1, 2], [3, 1]]))
        assert sink.check_reply(ok, "lease", [2, 3, 4, 7], dest, None).runs == [[0, 1], [1, 2], [3, 1]]
        return
    with pytest.raises(KVTransferError) as err:
        sink.check_reply(header, "lease", [2, 3, 4, 7], dest, None)
    assert err.value.code == "bad_message"


def test_block_runs_and_reply_frames():
    assert block_runs([]) == []
    assert block_runs([5, 2, 7]) == [[0, 1], [1, 1], [2, 1]]
    assert block_runs(list(range(8))) == [[0, 8]]
    assert block_runs([0, 1, 2, 5, 6, 3, 7]) == [[0, 3], [3, 2], [5, 1], [6, 1]]
    assert block_runs([3, 2, 1]) == [[0, 1], [1, 1], [2, 1]]  # descending ids are not a run
    # Long source runs stay whole; short stretches are merged (gathered) up to GATHER_BLOCKS.
    assert reply_runs(list(range(10)) + [20, 12, 13] + list(range(30, 38)) + [5]) == [[0, 10], [10, 3], [13, 8],
                                                                                      [21, 1]]
    scattered = list(range(0, 2 * (GATHER_BLOCKS + 6), 2))
    assert reply_runs(scattered) == [[0, GATHER_BLOCKS], [GATHER_BLOCKS, 6]]

    src = random_kv(40)
    leases = LeaseTable()
    lease = leases.grant(list(range(40)), ttl=30, now=time.time())
    source = KVBlockSource(src, leases, COMPAT)
    ids = list(range(10)) + [20, 12, 13]
    frames = source.serve(encode_kv_msg(KVPullMsg(COMPAT, lease.lease_id, ids, [2, 0])))
    header = decode_kv_msg(frames[0])
    assert header.runs == [[0, 10], [10, 3]] and header.layers == [2, 0]
    assert len(frames) == 1 + 2 * 2 * 2  # for each layer, for each run: K, V
    block_bytes = header.block_bytes
    assert [memoryview(f).nbytes // block_bytes for f in frames[1:5]] == [10, 10, 3, 3]
    assert bytes(frames[1]) == src[2][0][0:10].numpy().tobytes()  # layer 2's K of blocks 0..9
    assert bytes(frames[4]) == src[2][1][[20, 12, 13]].numpy().tobytes()  # layer 2's V, gathered
    assert bytes(frames[7]) == src[0][0][[20, 12, 13]].numpy().tobytes()  # layer 0's K, gathered
    # zero copy for the consecutive run, a copy for the gathered one
    assert np.shares_memory(np.frombuffer(frames[1], dtype=np.uint8), src[2][0].numpy())
    assert not np.shares_memory(np.frombuffer(frames[3], dtype=np.uint8), src[2][0].numpy())


@pytest.mark.parametrize("src_ids,dst_ids", [
    ([5, 2, 7], [0, 3, 1]),  # runs of length 1
    (list(range(8)), list(range(8))),  # one full consecutive run, consecutive destination
    (list(range(8)), [7, 6, 5, 4, 3, 2, 1, 0]),  # one run, non-consecutive destination
    ([0, 1, 2, 5, 6, 3], [9, 1, 2, 3, 4, 8]),  # mixed runs, destination runs partly consecutive
    ([4, 5, 6, 7], [0, 2, 4, 6]),  # consecutive source, every other destination block
], ids=["singles", "full", "full-reversed-dest", "mixed", "strided-dest"])
def test_runs_round_trip(transport, src_ids, dst_ids):
    src = random_kv(8, torch.bfloat16)
    dst = zeros_like_kv(src, 10)
    leases = LeaseTable()
    lease = leases.grant(list(range(8)), ttl=30, now=time.time())
    with transport.server(src, leases) as server:
        stats = transport.client().pull(server.address, lease.lease_id, src_ids, KVDest(dst, dst_ids))
    assert_pulled(src, dst, src_ids, dst_ids)
    untouched = sorted(set(range(10)) - set(dst_ids))
    for layer in dst:
        assert not layer[0][untouched].any() and not layer[1][untouched].any()
    assert stats.num_bytes == len(src_ids) * 3 * 2 * 4 * 2 * 8 * 2


def test_lease_expiry(transport):
    src = random_kv(4)
    dst = zeros_like_kv(src, 4)
    clock = FakeClock()
    leases = LeaseTable()
    lease = leases.grant([0, 1], ttl=30, now=clock())
    with transport.server(src, leases, clock=clock) as server:
        client = transport.client()
        clock.now += 31
        with pytest.raises(KVTransferError) as err:
            client.pull(server.address, lease.lease_id, [0, 1], KVDest(dst, [0, 1]))
        assert err.value.code == "lease_expired"
        assert leases.expire_due(clock()) == []  # refused at once, freed after the grace
        clock.now += leases.free_grace_s
        assert leases.expire_due(clock()) == [0, 1]  # the caller frees these in its BlockPool
        with pytest.raises(KVTransferError) as err:
            client.pull(server.address, lease.lease_id, [0, 1], KVDest(dst, [0, 1]))
        assert err.value.code == "lease_expired"
        with pytest.raises(KVTransferError) as err:
            client.pull(server.address, "f" * 32, [0], KVDest(dst, [0]))
        assert err.value.code == "unknown_lease"
    assert_untouched(dst)


def test_lease_renew_and_release_messages(transport):
    """The puller renews a lease (the server's TTL from now) and releases it after its pull; the
    serving side frees released blocks on its own thread (take_released)."""
    src = random_kv(4)
    dst = zeros_like_kv(src, 4)
    clock = FakeClock()
    leases = LeaseTable()
    lease = leases.grant([0, 1], ttl=5, now=clock())
    with transport.server(src, leases, clock=clock) as server:
        client = transport.client()
        clock.now += 4
        assert client.renew(server.address, lease.lease_id) == clock() + 30  # the server's lease_ttl_s
        clock.now += 20  # past the first expiry: the renewed lease still serves
        client.pull(server.address, lease.lease_id, [0, 1], KVDest(dst, [2, 3]))
        assert_pulled(src, dst, [0, 1], [2, 3])
        assert leases.take_released() == []
        client.release(server.address, lease.lease_id)
        assert leases.take_released() == [0, 1] and len(leases) == 0
        client.release(server.address, lease.lease_id)  # twice: nothing left to free, not an error
        assert leases.take_released() == []
        with pytest.raises(KVTransferError) as err:
            client.renew(server.address, lease.lease_id)
        assert err.value.code == "unknown_lease"
        other = transport.client(compat=compat_hash("other", "float32", 4, 3, 2, 8))
        lease2 = leases.grant([3], ttl=5, now=clock())
        with pytest.raises(KVTransferError) as err:
            other.release(server.address, lease2.lease_id)
        assert err.value.code == "compat_mismatch" and len(leases) == 1


def test_server_gone(transport):
    src = random_kv(4)
    dst = zeros_like_kv(src, 4)
    leases = LeaseTable()
    lease = leases.grant([0], ttl=30, now=time.time())
    server = transport.server(src, leases)
    addr = server.address
    server.close()
    t0 = time.perf_counter()
    with pytest.raises(KVTransferError) as err:
        transport.client(timeout_s=1.0).pull(addr, lease.lease_id, [0], KVDest(dst, [0]))
    assert err.value.code in ("peer_gone", "timeout")
    assert time.perf_counter() - t0 < 5
    assert_untouched(dst)


def test_socket_timeout_on_a_silent_server():
    """The socket client receives with MSG_WAITALL under SO_RCVTIMEO: a peer that accepts and never
    answers, or stops halfway through a reply's header, gives `timeout` within the pull timeout."""
    import socket

    from tandem.kv_transfer.socket_transport import SocketKVBlockClient

    dst = zeros_like_kv(random_kv(4), 4)
    for payload in (b"", b"\x40\x00"):  # nothing; 2 of a u64 size's 8 bytes
        with socket.create_server(("127.0.0.1", 0)) as listener:
            port = listener.getsockname()[1]

            def answer(listener=listener, payload=payload):
                conn, _ = listener.accept()
                conn.sendall(payload)
                time.sleep(3)
                conn.close()

            threading.Thread(target=answer, daemon=True).start()
            t0 = time.perf_counter()
            with pytest.raises(KVTransferError) as err:
                SocketKVBlockClient(COMPAT, timeout_s=0.5).pull(f"tcp://127.0.0.1:{port}", "a" * 32, [0],
                                                                KVDest(dst, [0]))
            assert err.value.code == "timeout" and time.perf_counter() - t0 < 2.5


def test_timeout_on_a_silent_server(tmp_path):
    """A peer that accepts the request and never answers (ZeroMQ: a bare ROUTER)."""
    import zmq

    from tandem.kv_transfer.zmq_transport import ZmqKVBlockClient

    ctx = zmq.Context.instance()
    silent = ctx.socket(zmq.ROUTER)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    dst = zeros_like_kv(random_kv(4), 4)
    try:
        t0 = time.perf_counter()
        with pytest.raises(KVTransferError) as err:
            ZmqKVBlockClient(COMPAT, timeout_s=0.5).pull(f"tcp://127.0.0.1:{port}", "a" * 32, [0], KVDest(dst, [0]))
        assert err.value.code == "timeout" and time.perf_counter() - t0 < 3
    finally:
        silent.close(linger=0)


def test_concurrent_pulls(transport):
    src = random_kv(16)
    leases = LeaseTable()
    lease = leases.grant(list(range(16)), ttl=30, now=time.time())
    dsts = [zeros_like_kv(src, 4) for _ in range(4)]
    errors = []
    with transport.server(src, leases) as server:
        client = transport.client()

        def pull(i):
            try:
                remote = [4 * i + j for j in range(4)]
                client.pull(server.address, lease.lease_id, remote, KVDest(dsts[i], [0, 1, 2, 3]))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=pull, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors
    for i, dst in enumerate(dsts):
        assert_pulled(src, dst, [4 * i + j for j in range(4)], [0, 1, 2, 3])


def test_server_survives_garbage_and_internal_errors(transport):
    src = random_kv(4)
    dst = zeros_like_kv(src, 4)
    leases = LeaseTable()
    lease = leases.grant([0], ttl=30, now=time.time())
    with transport.server(src, leases) as server:
        client = transport.client()
        if transport.name.startswith("socket"):  # garbage, then a size far over the cap: dropped, still serving
            from tandem.kv_transfer.socket_transport import _connect_raw, _recv_msg, _send_msg

            with _connect_raw(server.address) as sock:
                _send_msg(sock, b"\x93\x01\x02")
                reply = decode_kv_msg(_recv_msg(sock))
                assert isinstance(reply, KVErrorMsg) and reply.code == "bad_message"
                sock.sendall((1 << 62).to_bytes(8, "little"))
                assert sock.recv(1) == b""  # the server closed this connection
        if transport.name.startswith("zmq"):  # a raw request that is not a KVPullMsg
            import zmq

            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.connect(server.address)
            sock.send_multipart([b"\x93\x01\x02", b"extra"])
            assert sock.poll(5000)
            reply = decode_kv_msg(sock.recv_multipart()[0])
            sock.close(linger=0)
            assert isinstance(reply, KVErrorMsg) and reply.code == "bad_message"

        class Broken:
            def get(self, *args):
                raise RuntimeError("boom")

        server.source.leases = Broken()
        with pytest.raises(KVTransferError) as err:
            client.pull(server.address, lease.lease_id, [0], KVDest(dst, [0]))
        assert err.value.code == "internal_error" and "boom" in str(err.value)
        assert_untouched(dst)
        server.source.leases = leases
        client.pull(server.address, lease.lease_id, [0], KVDest(dst, [1]))
    assert_pulled(src, dst, [0], [1])


def test_ucx_client_keeps_its_endpoint_between_pulls(tmp_path):
    """A UCX client reuses an idle endpoint to the same server (no connection setup per pull); once
    the server is gone, the kept endpoint fails, a new connection is tried, and the pull fails clearly."""
    from tests.kv_transfer.conftest import Transport

    transport = Transport("ucx", tmp_path)
    src = random_kv(8)
    dst = zeros_like_kv(src, 8)
    leases = LeaseTable()
    lease = leases.grant([1, 2], ttl=30, now=time.time())
    server = transport.server(src, leases)
    client = transport.client(timeout_s=2.0)
    try:
        client.pull(server.address, lease.lease_id, [1, 2], KVDest(dst, [0, 1]))
        (key, idle), = client._idle.items()
        kept = idle[0]
        stats = client.pull(server.address, lease.lease_id, [2], KVDest(dst, [5]))
        assert client._idle[key] == [kept] and stats.phases["connect"] < 1.0
        assert_pulled(src, dst, [1, 2, 2], [0, 1, 5])
        server.close()
        with pytest.raises(KVTransferError) as err:
            client.pull(server.address, lease.lease_id, [1], KVDest(dst, [3]))
        assert err.value.code == "peer_gone" and client._idle[key] == []
    finally:
        server.close()
        client.close()
