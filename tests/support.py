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
from stream_server.bench import calls
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
    "spoken_card_call",
    "start_server",
    "stored_call_wav",
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


#: FSDD speakers who read each digit (the corpus has each digit by three of them).
DIGIT_SPEAKERS = {0: "george", 1: "jackson", 2: "lucas", 3: "nicolas", 4: "theo", 5: "yweweler", 6: "george", 7: "jackson", 8: "lucas", 9: "nicolas"}


def spoken_digits(digits: str, *, gap_s: float = 0.08, group_gap_s: float = 0.35) -> np.ndarray:
    """``digits`` read out by real voices (FSDD), a space a longer pause: "5204 7300" is a card
    number read in groups of four."""
    from stream_server.bench.replay_numbers import read_out

    return read_out(digits, lambda ch: load_clip(f"fsdd_{ch}_{DIGIT_SPEAKERS[int(ch)]}_0"), lambda: gap_s, lambda: group_gap_s)


def spoken_card_call(card: str = "5204 7300 0000 0016") -> np.ndarray:
    """A customer's turn of real speech ("will we ever forget it"), then a card number read out
    in groups by real voices, then another sentence ("has never been surpassed"): 16 kHz mono."""
    pause = np.zeros(int(16000 * 0.3), np.float32)
    quiet = np.zeros(int(16000 * 0.5), np.float32)
    return np.concatenate([quiet, load_clip("arctic_slt_arctic_a0005"), pause, spoken_digits(card), pause, load_clip("ljspeech_LJ001-0008"), quiet])


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


#: A call as a contact center stores it: the customer (LJ Speech) on the left channel, the agent
#: (ARCTIC slt) on the right, turns that overlap, abut and pause (``bench/calls.py``'s spacing).
STORED_CALL = [
    ("customer", "ljspeech_LJ001-0002"),
    ("agent", "arctic_slt_arctic_a0004"),
    ("customer", "ljspeech_LJ001-0013"),
    ("agent", "arctic_slt_arctic_a0008"),
    ("customer", "ljspeech_LJ001-0011"),
    ("agent", "arctic_slt_arctic_a0003"),
    ("customer", "ljspeech_LJ001-0008"),
    ("agent", "arctic_slt_arctic_a0006"),
]
STORED_CALL_LEGS = ("customer", "agent")


def stored_call_wav(directory: Path) -> tuple[calls.Call, Path]:
    """:data:`STORED_CALL` built as the call bench builds calls, written as one stereo WAV of
    8 kHz μ-law (a leg per channel, in :data:`STORED_CALL_LEGS` order): a stored call recording."""
    import soundfile

    from stream_server import audio

    call = calls.build_call(STORED_CALL, corpus=require_speech(), tracks=STORED_CALL_LEGS)
    table = audio.g711_table("ulaw")
    legs = [table[np.frombuffer(call.legs[leg], np.uint8)] for leg in STORED_CALL_LEGS]
    path = directory / "call.wav"
    soundfile.write(path, np.stack(legs, 1), calls.RATE, subtype="ULAW")
    return call, path
