"""End to end: live and stored session transcripts on the real server.

A real clip is streamed at real time over the native ``/v1/stream`` protocol; a subscriber joins
``GET /v1/sessions/{id}/events`` mid-call; the transcript is read while the call runs and after it
ends, in every format; a real local webhook receiver gets every final segment and the end, signed;
and the server is stopped and started again on the same database to read it all back.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets

from tests.local_services import Receiver
from tests.support import ServerProcess, load_clip, require_speech, start_server

pytestmark = pytest.mark.slow

SECRET = "whsec-test-секрет"
FRAME_S = 0.04
CLIPS = ("ljspeech_LJ001-0002", "ljspeech_LJ001-0008", "ljspeech_LJ001-0013")


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rx = Receiver(fail_first=1)
    yield rx
    rx.close()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store") / "transcripts.sqlite3"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, receiver: Receiver, db: Path) -> Iterator[ServerProcess]:
    require_speech()
    srv = start_server(
        tmp_path_factory.mktemp("server"),
        "--transcript-db", str(db),
        "--webhook-url", receiver.url,
        "--webhook-secret", SECRET,
        "--webhook-max-attempts", "4",
    )
    yield srv
    srv.stop()


def call_audio() -> np.ndarray:
    """Three sentences with pauses: three utterances, so a subscriber can join between them."""
    pause = np.zeros(int(16000 * 0.9), np.float32)
    return np.concatenate([part for clip in CLIPS for part in (load_clip(clip), pause)])


def sse_events(lines: list[str]) -> list[tuple[str, dict]]:
    """Parse an SSE body into (event, data) pairs; comments (``:``) are skipped."""
    events, kind, data = [], None, []
    for line in lines:
        if line.startswith(":"):
            continue
        if not line:
            if kind is not None:
                events.append((kind, json.loads("\n".join(data))))
            kind, data = None, []
        elif line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
    return events


async def subscribe(base: str, session_id: str, headers: dict[str, str] | None = None) -> list[tuple[str, dict]]:
    """Read ``/events`` to its end (the server ends the stream)."""
    lines: list[str] = []
    async with httpx.AsyncClient(timeout=120) as client, client.stream("GET", f"{base}/v1/sessions/{session_id}/events", headers=headers) as response:
        assert response.status_code == 200, await response.aread()
        assert response.headers["content-type"].startswith("text/event-stream")
        async for line in response.aiter_lines():
            lines.append(line)
    return sse_events([*lines, ""])


def native(event: dict) -> dict:
    """A WebSocket event as the hub publishes it (the dialect numbers events; the hub does not)."""
    return {k: v for k, v in event.items() if k != "event_id"}


async def stream_call(server: ServerProcess, audio: np.ndarray) -> dict:
    """Stream ``audio`` at real time; join the SSE stream after the first segment and read the
    transcript mid-call. Returns what each side saw."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    frame = int(16000 * FRAME_S) * 2
    ws_events: list[dict] = []
    first_segment = asyncio.Event()
    seen: dict = {}
    async with websockets.connect(server.ws_url, max_size=None) as ws:

        async def reader() -> None:
            async for message in ws:
                event = json.loads(message)
                ws_events.append(event)
                if event["type"] == "transcript.segment" and not first_segment.is_set():
                    seen["ws_before_join"] = len(ws_events)
                    first_segment.set()

        async def late_subscriber() -> None:
            await first_segment.wait()
            session_id = ws_events[0]["session"]["id"]
            task = asyncio.create_task(subscribe(server.http_url, session_id))
            async with httpx.AsyncClient(timeout=30) as client:
                seen["mid_call"] = (await client.get(f"{server.http_url}/v1/sessions/{session_id}/transcript")).json()
            seen["sse"] = await task

        reading = asyncio.create_task(reader())
        subscribing = asyncio.create_task(late_subscriber())
        start = time.monotonic()
        for i, offset in enumerate(range(0, len(pcm), frame)):
            await ws.send(pcm[offset : offset + frame])
            await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_S - time.monotonic()))
        await ws.send(json.dumps({"type": "session.close"}))
        await asyncio.wait_for(reading, 120)
        await asyncio.wait_for(subscribing, 120)
    seen["ws"] = ws_events
    return seen


@pytest.fixture(scope="module")
def call(server: ServerProcess) -> dict:
    return asyncio.run(stream_call(server, call_audio()))


def test_a_late_subscriber_gets_the_segments_so_far_then_every_live_event(call: dict) -> None:
    ws = [native(e) for e in call["ws"]]
    sse = call["sse"]
    assert [kind for kind, _ in sse] == [data["type"] for _, data in sse], "event: is the native type"
    assert sse[0] == ("session.created", ws[0]), "the session as created (its id, channels, ...)"
    segments = [e for e in ws if e["type"] == "transcript.segment"]
    assert len(segments) >= 3, [s["text"] for s in segments]
    # The stream must be: the first n segments (n >= 1, the backlog), then exactly the WebSocket's
    # events from some point on, with no segment lost between the two.
    rest = [data for _, data in sse[1:]]
    splits = [
        n for n in range(1, len(segments) + 1)
        if rest[:n] == segments[:n]
        and rest[n:] == ws[len(ws) - len(rest) + n:]
        and [e for e in ws[: len(ws) - len(rest) + n] if e["type"] == "transcript.segment"] == segments[:n]
    ]
    assert splits, "backlog of segments so far, then every live event in order"
    backlog, live = rest[: splits[0]], rest[splits[0]:]
    assert live, "live events followed the backlog"
    assert len(backlog) < len(segments), "the subscriber joined mid-call and saw later segments live"
    assert sse[-1][0] == "transcript.text.done" and sse[-1][1] == ws[-1]
    assert all("channel" in data and "speaker" in data for kind, data in sse if kind.startswith(("transcript.segment", "transcript.text.delta")))
    assert {e["type"] for e in live} & {"transcript.text.delta", "input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped"}


def test_the_transcript_while_the_call_runs(call: dict) -> None:
    mid = call["mid_call"]
    session_id = call["ws"][0]["session"]["id"]
    assert mid["id"] == session_id and mid["status"] == "active"
    assert mid["duration"] > 0
    assert len(mid["channels"]) == 1 and mid["channels"][0]["segments"], "the first segment is already there"
    assert mid["turns"] and mid["turns"][0]["text"] == mid["channels"][0]["segments"][0]["text"]


def transcript(server: ServerProcess, session_id: str, kind: str = "json", headers: dict[str, str] | None = None) -> httpx.Response:
    return httpx.get(f"{server.http_url}/v1/sessions/{session_id}/transcript", params={"format": kind}, headers=headers, timeout=30)


def check_stored(server: ServerProcess, call: dict, headers: dict[str, str] | None = None) -> None:
    """The finished transcript in every format matches what the WebSocket client received."""
    ws = [native(e) for e in call["ws"]]
    session_id = ws[0]["session"]["id"]
    done = ws[-1]
    segments = [{k: v for k, v in e.items() if k != "type"} for e in ws if e["type"] == "transcript.segment"]
    body = transcript(server, session_id, headers=headers).json()
    assert body["id"] == session_id and body["session_id"] == session_id and body["status"] == "completed"
    assert body["duration"] == done["usage"]["seconds"]
    [channel] = body["channels"]
    assert channel["channel"] == 0 and channel["segments"] == segments
    assert channel["text"] == done["text"]
    spoken = [s for s in segments if s["text"].strip()]
    assert [(t["start"], t["end"], t["text"]) for t in body["turns"]] == [(s["start"], s["end"], s["text"]) for s in spoken]
    txt = transcript(server, session_id, "txt", headers)
    assert txt.status_code == 200 and txt.text.splitlines() == [s["text"] for s in spoken]
    srt = transcript(server, session_id, "srt", headers).text
    # Subtitle cues follow subtitle norms (≤ 2 lines of 42 characters, ≤ 7 s): a segment may span several.
    assert srt.startswith("1\n00:00:") and srt.count(" --> ") >= len(spoken) and spoken[-1]["text"] in srt.replace("\n", " ")
    vtt = transcript(server, session_id, "vtt", headers)
    assert vtt.headers["content-type"].startswith("text/vtt")
    assert vtt.text.startswith("WEBVTT\n") and vtt.text.count(" --> ") >= len(spoken)


def test_the_stored_transcript_in_every_format(server: ServerProcess, call: dict) -> None:
    check_stored(server, call)


def test_the_webhook_receiver_gets_every_segment_and_the_end_signed(call: dict, receiver: Receiver) -> None:
    session_id = call["ws"][0]["session"]["id"]
    segments = [native(e) for e in call["ws"] if e["type"] == "transcript.segment"]

    def complete(payloads: list[dict]) -> bool:
        return any(p["type"] == "session.ended" and p["session_id"] == session_id for p in payloads)

    payloads = [p for p in receiver.wait_for(complete) if p["session_id"] == session_id]
    got = [p for p in payloads if p["type"] == "transcript.segment"]
    assert [p["segment"] for p in got] == segments, "every final segment, in order (the first after a retried 503)"
    assert [p["sequence"] for p in got] == list(range(len(segments)))
    [end] = [p for p in payloads if p["type"] == "session.ended"]
    assert end["transcript"]["status"] == "completed" and end["transcript"]["channels"][0]["text"] == call["ws"][-1]["text"]
    with receiver.lock:
        requests = [(h, b) for _, h, b in receiver.requests if json.loads(b)["session_id"] == session_id]
    for headers, body in requests:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["x-stream-server-signature"] == expected
        assert abs(int(headers["x-stream-server-timestamp"]) - time.time()) < 600
        assert headers["x-stream-server-timestamp"] == str(json.loads(body)["timestamp"])
        assert headers["content-type"] == "application/json"
        assert headers["x-stream-server-event"] == json.loads(body)["type"]
    assert len({h["x-stream-server-delivery"] for h, _ in requests}) == len(requests)


def test_a_call_that_drops_ends_its_subscribers_stream(server: ServerProcess) -> None:
    async def scenario() -> tuple[list, dict]:
        audio = load_clip(CLIPS[0])
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
        async with websockets.connect(server.ws_url) as ws:
            session_id = json.loads(await ws.recv())["session"]["id"]
            subscriber = asyncio.create_task(subscribe(server.http_url, session_id))
            await asyncio.sleep(0.3)
            await ws.send(pcm[: len(pcm) // 2])
            await asyncio.sleep(0.5)
        events = await asyncio.wait_for(subscriber, 60)  # the client went away without session.close
        body = transcript(server, session_id).json()
        return events, body

    events, body = asyncio.run(scenario())
    assert events[0][0] == "session.created" and events[-1][0] == "session.ended"
    assert events[-1][1]["status"] == "disconnected" and events[-1][1]["session_id"] == events[0][1]["session"]["id"]
    assert body["status"] == "disconnected" and body["duration"] > 0


def test_audiohook_connection_probes_are_answered_and_leave_nothing_behind(server: ServerProcess, call: dict, receiver: Receiver, db: Path) -> None:
    # Genesys checks an integration with sessions on the nil conversationId, open then close; two
    # may come at once. Each is answered as any session; none is stored, posted or listed.
    from stream_server.dialects.audiohook import PROBE_CONVERSATION
    from tests.test_dialect_audiohook import GenesysClient

    async def probe() -> list[str]:
        client = GenesysClient(session_id=str(uuid.uuid4()), conversation_id=PROBE_CONVERSATION)
        headers = {"audiohook-organization-id": client.organization_id, "audiohook-session-id": client.session_id,
                   "audiohook-correlation-id": str(uuid.uuid4()), "x-api-key": "any"}
        kinds = []
        async with websockets.connect(server.ws_url.replace("/v1/stream", "/v1/audiohook"), additional_headers=headers) as ws:
            for message in (client.open(), client.message("ping", {}), client.message("close", {"reason": "end"})):
                await ws.send(json.dumps(message))
                answer = json.loads(await asyncio.wait_for(ws.recv(), 5))
                client.seen(answer)
                kinds.append(answer["type"])
        return kinds

    async def probes() -> list[list[str]]:
        return list(await asyncio.gather(probe(), probe()))

    posted = len(receiver.payloads())
    assert asyncio.run(probes()) == [["opened", "pong", "closed"]] * 2
    time.sleep(1.0)  # what a webhook sender would have posted by now
    assert len(receiver.payloads()) == posted
    assert transcript(server, PROBE_CONVERSATION).status_code == 404
    with sqlite3.connect(db) as stored:
        assert stored.execute("SELECT COUNT(*) FROM sessions WHERE alias = ? OR session LIKE '%g711_ulaw%'", (PROBE_CONVERSATION,)).fetchone() == (0,)


def test_unknown_sessions_and_bad_formats_are_refused_in_the_error_shape(server: ServerProcess, call: dict) -> None:
    for path in ("/v1/sessions/sess_nope/transcript", "/v1/sessions/sess_nope/events"):
        response = httpx.get(server.http_url + path, timeout=10)
        assert response.status_code == 404
        assert response.json() == {"error": {"message": "no live or stored session 'sess_nope'", "type": "invalid_request_error", "param": "id", "code": "session_not_found"}}
    session_id = call["ws"][0]["session"]["id"]
    bad = transcript(server, session_id, "docx")
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "format"


def test_a_restart_loses_nothing_and_keys_guard_the_endpoints(server: ServerProcess, call: dict, db: Path, tmp_path: Path) -> None:
    session_id = call["ws"][0]["session"]["id"]
    server.stop()
    restarted = start_server(tmp_path, "--transcript-db", str(db), "--api-keys", "k1,k2")
    try:
        for path in (f"/v1/sessions/{session_id}/transcript", f"/v1/sessions/{session_id}/events"):
            for headers in (None, {"Authorization": "Bearer wrong"}):
                refused = httpx.get(restarted.http_url + path, headers=headers, timeout=10)
                assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        key = {"Authorization": "Bearer k2"}
        check_stored(restarted, call, key)
        replay = asyncio.run(subscribe(restarted.http_url, session_id, key))
        ws = [native(e) for e in call["ws"]]
        assert replay == [(e["type"], e) for e in ws if e["type"] in ("session.created", "transcript.segment", "transcript.text.done")]
    finally:
        restarted.stop()
