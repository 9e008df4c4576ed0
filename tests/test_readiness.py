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
