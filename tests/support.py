"""Shared test helpers: the real speech corpus, WER, and a real server in a subprocess."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from functools import cache
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SPEECH_DIR = Path(os.environ.get("STREAM_SERVER_SPEECH_DIR", REPO.parent / "shared" / "speech"))


def require_speech() -> Path:
    if not (SPEECH_DIR / "manifest.jsonl").is_file():
        pytest.skip(f"real speech corpus not found at {SPEECH_DIR} (set STREAM_SERVER_SPEECH_DIR)")
    return SPEECH_DIR


@cache
def manifest() -> dict[str, dict]:
    rows = [json.loads(line) for line in (require_speech() / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {row["id"]: row for row in rows}


def english_references() -> list[dict]:
    """Clips with a human English reference transcript (not a model's output)."""
    return [
        row
        for row in manifest().values()
        if row["language"] == "en" and row["text"] and not row["text_source"].startswith("model_output")
    ]


def load_clip(clip_id: str, *, rate: int = 16000) -> np.ndarray:
    row = manifest()[clip_id]
    return read_wav(SPEECH_DIR / (row["path"] if rate == 16000 else row["orig8k_path"]), rate=rate)


def read_wav(path: Path, *, dtype: str = "float32", rate: int = 16000) -> np.ndarray:
    """The samples of a mono WAV file (``dtype`` float32 in [-1, 1) or int16); asserts its rate."""
    import soundfile

    audio, sr = soundfile.read(path, dtype=dtype, always_2d=False)
    assert sr == rate, (path, sr)
    return audio


def normalize(text: str) -> str:
    from whisper_normalizer.english import EnglishTextNormalizer

    return " ".join(EnglishTextNormalizer()(text).split())


def wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    return jiwer.wer(" ".join(refs), " ".join(hyps))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class ServerProcess:
    process: subprocess.Popen
    port: int
    log_path: Path

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/stream"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def metric(self, name: str) -> float:
        body = urllib.request.urlopen(self.http_url + "/metrics", timeout=10).read().decode()
        for line in body.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start_server(log_dir: Path, *args: str, timeout: float = 120) -> ServerProcess:
    """Start ``python -m stream_server`` on a free port and wait until /readyz says ready."""
    port = free_port()
    log_path = log_dir / f"server-{port}.log"
    log = open(log_path, "wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "stream_server", "--port", str(port), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
    )
    server = ServerProcess(process, port, log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.http_url + "/readyz", timeout=2) as response:
                if response.status == 200:
                    return server
        except OSError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server not ready after {timeout} s:\n{server.log_tail()}")
