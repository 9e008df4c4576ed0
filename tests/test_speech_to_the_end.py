"""Nothing spoken is lost at the end: speech that runs up to the last sample of a stream or file
keeps all its words, on every front end and at any pace (a phone-call recording whose last sentence
ended 13 ms before the end of the file once lost that sentence when sent fast)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile
import websockets

from stream_server.audio import resample
from tests.support import ServerProcess, english_references, load_clip, normalize, start_server

RATE = 8000  # telephone audio


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("tail"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def call(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, str]:
    """~25 s of 8 kHz speech: three sentences, the last one (the longest) cut 13 ms after its end."""
    rows = sorted((r for r in english_references() if r["id"].startswith("ljspeech_")), key=lambda r: r["duration_s"])
    last = rows[-1]
    first = [r for r in rows if r["id"] != last["id"]][-2:]
    parts = []
    for row in first:
        parts += [resample_to_8k(load_clip(row["id"])), np.zeros(RATE, np.float32)]
    tail = resample_to_8k(load_clip(last["id"]))
    loud = np.nonzero(np.abs(tail) > 0.02)[0]
    parts.append(tail[: loud[-1] + int(0.013 * RATE)])
    audio = np.concatenate(parts)
    path = tmp_path_factory.mktemp("call") / "call.wav"
    soundfile.write(path, audio, RATE, subtype="PCM_16")
    return path, audio, last["text"]


def resample_to_8k(samples: np.ndarray) -> np.ndarray:
    import soxr

    return soxr.resample(samples, 16000, RATE).astype(np.float32)


def ending(text: str, n: int = 4) -> str:
    return " ".join(normalize(text).split()[-n:])


def test_http_upload_keeps_the_last_sentence(server: ServerProcess, call: tuple[Path, np.ndarray, str]) -> None:
    path, _, last = call
    with path.open("rb") as f:
        response = httpx.post(server.http_url + "/v1/audio/transcriptions", files={"file": f}, data={"model": "whisper-1"}, timeout=120)
    assert response.status_code == 200, response.text
    assert ending(last) in normalize(response.json()["text"]), response.json()["text"]


@pytest.mark.parametrize("audio_format", ["pcm16", "g711_ulaw"])
def test_websocket_sent_as_fast_as_possible_keeps_the_last_sentence(
    server: ServerProcess, call: tuple[Path, np.ndarray, str], audio_format: str
) -> None:
    _, audio, last = call
    if audio_format == "pcm16":
        data = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    else:
        from stream_server.audio import encode_g711

        data = encode_g711(audio, "ulaw")

    async def go() -> str:
        async with websockets.connect(server.ws_url, max_size=None) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {"input_audio_format": audio_format, "sample_rate": RATE}}))
            for i in range(0, len(data), 16000):
                await ws.send(data[i : i + 16000])
            await ws.send(json.dumps({"type": "session.close"}))
            async for message in ws:
                event = json.loads(message)
                if event["type"] == "transcript.text.done":
                    return str(event["text"])
        raise AssertionError("no transcript.text.done")

    text = asyncio.run(go())
    assert ending(last) in normalize(text), text


def test_mic_client_at_full_speed_keeps_the_last_sentence(server: ServerProcess, call: tuple[Path, np.ndarray, str], tmp_path: Path) -> None:
    path, _, last = call
    out = tmp_path / "events.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "mic_client", "--file", str(path), "--speed", "0", "--url", server.ws_url, "--output", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert result.returncode == 0, result.stderr
    done = [json.loads(line) for line in out.read_text().splitlines() if '"transcript.text.done"' in line]
    assert done and ending(last) in normalize(done[-1]["text"]), result.stdout


def test_the_resampled_upload_path_agrees(call: tuple[Path, np.ndarray, str]) -> None:
    """The 16 kHz signal the server decodes still holds the last sentence's final samples."""
    _, audio, _ = call
    upsampled = resample(audio, RATE)
    assert abs(len(upsampled) - 2 * len(audio)) <= 2
    assert np.abs(upsampled[-int(0.2 * 16000) :]).max() > 0.01
