"""Start the server under test as a subprocess and watch its CPU and memory.

The bench starts its own server (rather than importing it) so that what is measured is exactly
what a user runs — the same command line, a separate process, a real socket — and so that CPU
and RSS can be read from the operating system for that process and its children alone. The tests
start their servers with the same :class:`ServerProcess` (through ``tests/support.py``).
"""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerOptions:
    """Pass-through options for ``python -m stream_server``."""

    model: str | None = None
    device: str | None = None
    compute_type: str | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 300.0
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    cwd: Path | None = None  # the server's working directory (None: this process's)

    def args(self) -> list[str]:
        """The server's command-line flags (everything after ``python -m stream_server``)."""
        flags = [("--model", self.model), ("--device", self.device), ("--compute-type", self.compute_type)]
        return [arg for flag, value in flags if value for arg in (flag, value)] + list(self.extra_args)


class ServerProcess:
    """``python -m stream_server`` on a port of its own, its output in a log file.

    The one launcher of the bench and the tests: both need the command a user runs, in a separate
    process, and the same notion of "up" — ``/readyz`` answers 200 once the default model is
    loaded and warmed, so nothing measured or tested pays the model load.
    """

    def __init__(
        self,
        args: Sequence[str],
        log_path: Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        startup_timeout_s: float = 300.0,
        stop_timeout_s: float = 15.0,
    ) -> None:
        self.port = port if port is not None else free_port()
        self.command = [sys.executable, "-m", "stream_server", "--port", str(self.port), *args]
        self.log_path = log_path
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.cwd = cwd
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0
        self._log: IO[bytes] | None = None

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Launch and wait until ``/readyz`` says ready; stops the process and raises if it
        exits or is not ready within ``startup_timeout_s``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        self._log.write(("$ " + shlex.join(self.command) + "\n").encode())
        self._log.flush()
        started = time.monotonic()
        self.process = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=self.cwd)
        while time.monotonic() - started < self.startup_timeout_s:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode} during startup; see {self.log_path}:\n{self.log_tail()}")
            if http_ready(self.http_url):
                self.startup_s = time.monotonic() - started
                return
            time.sleep(0.2)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"server not ready after {self.startup_timeout_s} s; see {self.log_path}:\n{tail}")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def metric(self, name: str) -> float:
        """The value of one unlabelled (or first labelled) sample of ``/metrics`` now."""
        with urllib.request.urlopen(self.http_url + "/metrics", timeout=10) as response:
            body = response.read().decode()
        for line in body.splitlines():
            if line.startswith((name + " ", name + "{")):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after ``stop_timeout_s``; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=self.stop_timeout_s)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.process.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_ready(base: str) -> bool:
    """True once ``GET {base}/readyz`` answers 200 (503 while the model loads; nothing before
    the socket is bound)."""
    try:
        with urllib.request.urlopen(base + "/readyz", timeout=2.0) as response:
            status: int = response.status
            return status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ResourceSample:
    t: float  # monotonic
    cpu_s: float  # user+system seconds of the process tree so far
    rss_bytes: int


class ResourceMonitor:
    """Samples CPU time and RSS of a process tree in a background thread.

    A thread (not the event loop) does the sampling so that a busy client loop cannot skew the
    server's figures. Children are included because the server may run decode workers in
    subprocesses.
    """

    def __init__(self, pid: int, interval_s: float = 0.25) -> None:
        self.proc = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[ResourceSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def sample(self) -> ResourceSample | None:
        try:
            procs = [self.proc] + self.proc.children(recursive=True)
        except psutil.Error:
            return None
        cpu = 0.0
        rss = 0
        for p in procs:
            try:
                times = p.cpu_times()
                cpu += times.user + times.system
                rss += p.memory_info().rss
            except psutil.Error:
                continue
        s = ResourceSample(time.monotonic(), cpu, rss)
        self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="bench-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.sample()

    def window(self, t_start: float, t_end: float) -> list[ResourceSample]:
        return [s for s in self.samples if t_start <= s.t <= t_end]


def measure_idle(pid: int, seconds: float) -> dict[str, float]:
    """CPU (fraction of one core) and RSS of an idle server over ``seconds``."""
    mon = ResourceMonitor(pid, interval_s=min(0.25, seconds / 4))
    first = mon.sample()
    time.sleep(seconds)
    last = mon.sample()
    if first is None or last is None or last.t <= first.t:
        return {}
    return {
        "idle_cpu_cores": (last.cpu_s - first.cpu_s) / (last.t - first.t),
        "idle_rss_mb": last.rss_bytes / 2**20,
    }
