"""Helpers for the server tests: start `tandem serve` as a real process on a free port, wait
until it is healthy, and read its Prometheus metrics."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m tandem.cli serve ARGS`; its log goes to a file (read it with .log())."""

    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "tandem.cli", "serve", *args, "--port", str(self.port)]
        self._log = open(log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_healthy(self, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"server not healthy after {timeout_s} s:\n{self.log()[-4000:]}")

    def engine_pid(self) -> int:
        """The engine process: the server's child that is not multiprocessing's resource tracker."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == self.proc.pid and b"resource_tracker" not in cmdline:
                return int(entry.name)
        raise RuntimeError("no engine process found")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def metrics(url: str) -> dict[str, float]:
    """name -> value with label sets dropped (one model per server), except finished_reason:
    'tandem:request_success_total{finished_reason="stop"}'."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([^#\s{]+)(\{[^}]*\})?\s+(\S+)$", line)
        if m is None:
            continue
        key = m.group(1)
        reason = re.search(r'finished_reason="([^"]*)"', m.group(2) or "")
        if reason:
            key += f'{{finished_reason="{reason.group(1)}"}}'
        out[key] = out.get(key, 0.0) + float(m.group(3))
    return out


def wait_blocks_free(url: str, timeout_s: float = 20) -> dict[str, float]:
    """Poll /metrics until no request runs or waits and no KV block is held."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = metrics(url)
        if (m["tandem:kv_cache_used_blocks"] == 0 and m["tandem:num_requests_running"] == 0
                and m["tandem:num_requests_waiting"] == 0):
            return m
        if time.monotonic() > deadline:
            raise AssertionError(f"blocks still held: {m['tandem:kv_cache_used_blocks']}, "
                                 f"running {m['tandem:num_requests_running']}")
        time.sleep(0.2)
