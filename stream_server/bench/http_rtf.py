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
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stream_server.audio import MODEL_RATE
from stream_server.audio_files import decode_file, read_wav
from stream_server.bench.server_proc import ServerProcess

SPEECH = Path(__file__).resolve().parents[3] / "shared" / "speech"


def build_long_file(path: Path, min_seconds: float = 1.5) -> float:
    """Write the English clips of the corpus (human references, 16 kHz originals) to one WAV
    with 0.7-1.5 s pauses between them; returns its duration in seconds."""
    import soundfile

    rows = [json.loads(line) for line in (SPEECH / "manifest.jsonl").read_text().splitlines() if line.strip()]
    rng = np.random.default_rng(0)
    parts = []
    for row in rows:
        if row["language"] == "en" and row["text"] and row["duration_s"] >= min_seconds and not row["id"].endswith("_8k"):
            audio, _ = read_wav(SPEECH / row["path"])
            parts += [audio, np.zeros(int(16000 * rng.uniform(0.7, 1.5)), np.float32)]
    audio = np.concatenate(parts)
    soundfile.write(path, audio, 16000, subtype="PCM_16")
    return len(audio) / 16000


@contextlib.contextmanager
def server(url: str | None, log_dir: Path) -> Iterator[str]:
    """``url`` itself, or the base URL of a server started for the run (stopped afterwards)."""
    if url:
        yield url
        return
    with ServerProcess([], log_dir / "server.log", env={"STREAM_SERVER_LOG_LEVEL": "warning"}) as proc:
        yield proc.http_url


async def post_file(base: str, path: Path) -> tuple[float, dict[str, Any]]:
    import httpx

    async with httpx.AsyncClient(timeout=1800) as client:
        started = time.monotonic()
        with path.open("rb") as f:
            resp = await client.post(base + "/v1/audio/transcriptions", files={"file": (path.name, f, "audio/wav")})
        resp.raise_for_status()
        return time.monotonic() - started, resp.json()


async def stream_session(base: str, audio: np.ndarray, stop: asyncio.Event) -> dict[str, float]:
    import websockets

    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    frame = 3200  # 100 ms of pcm16
    sent = deltas = 0
    async with websockets.connect(base.replace("http", "ws", 1) + "/v1/stream", max_size=None) as ws:

        async def reader() -> None:
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


async def measure(base: str, path: Path, duration: float, streams: int, stream_audio: np.ndarray) -> dict[str, Any]:
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
    with tempfile.TemporaryDirectory() as tmp:
        path = args.file or Path(tmp) / "long.wav"
        if args.file is None:
            build_long_file(path)
        with path.open("rb") as f:
            audio = decode_file(f)  # as the server will: any accepted format, 16 kHz mono
        duration = len(audio) / MODEL_RATE
        stream_audio = audio[: 60 * MODEL_RATE]
        with server(args.url, Path(tmp)) as base:
            asyncio.run(post_file(base, path))  # warm-up: first request pays one-time costs
            for _ in range(args.repeat):
                for streams in (0, args.streams):
                    result = asyncio.run(measure(base, path, duration, streams, stream_audio))
                    print(json.dumps({"file_s": round(duration, 1), **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
