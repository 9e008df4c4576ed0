"""End to end: the official ``deepgram-sdk``, unmodified, against the real server at ``/v1/listen``.

The SDK is pointed at the server with nothing but a ``DeepgramClientEnvironment``. Real speech is
streamed at real time, side by side with a native ``/v1/stream`` client sending the same audio to
the same server, so accuracy (WER) and finalization latency are compared on equal terms: linear16
at 16 kHz and mu-law at 8 kHz. All sessions run concurrently (one fixture), which keeps the module
well under two minutes; the tests then check what each run saw.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import statistics
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from deepgram import AsyncDeepgramClient
from deepgram.environment import DeepgramClientEnvironment
from deepgram.listen.v1.types import ListenV1Metadata, ListenV1Results, ListenV1UtteranceEnd

from stream_server.audio import encode_g711
from tests.http_api_support import write_wav
from tests.support import (
    STORED_CALL_LEGS,
    ServerProcess,
    english_references,
    load_clip,
    manifest,
    normalize,
    require_speech,
    start_server,
    stored_call_wav,
    wer,
)
from tests.test_dialect_deepgram import SDK_MODELS, check_documented, sdk_validate
from tests.test_server import build_long_stream

FRAME_S = 0.04
CLIPS = 8


@dataclasses.dataclass
class Got:
    at: float  # seconds since the session's first audio frame was due
    message: dict[str, Any]


@dataclasses.dataclass
class Run:
    messages: list[Got]
    error: BaseException | None = None  # how the connection ended, None for a clean close
    marks: dict[str, float] = dataclasses.field(default_factory=dict)
    request_id: str | None = None  # Deepgram: the ``dg-request-id`` upgrade header
    core_text: str = ""  # Deepgram: the core's own transcript of the session, fetched by request_id

    def of(self, kind: str) -> list[Got]:
        return [g for g in self.messages if g.message.get("type") == kind]


@dataclasses.dataclass
class Runs:
    references: list[str]
    spans: list[tuple[float, float]]  # each clip's (start, end) in stream seconds
    native16: Run
    deepgram16: Run
    native8: Run
    deepgram8: Run
    finalize: Run
    finalize_reference: str
    idle: Run
    idle_elapsed: float
    refused: BaseException | None
    batch_s: float  # the server's mean decode batch time over all these runs (its /metrics)


# --------------------------------------------------------------------------------------------
# Clients
# --------------------------------------------------------------------------------------------


def environment(server: ServerProcess) -> DeepgramClientEnvironment:
    """The only thing a Deepgram user changes to use this server: the base URLs."""
    ws, http = f"ws://127.0.0.1:{server.port}", server.http_url
    return DeepgramClientEnvironment(base=http, production=ws, agent=ws, agent_rest=http)


async def paced(send: Callable[[bytes], Awaitable[None]], data: bytes, frame_bytes: int, start: float) -> None:
    """Send ``data`` in 40 ms frames at real time from ``start``."""
    for i, offset in enumerate(range(0, len(data), frame_bytes)):
        await send(data[offset : offset + frame_bytes])
        await asyncio.sleep(max(0.0, start + (i + 1) * FRAME_S - time.monotonic()))


async def sdk_stream(server: ServerProcess, data: bytes, rate: int, width: int, **options: Any) -> Run:
    """One Deepgram session through the SDK: audio at real time, then CloseStream."""
    client = AsyncDeepgramClient(api_key="test-key", environment=environment(server))
    run = Run([])
    async with client.listen.v1.connect(model="nova-3", sample_rate=rate, **options) as connection:
        start = time.monotonic()
        run.request_id = upgrade_headers(connection._websocket).get("dg-request-id")
        task = asyncio.create_task(collect(connection, run, start))
        await paced(connection.send_media, data, int(rate * FRAME_S) * width, start)
        run.marks["close_stream"] = time.monotonic() - start
        await connection.send_close_stream()
        await asyncio.wait_for(task, timeout=60)
    return run


async def collect(connection: Any, run: Run, start: float, parse: Callable[[Any], dict[str, Any]] | None = None) -> None:
    """Every message the SDK parses (``parse``: checked as :func:`sdk_message` does), with its
    arrival time; how the connection ended."""
    try:
        async for message in connection:
            run.messages.append(Got(time.monotonic() - start, (parse or sdk_message)(message)))
    except Exception as exc:  # noqa: BLE001 - the test asserts on what the SDK raised
        run.error = exc


def upgrade_headers(websocket: Any) -> Any:
    """The upgrade response's headers (the SDK runs websockets' legacy or new client)."""
    legacy = getattr(websocket, "response_headers", None)
    return legacy if legacy is not None else websocket.response.headers


def sdk_message(message: Any) -> dict[str, Any]:
    """What the SDK handed the application, as the JSON it was built from (validated again,
    strictly, against the model the SDK chose)."""
    assert type(message) in SDK_MODELS.values(), type(message)
    body = message.model_dump(mode="json", exclude_unset=True)
    return sdk_validate(json.dumps(body))


async def native_stream(server: ServerProcess, data: bytes, rate: int, width: int, session: dict[str, Any]) -> Run:
    run = Run([])
    async with websockets.connect(server.ws_url, max_size=None) as ws:
        await ws.send(json.dumps({"type": "session.update", "session": session}))
        start = time.monotonic()

        async def reader() -> None:
            async for message in ws:
                run.messages.append(Got(time.monotonic() - start, json.loads(message)))

        task = asyncio.create_task(reader())
        await paced(ws.send, data, int(rate * FRAME_S) * width, start)
        await ws.send(json.dumps({"type": "session.close"}))
        await asyncio.wait_for(task, timeout=60)
    return run


async def finalize_stream(server: ServerProcess, audio: np.ndarray) -> Run:
    """One clip, then Finalize before the speaker's pause could end the turn, a KeepAlive gap,
    then CloseStream."""
    client = AsyncDeepgramClient(api_key="test-key", environment=environment(server))
    run = Run([])
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    options = {"encoding": "linear16", "sample_rate": 16000, "interim_results": "true", "smart_format": "true"}
    async with client.listen.v1.connect(model="nova-2", **options) as connection:
        start = time.monotonic()

        async def reader() -> None:
            async for message in connection:
                run.messages.append(Got(time.monotonic() - start, sdk_message(message)))

        task = asyncio.create_task(reader())
        await paced(connection.send_media, pcm, int(16000 * FRAME_S) * 2, start)
        run.marks["finalize"] = time.monotonic() - start
        await connection.send_finalize()
        for _ in range(4):  # no audio after the Finalize: only it can end the turn
            await asyncio.sleep(1.0)
            await connection.send_keep_alive()
        run.marks["close_stream"] = time.monotonic() - start
        await connection.send_close_stream()
        await asyncio.wait_for(task, timeout=60)
    return run


async def idle_stream(server: ServerProcess) -> tuple[Run, float]:
    """Connect and send nothing: Deepgram's NET-0001 close after 10 s."""
    client = AsyncDeepgramClient(api_key="test-key", environment=environment(server))
    run = Run([])
    start = time.monotonic()
    async with client.listen.v1.connect(model="nova-3", encoding="mulaw", sample_rate=8000) as connection:
        try:
            async for message in connection:
                run.messages.append(Got(time.monotonic() - start, sdk_message(message)))
        except Exception as exc:  # noqa: BLE001 - the test asserts on what the SDK raised
            run.error = exc
    return run, time.monotonic() - start


async def refused_stream(server: ServerProcess) -> BaseException | None:
    client = AsyncDeepgramClient(api_key="test-key", environment=environment(server))
    try:
        async with client.listen.v1.connect(model="nova-3", encoding="linear16"):  # no sample_rate
            return None
    except Exception as exc:  # noqa: BLE001 - the test asserts on what the SDK raised
        return exc


# --------------------------------------------------------------------------------------------
# The runs (all at once)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_speech()
    srv = start_server(tmp_path_factory.mktemp("deepgram-server"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def runs(server: ServerProcess) -> Runs:
    import soxr

    rows = [r for r in english_references() if r["kind"] == "read" and 3.0 < r["duration_s"] < 9.0]
    clips = random.Random(11).sample(rows, CLIPS + 1)
    finalize_clip, clips = clips[0], clips[1:]
    audio, spans = build_long_stream(clips, seed=5)
    audio = np.concatenate([audio, np.zeros(int(2.5 * 16000), np.float32)])  # room for UtteranceEnd
    pcm16 = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    mulaw = encode_g711(soxr.resample(audio, 16000, 8000).astype(np.float32), "ulaw")
    common = {"interim_results": "true", "utterance_end_ms": "1000", "vad_events": "true"}
    native = {"interim_results": True, "include": ["logprobs", "words"], "language": "en"}

    async def everything() -> tuple[Any, ...]:
        # All at once (each Deepgram run beside its native twin, so both see the same load).
        return await asyncio.gather(
            native_stream(server, pcm16, 16000, 2, native),
            sdk_stream(server, pcm16, 16000, 2, encoding="linear16", smart_format="true", **common),
            idle_stream(server),
            refused_stream(server),
            native_stream(server, mulaw, 8000, 1, {**native, "input_audio_format": "g711_ulaw", "sample_rate": 8000}),
            sdk_stream(server, mulaw, 8000, 1, encoding="mulaw", **common),
            finalize_stream(server, load_clip(finalize_clip["id"])),
        )

    n16, d16, (idle, idle_elapsed), refused, n8, d8, fin = asyncio.run(everything())
    for run in (d16, d8):
        run.core_text = core_transcript(server, run)
    return Runs(
        [r["text"] for r in clips], spans, n16, d16, n8, d8, fin, finalize_clip["text"], idle, idle_elapsed, refused,
        mean_batch_seconds(server),
    )


def mean_batch_seconds(server: ServerProcess) -> float:
    """Model time per decode batch, averaged over the server's life (``/metrics``)."""
    from prometheus_client.parser import text_string_to_metric_families

    body = httpx.get(server.http_url + "/metrics", timeout=10).text
    [family] = [f for f in text_string_to_metric_families(body) if f.name == "stream_decode_batch_seconds"]
    values = {s.name: s.value for s in family.samples}
    return values["stream_decode_batch_seconds_sum"] / max(1.0, values["stream_decode_batch_seconds_count"])


def core_transcript(server: ServerProcess, run: Run) -> str:
    """The session's transcript as the server itself keeps it, found by the request_id the
    Deepgram client holds (upgrade header and Metadata)."""
    [metadata] = run.of("Metadata")
    assert run.request_id == metadata.message["request_id"], "dg-request-id names the stream"
    with httpx.Client(base_url=server.http_url, timeout=10) as http:
        for _ in range(50):  # the finished session is stored as the socket closes
            response = http.get(f"/v1/sessions/{run.request_id}/transcript", params={"format": "txt"})
            if response.status_code != 404:
                break
            time.sleep(0.1)
    assert response.status_code == 200, response.text
    return response.text


# --------------------------------------------------------------------------------------------
# Measures
# --------------------------------------------------------------------------------------------


def deepgram_text(run: Run) -> str:
    return " ".join(t for t in (final_transcript(g) for g in finals(run)) if t)


def finals(run: Run) -> list[Got]:
    return [g for g in run.of("Results") if g.message["is_final"]]


def final_transcript(got: Got) -> str:
    return str(got.message["channel"]["alternatives"][0]["transcript"])


def native_text(run: Run) -> str:
    [done] = run.of("transcript.text.done")
    return str(done.message["text"])


def final_words(run: Run) -> list[tuple[float, float, float]]:
    """(start, end, arrival) of every word when it became final, in either protocol."""
    out = []
    for got in run.messages:
        message = got.message
        if message.get("type") == "transcript.text.delta":
            words = message["words"] or []
        elif message.get("type") == "Results" and message["is_final"]:
            words = message["channel"]["alternatives"][0]["words"]
        else:
            continue
        out += [(w["start"], w["end"], got.at) for w in words]
    return out


def finalization_latencies(words: list[tuple[float, float, float]], spans: list[tuple[float, float]]) -> list[float]:
    """Per clip: arrival of the result that made its last word final − the clip's end (audio is
    sent at real time from t = 0, so stream seconds are wall seconds)."""
    latencies = []
    for start, end in spans:
        mine = [arrival for ws, we, arrival in words if start - 0.25 <= (ws + we) / 2 <= end + 0.25]
        if mine:
            latencies.append(max(mine) - end)
    return latencies


def paired_latencies(runs: Runs, native: Run, deepgram: Run) -> list[tuple[float, float]]:
    """(deepgram, native) finalization latency of each clip both runs transcribed."""
    words = {"dg": final_words(deepgram), "native": final_words(native)}
    pairs = []
    for span in runs.spans:
        dg, nat = (finalization_latencies(words[k], [span]) for k in ("dg", "native"))
        if dg and nat:
            pairs.append((dg[0], nat[0]))
    return pairs


def compare(runs: Runs, native: Run, deepgram: Run, label: str) -> None:
    """Same audio, same server, same moment. Accuracy: the dialect relays exactly the words the
    core committed for its own session (the server's stored transcript of it), so it adds no
    error; its native twin's WER is only a sanity bound, because two live sessions of the same
    audio commit differently with timing (measured in CI: up to 6 words of 100 apart, one
    utterance split differently). Latency: the median over utterances of (Deepgram − native)
    finalization latency within 0.1 s plus one decode batch. The paired median is the measure: two
    sessions sharing a busy scheduler can finalize one utterance up to a second apart in either
    direction (whichever decode was queued first), which moves a six-utterance median of either
    run alone by more than the dialect could ever add. Pairing leaves one source of noise: the
    twins' finals reach the scheduler a moment apart, so the later one waits for the earlier one's
    batch, one batch time either way; eight such coin flips put the median at +-1 batch time more
    often than not (CI on a slow host: +0.18 s with five of eight one way). The dialect itself
    sends a turn's last words as final in the core step that commits them (test_dialect_deepgram),
    so what is checked here is that nothing on the way adds more than that."""
    assert deepgram.error is None, f"{label}: the connection ended with {deepgram.error!r}"
    assert normalize(deepgram_text(deepgram)) == normalize(deepgram.core_text), (deepgram_text(deepgram), deepgram.core_text)
    dg_wer = wer(runs.references, [deepgram_text(deepgram)])
    native_wer = wer(runs.references, [native_text(native)])
    pairs = paired_latencies(runs, native, deepgram)
    dg_lat, native_lat = [d for d, _ in pairs], [n for _, n in pairs]
    difference = statistics.median(d - n for d, n in pairs)
    print(
        f"{label}: WER deepgram {dg_wer:.3f} native {native_wer:.3f}; median finalization latency "
        f"deepgram {statistics.median(dg_lat):.3f} s native {statistics.median(native_lat):.3f} s; "
        f"median per-utterance difference {difference:+.3f} s over {len(pairs)} utterances; "
        f"mean decode batch {runs.batch_s:.3f} s"
    )
    assert dg_wer <= native_wer + 0.08, (dg_wer, native_wer, deepgram_text(deepgram), native_text(native))
    assert len(pairs) >= CLIPS - 1, pairs
    assert abs(difference) <= 0.1 + runs.batch_s, (pairs, runs.batch_s)


def check_session_shape(run: Run, spans: list[tuple[float, float]]) -> None:
    kinds = [g.message["type"] for g in run.messages]
    assert kinds[-1] == "Metadata", "CloseStream: the last results, then Metadata, then the close"
    assert all(g.at >= run.marks["close_stream"] for g in run.of("Metadata"))
    [metadata] = run.of("Metadata")
    assert metadata.message["duration"] == pytest.approx(spans[-1][1] + 2.5, abs=2.0)
    assert kinds.count("SpeechStarted") >= len(spans) - 1, "vad_events: one per turn"
    assert run.of("UtteranceEnd"), "utterance_end_ms: gaps after the last word are announced"
    interims = [g for g in run.of("Results") if not g.message["is_final"]]
    assert len(interims) >= len(spans), "interim_results: text while the speaker talks"
    speech_finals = [g for g in finals(run) if g.message["speech_final"]]
    assert len(speech_finals) >= len(spans) - 1, "each turn ends with speech_final"
    position = 0.0
    for got in run.of("Results"):
        assert got.message["start"] == pytest.approx(position, abs=1e-3), "results tile the stream"
        if got.message["is_final"]:
            position = got.message["start"] + got.message["duration"]
    check_documented(g.message for g in run.messages)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


def test_linear16_16k_matches_native_accuracy_and_latency(runs: Runs) -> None:
    compare(runs, runs.native16, runs.deepgram16, "linear16 16 kHz")
    check_session_shape(runs.deepgram16, runs.spans)
    text = deepgram_text(runs.deepgram16)
    assert any(c in text for c in ".,?!") and any(c.isupper() for c in text), "smart_format keeps punctuation"


def test_mulaw_8k_matches_native_accuracy_and_latency(runs: Runs) -> None:
    compare(runs, runs.native8, runs.deepgram8, "mulaw 8 kHz")
    check_session_shape(runs.deepgram8, runs.spans)
    text = deepgram_text(runs.deepgram8)
    assert text == text.lower() and not any(c in text for c in ",?!"), "no punctuate: Deepgram's plain form"


def test_wer_within_one_point_of_native_over_both_encodings(runs: Runs) -> None:
    references = runs.references * 2
    deepgram = wer(references, [deepgram_text(runs.deepgram16), deepgram_text(runs.deepgram8)])
    native = wer(references, [native_text(runs.native16), native_text(runs.native8)])
    words = sum(len(r.split()) for r in references)
    print(f"pooled WER over {words} reference words: deepgram {deepgram:.4f} native {native:.4f}")
    # The dialect relays the core's committed text unchanged (checked word for word in
    # compare()), so the two differ only by the twins' timing-dependent commits: a sanity bound.
    assert deepgram <= native + 0.05, (deepgram, native)


def test_every_sdk_message_kind_was_seen_and_parsed_by_the_sdk(runs: Runs) -> None:
    kinds = {g.message["type"] for run in (runs.deepgram16, runs.deepgram8, runs.finalize) for g in run.messages}
    assert {"Results", "SpeechStarted", "UtteranceEnd", "Metadata"} <= kinds
    # The SDK's union parser chose the right model for each (checked in sdk_message); spot-check types.
    assert ListenV1Results is SDK_MODELS["Results"] and ListenV1UtteranceEnd is SDK_MODELS["UtteranceEnd"]
    assert ListenV1Metadata is SDK_MODELS["Metadata"]


def test_finalize_flushes_the_turn_at_once_then_close_stream_ends_the_session(runs: Runs) -> None:
    run = runs.finalize
    assert run.error is None
    flushed = [g for g in finals(run) if g.message["from_finalize"]]
    assert flushed, "Finalize answered with a from_finalize result"
    answer = flushed[0]
    # No audio followed the Finalize, so no pause could end the turn: the Finalize did, before
    # the CloseStream was sent (KeepAlives kept the stream open meanwhile).
    assert run.marks["finalize"] < answer.at < run.marks["close_stream"]
    assert answer.message["speech_final"] is False
    print(f"Finalize answered after {answer.at - run.marks['finalize']:.3f} s")
    text = " ".join(final_transcript(g) for g in finals(run) if g.at <= answer.at and final_transcript(g))
    assert wer([runs.finalize_reference], [text]) < 0.25, text
    assert [g.message["type"] for g in run.messages][-1] == "Metadata"


def test_idle_stream_is_closed_like_deepgrams_net0001(runs: Runs) -> None:
    error = runs.idle.error
    assert isinstance(error, websockets.ConnectionClosedError), error
    assert error.rcvd is not None and error.rcvd.code == 1011 and "NET-0001" in error.rcvd.reason
    assert 9.5 <= runs.idle_elapsed <= 14.0, runs.idle_elapsed


def test_bad_query_is_refused_before_the_upgrade(runs: Runs) -> None:
    error = runs.refused
    assert error is not None, "encoding without sample_rate must be refused"
    status = getattr(error, "status_code", None)
    if status is None:  # the SDK's legacy client raises the websockets exception itself
        status = getattr(error, "status_code", None) or getattr(getattr(error, "response", None), "status_code", None)
    assert status == 400, repr(error)


def test_multichannel_linear16_transcribes_each_leg(server: ServerProcess) -> None:
    """The SDK streams a two-channel call (a different voice per channel, turns overlapping) with
    ``multichannel=true&channels=2``: each channel's finals spell that leg's words."""
    legs = {0: [("arctic_slt_arctic_a0003", 0.3), ("arctic_slt_arctic_a0007", 6.2)], 1: [("arctic_aew_arctic_a0002", 2.9)]}
    rows = {r["id"]: r for r in english_references()}
    length = int(10.5 * 16000)
    frames = np.zeros((length, 2), np.float32)
    references: dict[int, str] = {}
    for channel, parts in legs.items():
        for clip_id, at in parts:
            audio = load_clip(clip_id)
            start = int(at * 16000)
            frames[start : start + len(audio), channel] = audio
            references[channel] = f"{references.get(channel, '')} {rows[clip_id]['text']}".strip()
    pcm = (np.clip(frames, -1, 1) * 32767).astype("<i2").tobytes()
    options = {"encoding": "linear16", "channels": "2", "multichannel": "true", "interim_results": "true", "vad_events": "true"}
    run = asyncio.run(sdk_stream(server, pcm, 16000, 4, **options))  # 4 bytes: one stereo frame
    assert run.error is None, run.error
    results = run.of("Results")
    assert {tuple(g.message["channel_index"]) for g in results} == {(0, 2), (1, 2)}
    for channel, reference in references.items():
        mine = [g for g in finals(run) if g.message["channel_index"][0] == channel]
        text = " ".join(t for t in (final_transcript(g) for g in mine) if t)
        error = wer([reference], [text])
        print(f"channel {channel}: WER {error:.3f}: {text!r}")
        assert error <= 0.2, (channel, text, reference)  # tiny.en misses "Whittemore" on this leg alone too
        started = [g for g in run.of("SpeechStarted") if g.message["channel"] == [channel, 2]]
        assert len(started) >= len(legs[channel]), "vad_events per channel"
    [metadata] = run.of("Metadata")
    assert metadata.message["channels"] == 2
    assert metadata.message["duration"] == pytest.approx(length / 16000, abs=0.05)
    check_documented(g.message for g in run.messages)


def test_keyterms_are_heard_after_earlier_sentences_fill_the_context(server: ServerProcess) -> None:
    """A list of keyterms (the SDK repeats ``keyterm``) is the decoder's prompt for the whole
    session: names tiny.en reads wrong alone ("Swainheim and Panerts") come out as the keyterms
    spell them in the third sentence, after 40 words of earlier text that used to push the
    keyterms out of the decoder's context (under 16 tokens they never reached it at all).

    "Subiaco" is a near tie for tiny.en even with the keyterms: from one forced prefix (" and
    Pannartz began printing in the monastery of", where a loaded machine's commits put it) it
    reads "Suviaco", from the others "Subiaco" (README, "Names and vocabulary": 127 of 131 missed
    words heard over a corpus of such states). So "Sweynheim and Pannartz" must come out as
    spelled, "Subiaco" so or as that one near tie, and the whole text closer to the reference."""
    rows = manifest()
    clips = [rows[c] for c in ("ljspeech_LJ001-0001", "ljspeech_LJ001-0005", "ljspeech_LJ001-0031")]
    audio, _ = build_long_stream(clips, seed=2)
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    options = {"encoding": "linear16", "smart_format": "true"}

    async def both() -> tuple[Run, Run]:
        return await asyncio.gather(
            sdk_stream(server, pcm, 16000, 2, keyterm=["Sweynheim", "Pannartz", "Subiaco"], **options),
            sdk_stream(server, pcm, 16000, 2, **options),
        )

    with_terms, without = asyncio.run(both())
    assert with_terms.error is None and without.error is None
    heard, plain = deepgram_text(with_terms), deepgram_text(without)
    print(f"with keyterms: {heard!r}\nwithout: {plain!r}")
    assert "Sweynheim and Pannartz" in heard
    assert "Subiaco" in heard or "Suviaco" in heard, heard  # the near tie above, nothing else
    assert "Pannartz" not in plain  # the premise: without them tiny.en spells the names otherwise
    assert wer([" ".join(c["text"] for c in clips)], [heard]) < wer([" ".join(c["text"] for c in clips)], [plain])


# --------------------------------------------------------------------------------------------
# Pre-recorded: POST /v1/listen (the SDK's transcribe_file)
# --------------------------------------------------------------------------------------------

def test_a_stored_call_through_the_sdks_transcribe_file(server: ServerProcess, tmp_path: Any) -> None:
    """``transcribe_file`` with ``multichannel`` and ``utterances``: the SDK parses the answer into
    its types; each leg's transcript is within one point of offline faster-whisper on the same
    μ-law turns; every turn is an utterance of its channel at its time; every field sent is
    documented (docs/deepgram.md, "Pre-recorded audio")."""
    from deepgram import DeepgramClient
    from deepgram.types.listen_v1response import ListenV1Response

    from stream_server.bench import calls
    from tests.test_dialect_deepgram import documented_fields, field_paths

    call, path = stored_call_wav(tmp_path)
    offline = calls.offline_texts(call, tag="stored-call")
    client = DeepgramClient(api_key="test-key", environment=environment(server))
    response = client.listen.v1.media.transcribe_file(
        request=path.read_bytes(), model="nova-3", smart_format=True, multichannel=True, utterances=True, paragraphs=True
    )
    assert isinstance(response, ListenV1Response)
    assert response.metadata.channels == 2 and response.metadata.duration == pytest.approx(call.seconds, abs=0.05)
    body = response.model_dump(mode="json", exclude_none=True)
    for channel, leg in enumerate(STORED_CALL_LEGS):
        [alternative] = response.results.channels[channel].alternatives
        streaming, baseline = wer(call.references(leg), [alternative.transcript]), wer(call.references(leg), offline[leg])
        print(f"{leg}: WER {streaming:.3f} (offline {baseline:.3f}): {alternative.transcript}")
        assert streaming <= baseline + 0.01, (leg, alternative.transcript, offline[leg])
        assert alternative.words and all(w.punctuated_word for w in alternative.words)
        paragraphs = alternative.paragraphs
        assert paragraphs is not None and paragraphs.transcript and paragraphs.transcript.startswith("\n") and paragraphs.paragraphs
        sentences = [s.text for par in paragraphs.paragraphs for s in par.sentences or []]
        assert " ".join(sentences).split() == alternative.transcript.split(), "the paragraphs hold the transcript's words"
        assert sum(par.num_words or 0 for par in paragraphs.paragraphs) == len(alternative.words)
    utterances = response.results.utterances
    assert [u.start for u in utterances] == sorted(u.start for u in utterances)
    for spoken in call.turns:
        channel = STORED_CALL_LEGS.index(spoken.track)
        assert any(u.channel == channel and abs(u.start - spoken.start) < 1.0 for u in utterances), (spoken, utterances)
    [(required, optional)] = documented_fields("## Pre-recorded audio").values()
    sent = {f for f in field_paths(body) if not f.startswith("metadata.model_info.")}
    allowed = {a for f in required | optional for a in _prefixes(f)}
    assert sent <= allowed, sorted(sent - allowed)
    assert required <= sent, sorted(required - sent)
    assert all(set(info) == {"name", "version", "arch"} for info in body["metadata"]["model_info"].values())


def _prefixes(path: str) -> set[str]:
    parts = path.replace("[]", ".[]").split(".")
    return {".".join(parts[:i]).replace(".[]", "[]") for i in range(1, len(parts) + 1)}


def test_pre_recorded_raw_audio_and_refusals(server: ServerProcess, tmp_path: Any) -> None:
    """Raw linear16 with ``encoding``/``sample_rate`` (what the SDK passes through its query
    options), mixed to one transcript without ``multichannel``; and each refusal in Deepgram's
    error shape, as the SDK raises it."""
    from deepgram import DeepgramClient
    from deepgram.core.api_error import ApiError as DeepgramApiError

    rows = {r["id"]: r for r in english_references()}
    clip = "arctic_slt_arctic_a0003"
    audio = load_clip(clip)
    pcm = (np.clip(np.stack([audio, audio * 0.5], 1), -1, 1) * 32767).astype("<i2").tobytes()
    url = server.http_url + "/v1/listen"
    resp = httpx.post(url, params={"encoding": "linear16", "sample_rate": "16000", "channels": "2"}, content=pcm, timeout=60)
    assert resp.status_code == 200, resp.text
    [channel] = resp.json()["results"]["channels"]
    transcript = channel["alternatives"][0]["transcript"]
    assert wer([rows[clip]["text"]], [transcript]) <= 0.2, transcript
    assert transcript == transcript.lower() and "," not in transcript, "no punctuate: Deepgram's plain form"
    assert resp.json()["metadata"]["duration"] == pytest.approx(len(audio) / 16000, abs=0.05)
    client = DeepgramClient(api_key="test-key", environment=environment(server))
    for kwargs, status, needle in (
        ({"request": b"not audio at all" * 64}, 400, "not a recognised audio format"),
        ({"request": b""}, 400, "empty"),
        ({"request": pcm, "encoding": "linear16"}, 400, "sample_rate"),
        ({"request": write_wav(audio, tmp_path / "clip.wav").read_bytes(), "language": "es"}, 400, "English only"),  # tiny.en would answer in English words
    ):
        with pytest.raises(DeepgramApiError) as caught:
            client.listen.v1.media.transcribe_file(model="nova-3", **kwargs)
        assert caught.value.status_code == status, caught.value.body
        assert needle in caught.value.body["err_msg"] and caught.value.body["request_id"], caught.value.body
    # A URL instead of the audio: by default only public hosts are fetched (test_deepgram_callbacks.py).
    resp = httpx.post(url, json={"url": server.http_url + "/v1/models"}, timeout=10)
    assert resp.status_code == 400 and "--request-urls any" in resp.json()["err_msg"], resp.text


# --------------------------------------------------------------------------------------------
# Containerized compressed audio: what browsers (MediaRecorder) and radio streams send
# --------------------------------------------------------------------------------------------


async def sdk_container_stream(server: ServerProcess, data: bytes, seconds: float, **options: Any) -> Run:
    """A Deepgram session with no ``encoding``/``sample_rate`` (as Deepgram asks for containerized
    audio), the stream's bytes sent in 250 ms pieces at real time (a MediaRecorder's timeslice),
    then CloseStream."""
    client = AsyncDeepgramClient(api_key="test-key", environment=environment(server))
    run = Run([])
    async with client.listen.v1.connect(model="nova-3", **options) as connection:
        start = time.monotonic()
        task = asyncio.create_task(collect(connection, run, start))
        step = max(1, int(len(data) * 0.25 / seconds))
        for i, offset in enumerate(range(0, len(data), step)):
            await connection.send_media(data[offset : offset + step])
            await asyncio.sleep(max(0.0, start + (i + 1) * 0.25 - time.monotonic()))
        run.marks["close_stream"] = time.monotonic() - start
        await connection.send_close_stream()
        await asyncio.wait_for(task, timeout=60)
    return run


def test_webm_opus_and_mp3_streams_read_as_well_as_linear16(server: ServerProcess, tmp_path: Any) -> None:
    """The SDK streams the same three sentences as WebM/Opus (Chrome's MediaRecorder), as MP3 (a
    radio stream, the SDK's own live example) and as linear16, side by side: the compressed
    streams are decoded as they come, so their finals arrive while they are sent, and read the
    same words within two points."""
    from tests.http_api_support import encode

    rows = [r for r in english_references() if r["kind"] == "read" and 3.0 < r["duration_s"] < 7.0]
    clips = random.Random(3).sample(rows, 3)
    audio, spans = build_long_stream(clips, seed=2)
    audio = np.concatenate([audio, np.zeros(16000, np.float32)])
    seconds = len(audio) / 16000
    webm = encode(audio, tmp_path / "speech.webm", "libopus", container="webm").read_bytes()
    mp3 = encode(audio, tmp_path / "speech.mp3", "libmp3lame", rate=44100).read_bytes()
    pcm16 = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    options = {"interim_results": "true", "smart_format": "true"}

    async def everything() -> tuple[Run, Run, Run]:
        return await asyncio.gather(
            sdk_container_stream(server, webm, seconds, **options),
            sdk_container_stream(server, mp3, seconds, **options),
            sdk_stream(server, pcm16, 16000, 2, encoding="linear16", **options),
        )

    runs = dict(zip(("webm", "mp3", "linear16"), asyncio.run(everything()), strict=True))
    references = [r["text"] for r in clips]
    errors = {name: wer(references, [deepgram_text(run)]) for name, run in runs.items()}
    print({name: f"{e:.3f}" for name, e in errors.items()}, {name: deepgram_text(run) for name, run in runs.items()})
    for name in ("webm", "mp3"):
        run = runs[name]
        assert run.error is None and not run.of("Error"), (name, run.error, run.of("Error"))
        assert errors[name] <= errors["linear16"] + 0.02, (name, errors)
        live = [g for g in finals(run) if final_transcript(g) and g.at < run.marks["close_stream"]]
        assert len(live) >= len(spans) - 1, f"{name}: finals come while the stream is sent"
        [metadata] = run.of("Metadata")
        assert metadata.message["duration"] == pytest.approx(seconds, abs=0.1)
        check_documented(g.message for g in run.messages)


def test_one_large_compressed_message_is_decoded_beside_the_event_loop(server: ServerProcess, tmp_path: Any) -> None:
    """A client that sends a whole recording as one WebM message (about 100 s, most of a MiB) and
    CloseStream at once: the server decodes it in the background (the audio comes to the session
    through the decoder's wake-up), answers /healthz meanwhile, and transcribes all of it."""
    import threading

    from tests.http_api_support import encode

    rows = [r for r in english_references() if r["kind"] == "read" and 4.0 < r["duration_s"] < 9.0]
    clips = random.Random(8).sample(rows, 14)
    audio, _ = build_long_stream(clips, seed=4)
    seconds = len(audio) / 16000
    webm = encode(audio, tmp_path / "recording.webm", "libopus", container="webm").read_bytes()
    assert len(webm) < 1 << 20
    health: list[float] = []
    stop = threading.Event()

    def watch_health() -> None:
        with httpx.Client(base_url=server.http_url, timeout=10) as http:
            while not stop.is_set():
                started = time.monotonic()
                http.get("/healthz")
                health.append(time.monotonic() - started)
                time.sleep(0.02)

    async def one_message() -> Run:
        client = AsyncDeepgramClient(api_key="test-key", environment=environment(server))
        run = Run([])
        async with client.listen.v1.connect(model="nova-3") as connection:
            task = asyncio.create_task(collect(connection, run, time.monotonic()))
            await connection.send_media(webm)
            await connection.send_close_stream()
            await asyncio.wait_for(task, timeout=120)
        return run

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    try:
        run = asyncio.run(one_message())
    finally:
        stop.set()
        watcher.join(5)
    text = deepgram_text(run)
    error = wer([r["text"] for r in clips], [text])
    print(f"{len(webm)} bytes, {seconds:.1f} s in one message: WER {error:.3f}; /healthz max {max(health) * 1000:.0f} ms, "
          f"p50 {statistics.median(health) * 1000:.0f} ms over {len(health)} requests")
    assert run.error is None and not run.of("Error"), (run.error, run.of("Error"))
    [metadata] = run.of("Metadata")
    assert metadata.message["duration"] == pytest.approx(seconds, abs=0.1), "every second of the message was heard"
    assert error <= 0.15, text


def test_pre_recorded_decoded_encodings(server: ServerProcess, tmp_path: Any) -> None:
    """``POST /v1/listen`` with ``encoding=opus`` (an Ogg Opus body) and ``encoding=amr-nb`` (AMR
    frames without the ``#!AMR`` line of a file), as the SDK sends them."""
    from deepgram import DeepgramClient

    from tests.http_api_support import encode

    rows = {r["id"]: r for r in english_references()}
    clip = "arctic_slt_arctic_a0003"
    audio = load_clip(clip)
    ogg = encode(audio, tmp_path / "clip.ogg", "libopus", container="ogg").read_bytes()
    amr = encode(audio, tmp_path / "clip.amr", "libopencore_amrnb", rate=8000, container="amr", bit_rate=12200).read_bytes()
    bare_amr = amr.removeprefix(b"#!AMR\n")
    client = DeepgramClient(api_key="test-key", environment=environment(server))
    for body, encoding in ((ogg, "opus"), (bare_amr, "amr-nb")):
        response = client.listen.v1.media.transcribe_file(request=body, model="nova-3", encoding=encoding)
        transcript = response.results.channels[0].alternatives[0].transcript
        print(f"{encoding}: {transcript!r}")
        assert wer([rows[clip]["text"]], [transcript]) <= 0.25, (encoding, transcript)
        assert response.metadata.duration == pytest.approx(len(audio) / 16000, abs=0.1)
