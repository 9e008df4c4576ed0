"""Real local services tests start themselves: redis-server and nginx on loopback (the scale-out
tests), and an HTTP receiver for webhooks and callbacks.

Each test that needs a binary skips, with the reason, when it is not installed (``.ci/run``
installs both from Debian).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.support import free_port

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
REDIS = shutil.which("redis-server") or next((p for p in ("/usr/bin/redis-server",) if os.access(p, os.X_OK)), None)

needs_redis = pytest.mark.skipif(REDIS is None, reason="redis-server is not installed (apt-get install redis-server; .ci/run does)")
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (apt-get install nginx; .ci/run does)")


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} during startup")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{what} is not listening on {port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def running_redis(folder: Path) -> Iterator[str]:
    """A throwaway redis-server on a free loopback port, nothing persisted: its URL."""
    port = free_port()
    log = (folder / "redis.log").open("wb")
    proc = subprocess.Popen(
        [str(REDIS), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--dir", str(folder)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        wait_for_port(port, proc, "redis-server")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
        log.close()


class Receiver:
    """An HTTP endpoint for webhooks and callbacks (``http.server`` on loopback): records every
    POST and PUT as (method, lower-cased headers, body); answers 503 to the first ``fail_first``
    so the sender's retries are exercised."""

    def __init__(self, fail_first: int = 0, path: str = "/hooks/transcripts") -> None:
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.failures_left = fail_first
        self.path = path
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    fail = receiver.failures_left > 0
                    receiver.failures_left -= fail
                    if not fail:
                        receiver.requests.append((self.command, {k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(503 if fail else 200)
                self.end_headers()

            do_POST = do_PUT = _record

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{self.path}"

    def payloads(self) -> list[Any]:
        with self.lock:
            return [json.loads(body) for _, _, body in self.requests]

    def wait_for(self, predicate: Callable[[list[Any]], bool], timeout: float = 30.0) -> list[Any]:
        """The payloads so far, once ``predicate`` holds of them."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.payloads()):
                return self.payloads()
            time.sleep(0.05)
        raise AssertionError(f"the receiver never saw what was expected: {self.payloads()}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
