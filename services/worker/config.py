"""WorkerConfig: the one frozen config of a prefill, decode or mixed worker, built from argv + env."""

from __future__ import annotations

import argparse
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from tandem.services.worker.kv_engine import KVTransferConfig
from tandem.shared.config import EngineConfig, parse_bytes

ROLES = ("prefill", "decode", "mixed")


@dataclass(frozen=True)
class WorkerConfig:
    engine: EngineConfig
    role: str
    worker_id: str
    host: str  # the interface every socket binds (127.0.0.1; 0.0.0.0 in a container)
    advertise_host: str  # the address peers dial
    port: int  # HTTP: /health, /metrics
    zmq_port: int  # requests (ROUTER)
    kv: KVTransferConfig
    redis_url: str | None = None
    log_level: str = "info"
    # The GIL switch interval: how long a KV transfer thread may wait for the engine's thread to let
    # go of the GIL, per torch or socket call (Python's default is 5 ms).
    switch_interval_ms: float = 0.5

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {self.role!r}")
        if not 0 < self.switch_interval_ms <= 100:
            raise ValueError(f"switch_interval_ms must be in (0, 100], got {self.switch_interval_ms}")
        for name in ("port", "zmq_port"):
            value = getattr(self, name)
            if not 0 <= value < 65536:
                raise ValueError(f"{name} must be a TCP port (0 picks a free one), got {value}")

    @property
    def zmq_addr(self) -> str:
        return f"tcp://{self.host}:{self.zmq_port}"


def add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="interface the worker's sockets bind (0.0.0.0: all)")
    p.add_argument("--advertise-host", default=None,
                   help="address peers dial (default: $TANDEM_ADVERTISE_HOST, else --host, else this host's IP)")
    p.add_argument("--port", type=int, default=8100, help="HTTP port for /health and /metrics (0: a free one)")
    p.add_argument("--zmq-port", type=int, default=8101, help="request socket port (0: a free one)")
    p.add_argument("--kv-port", type=int, default=8102, help="KV block server port (0: a free one)")
    p.add_argument("--kv-transport", default="zmq", choices=["zmq", "socket", "ucx"],
                   help="KV pulls over ZeroMQ, plain sockets (received straight into the cache), or UCX")
    p.add_argument("--kv-ipc", default=None, metavar="PATH",
                   help="serve KV pulls on ipc://PATH instead of tcp (peers on this machine only)")
    p.add_argument("--kv-failure-policy", default="recompute", choices=["recompute", "fail"],
                   help="when a KV pull fails: recompute the prompt locally, or fail the request")
    p.add_argument("--kv-lease-ttl", type=float, default=30.0, help="seconds a handed-off prompt's blocks are kept")
    p.add_argument("--kv-pull-timeout", type=float, default=10.0)
    p.add_argument("--worker-id", default=None)
    p.add_argument("--redis-url", default=None, help="register with this Redis (default: $TANDEM_REDIS_URL)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--gil-switch-interval-ms", type=float, default=0.5,
                   help="Python's thread switch interval: how long a KV transfer thread waits at most for the "
                        "engine thread to yield the GIL (Python's default: 5)")


def _default_advertise_host(host: str) -> str:
    if host not in ("0.0.0.0", "::", ""):
        return host
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "127.0.0.1"


def worker_config_from_args(args: argparse.Namespace, env: Mapping[str, str], role: str,
                            engine_kwargs: dict) -> WorkerConfig:
    if "*" in args.host:
        raise ValueError("--host: give an interface address (0.0.0.0 for all), not '*'")
    advertise = args.advertise_host or env.get("TANDEM_ADVERTISE_HOST") or _default_advertise_host(args.host)
    if args.kv_transport == "ucx":
        kv_bind = f"ucx://{advertise}:{args.kv_port}"  # ucxx listeners accept on every interface
    elif args.kv_ipc:
        kv_bind = f"ipc://{args.kv_ipc}"
    else:
        kv_bind = f"tcp://{args.host}:{args.kv_port}"
    kv = KVTransferConfig(
        transport=args.kv_transport, bind_addr=kv_bind, advertise_host=advertise,
        lease_ttl_s=args.kv_lease_ttl, lease_grace_s=max(args.kv_pull_timeout, 1.0),
        failure_policy=args.kv_failure_policy, pull_timeout_s=args.kv_pull_timeout,
    )
    kwargs = dict(engine_kwargs)
    if isinstance(kwargs.get("kv_cache_memory"), str):
        kwargs["kv_cache_memory"] = parse_bytes(kwargs["kv_cache_memory"])
    return WorkerConfig(
        engine=EngineConfig(model=args.model_tag or args.model, **kwargs),
        role=role,
        worker_id=args.worker_id or f"{role}-{uuid.uuid4().hex[:8]}",
        host=args.host,
        advertise_host=advertise,
        port=args.port,
        zmq_port=args.zmq_port,
        kv=kv,
        redis_url=args.redis_url or env.get("TANDEM_REDIS_URL") or None,
        log_level=args.log_level,
        switch_interval_ms=args.gil_switch_interval_ms,
    )
