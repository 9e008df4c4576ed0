"""Helpers for the HTTP API tests: a real server in a subprocess, speech clips, audio encoding."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SPEECH = Path(__file__).resolve().parents[2] / "shared" / "speech"
JFK_TEXT = "and so my fellow americans ask not what your country can do for you ask what you can do for your country"


def speech_or_skip() -> Path:
    if not (SPEECH / "manifest.jsonl").is_file():
        pytest.skip(f"real speech corpus not found at {SPEECH} (../shared/speech next to the repository)")
    return SPEECH


def manifest() -> list[dict]:
    return [json.loads(line) for line in (speech_or_skip() / "manifest.jsonl").read_text().splitlines() if line.strip()]


def jfk_path() -> Path:
    return speech_or_skip() / "audio" / "whisper_jfk.wav"


def normalize(text: str) -> str:
    from whisper_normalizer.english import EnglishTextNormalizer

    return " ".join(EnglishTextNormalizer()(text).split())


def wer(reference: str, hypothesis: str) -> float:
    import jiwer

    return jiwer.wer(normalize(reference), normalize(hypothesis) or "<empty>")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(**env_settings: str) -> Iterator[str]:
    """``python -m stream_server`` on a free port; yields its base URL once /readyz says ready."""
    port = free_port()
    env = {**os.environ, **{f"STREAM_SERVER_{k.upper()}": str(v) for k, v in env_settings.items()}}
    env.setdefault("STREAM_SERVER_LOG_LEVEL", "warning")
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(
        [sys.executable, "-m", "stream_server", "--port", str(port)], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read().decode(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("server did not become ready in 120 s")
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def encode(samples: np.ndarray, path: Path, codec: str, *, rate: int = 16000, container: str | None = None) -> Path:
    """Write mono 16 kHz float samples with PyAV (``codec`` such as libmp3lame, aac, flac, libopus),
    resampled to ``rate`` in the file."""
    import av

    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=48000 if codec == "libopus" else rate)
        stream.layout = "mono"
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=stream.codec_context.sample_rate)
        for chunk in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def read_wav(path: Path) -> np.ndarray:
    import soundfile

    audio, rate = soundfile.read(path, dtype="float32", always_2d=False)
    assert rate == 16000
    return audio


def write_wav(samples: np.ndarray, path: Path, rate: int = 16000) -> Path:
    import soundfile

    soundfile.write(path, samples, rate, subtype="PCM_16")
    return path
