"""Shared test helpers: the real speech corpus, WER, and a real server in a subprocess.

The WAV reader and the server launcher are the package's own (``audio_files.read_wav``, the
bench's ``ServerProcess``), so tests and benchmarks read audio and start servers the same way.
"""

from __future__ import annotations

import json
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from stream_server import audio_files
from stream_server.bench.server_proc import ServerProcess, free_port

__all__ = [
    "REPO",
    "SPEECH_DIR",
    "ServerProcess",
    "english_references",
    "free_port",
    "load_clip",
    "manifest",
    "normalize",
    "read_wav",
    "require_speech",
    "start_server",
    "wer",
]

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
    audio, sr = audio_files.read_wav(path, dtype=dtype)
    assert sr == rate, (path, sr)
    return audio


def normalize(text: str) -> str:
    """Whisper English normalisation, the benchmark's (one normaliser for every WER figure)."""
    from stream_server.bench.metrics import normalize_text

    return normalize_text(text)


def wer(references: list[str], hypotheses: list[str]) -> float:
    import jiwer

    refs = [normalize(r) for r in references]
    hyps = [normalize(h) for h in hypotheses]
    return jiwer.wer(" ".join(refs), " ".join(hyps))


def start_server(log_dir: Path, *args: str, timeout: float = 120) -> ServerProcess:
    """Start ``python -m stream_server`` on a free port and wait until /readyz says ready.

    Each server gets its own transcript database in ``log_dir`` (unless the test names one), so
    tests never read another run's stored sessions from the user's cache."""
    port = free_port()
    if "--transcript-db" not in args:
        args = (*args, "--transcript-db", str(log_dir / f"transcripts-{port}.sqlite3"))
    server = ServerProcess(args, log_dir / f"server-{port}.log", port=port, cwd=REPO, startup_timeout_s=timeout, stop_timeout_s=20)
    server.start()
    return server
