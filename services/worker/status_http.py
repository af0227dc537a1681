"""A worker's small HTTP server (a thread): GET /health and GET /metrics.

/health answers 200 with the worker's identity and addresses while its engine loop is alive (it
iterated within `stall_s`), 503 before the engine is ready and after it died or stalled.
/metrics: the engine's gauges and counters (the same names as `tandem serve`) and the KV-transfer
metrics (`tandem:kv_transfer_*`), from snapshots the loop publishes; no engine state is read from
this thread.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from tandem.services.openai.metrics import EngineStatsCollector
from tandem.services.worker.kv_engine import TRANSFER_BUCKETS, KVTransferStats


@dataclass
class WorkerStatus:
    """What the loop publishes for the HTTP thread (replaced whole, never mutated in place)."""

    info: dict[str, Any] = field(default_factory=dict)
    ready: bool = False
    dead_reason: str | None = None
    last_beat: float = 0.0  # time.monotonic() of the loop's last iteration
    kv_stats: KVTransferStats | None = None


class KVTransferCollector:
    def __init__(self, model_name: str, status: StatusBoard) -> None:
        self.model_name = model_name
        self.board = status

    def describe(self):
        return []

    def collect(self):
        s = self.board.status.kv_stats
        if s is None:
            return
        labels, value = ["model_name"], [self.model_name]
        counters = [
            ("tandem:kv_transfer_bytes", "KV bytes pulled from prefill workers.", s.bytes_pulled),
            ("tandem:kv_transfer_blocks", "KV blocks pulled from prefill workers.", s.blocks_pulled),
            ("tandem:kv_transfer_pulls", "Successful KV pulls.", s.pulls),
            ("tandem:kv_transfer_failures", "KV pulls that failed (timeout, peer gone, expired, refused).",
             s.failed_pulls),
            ("tandem:kv_transfer_recomputed_handoffs", "Handoffs whose prompt was recomputed after a failed pull.",
             s.recomputed_handoffs),
            ("tandem:kv_transfer_failed_handoffs", "Handoffs failed to the client (policy fail).", s.failed_handoffs),
            ("tandem:kv_transfer_local_hit_blocks", "Handed-off prompt blocks found in the local prefix cache.",
             s.local_hit_blocks),
            ("tandem:kv_handoffs_exported", "Prompts handed off to decode workers.", s.handoffs_exported),
            ("tandem:kv_leases_expired", "Leases that expired before their puller released them.",
             s.expired_leases),
            ("tandem:kv_leases_released", "Leases released by their puller.", s.released_leases),
        ]
        for name, doc, v in counters:
            c = CounterMetricFamily(name, doc, labels=labels)
            c.add_metric(value, v)
            yield c
        g = GaugeMetricFamily("tandem:kv_leases_active", "Handed-off prompts whose blocks are leased.", labels=labels)
        g.add_metric(value, s.active_leases)
        yield g
        c = CounterMetricFamily("tandem:kv_transfer_phase_seconds", "KV pull time by phase (connect, header: "
                                "waiting for the reply's header, frames: receiving, landing: copies into the cache).",
                                labels=[*labels, "phase"])
        for phase, seconds in s.phase_seconds.items():
            c.add_metric([*value, phase], seconds)
        yield c
        c = CounterMetricFamily("tandem:kv_serve_gather_seconds", "Serving KV pulls: time spent gathering staged "
                                "(GPU) frames and waiting for the GPU to finish them.", labels=labels)
        c.add_metric(value, s.gather_seconds)
        yield c
        h = HistogramMetricFamily("tandem:kv_transfer_seconds", "Time of one KV pull.", labels=labels)
        buckets = [(str(b), n) for b, n in zip(TRANSFER_BUCKETS, s.transfer_seconds_buckets)]
        buckets.append(("+Inf", s.transfer_seconds_count))
        h.add_metric(value, buckets, s.transfer_seconds_sum)
        yield h


class StatusBoard:
    """The loop writes `status` (and `engine_collector.stats`); HTTP threads read them."""

    def __init__(self, model_name: str, stall_s: float = 60.0) -> None:
        self.status = WorkerStatus()
        self.stall_s = stall_s
        self.registry = CollectorRegistry()
        self.engine_collector = EngineStatsCollector(model_name)
        self.registry.register(self.engine_collector)
        self.registry.register(KVTransferCollector(model_name, self))

    def health(self) -> tuple[int, dict[str, Any]]:
        s = self.status
        body = {**s.info, "ready": s.ready}
        if s.dead_reason is not None:
            return 503, {**body, "status": "dead", "reason": s.dead_reason}
        if not s.ready:
            return 503, {**body, "status": "starting"}
        stalled = time.monotonic() - s.last_beat
        if stalled > self.stall_s:
            return 503, {**body, "status": "stalled", "reason": f"the engine loop has not run for {stalled:.0f}s"}
        return 200, {**body, "status": "ok"}


class _Handler(BaseHTTPRequestHandler):
    board: StatusBoard

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        path = self.path.split("?", 1)[0]
        if path == "/health":
            code, body = self.board.health()
            self._reply(code, json.dumps(body).encode(), "application/json")
        elif path == "/metrics":
            self._reply(200, generate_latest(self.board.registry), "text/plain; version=0.0.4; charset=utf-8")
        else:
            self._reply(404, json.dumps({"error": f"no route {path}: try /health or /metrics"}).encode(),
                        "application/json")

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 (http.server's signature)
        pass  # probes every few seconds: not worth a log line each


def start_status_server(board: StatusBoard, host: str, port: int) -> ThreadingHTTPServer:
    """Bind now (port 0: a free one, see server.server_address) and serve on a daemon thread."""
    handler = type("WorkerHandler", (_Handler,), {"board": board})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="worker-http", daemon=True).start()
    return server
