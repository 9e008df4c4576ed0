"""A closed WebSocket session's memory goes with its connection, not at the next full GC.

A session holds its audio buffer (up to a few MB for a long utterance). When the connection and
its runner referred to each other, each closed session lived on until the cyclic garbage
collector's next full pass: the soak saw some 20 closed sessions' buffers (~40 MB) held at any
time, and RSS that grew with the churn of sessions. Here the cyclic collector is switched off, so
only reference counting can free a session: it must.
"""

from __future__ import annotations

import gc
import json
import time
import weakref
from collections.abc import Iterator

import numpy as np
import pytest
from starlette.testclient import TestClient

from stream_server.engine import Engine
from stream_server.server import create_app
from stream_server.session import Session
from stream_server.settings import Settings
from tests.fakes import BurstDecoder, EnergyVad, speech, to_pcm16


@pytest.fixture
def no_cyclic_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_closed_sessions_memory_is_freed_without_the_cyclic_collector(no_cyclic_gc: None) -> None:
    settings = Settings(model="tiny.en")
    engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda path: BurstDecoder())
    sessions: list[weakref.ref[Session]] = []
    new_session = engine.new_session

    def tracked(config):  # type: ignore[no-untyped-def]
        session = new_session(config)
        sessions.append(weakref.ref(session))
        return session

    engine.new_session = tracked  # type: ignore[method-assign]
    audio = to_pcm16(np.concatenate([np.zeros(8000, np.float32), speech([1, 2, 3]), np.zeros(16000, np.float32)]))
    with TestClient(create_app(settings, engine)) as client:
        for _ in range(3):
            with client.websocket_connect("/v1/stream") as ws:
                ws.send_text(json.dumps({"type": "session.update", "session": {"sample_rate": 16000}}))
                for i in range(0, len(audio), 640):
                    ws.send_bytes(audio[i : i + 640])
                ws.send_text(json.dumps({"type": "session.close"}))
                texts = []
                while True:
                    event = json.loads(ws.receive_text())
                    if event["type"] == "transcript.text.done":
                        texts.append(event["text"])
                        break
            assert texts == ["w1 w2 w3"]
        deadline = time.monotonic() + 5.0
        while any(ref() is not None for ref in sessions) and time.monotonic() < deadline:
            time.sleep(0.05)  # the server side finishes its connection after the client's close
        assert len(sessions) == 3
        assert [ref() is None for ref in sessions] == [True, True, True]
