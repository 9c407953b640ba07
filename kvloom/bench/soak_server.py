"""The server a soak runs against: `kvloom serve` started as a subprocess on loopback (or one given by URL),
its /metrics read back, and its process watched (resident memory, threads)."""
from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

GAUGES = ("kvloom_num_requests_running", "kvloom_num_requests_waiting", "kvloom_kv_cache_blocks_used",
          "kvloom_session_kv_blocks")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_loopback(base_url: str) -> None:
    """A soak sends thousands of requests, bursts and abandoned streams: only ever at this machine."""
    host = urlsplit(base_url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"--base-url must be a loopback address (127.0.0.1, ::1, localhost), not {host!r}")


class ServerProcess:
    """`python -m kvloom.cli serve [MODEL] --port P [--max-waiting-requests K] ...`, stopped with SIGTERM
    (max_waiting_requests None: the server's default)."""

    def __init__(self, model: str | None, max_waiting_requests: int | None, extra_args: list[str],
                 log_path: str | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        waiting = ["--max-waiting-requests", str(max_waiting_requests)] if max_waiting_requests is not None else []
        self.cmd = [sys.executable, "-m", "kvloom.cli", "serve", *([model] if model else []), "--host", "127.0.0.1",
                    "--port", str(self.port), *waiting, *extra_args]
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="kvloom-soak-server-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self, timeout: float = 900.0) -> None:
        """Start and wait for /health (a first start on a machine compiles the kernels: ~60 s)."""
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} before it was up:\n"
                                   f"{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop(grace=10)
        raise RuntimeError(f"the server was not up within {timeout:g} s:\n{self.log_tail()}")

    def stop(self, grace: float = 90.0) -> int | None:
        """SIGTERM, then the exit code; None if it had to be killed (which is a failure of the soak)."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.exit_code = None
                return None
        self.exit_code = self.proc.returncode
        return self.exit_code

    def log_text(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])


def tracebacks(log: str) -> tuple[int, str | None]:
    """How many tracebacks a server log holds, and the first (a 200 everywhere can still hide one)."""
    marker = "Traceback (most recent call last)"
    count = log.count(marker)
    if not count:
        return 0, None
    start = log.index(marker)
    return count, "\n".join(log[start:].splitlines()[:30])


@dataclass
class MetricsSnapshot:
    outcomes: dict[str, float] = field(default_factory=dict)   # kvloom_requests_total by outcome
    gauges: dict[str, float] = field(default_factory=dict)

    @property
    def idle(self) -> bool:
        return all(self.gauges.get(g, 0) == 0 for g in GAUGES)


def parse_metrics(text: str) -> MetricsSnapshot:
    snap = MetricsSnapshot()
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kvloom_requests_total":
                snap.outcomes[s.labels["outcome"]] = s.value
            elif s.name in GAUGES:
                snap.gauges[s.name] = s.value
    return snap


async def scrape(h: httpx.AsyncClient, base: str) -> MetricsSnapshot:
    r = await h.get(base + "/metrics")
    r.raise_for_status()
    return parse_metrics(r.text)


class ProcessWatch:
    """Samples a process's resident memory and thread count; keeps the peaks."""

    def __init__(self, pid: int | None):
        self.proc = None
        if pid:
            import psutil   # only where a process is watched
            self.proc = psutil.Process(pid)
        self.peak_rss = 0
        self.peak_threads = 0
        self.lost: str | None = None   # why the process could no longer be sampled (reported with the result)

    def sample(self) -> tuple[int, int] | None:
        if self.proc is None:
            return None
        import psutil
        try:
            rss, threads = self.proc.memory_info().rss, self.proc.num_threads()
        except psutil.Error as e:       # gone, a zombie, or no longer ours to read: the soak's check fails on it
            self.lost = self.lost or repr(e)
            return None
        self.peak_rss, self.peak_threads = max(self.peak_rss, rss), max(self.peak_threads, threads)
        return rss, threads

    async def run(self, every: float = 0.5) -> None:
        while True:
            self.sample()
            await asyncio.sleep(every)
