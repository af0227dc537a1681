"""Real worker processes (`tandem prefill|decode ...` on 127.0.0.1, free ports) and a driver that
plays the router's part of the handoff: prompts to a prefill worker with kv_export, each handoff
record to a decode worker with kv_import."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("zmq")

from tandem.services.worker import READY_PREFIX  # noqa: E402
from tandem.services.worker.client import WorkerClient  # noqa: E402
from tandem.shared.wire.messages import EngineOutputsMsg, ErrorMsg, HandoffRecord  # noqa: E402

WORKER_ARGS = ["--dtype", "float32", "--block-size", "4", "--max-num-batched-tokens", "24", "--max-model-len", "256",
               "--kv-cache-memory", "16MiB", "--port", "0", "--zmq-port", "0", "--kv-port", "0"]


@dataclass
class Worker:
    proc: subprocess.Popen
    info: dict
    log: Path
    client: WorkerClient

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.info['http_port']}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def start_worker(role: str, model: Path, log_dir: Path, *extra: str, timeout_s: float = 90.0) -> Worker:
    log = log_dir / f"{role}-{time.monotonic_ns()}.log"
    cmd = [sys.executable, "-m", "tandem.cli", "worker", "--role", role, str(model), *WORKER_ARGS, *extra]
    stderr = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ})
    stderr.close()
    line: list[str] = []

    def read_ready() -> None:
        for text in proc.stdout:
            if text.startswith(READY_PREFIX):
                line.append(text)
                return

    reader = threading.Thread(target=read_ready, daemon=True)
    reader.start()
    reader.join(timeout_s)
    if not line:
        proc.kill()
        raise RuntimeError(f"{role} worker did not start: {log.read_text()[-3000:]}")
    info = json.loads(line[0][len(READY_PREFIX):])
    return Worker(proc, info, log, WorkerClient(info["zmq_addr"]))


@pytest.fixture
def workers(tmp_path):
    """start(role, model, *args) -> Worker; every worker is killed after the test."""
    started: list[Worker] = []

    def start(role: str, model: Path, *extra: str) -> Worker:
        w = start_worker(role, model, tmp_path, *extra)
        started.append(w)
        return w

    yield start
    for w in started:
        w.client.close()
        if w.proc.poll() is None:
            w.proc.send_signal(signal.SIGTERM)
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                w.kill()


@dataclass
class DriveResult:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, str] = field(default_factory=dict)
    errors: dict[str, ErrorMsg] = field(default_factory=dict)
    handoffs: dict[str, HandoffRecord] = field(default_factory=dict)


def prefill_all(prefill: Worker, prompts, params, result: DriveResult, timeout_s: float = 60.0) -> None:
    """Send every prompt with kv_export and collect first tokens and handoffs (no decode yet)."""
    for i, p in enumerate(prompts):
        result.tokens[f"r{i}"] = []
        prefill.client.add(f"r{i}", p, params[i], kv_export=True)
    deadline = time.monotonic() + timeout_s
    while len(result.handoffs) + len(result.finish) + len(result.errors) < len(prompts):
        assert time.monotonic() < deadline, "prefill did not answer every prompt"
        msg = prefill.client.recv(0.05)
        _take(msg, result)


def _take(msg, result: DriveResult) -> list[HandoffRecord]:
    handoffs = []
    if isinstance(msg, EngineOutputsMsg):
        for out in msg.outputs:
            result.tokens[out.request_id].extend(out.new_token_ids)
            if out.finish_reason is not None:
                result.finish[out.request_id] = out.finish_reason
            elif out.handoff is not None:
                result.handoffs[out.request_id] = out.handoff
                handoffs.append(out.handoff)
    elif isinstance(msg, ErrorMsg) and msg.request_id is not None:
        result.errors[msg.request_id] = msg
    return handoffs


def decode_all(decode: Worker, prompts, params, result: DriveResult, handoffs,
               rewrite: Callable[[HandoffRecord], HandoffRecord] = lambda h: h, timeout_s: float = 90.0) -> None:
    handoffs = list(handoffs)
    target = len(result.finish) + len(result.errors) + len(handoffs)
    for h in handoffs:
        i = int(h.request_id[1:])
        decode.client.add(h.request_id, prompts[i], params[i], kv_import=rewrite(h))
    wait_decoded(decode, result, target, timeout_s)


def wait_decoded(decode: Worker, result: DriveResult, total: int, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while len(result.finish) + len(result.errors) < total:
        assert time.monotonic() < deadline, f"decode did not finish: {len(result.finish)} of {total}"
        _take(decode.client.recv(0.05), result)


def drive(prefill: Worker, decode: Worker, prompts, params, timeout_s: float = 120.0) -> DriveResult:
    """Pipelined, as a router does: each handoff goes to decode as soon as it arrives."""
    result = DriveResult()
    for i, p in enumerate(prompts):
        result.tokens[f"r{i}"] = []
        prefill.client.add(f"r{i}", p, params[i], kv_export=True)
    deadline = time.monotonic() + timeout_s
    while len(result.finish) + len(result.errors) < len(prompts):
        assert time.monotonic() < deadline, f"not finished: {len(result.finish)} of {len(prompts)}"
        for h in _take(prefill.client.recv(0.005), result):
            i = int(h.request_id[1:])
            decode.client.add(h.request_id, prompts[i], params[i], kv_import=h)
        _take(decode.client.recv(0.005), result)
    return result


def metric(text: str, name: str) -> float:
    """The value of one unlabeled-or-single-series metric in Prometheus text."""
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(name)


class TcpProxy:
    """A loopback TCP proxy to `target` ("tcp://host:port") that can hold replies back
    (`delay_s`) or drop every connection at once (`drop`): a slow or broken network for KV pulls."""

    def __init__(self, target: str, delay_s: float = 0.0, drop: bool = False) -> None:
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.delay_s = delay_s
        self.drop = drop
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = 0
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.drop:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            threading.Thread(target=self._pipe, args=(client, upstream, 0.0), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, self.delay_s), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, delay_s: float) -> None:
        try:
            while data := src.recv(1 << 16):
                if delay_s:
                    time.sleep(delay_s)
                    delay_s = 0.0
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
