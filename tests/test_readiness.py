"""/readyz tells a load balancer the truth: ready only while sessions can get decodes."""

from __future__ import annotations

from starlette.testclient import TestClient

from stream_server.engine import Engine
from stream_server.server import create_app
from stream_server.settings import Settings
from tests.fakes import BurstDecoder, EnergyVad


def test_readyz_is_503_when_the_decode_workers_are_gone() -> None:
    settings = Settings(model="tiny.en")
    engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda path: BurstDecoder())
    with TestClient(create_app(settings, engine)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        engine.scheduler.stop()  # as if every worker thread had died
        down = client.get("/readyz")
        assert down.status_code == 503 and down.json()["status"] == "decoder_down"
        assert client.get("/healthz").status_code == 200  # alive, only not ready


async def test_new_sessions_are_refused_while_finals_run_late() -> None:
    """Admission control: the refusal reason the WebSocket shell sends as ``server_busy``."""
    import asyncio
    import threading

    import numpy as np

    from stream_server.decoding import DecodeRequest, DecodeResult

    gate = threading.Event()

    class StalledDecoder(BurstDecoder):
        def decode_batch(self, requests):  # type: ignore[no-untyped-def]
            gate.wait(10)
            return [DecodeResult((), "en", 0.0, 0.0) for _ in requests]

    # One worker and one request per batch: the second final must wait in the queue (with batches,
    # or a second worker, it would go into a stalled decoder too, and nothing would be waiting).
    settings = Settings(model="tiny.en", admission_max_turn_end_s=0.2, max_batch_size=1, decode_workers=1)
    engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda path: StalledDecoder())

    class Job:
        def __init__(self) -> None:
            self.request = DecodeRequest(np.zeros(1600, np.float32), model="tiny.en", final=True)

    try:
        assert engine.refusal() is None
        futures = [engine.scheduler.submit(Job()) for _ in range(2)]
        await asyncio.sleep(0.4)
        reason = engine.refusal()
        assert reason is not None and "capacity" in reason
        gate.set()
        await asyncio.gather(*futures)
    finally:
        gate.set()
        engine.close()


async def test_new_sessions_are_refused_while_a_turn_waits_for_its_first_text() -> None:
    """Turn ends on time, but a live turn's first interim waits past ``admission_max_first_text_s``
    behind them: the engine refuses too, with the same reason; 0 turns that watch off."""
    import asyncio
    import threading

    import numpy as np

    from stream_server.decoding import DecodeRequest, DecodeResult

    gate = threading.Event()

    class StalledDecoder(BurstDecoder):
        def decode_batch(self, requests):  # type: ignore[no-untyped-def]
            gate.wait(10)
            return [DecodeResult((), "en", 0.0, 0.0) for _ in requests]

    class Job:
        def __init__(self, key: str) -> None:
            self.request = DecodeRequest(np.zeros(1600, np.float32), model="tiny.en", key=key)

    for first_text_limit, refused in ((0.3, True), (0.0, False)):
        gate.clear()
        settings = Settings(model="tiny.en", admission_max_first_text_s=first_text_limit, max_batch_size=1, decode_workers=1)
        engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda path: StalledDecoder())
        try:
            running = engine.scheduler.submit(Job("someone"))  # an interim in the stalled decoder
            await asyncio.sleep(0.05)
            waiting = engine.scheduler.submit(Job("someone else"))  # a new turn's first interim
            assert engine.refusal() is None
            await asyncio.sleep(0.4)
            reason = engine.refusal()
            assert (reason is not None and "capacity" in reason) is refused, reason
            gate.set()
            await asyncio.gather(running, waiting)
        finally:
            gate.set()
            engine.close()


async def test_new_sessions_are_refused_while_the_event_loop_runs_late() -> None:
    """Decodes on time, but the loop that takes every client's audio is ``admission_max_loop_lag_ms``
    late (a real meter on this loop, held by blocking callbacks): refused, with its own reason;
    admitted again once the lag has left the meter's window; 0 turns the watch off."""
    import asyncio
    import contextlib
    import time

    settings = Settings(model="tiny.en", admission_max_loop_lag_ms=200)
    engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda path: BurstDecoder())
    engine.loop_lag.interval_s, engine.loop_lag.window_s = 0.01, 0.5
    engine.loop_lag.watch()  # the meter samples while a live session is open
    meter = asyncio.create_task(engine.loop_lag.run())
    try:
        await asyncio.sleep(0.05)
        assert engine.refusal() is None
        for _ in range(4):  # the loop is held again and again: each of the meter's timers fires ~0.3 s late
            time.sleep(0.3)
            await asyncio.sleep(0)
        reason = engine.refusal()
        assert reason is not None and "intake is running late" in reason
        await asyncio.sleep(0.7)
        assert engine.refusal() is None
    finally:
        meter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await meter
        engine.close()
    unwatched = Engine(Settings(model="tiny.en", admission_max_loop_lag_ms=0), vad=EnergyVad(), decoder_factory=lambda path: BurstDecoder())
    try:
        unwatched.loop_lag.observe(5.0, time.monotonic())
        assert unwatched.refusal() is None
    finally:
        unwatched.close()


def test_a_session_refused_for_the_loop_gets_server_busy_and_1013() -> None:
    import time

    import pytest
    from starlette.websockets import WebSocketDisconnect

    settings = Settings(model="tiny.en", admission_max_loop_lag_ms=200)
    engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda path: BurstDecoder())
    with TestClient(create_app(settings, engine)) as client:
        for _ in range(100):  # late at every sample (the lifespan's own meter adds a few on time)
            engine.loop_lag.observe(0.6, time.monotonic())
        with client.websocket_connect("/v1/stream") as ws:
            busy = ws.receive_json()
            assert busy["type"] == "error" and busy["error"]["code"] == "server_busy"
            assert "intake is running late" in busy["error"]["message"]
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_json()
            assert closed.value.code == 1013
