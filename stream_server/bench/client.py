"""Real WebSocket clients that stream audio at a fixed pace and record every event's arrival.

Each client behaves like a live microphone: a frame is sent when its last sample has been
"spoken" (``t0 + end_of_frame / speed``), so the time a listener waits is measured from the
moment a word was said, buffering included. Pacing uses absolute deadlines, never accumulated
sleeps, so a slow iteration does not drift the stream; how far the client fell behind is
recorded (``send_lag_max_s``) because an overloaded *client* would make the server look slow.

Arrival times are ``time.monotonic() - t0`` and raw frames are parsed only after the run, to
keep the receive loop as light as possible when hundreds of clients share one event loop.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import connect

from .corpus import Stream


@dataclass
class ClientConfig:
    """What every client asks of the server and how it paces audio."""

    url: str
    speed: float = 1.0
    frame_ms: int = 20
    language: str | None = "en"
    silence_duration_ms: int | None = None  # None: the server's default
    close_timeout_s: float = 60.0
    session_extra: dict[str, Any] = field(default_factory=dict)

    def session_update(self, sample_rate: int) -> dict[str, Any]:
        session: dict[str, Any] = {
            "interim_results": True,
            "include": ["logprobs"],
            "sample_rate": sample_rate,
            "language": self.language,
        }
        if self.silence_duration_ms is not None:
            session["turn_detection"] = {
                "type": "server_vad",
                "silence_duration_ms": self.silence_duration_ms,
            }
        session.update(self.session_extra)
        return {"type": "session.update", "session": session}


@dataclass
class StreamRecord:
    """Everything one client observed: raw events with arrival times and pacing health."""

    index: int
    raw_events: list[tuple[float, str]] = field(default_factory=list)
    audio_s: float = 0.0
    started_wall: float = 0.0  # monotonic time of t0 (shared clock with the resource monitor)
    finished_wall: float = 0.0
    send_lag_max_s: float = 0.0
    frames_sent: int = 0
    frames_late: int = 0  # sent more than 50 ms after their deadline
    close_code: int | None = None
    error: str | None = None

    def events(self) -> list[tuple[float, dict[str, Any]]]:
        out = []
        for t, raw in self.raw_events:
            try:
                ev = json.loads(raw)
            except ValueError:
                ev = {"type": "bench.unparseable", "raw": raw[:200]}
            if isinstance(ev, dict):
                out.append((t, ev))
        return out


async def _receiver(
    ws: Any, record: StreamRecord, updated: asyncio.Event, finished: asyncio.Event
) -> None:
    """Store every text frame with its absolute monotonic arrival time (re-based later)."""
    try:
        async for message in ws:
            if isinstance(message, bytes):
                continue
            record.raw_events.append((time.monotonic(), message))
            if not updated.is_set() and (
                '"session.updated"' in message or '"error"' in message
            ):
                updated.set()
            if '"transcript.text.done"' in message:
                finished.set()
    except websockets.ConnectionClosed:
        pass
    finally:
        updated.set()
        finished.set()


async def run_client(stream: Stream, cfg: ClientConfig, start_delay_s: float = 0.0) -> StreamRecord:
    """Stream ``stream`` over one WebSocket session and record what comes back.

    Order: connect, ``session.update`` (wait for ``session.updated``), paced binary pcm16 frames,
    ``session.close``, then wait for ``transcript.text.done`` and the server's close.
    """
    record = StreamRecord(index=stream.index)
    if start_delay_s > 0:
        await asyncio.sleep(start_delay_s)
    sr = stream.sample_rate
    frame = max(1, int(sr * cfg.frame_ms / 1000))
    payload = stream.samples.astype("<i2").tobytes()
    t0 = time.monotonic()
    try:
        async with connect(
            cfg.url, max_size=None, open_timeout=60, close_timeout=10, ping_interval=None
        ) as ws:
            updated = asyncio.Event()
            finished = asyncio.Event()
            recv_task = asyncio.create_task(_receiver(ws, record, updated, finished))
            await ws.send(json.dumps(cfg.session_update(sr)))
            try:
                await asyncio.wait_for(updated.wait(), timeout=30)
            except TimeoutError:
                record.error = "no session.updated within 30 s"
            t0 = time.monotonic()
            record.started_wall = t0
            n_samples = len(stream.samples)
            pos = 0
            while pos < n_samples:
                end = min(n_samples, pos + frame)
                deadline = t0 + (end / sr) / cfg.speed
                now = time.monotonic()
                if deadline > now:
                    await asyncio.sleep(deadline - now)
                    now = time.monotonic()
                # Timer overshoot and send back-pressure both count: either delays the audio.
                record.send_lag_max_s = max(record.send_lag_max_s, now - deadline)
                record.frames_sent += 1
                if now - deadline > 0.05:
                    record.frames_late += 1
                await ws.send(payload[2 * pos : 2 * end])
                pos = end
            record.audio_s = n_samples / sr
            await ws.send(json.dumps({"type": "session.close"}))
            try:
                await asyncio.wait_for(finished.wait(), timeout=cfg.close_timeout_s)
            except TimeoutError:
                record.error = f"no transcript.text.done within {cfg.close_timeout_s:.0f} s of close"
            try:
                await asyncio.wait_for(recv_task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                recv_task.cancel()
            record.close_code = ws.close_code
    except (TimeoutError, OSError, websockets.WebSocketException) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
    record.finished_wall = time.monotonic()
    # Arrival times relative to t0: audio time a was spoken at wall time a / speed.
    record.raw_events = [(t - t0, raw) for t, raw in record.raw_events]
    return record


async def run_clients(
    streams: list[Stream], cfg: ClientConfig, stagger_s: float
) -> list[StreamRecord]:
    """Run one client per stream concurrently; client ``i`` starts ``i * stagger_s / N`` late.

    Staggering spreads utterance ends over time as independent callers would, instead of
    synchronising every stream's decode at the same instant.
    """
    n = len(streams)
    step = stagger_s / n if n else 0.0
    tasks = [run_client(s, cfg, start_delay_s=i * step) for i, s in enumerate(streams)]
    return list(await asyncio.gather(*tasks))


def is_refusal(record: StreamRecord) -> bool:
    """The server turned the session away (``server_busy``, close 1013) before it heard any speech:
    capacity, not a lost final."""
    events = [ev for _, ev in record.events()]
    busy = any(ev.get("type") == "error" and (ev.get("error") or {}).get("code") == "server_busy" for ev in events)
    heard = any(str(ev.get("type", "")).startswith(("input_audio_buffer.speech", "transcript.")) for ev in events)
    return busy and not heard
