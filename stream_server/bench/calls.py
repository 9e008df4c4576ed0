"""Call-center benchmark: N concurrent two-leg phone calls replayed into the server as Twilio does.

A contact center does not stream one clean mono recording: each call is two legs (customer and
agent) of 8 kHz μ-law, the legs take turns that abut and overlap, many calls run at once, and the
transcript is read by a *subscriber* (an agent-assist screen) rather than by the connection that
carries the audio. This module builds such calls from real speech and replays them exactly as
Twilio Media Streams sends them, so the figures are what a call center would see:

* **The calls** (:func:`build_calls`): call ``i`` puts one LJ Speech voice on the inbound track
  (the caller) and another speaker on the outbound track (ARCTIC slt, a LibriVox reader, ...: a
  different one per call), turns alternating, each turn starting 0.5 s *before* the previous one
  ends, right at its end, or 0.8 s after it. Clips are resampled to 8 kHz (soxr, as the server
  resamples) and μ-law encoded. Calls take unused clips in order, so call ``i`` is the same audio
  whatever N is and a sweep compares like with like; a voice that runs out of clips repeats them
  (reported).
* **The replay** (:func:`replay`): ``connected``, ``start`` (``customParameters`` carrying the leg
  labels), 20 ms ``media`` frames of both tracks interleaved by timestamp, each sent when its last
  sample has been spoken, a ``dtmf`` and a ``mark`` among them, ``stop``: Twilio's exact JSON,
  numbers as strings, payloads base64.
* **The reader** (:func:`subscribe`): an SSE client of ``GET /v1/sessions/{callSid}/events`` that
  joins as soon as the call is known and stamps every event with its arrival time.

Figures per leg: WER against the references and against offline faster-whisper (beam 5) decoding
each turn whole from the same μ-law (:func:`~stream_server.bench.offline.offline_mulaw_turns`);
**finalization latency** = arrival at the SSE subscriber of the ``transcript.segment`` that holds
the turn's last transcribed word − the turn's end of speech (the earlier of an energy detector and
offline Silero VAD on the clean clip, as the stream bench defines it); also, for comparison with
the stream bench, the same for the ``transcript.text.delta`` that made that word final; lost turns
(no word of the turn in its leg's transcript); speaker labels; server CPU and RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import dataclasses
import datetime as _dt
import functools
import json
import os
import platform
import shlex
import ssl
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import websockets

from stream_server import audio

from . import server_metrics
from .corpus import Utterance, load_wav, silero_bounds, speech_bounds
from .metrics import FinalWord, WerCounts, attribute, final_words, percentile, pooled_wer, wer_counts
from .report import refused_note, write_json
from .server_proc import ResourceMonitor, ServerOptions, ServerProcess, measure_idle

RATE = 8000
FRAME = 160  # bytes (= samples) of one 20 ms μ-law frame
FRAME_S = FRAME / RATE
TRACKS = ("inbound", "outbound")
CHANNEL = {"inbound": 0, "outbound": 1}  # the Twilio dialect's mapping
CALL_SID = "CA" + "0123456789abcdef" * 2
ACCOUNT_SID = "AC" + "fedcba9876543210" * 2
LABELS = {"inbound": "customer", "outbound": "agent"}
#: Where each turn starts relative to the end of the one before: overlap, abut, pause.
SPACING_S = (-0.5, 0.0, 0.8)
LEAD_IN_S, TAIL_S = 0.6, 1.5
#: The caller's voice (one LJ Speech reader) and the callees' voices, one per call in turn.
CALLER_VOICE = "ljspeech_"
CALLEE_VOICES = (
    "arctic_slt_",
    "pocketsphinx_sense_and_sensibility_",
    "speechbrain_spk1_",
    "arctic_aew_",
    "speechbrain_spk2_",
    "arctic_axb_",
)
MIN_CLIP_S = 1.0  # shorter clips (single digits) are not conversational turns
#: The agent-assist target from the issue: the customer's words while the agent answers.
TARGET_P50_S, TARGET_P95_S = 0.6, 1.2


# --------------------------------------------------------------------------------------------
# The calls
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Turn:
    """One turn of a call; times are seconds of call audio from the call's first sample."""

    track: str
    clip_id: str
    start: float  # where the clip's audio starts in its leg
    end: float  # where it ends (the clip's own silence included)
    mulaw: bytes
    reference: str
    speech_start: float | None = None  # detected speech inside the clip, in call time
    speech_end: float | None = None

    @property
    def speech_end_s(self) -> float:
        return self.end if self.speech_end is None else self.speech_end

    @property
    def speech_start_s(self) -> float:
        return self.start if self.speech_start is None else self.speech_start


@dataclasses.dataclass(frozen=True)
class Call:
    turns: list[Turn]
    legs: dict[str, bytes]  # μ-law per track, whole 20 ms frames, the same length
    call_sid: str = CALL_SID
    hold: tuple[float, float] = (0.0, 0.0)  # seconds of call audio where both legs are on hold

    def references(self, track: str) -> list[str]:
        return [t.reference for t in self.turns if t.track == track]

    def leg_turns(self, track: str) -> list[Turn]:
        return [t for t in self.turns if t.track == track]

    @property
    def tracks(self) -> tuple[str, ...]:
        return tuple(self.legs)

    @property
    def seconds(self) -> float:
        return len(next(iter(self.legs.values()))) / RATE


@functools.cache
def load_manifest(corpus: Path) -> dict[str, dict[str, Any]]:
    """The corpus manifest by clip id."""
    rows = [json.loads(line) for line in (corpus / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return {str(row["id"]): row for row in rows}


def telephone_samples(corpus: Path, clip_id: str) -> np.ndarray:
    """A clip as a phone line carries it, before encoding: 8 kHz float32 (soxr HQ from 16 kHz)."""
    return load_wav(corpus / load_manifest(corpus)[clip_id]["path"], RATE)


def telephone(corpus: Path, clip_id: str) -> bytes:
    """A clip as a phone line carries it: 8 kHz, μ-law."""
    return audio.encode_g711(telephone_samples(corpus, clip_id), "ulaw")


def speech_span(samples: np.ndarray) -> tuple[float, float]:
    """Seconds of the clip's speech: the earlier onset and the earlier end of the energy detector
    and offline Silero VAD, so a noisy tail never makes a final look early (as in the stream bench)."""
    e_first, e_last = speech_bounds(samples, RATE)
    s_first, s_last = silero_bounds(samples, RATE) or (e_first, e_last)
    first = min(e_first, s_first)
    return first / RATE, max(first + 1, min(e_last, s_last)) / RATE


def build_call(
    spec: Sequence[tuple[str, str]],
    *,
    corpus: Path,
    call_sid: str = CALL_SID,
    tracks: Sequence[str] = TRACKS,
    hold_after: int | None = None,
    hold_s: float = 8.0,
) -> Call:
    """The call of ``spec`` (``(track, clip_id)`` per turn, in order): turn ``i`` starts
    ``SPACING_S[i % 3]`` after the previous turn's end (but at least 0.5 s after its start), both
    legs padded with μ-law silence to the same whole number of frames. With ``hold_after``, both
    legs are silent for ``hold_s`` after that turn and everything said before it has ended (a
    call on hold: a pause, then a resume, in the AudioHook test)."""
    rows = load_manifest(corpus)
    turns: list[Turn] = []
    at = LEAD_IN_S
    hold = (0.0, 0.0)
    for i, (track, clip_id) in enumerate(spec):
        samples = telephone_samples(corpus, clip_id)
        mulaw = audio.encode_g711(samples, "ulaw")
        if turns:
            at = max(turns[-1].end + SPACING_S[i % len(SPACING_S)], turns[-1].start + 0.5)
        if hold_after is not None and i == hold_after + 1:
            quiet = max(t.end for t in turns)
            hold = (quiet, quiet + hold_s)
            at = hold[1]
        first, last = speech_span(samples)
        turns.append(Turn(track, clip_id, at, at + len(mulaw) / RATE, mulaw, str(rows[clip_id]["text"]), at + first, at + last))
    total = int((max(t.end for t in turns) + TAIL_S) * RATE)
    total += -total % FRAME
    legs = {track: bytearray(b"\xff" * total) for track in tracks}
    for t in turns:
        offset = int(t.start * RATE)
        legs[t.track][offset : offset + len(t.mulaw)] = t.mulaw
    return Call(turns, {track: bytes(leg) for track, leg in legs.items()}, call_sid, hold)


def call_sid_for(index: int) -> str:
    """A distinct, well-formed Call SID per built call (``CA`` + 32 hex digits), stable across runs."""
    return f"CA{index:08x}" + "0123456789abcdef0123456789abcdef"[8:]


def fresh_sid() -> str:
    """A Call SID no earlier run used. Twilio never reuses one, and the server keeps finished
    transcripts: a reused SID would let a subscriber read the *previous* run's stored call."""
    return "CA" + uuid.uuid4().hex


def voice_clips(rows: Mapping[str, Mapping[str, Any]], prefix: str) -> list[str]:
    """The clips of one voice usable as turns: English, a human reference, at least a second."""
    return sorted(
        clip_id
        for clip_id, row in rows.items()
        if clip_id.startswith(prefix)
        and row.get("language") == "en"
        and row.get("text")
        and not str(row.get("text_source") or "").startswith("model_output")
        and float(row.get("duration_s") or 0) >= MIN_CLIP_S
    )


@dataclasses.dataclass
class _Voice:
    """A voice's clips taken in order; wraps around (and says so) when they run out."""

    clips: list[str]
    taken: int = 0

    def peek(self) -> str:
        return self.clips[self.taken % len(self.clips)]

    def take(self) -> str:
        clip = self.peek()
        self.taken += 1
        return clip

    @property
    def repeated(self) -> bool:
        return self.taken > len(self.clips)


def _plan_one(caller: _Voice, callee: _Voice, call_s: float, rows: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str]]:
    """Alternate caller and callee turns while the next one still ends ``TAIL_S`` before ``call_s``
    (by the manifest durations; the built call may differ by a frame or so)."""
    spec: list[tuple[str, str]] = []
    start = end = 0.0
    while True:
        track = TRACKS[len(spec) % 2]
        voice = caller if track == "inbound" else callee
        seconds = float(rows[voice.peek()]["duration_s"])
        at = LEAD_IN_S if not spec else max(end + SPACING_S[len(spec) % len(SPACING_S)], start + 0.5)
        if len(spec) >= 2 and at + seconds + TAIL_S > call_s:
            return spec
        spec.append((track, voice.take()))
        start, end = at, at + seconds


def plan_calls(n: int, call_s: float, corpus: Path) -> tuple[list[list[tuple[str, str]]], list[str]]:
    """``n`` call specs and notes on clip reuse. Call ``i`` does not depend on ``n``: calls take
    their clips in order, the callee voice of call ``i`` is ``CALLEE_VOICES[i % 6]``."""
    rows = load_manifest(corpus)
    caller = _Voice(voice_clips(rows, CALLER_VOICE))
    callees = [_Voice(voice_clips(rows, prefix)) for prefix in CALLEE_VOICES]
    if not caller.clips or not any(v.clips for v in callees):
        raise ValueError(f"the corpus at {corpus} lacks the voices a call is made of")
    callees = [v for v in callees if v.clips]
    specs = [_plan_one(caller, callees[i % len(callees)], call_s, rows) for i in range(n)]
    notes = [f"caller voice {CALLER_VOICE}* ran out of clips: later calls repeat earlier sentences"] if caller.repeated else []
    notes += [f"callee voice {v.clips[0].rsplit('_', 1)[0]}* has {len(v.clips)} clips: its calls repeat some" for v in callees if v.repeated]
    return specs, notes


def build_calls(n: int, call_s: float, corpus: Path, *, echo_db: float | None = None) -> tuple[list[Call], list[str]]:
    """``n`` different two-leg calls of about ``call_s`` seconds each (see :func:`plan_calls`),
    each leg carrying the other ``echo_db`` dB down when given (:func:`with_echo`)."""
    specs, notes = plan_calls(n, call_s, corpus)
    calls = [build_call(spec, corpus=corpus, call_sid=call_sid_for(i)) for i, spec in enumerate(specs)]
    return ([with_echo(call, echo_db) for call in calls] if echo_db is not None else calls), notes


#: How late a leg's echo of the other leg comes (a hybrid's echo path plus the network's).
ECHO_DELAY_S = 0.04


def with_echo(call: Call, echo_db: float, delay_s: float = ECHO_DELAY_S) -> Call:
    """``call`` with each leg carrying the other leg ``echo_db`` dB down and ``delay_s`` late, as a
    line with an imperfect echo canceller (or a phone on speaker) delivers it. The turns keep
    their clean μ-law: the offline baseline and the references are the same as without echo."""
    legs = {track: audio.decode_samples(data, "g711_ulaw")[0] for track, data in call.legs.items()}
    delay, gain = int(delay_s * RATE), np.float32(10 ** (echo_db / 20))
    echoed: dict[str, bytes] = {}
    for track, own in legs.items():
        other = sum(leg for name, leg in legs.items() if name != track)
        late = np.concatenate([np.zeros(delay, np.float32), np.asarray(other, np.float32)[: len(own) - delay]])
        echoed[track] = audio.encode_g711(np.clip(own + gain * late, -1.0, 1.0).astype(np.float32), "ulaw")
    return dataclasses.replace(call, legs=echoed)


def offline_texts(call: Call, *, model: str = "tiny.en", tag: str = "twilio") -> dict[str, list[str]]:
    """faster-whisper, the server's own model, each turn decoded whole from the same μ-law
    (cached by model and audio: the baseline does not change between runs)."""
    from .offline import offline_mulaw_turns

    texts = offline_mulaw_turns([(t.track, t.mulaw) for t in call.turns], model=model, tag=tag)
    return {leg: texts.get(leg, []) for leg in call.tracks}


# --------------------------------------------------------------------------------------------
# Twilio's client side: the messages and the replay
# --------------------------------------------------------------------------------------------


class TwilioStream:
    """Builds one Media Stream's messages as Twilio sends them: ``sequenceNumber`` counts every
    message after ``connected`` from "1", ``chunk`` counts each track's frames from "1",
    ``timestamp`` is milliseconds since the stream started; all three are strings."""

    def __init__(self, call_sid: str = CALL_SID, stream_sid: str = "MZ" + "00112233445566778899aabbccddeeff", account_sid: str = ACCOUNT_SID) -> None:
        self.call_sid, self.stream_sid, self.account_sid = call_sid, stream_sid, account_sid
        self.sequence = 0
        self.chunks = dict.fromkeys(TRACKS, 0)

    def _next(self) -> str:
        self.sequence += 1
        return str(self.sequence)

    def connected(self) -> dict[str, Any]:
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}

    def start(self, tracks: tuple[str, ...] = TRACKS, parameters: dict[str, str] | None = None) -> dict[str, Any]:
        return {
            "event": "start",
            "sequenceNumber": self._next(),
            "start": {
                "accountSid": self.account_sid,
                "streamSid": self.stream_sid,
                "callSid": self.call_sid,
                "tracks": list(tracks),
                "customParameters": dict(parameters or {}),
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": RATE, "channels": 1},
            },
            "streamSid": self.stream_sid,
        }

    def media(self, track: str, payload: bytes, timestamp_ms: int) -> dict[str, Any]:
        self.chunks[track] += 1
        return {
            "event": "media",
            "sequenceNumber": self._next(),
            "media": {"track": track, "chunk": str(self.chunks[track]), "timestamp": str(timestamp_ms), "payload": base64.b64encode(payload).decode()},
            "streamSid": self.stream_sid,
        }

    def dtmf(self, digit: str) -> dict[str, Any]:
        return {"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": self._next(), "dtmf": {"track": "inbound_track", "digit": digit}}

    def mark(self, name: str) -> dict[str, Any]:
        return {"event": "mark", "sequenceNumber": self._next(), "streamSid": self.stream_sid, "mark": {"name": name}}

    def stop(self) -> dict[str, Any]:
        return {"event": "stop", "sequenceNumber": self._next(), "streamSid": self.stream_sid, "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}}

    def frames(self, legs: Mapping[str, bytes], *, start_ms: int = 0) -> Iterator[dict[str, Any]]:
        """Both tracks cut into 20 ms frames and interleaved by timestamp (inbound first at each
        instant), as Twilio forwards a call's audio."""
        length = max(len(audio) for audio in legs.values())
        for offset in range(0, length, FRAME):
            for track in TRACKS:
                audio = legs.get(track, b"")[offset : offset + FRAME]
                if audio:
                    yield self.media(track, audio, start_ms + offset // (RATE // 1000))


@dataclasses.dataclass
class Replay:
    received: list[str | bytes]
    close_code: int | None
    close_reason: str
    flush_s: float  # stop sent → server closed the socket
    late_frames: int  # frames the client sent more than 100 ms after they were due
    elapsed_s: float  # first frame → stop
    t0: float = 0.0  # monotonic time at which call audio time 0 was spoken
    send_lag_max_s: float = 0.0


def call_messages(call: Call, twilio: TwilioStream) -> Iterator[tuple[float, dict[str, Any]]]:
    """(due second, message): each frame when its last sample has been spoken, a dtmf and a mark
    among them (each numbered after the frame before it, as Twilio numbers everything it sends)."""
    extras = [(10.0, "dtmf"), (20.0, "mark")]
    for message in twilio.frames(call.legs):
        due = int(message["media"]["timestamp"]) / 1000 + FRAME_S
        yield due, message
        while extras and due >= extras[0][0]:
            _, kind = extras.pop(0)
            yield due, twilio.dtmf("7") if kind == "dtmf" else twilio.mark("hold-music-ended")


async def replay(
    url: str,
    call: Call,
    *,
    ssl_context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    parameters: dict[str, str] | None = None,
) -> Replay:
    """Stream ``call`` to ``url`` at real time as Twilio does, then ``stop`` and wait for the
    server to close (after its last finals). What the server sends back is kept (Twilio ignores it)."""
    twilio = TwilioStream(call_sid=call.call_sid)
    received: list[str | bytes] = []
    late, lag = 0, 0.0
    async with websockets.connect(url, ssl=ssl_context, additional_headers=headers, max_size=None) as ws:

        async def listen() -> None:
            with contextlib.suppress(websockets.ConnectionClosed):  # a close code other than 1000
                async for message in ws:
                    received.append(message)

        listener = asyncio.create_task(listen())
        labels = {"inbound_label": LABELS["inbound"], "outbound_label": LABELS["outbound"], "crm_ticket": "T-1"}
        t0 = time.monotonic()
        try:
            await ws.send(json.dumps(twilio.connected()))
            await ws.send(json.dumps(twilio.start(parameters={**labels, **(parameters or {})})))
            t0 = time.monotonic()
            for due, message in call_messages(call, twilio):
                delay = t0 + due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                else:
                    lag = max(lag, -delay)
                    late += delay < -0.1
                await ws.send(json.dumps(message))
            stopped = time.monotonic()
            await ws.send(json.dumps(twilio.stop()))
        except websockets.ConnectionClosed:  # the server ended the stream (a refused API key, server_busy)
            stopped = time.monotonic()
        await asyncio.wait_for(listener, timeout=60)
        flush_s = time.monotonic() - stopped
    return Replay(received, ws.close_code, ws.close_reason or "", flush_s, late, stopped - t0, t0, lag)


@dataclasses.dataclass(frozen=True)
class SseEvent:
    t: float  # monotonic arrival time
    kind: str  # the SSE ``event:`` line: the native event type
    data: dict[str, Any]


async def subscribe(
    base: str, call_id: str, *, delay: float = 0.0, verify: ssl.SSLContext | bool = True, retry_s: float = 0.0
) -> list[SseEvent]:
    """Join ``GET /v1/sessions/{call_id}/events`` ``delay`` seconds in (retrying a 404 for
    ``retry_s`` seconds: the call id is known once Twilio's ``start`` has arrived) and read until
    the stream ends; every event is stamped with its arrival."""
    await asyncio.sleep(delay)
    events: list[SseEvent] = []
    deadline = time.monotonic() + retry_s
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(10, read=120), verify=verify) as client:
        while True:
            async with client.stream("GET", f"/v1/sessions/{call_id}/events") as response:
                if response.status_code == 404 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                    continue
                if response.status_code != 200:
                    raise RuntimeError(f"GET /v1/sessions/{call_id}/events: {response.status_code} {(await response.aread())!r}")
                kind = ""
                async for line in response.aiter_lines():
                    if line.startswith("event: "):
                        kind = line[len("event: ") :]
                    elif line.startswith("data: "):
                        events.append(SseEvent(time.monotonic(), kind, json.loads(line[len("data: ") :])))
                return events


@dataclasses.dataclass
class CallRun:
    """One call as replayed and as its subscriber saw it."""

    call: Call
    replay: Replay
    events: list[SseEvent]
    offset_s: float  # start delay of this call in the run

    @property
    def refused(self) -> bool:
        """The server turned the call away at connect (admission control: ``server_busy``, 1013)."""
        return self.replay.close_code == BUSY_CLOSE_CODE


#: The close code of a session refused at connect (``server_busy``, "try again later").
BUSY_CLOSE_CODE = 1013


async def run_call(ws_url: str, http_base: str, call: Call, *, delay: float = 0.0, parameters: dict[str, str] | None = None) -> CallRun:
    """Replay one call, under a fresh Call SID, with a subscriber reading its events from the
    moment the server knows the call."""
    call = dataclasses.replace(call, call_sid=fresh_sid())
    await asyncio.sleep(delay)
    subscriber = asyncio.create_task(subscribe(http_base, call.call_sid, retry_s=30))
    try:
        result = await replay(ws_url, call, parameters=parameters)
        # A refused call never becomes a session: there is nothing to subscribe to.
        events = [] if result.close_code == BUSY_CLOSE_CODE else await asyncio.wait_for(subscriber, timeout=120)
    finally:
        subscriber.cancel()
    return CallRun(call, result, events, delay)


async def run_calls(
    ws_url: str, http_base: str, calls: Sequence[Call], *, stagger_s: float, parameters: dict[str, str] | None = None
) -> list[CallRun]:
    """All calls at once, call ``i`` starting ``i * stagger_s / N`` late (callers do not all dial
    on the same frame); ``parameters``: extra ``customParameters`` for every call."""
    step = stagger_s / len(calls) if calls else 0.0
    return list(await asyncio.gather(
        *(run_call(ws_url, http_base, c, delay=i * step, parameters=parameters) for i, c in enumerate(calls))
    ))


# --------------------------------------------------------------------------------------------
# Scoring one leg
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LegScore:
    """One leg of one call: accuracy, per-turn latency, labels."""

    call_sid: str
    track: str
    channel: int
    speaker: str
    reference: str
    hypothesis: str
    offline_hypothesis: str
    wer: WerCounts
    offline_wer: WerCounts
    finalization_s: list[float | None]  # per turn: its segment's arrival − its end of speech
    last_word_final_s: list[float | None]  # per turn: the delta completing its last word − end of speech
    endpoint_s: list[float | None]  # per turn: speech_stopped of its final utterance − end of speech (VAD's share)
    lost_turns: list[str]  # clip ids of turns with no word in the leg's transcript
    wrong_speaker: int  # this leg's segments labelled with another speaker
    segments: int

    def figures(self) -> dict[str, Any]:
        fin = [x for x in self.finalization_s if x is not None]
        word = [x for x in self.last_word_final_s if x is not None]
        endpoint = [x for x in self.endpoint_s if x is not None]
        return {
            "call_sid": self.call_sid,
            "track": self.track,
            "channel": self.channel,
            "speaker": self.speaker,
            "turns": len(self.finalization_s),
            "segments": self.segments,
            "reference_words": self.wer.reference_words,
            "wer": self.wer.wer,
            "offline_wer": self.offline_wer.wer,
            "wer_minus_offline": self.wer.wer - self.offline_wer.wer,
            "finalization_s_p50": percentile(fin, 50),
            "finalization_s_p95": percentile(fin, 95),
            "last_word_final_s_p50": percentile(word, 50),
            "last_word_final_s_p95": percentile(word, 95),
            "endpoint_s_p50": percentile(endpoint, 50),
            "lost_turns": len(self.lost_turns),
            "wrong_speaker": self.wrong_speaker,
        }


def leg_segments(events: Sequence[SseEvent], channel: int) -> list[SseEvent]:
    return [e for e in events if e.kind == "transcript.segment" and e.data.get("channel") == channel]


def leg_text(events: Sequence[SseEvent], channel: int) -> str:
    """A leg's transcript as its subscriber received it: its segments' texts in order."""
    return " ".join(str(e.data.get("text") or "").strip() for e in leg_segments(events, channel)).strip()


def turn_utterances(turns: Sequence[Turn]) -> list[Utterance]:
    return [Utterance(t.clip_id, t.reference, t.speech_start_s, t.speech_end_s, t.start, t.end) for t in turns]


def _turn_finals(
    words: list[FinalWord], turns: Sequence[Turn], starts: Mapping[str, float] | None = None
) -> tuple[list[float | None], list[str | None], list[str]]:
    """Per turn: when its last attributed word became final (relative to its end of speech) and
    the utterance that word belongs to; and the turns none of whose words were transcribed.

    ``starts``: where each utterance (item) begins in the call's audio. A word of an utterance
    that begins after the turn's speech ended is not that turn's, whatever the alignment paired
    it with: "in the year fourteen sixty-two" (normalised "14 62") heard as "1462", then the next
    turn's "It imitates" heard as "Imitate the", aligned "imitate" with "62", and the turn's last
    word seemed final with the next turn's segment, 11 s late."""
    attribution = attribute(words, turn_utterances(turns))
    latencies: list[float | None] = []
    items: list[str | None] = []
    lost: list[str] = []
    for i, turn in enumerate(turns):
        own = [w for w in attribution.words_of(i) if _may_hold(starts, words[w].item_id, turn)]
        last = max(own, key=lambda w: words[w].t_final, default=None)
        latencies.append(None if last is None else words[last].t_final - turn.speech_end_s)
        items.append(None if last is None else words[last].item_id)
        if not any(u == i for u in attribution.token_utt):
            lost.append(turn.clip_id)
    return latencies, items, lost


def _may_hold(starts: Mapping[str, float] | None, item: str | None, turn: Turn) -> bool:
    """Whether the utterance ``item`` can hold words of ``turn``: it began before the turn's
    speech ended (or its start is not known)."""
    if starts is None or item is None or item not in starts:
        return True
    return starts[item] < turn.speech_end_s


def score_leg(run: CallRun, track: str, offline: Mapping[str, list[str]]) -> LegScore:
    """Score one leg of a replayed call from what its subscriber received."""
    channel, speaker = CHANNEL[track], LABELS[track]
    turns = run.call.leg_turns(track)
    t0 = run.replay.t0
    segments = leg_segments(run.events, channel)
    segment_words = [
        FinalWord(raw, e.data.get("item_id"), e.t - t0, e.t - t0) for e in segments for raw in str(e.data.get("text") or "").split()
    ]
    deltas = [(e.t - t0, e.data) for e in run.events if e.kind == "transcript.text.delta" and e.data.get("channel") == channel]
    starts = {str(e.data.get("item_id")): float(e.data.get("start") or 0.0) for e in segments}
    finalization, items, lost = _turn_finals(segment_words, turns, starts)
    last_word, _, _ = _turn_finals(final_words(deltas), turns, starts)
    stopped = {e.data.get("item_id"): e.t - t0 for e in run.events if e.kind == "input_audio_buffer.speech_stopped"}
    endpoint = [
        None if item not in stopped else stopped[item] - turn.speech_end_s for item, turn in zip(items, turns)
    ]
    reference = " ".join(t.reference for t in turns)
    hypothesis = leg_text(run.events, channel)
    offline_hypothesis = " ".join(offline.get(track, []))
    return LegScore(
        call_sid=run.call.call_sid,
        track=track,
        channel=channel,
        speaker=speaker,
        reference=reference,
        hypothesis=hypothesis,
        offline_hypothesis=offline_hypothesis,
        wer=wer_counts(reference, hypothesis),
        offline_wer=wer_counts(reference, offline_hypothesis),
        finalization_s=finalization,
        last_word_final_s=last_word,
        endpoint_s=endpoint,
        lost_turns=lost,
        wrong_speaker=sum(1 for e in segments if e.data.get("speaker") != speaker),
        segments=len(segments),
    )


def foreign_segments(events: Sequence[SseEvent]) -> list[dict[str, Any]]:
    """Segments on a channel a two-leg call does not have."""
    return [e.data for e in events if e.kind == "transcript.segment" and e.data.get("channel") not in CHANNEL.values()]


# --------------------------------------------------------------------------------------------
# The benchmark: one level (N calls on a fresh server) and the sweep
# --------------------------------------------------------------------------------------------


def _level_figures(legs: Sequence[LegScore], runs: Sequence[CallRun]) -> dict[str, float]:
    fin = [x for leg in legs for x in leg.finalization_s if x is not None]
    word = [x for leg in legs for x in leg.last_word_final_s if x is not None]
    endpoint = [x for leg in legs for x in leg.endpoint_s if x is not None]
    figures: dict[str, float] = {
        "calls": len(runs),
        "legs": len(legs),
        "turns": sum(len(leg.finalization_s) for leg in legs),
        "wer": pooled_wer((leg.reference, leg.hypothesis) for leg in legs).wer,
        "offline_wer": pooled_wer((leg.reference, leg.offline_hypothesis) for leg in legs).wer,
        "lost_turns": sum(len(leg.lost_turns) for leg in legs),
        "wrong_speaker": sum(leg.wrong_speaker for leg in legs),
        "client_late_frames": sum(r.replay.late_frames for r in runs),
        "client_send_lag_max_s": max((r.replay.send_lag_max_s for r in runs), default=0.0),
        "flush_s_max": max((r.replay.flush_s for r in runs), default=0.0),
        "bad_close": sum(1 for r in runs if r.replay.close_code != 1000),
    }
    figures["wer_minus_offline"] = figures["wer"] - figures["offline_wer"]
    for name, values in (("finalization_s", fin), ("last_word_final_s", word), ("endpoint_s", endpoint)):
        for q in (50, 95):
            value = percentile(values, q)
            if value is not None:
                figures[f"{name}_p{q}"] = value
        if values:
            figures[f"{name}_max"] = max(values)
    worst = [leg.figures()["finalization_s_p95"] for leg in legs]
    if any(w is not None for w in worst):
        figures["finalization_s_p95_worst_leg"] = max(w for w in worst if w is not None)
    return figures


def meets_target(figures: Mapping[str, float]) -> bool:
    """p50 ≤ 0.6 s and p95 ≤ 1.2 s over every turn of every leg, no turn lost, every call
    admitted and closed."""
    p50, p95 = figures.get("finalization_s_p50"), figures.get("finalization_s_p95")
    return (
        p50 is not None and p95 is not None and p50 <= TARGET_P50_S and p95 <= TARGET_P95_S
        and figures.get("lost_turns", 1) == 0 and figures.get("bad_close", 1) == 0 and figures.get("refused_calls", 0) == 0
    )


def _resources(monitor: ResourceMonitor, start: float, end: float, audio_s: float) -> dict[str, float]:
    window = monitor.window(start - 0.5, end + 0.5)
    if len(window) < 2:
        return {}
    first, last = window[0], window[-1]
    cpu = last.cpu_s - first.cpu_s
    return {
        "server_cpu_cores_mean": cpu / max(1e-9, last.t - first.t),
        "server_cpu_s_per_audio_s": cpu / max(1e-9, audio_s),
        "server_rss_peak_mb": max(s.rss_bytes for s in monitor.samples) / 2**20,
    }


@dataclasses.dataclass
class BenchConfig:
    options: ServerOptions
    out: Path
    stagger_s: float = 5.0
    idle_s: float = 2.0
    url: str | None = None  # a running server's /v1/twilio; None: start one per level
    server_pid: int | None = None
    model: str = "tiny.en"
    parameters: dict[str, str] | None = None  # extra customParameters (--call-param)


def _http_base(ws_url: str) -> str:
    return ws_url.split("/v1/")[0].replace("ws://", "http://", 1).replace("wss://", "https://", 1)


def run_level(calls: Sequence[Call], offline: Sequence[Mapping[str, list[str]]], cfg: BenchConfig) -> dict[str, Any]:
    """N calls concurrently against one server (a fresh one unless ``cfg.url``), scored."""
    label = f"calls{len(calls):03d}"
    args = cfg.options.args()
    if "--transcript-db" not in args:  # the store works as by default, but in the output folder
        args += ["--transcript-db", str(cfg.out / f"transcripts-{label}.sqlite3")]
    server = None if cfg.url else ServerProcess(args, cfg.out / f"server-{label}.log", startup_timeout_s=cfg.options.startup_timeout_s)
    if server is not None:
        server.start()
    try:
        ws_url = cfg.url or f"ws://127.0.0.1:{server.port}/v1/twilio"  # type: ignore[union-attr]
        http_base = _http_base(ws_url)
        pid = server.process.pid if server is not None and server.process else cfg.server_pid
        return _measure(calls, offline, cfg, label, ws_url, http_base, pid)
    finally:
        if server is not None:
            server.stop()


def _measure(
    calls: Sequence[Call], offline: Sequence[Mapping[str, list[str]]], cfg: BenchConfig, label: str, ws_url: str, http_base: str, pid: int | None
) -> dict[str, Any]:
    figures: dict[str, float] = {}
    if pid is not None and cfg.idle_s > 0:
        figures.update(measure_idle(pid, cfg.idle_s))
    text = server_metrics.fetch(http_base)
    before = server_metrics.parse(text) if text is not None else None
    monitor = ResourceMonitor(pid) if pid is not None else None
    if monitor:
        monitor.start()
    start = time.monotonic()
    runs = asyncio.run(run_calls(ws_url, http_base, calls, stagger_s=cfg.stagger_s, parameters=cfg.parameters))
    end = time.monotonic()
    if monitor:
        monitor.stop()
        figures.update(_resources(monitor, start, end, sum(2 * c.seconds for c in calls)))
    text = server_metrics.fetch(http_base)
    if before is not None and text is not None:
        figures.update(server_metrics.headline(server_metrics.diff(before, server_metrics.parse(text))))
    # Refused calls (admission control) are counted, not scored: the figures are the admitted calls'.
    admitted = [(run, off) for run, off in zip(runs, offline) if not run.refused]
    legs = [score_leg(run, track, off) for run, off in admitted for track in TRACKS]
    figures.update(_level_figures(legs, [run for run, _ in admitted]))
    figures["refused_calls"] = len(runs) - len(admitted)
    figures["foreign_channel_segments"] = sum(len(foreign_segments(r.events)) for r in runs)
    _write_events(cfg.out / label, runs)
    return {
        "label": label,
        "n_calls": len(calls),
        "metrics": figures,
        "meets_target": meets_target(figures),
        "legs": [{**leg.figures(), "reference": leg.reference, "hypothesis": leg.hypothesis, "offline": leg.offline_hypothesis,
                  "lost_clips": leg.lost_turns, "finalization_s": leg.finalization_s, "last_word_final_s": leg.last_word_final_s,
                  "endpoint_s": leg.endpoint_s}
                 for leg in legs],
        "calls": [{"call_sid": r.call.call_sid, "seconds": r.call.seconds, "offset_s": r.offset_s, "close_code": r.replay.close_code, "refused": r.refused,
                   "flush_s": r.replay.flush_s, "late_frames": r.replay.late_frames, "elapsed_s": r.replay.elapsed_s} for r in runs],
    }


def _write_events(folder: Path, runs: Sequence[CallRun]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for run in runs:
        with (folder / f"{run.call.call_sid}.events.jsonl").open("w", encoding="utf-8") as fh:
            for e in run.events:
                fh.write(json.dumps({"t": round(e.t - run.replay.t0, 4), "event": e.kind, "data": e.data}) + "\n")


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 2, pct: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.1f}%" if pct else f"{value:.{digits}f}"


def markdown(results: Mapping[str, Any]) -> str:
    cfg, env = results["config"], results["environment"]
    lines = ["# Call-center benchmark", ""]
    lines += [f"- {note}" for note in results["notes"]]
    lines += [
        "",
        f"Model `{cfg['model']}` ({cfg['device']}, {cfg['compute_type']}); calls of about {cfg['call_s']} s, two legs each "
        f"(inbound `{LABELS['inbound']}`, outbound `{LABELS['outbound']}`), replayed at real time over `/v1/twilio`, "
        f"calls started {cfg['stagger_s']} s / N apart. Machine: {env['cpu_count']} CPUs, {env['platform']}; started {results['created_utc']}.",
        "",
        f"Finalization = `transcript.segment` holding the turn's last word arriving at a `GET /v1/sessions/{{callSid}}/events` subscriber − "
        f"the turn's end of speech; last-word final = the same for the `transcript.text.delta` that completed that word; endpoint = the same for the turn's "
        f"`input_audio_buffer.speech_stopped` (the VAD's share: the rest is the final decode and delivery). "
        f"Target: p50 ≤ {TARGET_P50_S} s, p95 ≤ {TARGET_P95_S} s, no turn lost, no call refused. "
        f"Calls that admission control refused (`server_busy`) are counted in the calls column; the figures are the admitted calls'.",
        "",
        "| calls | turns | WER | offline WER | Δ | final p50 / p95 s | worst leg p95 s | last-word p50 / p95 s | endpoint p50 s | lost | server CPU cores | CPU s / audio s | RSS peak MB | late frames | meets target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in results["levels"]:
        m = level["metrics"]
        lines.append(
            f"| {level['n_calls']}{refused_note(int(m.get('refused_calls', 0)))} | {int(m['turns'])} | {_f(m['wer'], pct=True)} | {_f(m['offline_wer'], pct=True)} | "
            f"{_f(m['wer_minus_offline'] * 100, 1)} pt | {_f(m.get('finalization_s_p50'))} / {_f(m.get('finalization_s_p95'))} | "
            f"{_f(m.get('finalization_s_p95_worst_leg'))} | {_f(m.get('last_word_final_s_p50'))} / {_f(m.get('last_word_final_s_p95'))} | "
            f"{_f(m.get('endpoint_s_p50'))} | {int(m['lost_turns'])} | {_f(m.get('server_cpu_cores_mean'))} | {_f(m.get('server_cpu_s_per_audio_s'), 3)} | "
            f"{_f(m.get('server_rss_peak_mb'), 0)} | {int(m['client_late_frames'])} | {'yes' if level['meets_target'] else 'no'} |"
        )
    held = results.get("calls_held")
    lines += ["", f"Calls held at the target: **{held if held is not None else 'none of the tested levels'}** (largest N whose level and every smaller one met it).", ""]
    lines += ["## Per leg", "", "| calls | call | leg | turns | WER | offline WER | final p50 / p95 s | last-word p50 / p95 s | lost | wrong speaker |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for level in results["levels"]:
        for leg in level["legs"]:
            lines.append(
                f"| {level['n_calls']} | {leg['call_sid'][:10]}… | {leg['speaker']} | {leg['turns']} | {_f(leg['wer'], pct=True)} | "
                f"{_f(leg['offline_wer'], pct=True)} | {_f(leg['finalization_s_p50'])} / {_f(leg['finalization_s_p95'])} | "
                f"{_f(leg['last_word_final_s_p50'])} / {_f(leg['last_word_final_s_p95'])} | {leg['lost_turns']} | {leg['wrong_speaker']} |"
            )
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# ``stream-server bench --calls N[,N...]``
# --------------------------------------------------------------------------------------------


def parse_calls(spec: str) -> list[int]:
    """``"1,2,4"`` → ``[1, 2, 4]`` (sorted, distinct, positive)."""
    levels = sorted({int(x) for x in spec.replace(" ", "").split(",") if x})
    if not levels or levels[0] < 1:
        raise ValueError("--calls takes positive integers, e.g. 4 or 1,2,4")
    return levels


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def call_parameters(pairs: Sequence[str]) -> dict[str, str]:
    """``--call-param NAME=VALUE`` options as the calls' extra ``customParameters``."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--call-param expects NAME=VALUE, got {pair!r}")
        out[name] = value
    return out


def main_calls(args: argparse.Namespace, out: Path, stamp: _dt.datetime, argv: Sequence[str]) -> int:
    """The ``--calls`` mode of ``stream-server bench``: build, baseline, run each level, report."""
    levels = parse_calls(args.calls)
    corpus: Path = args.corpus
    _log(f"[bench] building {max(levels)} two-leg call(s) of about {args.call_s:.0f} s from {corpus} ...")
    calls, notes = build_calls(max(levels), args.call_s, corpus, echo_db=args.call_echo_db)
    model = args.model or "tiny.en"
    _log(f"[bench] offline baseline ({model}, beam 5, each turn whole) ...")
    offline = [offline_texts(call, model=model, tag="calls") for call in calls]
    options = ServerOptions(model=args.model, device=args.device, compute_type=args.compute_type,
                            extra_args=[a for chunk in args.server_arg for a in shlex.split(chunk)])
    cfg = BenchConfig(options, out, stagger_s=args.stagger_s, idle_s=args.idle_s, url=args.url, server_pid=args.server_pid, model=model,
                      parameters=call_parameters(args.call_param or []))
    results_levels = []
    for n in levels:
        _log(f"[bench] {n} concurrent call(s) ...")
        level = run_level(calls[:n], offline[:n], cfg)
        m = level["metrics"]
        _log(f"[bench]   {n} call(s): WER {100 * m['wer']:.1f}% (offline {100 * m['offline_wer']:.1f}%), final p50/p95 "
             f"{m.get('finalization_s_p50', float('nan')):.2f}/{m.get('finalization_s_p95', float('nan')):.2f} s, "
             f"lost {int(m['lost_turns'])}, server {m.get('server_cpu_cores_mean', float('nan')):.2f} cores")
        results_levels.append(level)
    held = None
    for level in results_levels:
        if not level["meets_target"]:
            break
        held = level["n_calls"]
    device = args.device or "cpu"
    notes.append("latency is measured at a live subscriber of /v1/sessions/{callSid}/events (SSE) in the bench's own process, "
                 "so it includes the hub and SSE delivery; the bench client shares the machine with the server")
    results = {
        "schema": 1,
        "tool": "stream_server.bench --calls",
        "created_utc": stamp.isoformat(timespec="seconds"),
        "notes": notes,
        "config": {
            "model": model, "device": device, "compute_type": args.compute_type or ("float16" if device == "cuda" else "int8"),
            "server_args": options.extra_args, "url": args.url, "corpus": str(corpus), "calls": levels, "call_s": args.call_s,
            "stagger_s": args.stagger_s, "labels": LABELS, "argv": list(argv),
        },
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "target": {"finalization_s_p50": TARGET_P50_S, "finalization_s_p95": TARGET_P95_S, "lost_turns": 0},
        "calls_built": [{"call_sid": c.call_sid, "seconds": c.seconds,
                         "turns": [{"track": t.track, "clip_id": t.clip_id, "start": t.start, "end": t.end,
                                    "speech_start": t.speech_start_s, "speech_end": t.speech_end_s} for t in c.turns]} for c in calls],
        "levels": results_levels,
        "calls_held": held,
    }
    write_json(out / "results.json", results)
    md = markdown(results)
    (out / "summary.md").write_text(md)
    _log(f"[bench] wrote {out}/results.json and summary.md")
    print(md)
    return 0


__all__ = [
    "CALL_SID", "FRAME", "LABELS", "RATE", "Call", "CallRun", "LegScore", "Replay", "SseEvent", "Turn", "TwilioStream",
    "build_call", "build_calls", "call_messages", "leg_text", "main_calls", "offline_texts",
    "replay", "run_calls", "score_leg", "subscribe", "telephone", "with_echo",
]
