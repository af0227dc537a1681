"""Transports under test: every transport test runs over ZeroMQ tcp and ipc, plain sockets (TCP
and Unix), and UCX where `ucxx` imports."""

from __future__ import annotations

import os

import pytest
import torch

from tandem.kv_transfer.compat import compat_hash

COMPAT = compat_hash("tiny", "float32", 4, 3, 2, 8)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def random_kv(num_blocks: int, dtype=torch.float32, num_layers=3, block_size=4, heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, heads, head_dim)
    return [(torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype))
            for _ in range(num_layers)]


def zeros_like_kv(kv, num_blocks):
    return [(torch.zeros((num_blocks, *k.shape[1:]), dtype=k.dtype), torch.zeros((num_blocks, *v.shape[1:]),
             dtype=v.dtype)) for k, v in kv]


class Transport:
    def __init__(self, name: str, tmp_path) -> None:
        self.name = name
        self.tmp_path = tmp_path
        if name == "ucx":
            os.environ.setdefault("UCX_WARN_UNUSED_ENV_VARS", "n")
            pytest.importorskip("ucxx", reason="ucxx not installed (pip install ucxx-cu12)")
            from tandem.kv_transfer import ucx_transport
            if torch.cuda.is_available():  # UCX binds the GPU current at its init (as a worker's engine has)
                torch.zeros(1, device="cuda")
            try:
                ucx_transport.UcxRuntime.default()
            except Exception as exc:  # installed but unusable here (no usable interface, ...)
                pytest.skip(f"ucxx imports but UCX does not start: {exc}")
            self.mod = ucx_transport
        elif name.startswith("socket"):
            from tandem.kv_transfer import socket_transport
            self.mod = socket_transport
        else:
            pytest.importorskip("zmq")
            from tandem.kv_transfer import zmq_transport
            self.mod = zmq_transport

    def addr(self) -> str:
        if self.name in ("zmq-tcp", "socket-tcp"):
            return "tcp://127.0.0.1:0"
        if self.name in ("zmq-ipc", "socket-unix"):
            return f"ipc://{self.tmp_path}/kv.sock"
        return "ucx://127.0.0.1:0"

    @property
    def classes(self):
        prefix = {"ucx": "Ucx", "socket": "Socket"}.get(self.name.split("-")[0], "Zmq")
        return getattr(self.mod, f"{prefix}KVBlockServer"), getattr(self.mod, f"{prefix}KVBlockClient")

    def server(self, kv, leases, compat=COMPAT, clock=None):
        cls = self.classes[0]
        kwargs = {"clock": clock} if clock is not None else {}
        return cls(self.addr(), kv, leases, compat, **kwargs).start()

    def client(self, compat=COMPAT, timeout_s=5.0):
        return self.classes[1](compat, timeout_s=timeout_s)


@pytest.fixture(params=["zmq-tcp", "zmq-ipc", "socket-tcp", "socket-unix", "ucx"])
def transport(request, tmp_path):
    return Transport(request.param, tmp_path)
