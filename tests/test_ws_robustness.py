"""The WebSocket shell under abuse and shutdown, against the real server: graceful drain on
SIGTERM, a client that stops reading, message floods, absurdly nested JSON."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import struct
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import websockets

from tests.support import ServerProcess, english_references, load_clip, start_server


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


def readyz(server: ServerProcess) -> int:
    try:
        with urllib.request.urlopen(server.http_url + "/readyz", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def test_sigterm_drains_every_open_utterance_then_closes_1001(tmp_path: Path) -> None:
    rows = english_references()[:3]
    server = start_server(tmp_path, "--drain-timeout-s", "30")

    async def client(clip_id: str, opened: asyncio.Event) -> tuple[list[dict], int | None]:
        audio = load_clip(clip_id)
        audio = audio[: int(len(audio) * 0.8)]  # stop mid-sentence: the utterance is open
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(pcm16(audio))
            events: list[dict] = []
            async for message in ws:
                events.append(json.loads(message))
                if events[-1]["type"] == "input_audio_buffer.speech_started":
                    opened.set()
            return events, ws.close_code

    async def go() -> tuple[list[tuple[list[dict], int | None]], int, int | None]:
        flags = [asyncio.Event() for _ in rows]
        tasks = [asyncio.create_task(client(r["id"], f)) for r, f in zip(rows, flags)]
        await asyncio.wait_for(asyncio.gather(*(f.wait() for f in flags)), 60)
        await asyncio.sleep(0.5)
        server.process.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)
        status = await asyncio.to_thread(readyz, server)
        refused: int | None = None
        try:
            async with websockets.connect(server.ws_url) as late:
                busy = json.loads(await late.recv())
                assert busy["error"]["code"] == "server_busy", busy
                await late.wait_closed()
                refused = late.close_code
        except (OSError, websockets.exceptions.WebSocketException):
            refused = -1  # already stopped listening: refused too
        return await asyncio.gather(*tasks), status, refused

    try:
        results, status, refused = asyncio.run(go())
        # uvicorn re-raises the signal it caught once shutdown is complete: -SIGTERM, by design.
        assert server.process.wait(timeout=40) in (0, -signal.SIGTERM)
    finally:
        server.stop()
    assert status == 503, "readiness says draining at once"
    assert refused in (1013, -1), refused
    for events, code in results:
        types = [e["type"] for e in events]
        assert code == 1001
        assert types[-1] == "transcript.text.done" and "transcript.segment" in types
        done = events[-1]
        assert done["text"] and done["text"] == "".join(e["delta"] for e in events if e["type"] == "transcript.text.delta")
    log = server.log_path.read_text()
    assert "draining 3 session(s)" in log and "drain finished" in log


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    srv = start_server(tmp_path_factory.mktemp("robust"), "--max-send-queue", "100", "--max-messages-per-s", "1000")
    yield srv  # type: ignore[misc]
    srv.stop()


class StalledClient:
    """A WebSocket client that sends but never reads, with a tiny receive buffer: the server's
    writes back up at once, as with a phone whose app froze."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            f"GET /v1/stream HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        response = b""
        while b"\r\n\r\n" not in response:
            response += self.sock.recv(1)  # only the handshake is read, byte by byte
        assert b" 101 " in response.split(b"\r\n")[0], response

    def send_text(self, text: str) -> None:
        payload = text.encode()
        mask = os.urandom(4)
        header = bytes([0x81]) + (bytes([0x80 | 126]) + struct.pack("!H", len(payload)) if len(payload) > 125 else bytes([0x80 | len(payload)]))
        key = np.resize(np.frombuffer(mask, np.uint8), len(payload))
        self.sock.sendall(header + mask + (np.frombuffer(payload, np.uint8) ^ key).tobytes())

    def close(self) -> None:
        self.sock.close()


def test_a_client_that_stops_reading_is_dropped_and_others_go_on(server: ServerProcess) -> None:
    stalled = StalledClient(server.port)
    started = time.monotonic()
    try:
        # Each message of an unknown type is answered by an error that names the type: ~40 KB
        # each, 12 MB in all, more than the kernel's socket buffers can absorb.
        for _ in range(300):
            stalled.send_text(json.dumps({"type": "t" * 40_000}))
            time.sleep(0.005)

        async def other_session() -> list[str]:
            async with websockets.connect(server.ws_url) as other:
                await other.send(json.dumps({"type": "session.close"}))
                return [json.loads(m)["type"] async for m in other]

        kinds = asyncio.run(other_session())
        while server.metric("stream_active_sessions") > 0 and time.monotonic() - started < 20:
            time.sleep(0.2)
        dropped_after = time.monotonic() - started
    finally:
        stalled.close()
    assert kinds[-1] == "transcript.text.done", "other sessions go on"
    assert dropped_after < 20, "the stalled session was dropped"
    assert "client is not reading" in server.log_tail(200)


def test_a_flood_of_tiny_frames_is_cut_off_with_rate_limited(server: ServerProcess) -> None:
    async def go() -> tuple[list[dict], int | None]:
        async with websockets.connect(server.ws_url) as ws:
            try:
                for _ in range(5000):
                    await ws.send(b"\x00\x00")
            except websockets.exceptions.ConnectionClosed:
                pass
            events = []
            try:
                async for message in ws:
                    events.append(json.loads(message))
            except websockets.exceptions.ConnectionClosedError:
                pass  # 1008 ends the iteration with an exception in websockets
            return events, ws.close_code

    events, code = asyncio.run(go())
    assert code == 1008
    assert [e["error"]["code"] for e in events if e["type"] == "error"] == ["rate_limited"]


@pytest.mark.parametrize(
    ("path", "valid"),
    [
        ("/v1/stream", {"type": "session.close"}),
        ("/v1/realtime?intent=transcription", {"type": "input_audio_buffer.clear"}),
        ("/v1/listen?encoding=linear16&sample_rate=16000", {"type": "CloseStream"}),
    ],
)
def test_absurdly_nested_json_gets_an_error_and_the_session_goes_on(server: ServerProcess, path: str, valid: dict) -> None:
    async def go() -> list[dict]:
        async with websockets.connect(f"ws://127.0.0.1:{server.port}{path}") as ws:
            await ws.send("[" * 100_000 + "]" * 100_000)
            await ws.send(json.dumps(valid))
            received = []
            while True:
                try:
                    received.append(json.loads(await asyncio.wait_for(ws.recv(), 15)))
                except (websockets.exceptions.ConnectionClosed, asyncio.TimeoutError):
                    return received
                if len(received) >= 3 and received[-1].get("type") in ("transcript.text.done", "input_audio_buffer.cleared", "Metadata"):
                    return received

    received = asyncio.run(go())
    types = [str(m.get("type")) for m in received]
    assert any(t.lower() == "error" for t in types), types
    assert types[-1] in ("transcript.text.done", "input_audio_buffer.cleared", "Metadata"), types
