"""Batch real-time factor of the HTTP API, alone and next to live streaming sessions.

    python -m stream_server.bench.http_rtf [--url http://127.0.0.1:8000] [--file long.wav] [--streams 2]

Without ``--file`` a long file is built from the English clips of ``../shared/speech`` with pauses
between utterances. Without ``--url`` a server is started on a free port. The RTF is audio seconds
per wall second of ``POST /v1/audio/transcriptions``; the streaming sessions send real speech at real
time (pcm16, 100 ms frames) over ``/v1/stream`` for as long as the batch request runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

SPEECH = Path(__file__).resolve().parents[3] / "shared" / "speech"


def build_long_file(path: Path, min_seconds: float = 1.5) -> float:
    import soundfile

    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    parts = []
    for row in rows:
        if row["language"] == "en" and row["text"] and row["duration_s"] >= min_seconds and not row["id"].endswith("_8k"):
            audio, _ = soundfile.read(SPEECH / row["path"], dtype="float32")
            parts += [audio, np.zeros(int(16000 * rng.uniform(0.7, 1.5)), np.float32)]
    audio = np.concatenate(parts)
    soundfile.write(path, audio, 16000, subtype="PCM_16")
    return len(audio) / 16000


@contextlib.contextmanager
def server(url: str | None):
    if url:
        yield url
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "STREAM_SERVER_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "stream_server", "--port", str(port)], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(base + "/readyz", timeout=2) as resp:
                    if resp.status == 200:
                        break
            time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        proc.wait(15)


async def post_file(base: str, path: Path) -> tuple[float, dict]:
    import httpx

    async with httpx.AsyncClient(timeout=1800) as client:
        started = time.monotonic()
        with path.open("rb") as f:
            resp = await client.post(base + "/v1/audio/transcriptions", files={"file": (path.name, f, "audio/wav")})
        resp.raise_for_status()
        return time.monotonic() - started, resp.json()


async def stream_session(base: str, audio: np.ndarray, stop: asyncio.Event) -> dict:
    import websockets

    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    frame = 3200  # 100 ms of pcm16
    sent = deltas = 0
    async with websockets.connect(base.replace("http", "ws", 1) + "/v1/stream", max_size=None) as ws:

        async def reader():
            nonlocal deltas
            async for message in ws:
                if json.loads(message).get("type") == "transcript.text.delta":
                    deltas += 1

        task = asyncio.create_task(reader())
        started = time.monotonic()
        pos = 0
        while not stop.is_set():
            await ws.send(pcm[pos : pos + frame])
            pos = (pos + frame) % len(pcm)
            sent += frame
            await asyncio.sleep(max(0.0, started + sent / 32000 - time.monotonic()))
        await ws.send(json.dumps({"type": "session.close"}))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 60)
    return {"audio_s": sent / 32000, "deltas": deltas}


async def measure(base: str, path: Path, duration: float, streams: int, stream_audio: np.ndarray) -> dict:
    stop = asyncio.Event()
    sessions = [asyncio.create_task(stream_session(base, stream_audio, stop)) for _ in range(streams)]
    if streams:
        await asyncio.sleep(2.0)  # sessions are live before the upload starts
    wall, body = await post_file(base, path)
    stop.set()
    results = await asyncio.gather(*sessions)
    return {"streams": streams, "wall_s": round(wall, 2), "rtf": round(duration / wall, 2), "sessions": results, "chars": len(body["text"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url")
    parser.add_argument("--file", type=Path)
    parser.add_argument("--streams", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args(argv)
    import soundfile

    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "long.wav"
        if args.file is None:
            build_long_file(path)
        audio, rate = soundfile.read(path, dtype="float32")
        duration = len(audio) / rate
        stream_audio = audio[: 60 * rate] if rate == 16000 else np.zeros(16000, np.float32)
        with server(args.url) as base:
            asyncio.run(post_file(base, path))  # warm-up: first request pays one-time costs
            for _ in range(args.repeat):
                for streams in (0, args.streams):
                    result = asyncio.run(measure(base, path, duration, streams, stream_audio))
                    print(json.dumps({"file_s": round(duration, 1), **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
