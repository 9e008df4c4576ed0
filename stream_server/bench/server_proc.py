"""Start the server under test as a subprocess and watch its CPU and memory.

The bench starts its own server (rather than importing it) so that what is measured is exactly
what a user runs — the same command line, a separate process, a real socket — and so that CPU
and RSS can be read from the operating system for that process and its children alone.
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

    def command(self, port: int) -> list[str]:
        cmd = [sys.executable, "-m", "stream_server", "--port", str(port)]
        if self.model:
            cmd += ["--model", self.model]
        if self.device:
            cmd += ["--device", self.device]
        if self.compute_type:
            cmd += ["--compute-type", self.compute_type]
        return cmd + list(self.extra_args)


class ServerProcess:
    """A running ``stream_server`` subprocess with its log written to a file."""

    def __init__(self, options: ServerOptions, log_path: Path) -> None:
        self.options = options
        self.port = free_port()
        self.log_path = log_path
        self._log: IO[bytes] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s = 0.0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Launch and wait until the HTTP side answers (any status: the socket is serving)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("wb")
        cmd = self.options.command(self.port)
        self._log.write(("$ " + shlex.join(cmd) + "\n").encode())
        self._log.flush()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = t + self.options.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"server exited with code {self.proc.returncode} during startup; "
                    f"see {self.log_path}:\n{self.log_tail()}"
                )
            if http_alive(self.http_base):
                self.startup_s = time.monotonic() - t
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer within {self.options.startup_timeout_s} s")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL after 15 s; returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self._log is not None:
            self._log.close()
            self._log = None
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def http_alive(base: str) -> bool:
    """True when something answers HTTP on ``base`` (a 404 counts: the server is up)."""
    for path in ("/health", "/metrics", "/"):
        try:
            with urllib.request.urlopen(base + path, timeout=1.0):
                return True
        except urllib.error.HTTPError:
            return True
        except (urllib.error.URLError, OSError):
            continue
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
