"""The session hub without a server: fan-out, late joiners' backlog, slow subscribers, aliases,
the transcript view, key presses, and the WebSocket shell's wiring (in-process app with the fake
models): call ids, an operator's pause/resume over HTTP, Twilio's DTMF into the transcript."""

from __future__ import annotations

import asyncio
import functools
import json
import time

import numpy as np
import pytest

from stream_server import protocol as p
from stream_server.hub import Dropped, Dtmf, Ended, Published, SessionHub, TranscriptRecord, conversation, transcript_json


def created(channels: int = 1, labels: list[str] | None = None) -> p.SessionCreated:
    return p.SessionCreated({"id": "sess_1", "channels": channels, "channel_labels": labels})


def segment(n: int, text: str, start: float, end: float, channel: int = 0, speaker: str | None = None) -> p.TranscriptSegment:
    return p.TranscriptSegment(f"item_{n}", start, end, text, None, None, -0.2, 0.01, channel=channel, speaker=speaker)


def delta(n: int, text: str) -> p.TranscriptDelta:
    return p.TranscriptDelta(f"item_{n}", text, None)


def done(text: str) -> p.TranscriptDone:
    return p.TranscriptDone(text, None, p.Usage(4.0))


async def drain(subscription, timeout: float = 1.0) -> list:
    """Everything a subscription yields up to its end (or ``timeout`` of silence)."""
    out = list(subscription.backlog)
    while True:
        item = await subscription.next(timeout)
        out.append(item)
        if item is None or isinstance(item, (Dropped, Ended)) or (isinstance(item, Published) and item.type == "transcript.text.done"):
            return out


class Recorder:
    """An observer that records what it was told (the store and webhooks have this shape)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int | None]] = []

    def started(self, record: TranscriptRecord) -> None:
        self.calls.append(("started", record.public_id, None))

    def aliased(self, record: TranscriptRecord) -> None:
        self.calls.append(("aliased", record.public_id, None))

    def segment(self, record: TranscriptRecord, index: int) -> None:
        self.calls.append(("segment", record.segments[index]["text"], index))

    def ended(self, record: TranscriptRecord) -> None:
        self.calls.append(("ended", record.status, None))


async def test_every_subscriber_gets_every_event_in_order() -> None:
    hub = SessionHub()
    hub.open("sess_1")
    hub.publish("sess_1", created())
    subscribers = [hub.subscribe("sess_1") for _ in range(3)]
    events = [delta(1, "hello"), segment(1, "hello", 0.1, 0.6), delta(2, " world"), segment(2, "world", 1.0, 1.4), done("hello world")]
    for event in events:
        hub.publish("sess_1", event)
    for subscription in subscribers:
        received = await drain(subscription)
        assert [item.type for item in received] == ["session.created", *(e.type for e in events)]
        assert received[2].data == p.event_to_dict(events[1])  # the native JSON, channel and speaker included
        assert json.loads(received[2].json)["channel"] == 0


async def test_late_joiner_gets_created_and_segments_so_far_then_live_events() -> None:
    hub = SessionHub()
    hub.open("sess_1")
    hub.publish("sess_1", created())
    hub.publish("sess_1", delta(1, "one"))
    hub.publish("sess_1", segment(1, "one", 0.0, 0.5))
    hub.publish("sess_1", p.TranscriptInterim("item_2", "tw", None))
    hub.publish("sess_1", segment(2, "two", 1.0, 1.5))
    late = hub.subscribe("sess_1")
    assert late is not None
    assert [(e.type, e.data.get("text")) for e in late.backlog] == [
        ("session.created", None),
        ("transcript.segment", "one"),
        ("transcript.segment", "two"),
    ]
    hub.publish("sess_1", segment(3, "three", 2.0, 2.5))
    hub.close("sess_1")
    received = await drain(late)
    assert [e.data.get("text") for e in received if isinstance(e, Published)] == [None, "one", "two", "three"]
    assert isinstance(received[-1], Ended) and received[-1].record.status == "disconnected"


async def test_a_slow_subscriber_is_dropped_without_slowing_the_publisher() -> None:
    hub = SessionHub(subscriber_limit=10)
    hub.open("sess_1")
    hub.publish("sess_1", created())
    slow = hub.subscribe("sess_1")
    fast = hub.subscribe("sess_1")
    assert slow is not None and fast is not None
    received: list = []

    async def read_fast() -> None:
        while True:
            item = await fast.next(2.0)
            received.append(item)
            if not isinstance(item, Published) or item.type == "transcript.text.done":
                return

    reader = asyncio.create_task(read_fast())
    started = time.perf_counter()
    for n in range(500):
        hub.publish("sess_1", delta(n, f" w{n}"))
        await asyncio.sleep(0)  # the fast reader keeps up; the slow one never reads
    hub.publish("sess_1", done("..."))
    publishing = time.perf_counter() - started
    await asyncio.wait_for(reader, 5)
    assert all(isinstance(item, Published) for item in received), received[-1]
    assert len(received) == 501, "the reader that keeps up loses nothing"
    assert publishing < 1.0
    assert hub.subscriber_count("sess_1") == 1, "the slow subscriber was removed from the session"
    assert slow.pending == 10
    items = await drain(slow)
    assert [item.data["delta"] for item in items if isinstance(item, Published) and item.type == "transcript.text.delta"] == [
        f" w{n}" for n in range(10)
    ], "what was queued before the drop is still delivered, in order"
    assert isinstance(items[-1], Dropped) and items[-1].reason == "slow_subscriber"
    assert items[-1].event()["type"] == "subscription.dropped"


async def test_alias_finds_the_session_until_it_ends() -> None:
    recorder = Recorder()
    hub = SessionHub([recorder])
    hub.open("sess_1")
    hub.publish("sess_1", created())
    assert hub.record("CA123") is None and hub.subscribe("CA123") is None
    hub.alias("sess_1", "CA123")
    hub.publish("sess_1", segment(1, "hi", 0.0, 0.4))
    by_alias = hub.record("CA123")
    assert by_alias is not None and by_alias.session_id == "sess_1" and by_alias.public_id == "CA123"
    subscription = hub.subscribe("CA123")
    assert subscription is not None and [e.type for e in subscription.backlog] == ["session.created", "transcript.segment"]
    hub.publish("sess_1", done("hi"))
    hub.close("sess_1")
    assert hub.record("CA123") is None and hub.record("sess_1") is None
    assert recorder.calls == [("started", "sess_1", None), ("aliased", "CA123", None), ("segment", "hi", 0), ("ended", "completed", None)]


async def test_two_sessions_with_the_same_alias_the_latest_wins() -> None:
    hub = SessionHub()
    for sid in ("sess_a", "sess_b"):
        hub.open(sid)
        hub.publish(sid, created())
        hub.alias(sid, "conv-1")
    record = hub.record("conv-1")
    assert record is not None and record.session_id == "sess_b"
    hub.close("sess_a")  # the older one ending must not unregister the newer one's alias
    record = hub.record("conv-1")
    assert record is not None and record.session_id == "sess_b"


async def test_a_failing_observer_never_stops_publishing(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(Recorder):
        def segment(self, record: TranscriptRecord, index: int) -> None:
            raise OSError("disk full")

    good = Recorder()
    hub = SessionHub([Broken(), good])
    hub.open("sess_1")
    hub.publish("sess_1", created())
    subscription = hub.subscribe("sess_1")
    hub.publish("sess_1", segment(1, "still here", 0.0, 1.0))
    assert ("segment", "still here", 0) in good.calls
    assert subscription is not None and (await subscription.next(1)).type == "transcript.segment"
    assert "observer Broken failed" in caplog.text


def test_unknown_ids_are_ignored_by_publishers_and_readers() -> None:
    hub = SessionHub()
    hub.publish("nope", created())
    hub.alias("nope", "x")
    hub.close("nope")
    assert hub.record("nope") is None and hub.subscribe("nope") is None and hub.live_ids() == []


class KeyRecorder(Recorder):
    """An observer that also keeps key presses (the store has this shape)."""

    def dtmf(self, record: TranscriptRecord, index: int) -> None:
        self.calls.append(("dtmf", record.dtmf[index]["digit"], index))


async def test_key_presses_reach_subscribers_the_transcript_and_observers_that_keep_them(caplog: pytest.LogCaptureFixture) -> None:
    keeper, plain = KeyRecorder(), Recorder()
    hub = SessionHub([keeper, plain])
    hub.open("sess_1")
    hub.publish("sess_1", created(2, ["caller", "callee"]))
    live = hub.subscribe("sess_1")
    hub.publish("sess_1", segment(1, "my account number is", 0.5, 2.0, 0, "caller"))
    hub.dtmf("sess_1", Dtmf("5", 0, "caller", 2.4))
    hub.dtmf("sess_1", Dtmf("#", 0, "caller", 2.9))
    hub.publish("sess_1", segment(2, "thank you", 3.1, 3.8, 1, "callee"))
    late = hub.subscribe("sess_1")
    hub.dtmf("unknown", Dtmf("1", 0, None, 0.0))  # ignored, like events of unknown sessions
    record = hub.record("sess_1")
    hub.close("sess_1")
    received = await drain(live)
    assert [getattr(item, "type", None) for item in received[:5]] == ["session.created", "transcript.segment", "call.dtmf", "call.dtmf", "transcript.segment"]
    assert received[2].data == {"type": "call.dtmf", "digit": "5", "channel": 0, "speaker": "caller", "time": 2.4}
    assert [e.type for e in late.backlog] == ["session.created", "transcript.segment", "call.dtmf", "call.dtmf", "transcript.segment"], "keys among the segments so far"
    assert ("dtmf", "5", 0) in keeper.calls and ("dtmf", "#", 1) in keeper.calls
    assert not [r for r in caplog.records if r.levelno >= 40], "an observer without dtmf() is simply not told"
    assert record is not None
    body = transcript_json(record)
    assert body["dtmf"] == [{"channel": 0, "speaker": "caller", "digit": "5", "time": 2.4}, {"channel": 0, "speaker": "caller", "digit": "#", "time": 2.9}]
    assert [(e["speaker"], e["text"]) for e in conversation(body)] == [
        ("caller", "my account number is"), ("caller", "[DTMF 5]"), ("caller", "[DTMF #]"), ("callee", "thank you")]


def test_transcript_of_a_running_two_channel_call() -> None:
    hub = SessionHub()
    hub.open("sess_1", duration=lambda: 7.5)
    hub.publish("sess_1", created(2, ["agent", "customer"]))
    hub.publish("sess_1", segment(1, "Thanks for calling.", 0.2, 1.4, 0, "agent"))
    hub.publish("sess_1", segment(2, "Hi, my card", 1.2, 2.0, 1, "customer"))
    hub.publish("sess_1", segment(3, "was declined.", 2.2, 3.0, 1, "customer"))
    hub.publish("sess_1", segment(4, "", 3.5, 3.6, 0, "agent"))  # an utterance with no words
    record = hub.record("sess_1")
    assert record is not None
    body = transcript_json(record)
    assert body["status"] == "active" and body["duration"] == 7.5 and body["id"] == "sess_1"
    assert [(c["channel"], c["speaker"], c["text"]) for c in body["channels"]] == [
        (0, "agent", "Thanks for calling."),
        (1, "customer", "Hi, my card was declined."),
    ]
    assert [s["item_id"] for s in body["channels"][1]["segments"]] == ["item_2", "item_3"]
    assert "type" not in body["channels"][0]["segments"][0]
    assert [(t["speaker"], t["start"], t["text"]) for t in body["turns"]] == [
        ("agent", 0.2, "Thanks for calling."),
        ("customer", 1.2, "Hi, my card"),
        ("customer", 2.2, "was declined."),
    ]


def test_transcript_after_done_uses_the_done_events_channel_text() -> None:
    hub = SessionHub()
    hub.open("sess_1", duration=lambda: 99.0)
    hub.publish("sess_1", created(2, ["a", "b"]))
    hub.publish("sess_1", segment(1, "one", 0.0, 1.0, 0, "a"))
    final = p.TranscriptDone(
        "one two", None, p.Usage(3.25),
        channels=[p.ChannelText(0, "a", "one"), p.ChannelText(1, "b", "two")],
        turns=[p.Turn(0, "a", 0.0, 1.0, "one"), p.Turn(1, "b", 1.5, 2.0, "two")],
    )
    hub.publish("sess_1", final)
    hub.close("sess_1")
    record = TranscriptRecord("sess_1", None, "completed", 0.0, 1.0, 3.25, {"channels": 2, "channel_labels": ["a", "b"]},
                              [p.event_to_dict(segment(1, "one", 0.0, 1.0, 0, "a"))], p.event_to_dict(final))
    body = transcript_json(record)
    assert body["duration"] == 3.25 and body["status"] == "completed"
    assert [c["text"] for c in body["channels"]] == ["one", "two"]
    assert body["turns"] == [{"channel": 0, "speaker": "a", "start": 0.0, "end": 1.0, "text": "one"}], "turns are the spoken segments"
    assert [e.type for e in record.replay()] == ["session.created", "transcript.segment", "transcript.text.done"]


# ------------------------------------------------------------------ the WebSocket shell's wiring


def _app(tmp_path, dialect_factory=None, **options):
    """The real app with the fake models, plus (optionally) a route for a test dialect."""
    from starlette.routing import WebSocketRoute

    from stream_server.engine import Engine
    from stream_server.server import create_app
    from stream_server.settings import Settings
    from stream_server.ws import dialect_endpoint
    from tests.fakes import BurstDecoder, EnergyVad

    settings = Settings(model="tiny.en", transcript_db=str(tmp_path / "t.sqlite3"), **options)
    engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda path: BurstDecoder())
    app = create_app(settings, engine)
    if dialect_factory is not None:
        app.router.routes.append(WebSocketRoute("/test-dialect", functools.partial(dialect_endpoint, dialect_factory)))
    return app, engine


def test_websocket_sessions_are_published_under_their_id_and_the_dialects_alias(tmp_path) -> None:
    from starlette.testclient import TestClient

    from stream_server.dialects.native import NativeDialect
    from tests.fakes import silence, speech, to_pcm16

    class CallDialect(NativeDialect):
        """Native, but learns a call id from its first text message (as Twilio's ``start``)."""

        session_alias: str | None = None

        def receive_text(self, text: str):
            self.session_alias = self.session_alias or "CA-call-1"
            return super().receive_text(text)

    app, engine = _app(tmp_path, lambda handshake: CallDialect())
    with TestClient(app) as client, client.websocket_connect("/test-dialect") as ws:
        session_id = json.loads(ws.receive_text())["session"]["id"]
        assert client.get(f"/v1/sessions/{session_id}/transcript").json()["status"] == "active"
        assert client.get("/v1/sessions/CA-call-1/transcript").status_code == 404
        ws.send_text(json.dumps({"type": "session.update", "session": {"language": "en"}}))
        ws.send_bytes(to_pcm16(speech([1, 2, 3])) + to_pcm16(silence(1.0)))
        while (event := json.loads(ws.receive_text()))["type"] != "transcript.segment":
            pass
        live = client.get("/v1/sessions/CA-call-1/transcript").json()
        assert live["id"] == "CA-call-1" and live["session_id"] == session_id and live["status"] == "active"
        assert live["channels"][0]["text"] == "w1 w2 w3" == event["text"]
        ws.send_text(json.dumps({"type": "session.close"}))
        while json.loads(ws.receive_text())["type"] != "transcript.text.done":
            pass
    from stream_server.store import TranscriptStore

    reopened = TranscriptStore(engine.store.path)  # the app closed its store on shutdown
    stored = reopened.get_now("CA-call-1")
    reopened.close()
    assert stored is not None and stored.status == "completed" and stored.session_id == session_id
    assert [s["text"] for s in stored.segments] == ["w1 w2 w3"]


# ------------------------------------------------------------------ an operator's controls over HTTP


def test_an_operator_pauses_and_resumes_an_audiohook_call_and_the_gap_stays_in_its_times(tmp_path) -> None:
    """POST /v1/sessions/{conversationId}/pause → the connection sends ``pause`` at once; the
    client's ``paused``, later ``resumed`` with what it discarded; times stay the call's."""
    from starlette.testclient import TestClient

    from stream_server.dialects import audiohook as ah
    from tests.fakes import silence, speech
    from tests.test_dialect_audiohook import CONVERSATION, GenesysClient, handshake, pcmu, stereo_frames

    genesys = GenesysClient()
    app, _engine = _app(tmp_path)
    with TestClient(app) as client:
        with client.websocket_connect("/v1/audiohook", headers=handshake().headers) as ws:

            def send(kind: str, parameters: dict | None = None) -> None:
                ws.send_text(json.dumps(genesys.message(kind, parameters)))

            def receive() -> dict:
                message = json.loads(ws.receive_text())
                genesys.seen(message)
                return message

            def audio(samples16k) -> None:
                frames = stereo_frames(pcmu(samples16k), pcmu(silence(len(samples16k) / 16000)))
                for i in range(0, len(frames), 320):
                    ws.send_bytes(frames[i : i + 320])
                    genesys.position += 0.02

            assert client.post("/v1/sessions/nobody/pause").status_code == 404
            ws.send_text(json.dumps(genesys.open()))
            assert receive()["type"] == "opened"
            audio(silence(1.0))
            response = client.post(f"/v1/sessions/{CONVERSATION}/pause")
            assert response.status_code == 202, response.text
            assert response.json() == {"id": CONVERSATION, "session_id": response.json()["session_id"], "control": "pause", "status": "requested"}
            assert receive()["type"] == "pause"
            again = client.post(f"/v1/sessions/{CONVERSATION}/pause")
            assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"
            send("paused")
            start = genesys.position
            genesys.position += 3.0  # the client discards 3 s of the call while paused
            assert client.post(f"/v1/sessions/{CONVERSATION}/resume").status_code == 202
            assert receive()["type"] == "resume"
            send("resumed", {"start": ah.duration(start), "discarded": "PT3S"})
            audio(silence(0.2))
            audio(speech([3, 4]))
            audio(silence(1.5))
            send("close", {"reason": "end"})
            messages = []
            while not messages or messages[-1]["type"] != "closed":
                messages.append(receive())
            [final] = [e["data"] for m in messages if m["type"] == "event" for e in m["parameters"]["entities"]]
            assert final["alternatives"][0]["interpretations"][0]["transcript"] == "w3 w4"
            assert ah.parse_duration(final["offset"]) == pytest.approx(1.0 + 3.0 + 0.2, abs=0.15), "the pause is in the call's time"
        stored = client.get(f"/v1/sessions/{CONVERSATION}/transcript").json()
        assert stored["turns"][0]["start"] == pytest.approx(1.0 + 3.0 + 0.2, abs=0.15), "and in the stored transcript's"
        finished = client.post(f"/v1/sessions/{CONVERSATION}/resume")
        assert finished.status_code == 409 and finished.json()["error"]["code"] == "invalid_state"


def test_a_protocol_without_pause_is_refused_and_controls_need_a_key(tmp_path) -> None:
    from starlette.testclient import TestClient

    app, _engine = _app(tmp_path, api_keys="ops-key")
    with TestClient(app) as client, client.websocket_connect("/v1/stream", headers={"Authorization": "Bearer ops-key"}) as ws:
        session_id = json.loads(ws.receive_text())["session"]["id"]
        assert client.post(f"/v1/sessions/{session_id}/pause").status_code == 401
        watch = client.post(f"/v1/sessions/{session_id}/pause", params={"token": "anything"}, headers={"Authorization": "Bearer ops-key"})
        assert watch.status_code == 401 and "watch token" in watch.json()["error"]["message"]
        native = client.post(f"/v1/sessions/{session_id}/pause", headers={"Authorization": "Bearer ops-key"})
        assert native.status_code == 409 and native.json()["error"]["code"] == "control_unsupported", native.json()
        assert "native" in native.json()["error"]["message"]


# ------------------------------------------------------------------ Twilio's DTMF through the shell


def test_twilio_keys_reach_the_stored_transcript_in_every_format(tmp_path) -> None:
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from stream_server.bench.calls import TwilioStream
    from tests.test_dialect_twilio import CALL_SID, quiet, tone_words, ulaw

    twilio = TwilioStream(CALL_SID)
    inbound = ulaw(np.concatenate([quiet(0.3), tone_words([1, 2]), quiet(1.0)]))
    app, _engine = _app(tmp_path)
    with TestClient(app) as client:
        with client.websocket_connect("/v1/twilio") as ws:
            ws.send_text(json.dumps(twilio.connected()))
            ws.send_text(json.dumps(twilio.start(tracks=("inbound",), parameters={"inbound_label": "customer"})))
            for message in twilio.frames({"inbound": inbound}):
                ws.send_text(json.dumps(message))
            ws.send_text(json.dumps(twilio.dtmf("4")))
            ws.send_text(json.dumps(twilio.dtmf("2")))
            ws.send_text(json.dumps(twilio.stop()))
            with pytest.raises(WebSocketDisconnect):  # the server closes (1000) once the transcript is final
                ws.receive_text()
        body = client.get(f"/v1/sessions/{CALL_SID}/transcript").json()
        seconds = len(inbound) / 8000
        assert body["dtmf"] == [{"channel": 0, "speaker": "customer", "digit": "4", "time": pytest.approx(seconds, abs=0.02)},
                                {"channel": 0, "speaker": "customer", "digit": "2", "time": pytest.approx(seconds, abs=0.02)}]
        text = client.get(f"/v1/sessions/{CALL_SID}/transcript", params={"format": "txt"}).text
        assert text.splitlines() == ["customer: w1 w2", "customer: [DTMF 4]", "customer: [DTMF 2]"]
        vtt = client.get(f"/v1/sessions/{CALL_SID}/transcript", params={"format": "vtt"}).text
        assert "customer: [DTMF 4]" in vtt and vtt.index("w1 w2") < vtt.index("[DTMF 4]")
        events = client.get(f"/v1/sessions/{CALL_SID}/events").text
        assert events.count("event: call.dtmf") == 2 and events.index("transcript.segment") < events.index("call.dtmf")
