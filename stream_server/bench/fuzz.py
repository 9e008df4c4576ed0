"""Property-based fuzzing of every wire dialect and of the session core (``stream-server bench --fuzz N``).

Hypothesis strategies build *cases*: a target (one of the five dialects, or the core session on its
own), a handshake or session setup, and a program of steps. Steps are client frames (each
protocol's real messages with mutated, missing or wrong-typed fields, raw text, deeply nested JSON,
huge numbers, arbitrary bytes, synthetic speech split into frames of random length) and the
scheduler's side of a session (decode results and failures, answered in random order after random
latencies). :func:`run_case` plays a case through a :class:`Rig` — the dialect in front of a real
:class:`~stream_server.session.Session` with a deterministic energy VAD and burst decoder, wired
as ``ws.py`` wires them — and checks, after every step and at the end:

* no exception escapes a dialect (``receive_text``, ``receive_bytes``, ``render``) or the session;
* every client frame has a defined outcome: a command for the core, a reply, an error in the
  protocol's own shape, a documented close code, or a drop that is logged (or one of the few
  documented silent ones: Deepgram's ``KeepAlive``, audio after ``CloseStream``, a WAV header
  still being read, Twilio's ``connected``);
* everything sent is a text frame that encodes as UTF-8 and parses as standard JSON;
* the session's invariants: the deltas of a channel concatenate to that channel's text in
  ``transcript.text.done``; segments come in utterance order per channel, one per utterance and
  after its deltas; exactly one ``done``, nothing after it; the session closes after ``close()``
  once every decode is answered; no decode request has empty audio; no channel holds more than
  ``SessionLimits().max_pending_finals`` pending finals.

``tests/test_fuzz.py`` runs the same strategies in CI (derandomized, a few hundred examples); the
bench mode runs N cases through Hypothesis' ``given`` machinery in seeded chunks, on every CPU,
and writes ``results.json`` and ``summary.md``.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import copy
import dataclasses
import datetime as _dt
import functools
import io
import itertools
import json
import logging
import multiprocessing
import os
import platform
import struct
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from stream_server import protocol as p
from stream_server.audio import SAMPLE_WIDTH, g711_table
from stream_server.decoding import DecodeFailure, DecodeResult, FailureKind
from stream_server.dialects import audiohook, deepgram, deepgram_flux, native, openai_realtime, twilio
from stream_server.dialects.base import Action, Close, Dialect, Handshake, HandshakeRejected, Send
from stream_server.dialects.deepgram_audio import DATA_CLOSE_CODE
from stream_server.session import DecodeTicket, Session, SessionLimits

from .tone_models import BurstDecoder, EnergyVad, word_amplitude

MODEL_RATE = 16000
KNOWN_MODELS = ("tiny.en", "base")
DIALECTS = ("native", "openai", "deepgram", "flux", "twilio", "audiohook")
TARGETS = (*DIALECTS, "session")
MAX_PENDING_FINALS = SessionLimits().max_pending_finals
CATCH_UP_TICKS = 10  # the shell's bounded wait for a backlogged session, in scheduler ticks
#: Close codes a dialect may send (besides the core's 1000 after ``done``), from its docs.
DOCUMENTED_CLOSE_CODES: dict[str, frozenset[int]] = {
    "native": frozenset(),
    "openai": frozenset(),
    "deepgram": frozenset({DATA_CLOSE_CODE, 1011}),
    "flux": frozenset({DATA_CLOSE_CODE, 1011}),
    "twilio": frozenset({twilio.POLICY_VIOLATION, twilio.UNSUPPORTED_DATA}),
    "audiohook": frozenset(),
}
SETTLE_LIMIT = 2000  # decode answers after close() before "the session never closes" is reported
SESSION_ID = "sess_fuzz00000001"
AUDIOHOOK_ID = "3f0e6a8c-6a3b-4f55-9d6c-0c8d7f1e2a44"


# ============================================================================================
# Case model
# ============================================================================================


@dataclasses.dataclass(frozen=True)
class Auto:
    """A field filled in when the step runs, from the connection's state (``seq``, positions,
    timestamps, audio in the session's current format); mutations may replace it with garbage."""

    name: str
    arg: Any = None


@dataclasses.dataclass(frozen=True)
class Raw:
    """JSON text put into a message verbatim (numbers Python cannot serialise, deep nesting)."""

    text: str


@dataclasses.dataclass(frozen=True)
class AudioSpec:
    """Synthetic audio: tone-burst words with gaps, then a tail of silence (or noise)."""

    words: tuple[int, ...] = ()
    gap_ms: int = 120
    tail_ms: int = 0
    noise: bool = False
    cuts: tuple[float, ...] = ()  # where the bytes are split into frames (fractions)
    channel_mask: int = 1  # channels that carry the signal (the others are silent)
    aligned: bool = True  # cuts fall between whole frames (else anywhere, even mid-sample)


@dataclasses.dataclass(frozen=True)
class Msg:
    """A JSON text frame, optionally cut off after ``cut`` characters."""

    value: Any
    cut: int | None = None


@dataclasses.dataclass(frozen=True)
class RawText:
    text: str


@dataclasses.dataclass(frozen=True)
class Bytes:
    data: bytes


@dataclasses.dataclass(frozen=True)
class Frames:
    """Audio in the connection's current format as binary frames (split at ``spec.cuts``)."""

    spec: AudioSpec


@dataclasses.dataclass(frozen=True)
class CoreAudio:
    """``AudioAppend`` straight to the core: interleaved (``channel`` None) or one channel."""

    spec: AudioSpec
    channel: int | None = None


@dataclasses.dataclass(frozen=True)
class CoreCommand:
    """A typed command straight to the core: update (with ``fields``), commit, clear, close."""

    kind: str
    fields: Any = None


@dataclasses.dataclass(frozen=True)
class Tick:
    """The scheduler's clock moves ``n`` steps: decodes whose latency is up are answered."""

    n: int


@dataclasses.dataclass(frozen=True)
class Answer:
    """Answer the ``index``-th decode in flight now (out of order), with a result or a failure."""

    index: int
    outcome: str  # "result", "empty", "dropped", "model_unavailable", "decode_failed"


@dataclasses.dataclass(frozen=True)
class Hangup:
    """The shell flushes the session (client gone, drain): ``Session.close()``."""


Step = Msg | RawText | Bytes | Frames | CoreAudio | CoreCommand | Tick | Answer | Hangup


@dataclasses.dataclass(frozen=True)
class Case:
    target: str
    setup: dict[str, Any]
    steps: tuple[Step, ...]
    max_utterance_s: float = 6.0
    latencies: tuple[int, ...] = (3,)
    # SessionLimits.final_context_lag: the file path's held finals (4), or live's none (0).
    final_context_lag: int = 0


# ============================================================================================
# Strategies
# ============================================================================================

UNICODE_SAMPLES = ("", " ", "é", "日本語", "\u200b", "\U0001f600", "\x00", "a\nb", "\\", '"', "\ud7ff", "\ufeff", "𝔘𝔫𝔦")
HUGE_NUMBERS = (
    "1" * 4300, "1" * 4301, "9" * 5000, "-" + "7" * 20000, "1e400", "-1e400", "1" + "0" * 400, "1.5e-400",
    "NaN", "Infinity", "-Infinity", "-0", "-0.0", "0e0", "123456789012345678901234567890.5",
    str(2**63), str(2**64), str(-(2**63) - 1), "1E+308", "4.9e-324",
)


def deep_text(depth: int, opener: str) -> str:
    closer = {"[": "]", '{"a":': "}"}[opener]
    inner = "0" if opener != "[" else ""
    return opener * depth + inner + closer * depth


raws = st.one_of(
    st.sampled_from(HUGE_NUMBERS).map(Raw),
    st.builds(deep_text, st.one_of(st.integers(1, 3000), st.sampled_from([900, 990, 1000, 1100, 5000, 100_000])),
              st.sampled_from(["[", '{"a":'])).map(Raw),
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.sampled_from(UNICODE_SAMPLES),
)
json_values = st.recursive(
    st.one_of(scalars, raws),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=12), kids, max_size=4),
    max_leaves=12,
)


def dumps(value: Any) -> str:
    """JSON text of ``value``; :class:`Raw` goes in verbatim, NaN/Infinity as Python writes them."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(json.dumps(str(k)) + ":" + dumps(v) for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, Auto):  # unresolved (not expected): as a string
        return json.dumps(value.name)
    return json.dumps(value)


def _paths(value: Any, depth: int = 0) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every member of nested dicts/lists."""
    if depth > 8:
        return
    if isinstance(value, dict):
        for key in list(value):
            yield value, key
            yield from _paths(value[key], depth + 1)
    elif isinstance(value, list):
        for index in range(len(value)):
            yield value, index
            yield from _paths(value[index], depth + 1)


ALL_TYPE_NAMES = (
    "session.update", "transcription_session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
    "input_audio_buffer.clear", "session.close", "KeepAlive", "Finalize", "CloseStream", "Configure",
    "connected", "start", "media", "dtmf", "mark", "stop", "open", "close", "ping", "paused", "resumed",
    "discarded", "update", "error", "", "SESSION.UPDATE",
)


@st.composite
def mutated(draw: st.DrawFn, template: st.SearchStrategy[Any], max_mutations: int = 3) -> Any:
    """A real message with a few fields deleted, replaced by arbitrary JSON, added, or retyped."""
    value = copy.deepcopy(draw(template))  # never mutate a shared template (st.just)
    counts = [n for n in (0, 0, 0, 0, 0, 0, 1, 1, 2, 3) if n <= max_mutations]  # most messages stay real
    for _ in range(draw(st.sampled_from(counts))):
        paths = list(_paths(value))
        op = draw(st.sampled_from(["delete", "replace", "replace", "add", "retype"]))
        if op == "add" or not paths:
            holders = [value] + [c[k] for c, k in paths if isinstance(c[k], dict)]
            holder = draw(st.sampled_from(holders)) if isinstance(value, dict) else None
            if isinstance(holder, dict):
                holder[draw(st.text(max_size=12))] = draw(json_values)
            continue
        container, key = draw(st.sampled_from(paths))
        if op == "delete":
            del container[key]
        elif op == "retype":
            container[key] = draw(st.sampled_from(ALL_TYPE_NAMES))
        else:
            container[key] = draw(json_values)
    return value


def message_step(template: st.SearchStrategy[Any], max_mutations: int = 3) -> st.SearchStrategy[Msg]:
    cut = st.sampled_from([None] * 7 + [0]).flatmap(lambda c: st.none() if c is None else st.integers(0, 200))
    return st.builds(Msg, mutated(template, max_mutations), cut)


audio_specs = st.builds(
    AudioSpec,
    words=st.lists(st.integers(0, 12), max_size=4).map(tuple),
    gap_ms=st.integers(0, 400),
    tail_ms=st.sampled_from([0, 20, 100, 300, 700, 1200]) | st.integers(0, 1500),
    noise=st.booleans(),
    cuts=st.lists(st.floats(0, 1), max_size=4).map(lambda xs: tuple(sorted(xs))),
    channel_mask=st.integers(0, 3),
    aligned=st.sampled_from([True, True, True, False]),
)
small_specs = st.builds(AudioSpec, words=st.lists(st.integers(0, 6), max_size=1).map(tuple), gap_ms=st.just(0),
                        tail_ms=st.sampled_from([0, 20, 40, 200]), noise=st.booleans())

decoder_steps = st.one_of(
    st.builds(Tick, st.integers(1, 12)),
    st.builds(Answer, st.integers(0, 8), st.sampled_from(["result", "result", "empty", "dropped", "model_unavailable", "decode_failed"])),
)
garbage_text = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    json_values.map(dumps),
    raws.map(lambda r: r.text),
)

# ---- native ---------------------------------------------------------------------------------

NATIVE_SESSION_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "input_audio_format": st.sampled_from(["pcm16", "float32", "g711_ulaw", "g711_alaw", "opus"]),
    "sample_rate": st.sampled_from([8000, 16000, 22050, 24000, 44100, 48000]) | st.integers(-10, 100_000),
    "language": st.sampled_from([None, "en", "en-US", "pt_BR", "de", "", "xx-yy-zz", "english"]),
    "prompt": st.text(max_size=40) | st.just("x" * 1001),
    "model": st.sampled_from(["tiny.en", "base", "large-v9", ""]),
    "turn_detection": st.none() | st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(["server_vad", "semantic_vad"]),
        "threshold": st.floats(0, 1) | st.integers(0, 1),
        "prefix_padding_ms": st.integers(0, 5000),
        "silence_duration_ms": st.sampled_from([0, 100, 200, 500, 5000]) | st.integers(0, 5000),
    }),
    "include": st.lists(st.sampled_from(["logprobs", "words"]), max_size=2),
    "interim_results": st.booleans(),
    "channels": st.integers(1, 3),
    "channel_labels": st.none() | st.lists(st.sampled_from(["agent", "customer", "x" * 65, ""]), max_size=3),
    "redact": st.lists(st.sampled_from(["pci", "ssn", "numbers", "cvv", "pii", ""]), max_size=3) | st.sampled_from(["pci", None]),
}
native_session_fields = st.fixed_dictionaries({}, optional=NATIVE_SESSION_FIELDS)


@st.composite
def native_message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(p.CLIENT_MESSAGE_TYPES))
    message: dict[str, Any] = {"type": kind}
    if kind == "session.update":
        message["session"] = draw(native_session_fields)
    elif kind == "input_audio_buffer.append":
        message["audio"] = Auto("b64", draw(audio_specs))
    return message


# ---- OpenAI Realtime ------------------------------------------------------------------------

openai_turn_detection = st.none() | st.fixed_dictionaries({"type": st.sampled_from(["server_vad", "semantic_vad"])}, optional={
    "threshold": st.floats(0, 1),
    "prefix_padding_ms": st.integers(0, 5000),
    "silence_duration_ms": st.integers(0, 5000),
    "eagerness": st.sampled_from(["low", "medium", "high", "auto"]),
    "create_response": st.booleans(),
    "idle_timeout_ms": st.none() | st.integers(0, 100_000),
})
openai_transcription = st.none() | st.fixed_dictionaries({}, optional={
    "model": st.sampled_from(["gpt-4o-transcribe", "whisper-1", "tiny.en", "base", None]),
    "language": st.sampled_from(["en", "de", "en-US", "", None, "klingon"]),
    "prompt": st.text(max_size=30),
    "keywords": st.lists(st.text(max_size=10), max_size=3),
    "delay": st.sampled_from(["minimal", "low", "high"]),
})
openai_noise = st.none() | st.fixed_dictionaries({}, optional={"type": st.sampled_from(["near_field", "far_field"]),
                                                                "strength": st.floats(0, 10)})
openai_ga_session = st.fixed_dictionaries({"type": st.just("transcription")}, optional={
    "audio": st.fixed_dictionaries({"input": st.fixed_dictionaries({}, optional={
        "format": st.fixed_dictionaries({"type": st.sampled_from(["audio/pcm", "audio/pcmu", "audio/pcma"])},
                                        optional={"rate": st.just(24000)}),
        "transcription": openai_transcription,
        "turn_detection": openai_turn_detection,
        "noise_reduction": openai_noise,
    })}),
    "include": st.lists(st.just(openai_realtime.LOGPROBS_INCLUDE), max_size=1),
})
openai_beta_session = st.fixed_dictionaries({}, optional={
    "input_audio_format": st.sampled_from(["pcm16", "g711_ulaw", "g711_alaw"]),
    "input_audio_transcription": openai_transcription,
    "turn_detection": openai_turn_detection,
    "input_audio_noise_reduction": openai_noise,
    "include": st.none() | st.lists(st.just(openai_realtime.LOGPROBS_INCLUDE), max_size=1),
})


@st.composite
def openai_message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(openai_realtime.CLIENT_EVENT_TYPES))
    message: dict[str, Any] = {"type": kind}
    if draw(st.booleans()):
        message["event_id"] = draw(st.sampled_from(["event_1", "e", ""]))
    if kind == "session.update":
        message["session"] = draw(openai_ga_session)
    elif kind == "transcription_session.update":
        message["session"] = draw(openai_beta_session)
    elif kind == "input_audio_buffer.append":
        message["audio"] = Auto("b64", draw(audio_specs))
    return message


# ---- Deepgram -------------------------------------------------------------------------------

deepgram_query = st.fixed_dictionaries({}, optional={
    "encoding": st.sampled_from(["linear16", "linear16", "mulaw", "alaw", "opus", "LINEAR16", "mp3"]),
    "sample_rate": st.sampled_from(["8000", "16000", "44100", "48000", "7999", "x", " 16000 "]),
    "channels": st.sampled_from(["1", "2", "3", "9", "0"]),
    "multichannel": st.sampled_from(["true", "false", "True", "yes"]),
    "interim_results": st.sampled_from(["true", "false"]),
    "endpointing": st.sampled_from(["false", "true", "10", "300", "5001", "-1"]),
    "utterance_end_ms": st.sampled_from(["1000", "0", "60001", "abc"]),
    "vad_events": st.sampled_from(["true", "false"]),
    "punctuate": st.sampled_from(["true", "false"]),
    "smart_format": st.sampled_from(["true", "false"]),
    "language": st.sampled_from(["en", "multi", "en-US", "xx-yy-zz", ""]),
    "model": st.sampled_from(["nova-3", "tiny.en", "base", "mystery", ""]),
    "keyterm": st.text(max_size=20),
    "redact": st.sampled_from(["pci", "true", "false", "pci,ssn", "pii", "aggressive_numbers", ""]),
}) | st.dictionaries(st.sampled_from(["encoding", "sample_rate", "channels", "endpointing", "model", "language"]), st.text(max_size=12))


@st.composite
def deepgram_message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["KeepAlive", "Finalize", "CloseStream", "Configure"]))
    message: dict[str, Any] = {"type": kind}
    if kind == "Configure":
        if draw(st.booleans()):
            message["features"] = draw(st.dictionaries(st.sampled_from(["punctuate", "smart_format", "diarize"]), st.booleans(), max_size=2))
        if draw(st.booleans()):
            message["keyterms"] = draw(st.lists(st.text(max_size=20), max_size=4))
    return message


# ---- Deepgram Flux --------------------------------------------------------------------------

flux_query = st.fixed_dictionaries({}, optional={
    "encoding": st.sampled_from(["linear16", "mulaw", "opus", "flac", "LINEAR16"]),
    "sample_rate": st.sampled_from(["8000", "16000", "x", "16000.5"]),
    "eot_threshold": st.sampled_from(["0.5", "0.7", "1.0", "0.2", "nan", "x"]),
    "eager_eot_threshold": st.sampled_from(["0.3", "0.5", "0.95", ""]),
    "eot_timeout_ms": st.sampled_from(["500", "5000", "60000", "100", "1e9"]),
    "model": st.sampled_from(["flux-general-en", "flux-general-multi", "base", "nova-3", ""]),
    "language_hint": st.sampled_from(["de", "xx-yy-zz", ""]),
    "keyterm": st.text(max_size=20),
    "redact": st.sampled_from(["numbers", "aggressive_numbers", "phi"]),
})


@st.composite
def flux_message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["CloseStream", "ForceEndTurn", "ForceEndTurn", "Configure", "KeepAlive"]))
    message: dict[str, Any] = {"type": kind}
    if kind == "Configure":
        if draw(st.booleans()):
            message["thresholds"] = draw(st.dictionaries(
                st.sampled_from(["eot_threshold", "eager_eot_threshold", "eot_timeout_ms", "other"]),
                st.one_of(st.floats(allow_nan=True), st.integers(-10, 70000), st.booleans(), st.text(max_size=4)), max_size=3))
        if draw(st.booleans()):
            message["keyterms"] = draw(st.one_of(st.lists(st.text(max_size=20), max_size=4), st.text(max_size=10), st.integers()))
    return message


def wav_header(fmt_tag: int, channels: int, rate: int, bits: int, data_size: int, extra: bytes) -> bytes:
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    return b"RIFF" + struct.pack("<I", (36 + data_size) & 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + extra + b"data" + struct.pack("<I", data_size)


wav_headers = st.builds(
    wav_header,
    st.sampled_from([1, 1, 3, 6, 7, 2, 0xFFFE]),
    st.sampled_from([1, 1, 2, 0, 9]),
    st.sampled_from([8000, 16000, 44100, 48000, 1]),
    st.sampled_from([16, 16, 32, 8, 24]),
    st.sampled_from([0, 0xFFFFFFFF, 1000]),
    st.sampled_from([b"", b"LIST\x04\x00\x00\x00abcd", b"junk\xff\xff\xff\x7f"]),
)



@functools.cache
def compressed_clips() -> dict[str, bytes]:
    """Half a second of tone words in the compressed formats Deepgram clients stream without an
    encoding (made once per process with PyAV)."""
    import av

    from stream_server.bench.tone_models import speech

    samples = (np.clip(speech([1, 2], seconds=0.2), -1, 1) * 32767).astype(np.int16)[None, :]
    clips = {}
    for name, codec, container, rate in [("webm", "libopus", "webm", 48000), ("ogg", "libopus", "ogg", 48000),
                                         ("mp3", "libmp3lame", "mp3", 44100), ("flac", "flac", "flac", 16000)]:
        buffer = io.BytesIO()
        with av.open(buffer, "w", format=container) as out:
            stream = out.add_stream(codec, rate=rate)
            assert isinstance(stream, av.audio.stream.AudioStream)
            stream.layout = "mono"
            frame = av.AudioFrame.from_ndarray(samples, format="s16", layout="mono")
            frame.sample_rate = 16000
            resampler = av.AudioResampler(format=stream.codec_context.format.name, layout="mono", rate=rate)
            for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
                out.mux(stream.encode(chunk))
            out.mux(stream.encode(None))
        clips[name] = buffer.getvalue()
    return clips


@st.composite
def compressed_opening(draw: st.DrawFn) -> list[Step]:
    """A compressed stream in pieces, now and then cut short, with bytes flipped or spliced in."""
    data = bytearray(compressed_clips()[draw(st.sampled_from(["webm", "ogg", "mp3", "flac"]))])
    for _ in range(draw(st.integers(0, 3))):
        position = draw(st.integers(0, len(data) - 1))
        data[position : position + 1] = draw(st.binary(min_size=0, max_size=8))
    data = data[: draw(st.integers(1, len(data)))] if draw(st.integers(0, 3)) == 0 else data
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return [Bytes(bytes(data[a:b])) for a, b in itertools.pairwise([0, *cuts, len(data)]) if b > a]


# ---- Twilio ---------------------------------------------------------------------------------

TWILIO_MEDIA_FORMAT = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}
#: Strings that look like numbers to ``str.isdigit`` or a glance but not to ``int()`` (or only
#: at great cost): Twilio sends its numbers as strings, and each once raised out of the dialect.
ODD_NUMBERS = st.sampled_from(["9" * 5000, "²", "１２", " 7", "1e3", "-0", "0x10", "٣"])


@st.composite
def twilio_start(draw: st.DrawFn) -> dict[str, Any]:
    parameters = draw(st.fixed_dictionaries({}, optional={
        "api_key": st.sampled_from(["k1", "k1", "k1", "wrong"]),
        "language": st.sampled_from(["en", "en-GB", "xx-yy-zz", ""]),
        "model": st.sampled_from(["tiny.en", "base", "nope"]),
        "inbound_label": st.sampled_from(["agent", "", "x" * 70]),
        "outbound_label": st.sampled_from(["customer", " "]),
        "silence_duration_ms": st.sampled_from(["300", "800", "0", "-1", "abc", ""]) | ODD_NUMBERS,
        "redact": st.sampled_from(["pci", "pci,ssn", "PCI", "", "pii"]),
    }))
    tracks = draw(st.sampled_from([["inbound"], ["inbound", "outbound"], ["inbound", "outbound"], ["outbound"], ["both_tracks"], []]))
    start = {"accountSid": "AC" + "3d" * 16, "streamSid": "MZ" + "2e" * 16, "callSid": "CA" + "1f" * 16,
             "tracks": tracks, "mediaFormat": dict(TWILIO_MEDIA_FORMAT), "customParameters": parameters}
    return {"event": "start", "sequenceNumber": Auto("seqno"), "start": start, "streamSid": "MZ" + "2e" * 16}


@st.composite
def twilio_message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["media"] * 12 + ["dtmf", "mark", "stop", "connected", "start"]))
    if kind == "start":
        return draw(twilio_start())
    if kind == "connected":
        return {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    message: dict[str, Any] = {"event": kind, "sequenceNumber": Auto("seqno"), "streamSid": "MZ" + "2e" * 16}
    if kind == "media":
        track = draw(st.sampled_from(["inbound", "inbound", "outbound", "both"]))
        message["media"] = {"track": track, "chunk": Auto("chunk", track), "timestamp": Auto("timestamp", track),
                            "payload": Auto("ulaw_b64", draw(audio_specs | small_specs))}
        if draw(st.integers(0, 15)) == 0:  # now and then one number is odd
            field = draw(st.sampled_from(["sequenceNumber", "chunk", "timestamp"]))
            (message if field == "sequenceNumber" else message["media"])[field] = draw(ODD_NUMBERS)
    elif kind == "dtmf":
        message["dtmf"] = {"track": "inbound_track", "digit": draw(st.sampled_from(["1", "#", "*"]))}
    elif kind == "mark":
        message["mark"] = {"name": draw(st.text(max_size=10))}
    elif kind == "stop":
        message["stop"] = {"accountSid": "AC" + "3d" * 16, "callSid": "CA" + "1f" * 16}
    return message


# ---- AudioHook ------------------------------------------------------------------------------

durations = st.one_of(
    st.floats(0, 120).map(lambda s: f"PT{s:.3f}S"),
    st.integers(0, 200).map(lambda s: f"PT{s}S"),
    st.sampled_from(["PT0S", "PT1H2M3.5S", "PT", "P1D", "PT-1S", "PT1e3S", "PT" + "9" * 30 + "S", "PT" + "9" * 400 + "S",
                     "PT" + "9" * 5000 + "H", "PT" + "9" * 5000 + "S", "PT99999999999999999999M"]),
)


def audiohook_envelope(kind: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"version": "2", "id": Auto("ah_id"), "type": kind, "seq": Auto("ah_seq"), "serverseq": Auto("ah_serverseq"),
            "position": Auto("ah_position"), "parameters": parameters}


@st.composite
def audiohook_open(draw: st.DrawFn) -> dict[str, Any]:
    valid = {"type": "audio", "format": draw(st.sampled_from(["PCMU", "L16"])), "channels": draw(st.sampled_from([["external", "internal"], ["external"]])), "rate": 8000}
    media = [valid] * draw(st.sampled_from([0, 1, 1, 1])) + draw(st.lists(st.fixed_dictionaries({
        "type": st.just("audio"),
        "format": st.sampled_from(["PCMU", "L16", "opus"]),
        "channels": st.sampled_from([["external", "internal"], ["external"], ["internal"], ["external", "external"], []]),
        "rate": st.sampled_from([8000, 8000, 16000]),
    }), max_size=2))
    parameters: dict[str, Any] = {
        "organizationId": "d7934305-0972-4844-938e-9060eef73d05",
        "conversationId": "090eaa2f-72fa-480a-83e0-8667ff89c0ec",
        "participant": {"id": "883efee8-3d6c-4537-b500-6d7ca4b92fa0", "ani": "+1-555-555-1234", "aniName": "John Doe", "dnis": "+1-800-555-6789"},
        "media": media,
    }
    if draw(st.booleans()):
        parameters["language"] = draw(st.sampled_from(["en-US", "de-DE", "xx", "en"]))
    if draw(st.booleans()):
        parameters["customConfig"] = draw(st.fixed_dictionaries({"interimResults": st.booleans()}, optional={
            "redact": st.sampled_from([["pci"], "pci, ssn", ["pii"], 3, []]),
        }))
    if draw(st.booleans()):
        parameters["supportedLanguages"] = True
    return audiohook_envelope("open", parameters)


@st.composite
def audiohook_message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["ping", "ping", "paused", "resumed", "resumed", "discarded", "discarded", "update", "error", "close", "open"]))
    if kind == "open":
        return draw(audiohook_open())
    parameters: dict[str, Any] = {}
    if kind == "ping":
        parameters = {"rtt": draw(durations)} if draw(st.booleans()) else {}
    elif kind in ("resumed", "discarded"):
        parameters = {"start": Auto("ah_position"), "discarded": draw(durations)}
    elif kind == "update":
        parameters = {"language": draw(st.sampled_from(["en-US", "fr-FR", "", "en"]))}
    elif kind == "error":
        parameters = {"code": 500, "message": draw(st.text(max_size=30))}
    elif kind == "close":
        parameters = {"reason": draw(st.sampled_from(["end", "disconnect", "error"]))}
    return audiohook_envelope(kind, parameters)


# ---- cases ----------------------------------------------------------------------------------

PROTOCOL_MESSAGES: dict[str, st.SearchStrategy[Any]] = {
    "native": native_message(),
    "openai": openai_message(),
    "deepgram": deepgram_message(),
    "flux": flux_message(),
    "twilio": twilio_message(),
    "audiohook": audiohook_message(),
}
#: Each dialect's step mix (kind: weight); protocol messages dominate so programs go deep.
STEP_WEIGHTS = {"message": 12, "frames": 4, "bytes": 2, "text": 2, "decoder": 5, "hangup": 1}
#: Twilio carries its audio in JSON messages: binary frames are only noise there.
TWILIO_WEIGHTS = {"message": 18, "frames": 1, "bytes": 1, "text": 2, "decoder": 5, "hangup": 1}


def weighted(by_kind: dict[str, st.SearchStrategy[Any]], weights: dict[str, int]) -> st.SearchStrategy[Any]:
    kinds = [kind for kind, weight in weights.items() for _ in range(weight)]
    return st.sampled_from(kinds).flatmap(lambda kind: by_kind[kind])


def dialect_steps(dialect: str) -> st.SearchStrategy[Step]:
    by_kind: dict[str, st.SearchStrategy[Step]] = {
        "message": message_step(PROTOCOL_MESSAGES[dialect]),
        "frames": st.builds(Frames, audio_specs),
        "bytes": st.builds(Bytes, st.binary(max_size=600)),
        "text": st.builds(RawText, garbage_text),
        "decoder": decoder_steps,
        "hangup": st.just(Hangup()),
    }
    return weighted(by_kind, TWILIO_WEIGHTS if dialect == "twilio" else STEP_WEIGHTS)


@st.composite
def dialect_setup(draw: st.DrawFn, dialect: str) -> dict[str, Any]:
    if dialect == "openai":
        return {"beta": draw(st.booleans()), "model": draw(st.sampled_from([None, "gpt-4o-transcribe", "base"]))}
    if dialect == "deepgram":
        raw_wav = draw(st.booleans())
        query = {} if raw_wav else {"encoding": "linear16", "sample_rate": draw(st.sampled_from(["8000", "16000", "48000"]))}
        if draw(st.integers(0, 2)) == 0:
            query.update(draw(deepgram_query))
        return {"query": query}
    if dialect == "flux":
        raw = draw(st.booleans())
        query = {"model": "flux-general-en", **({"encoding": "linear16", "sample_rate": "16000"} if raw else {})}
        if draw(st.integers(0, 2)) == 0:
            query.update(draw(flux_query))
        return {"query": query}
    if dialect == "twilio":
        return {"api_keys": draw(st.sampled_from([(), (), (), ("k1",)]))}
    if dialect == "audiohook":
        return {"organization_id": draw(st.sampled_from([None, "d7934305-0972-4844-938e-9060eef73d05", "other"]))}
    return {}


TWILIO_CONNECTED = message_step(st.just({"event": "connected", "protocol": "Call", "version": "1.0.0"}), 1)
TWILIO_START = message_step(twilio_start(), 1)
AUDIOHOOK_OPEN = message_step(audiohook_open(), 1)
FIRST_UPDATE = {
    "native": message_step(native_message().filter(lambda m: m["type"] == "session.update"), 1),
    "openai": message_step(openai_message().filter(lambda m: "update" in m["type"]), 1),
}


@st.composite
def opening(draw: st.DrawFn, dialect: str, setup: dict[str, Any]) -> list[Step]:
    """The messages a real client starts with (mutated now and then), so programs reach the
    protocol's later states."""
    if dialect == "twilio":
        steps: list[Step] = [draw(TWILIO_CONNECTED)] if draw(st.booleans()) else []
        return [*steps, draw(TWILIO_START)]
    if dialect == "audiohook":
        return [draw(AUDIOHOOK_OPEN)]
    if dialect in ("deepgram", "flux") and ("encoding" not in setup["query"] or setup["query"]["encoding"] == "opus"):
        if draw(st.booleans()):
            return draw(compressed_opening())
        header = draw(wav_headers)
        if draw(st.integers(0, 3)) == 0:
            header = header[: draw(st.integers(0, len(header)))]
        return [Bytes(header)]
    if dialect in FIRST_UPDATE and draw(st.booleans()):
        return [draw(FIRST_UPDATE[dialect])]
    return []


@st.composite
def dialect_cases(draw: st.DrawFn, dialect: str, max_steps: int = 24) -> Case:
    setup = draw(dialect_setup(dialect))
    steps = draw(opening(dialect, setup)) if draw(st.integers(0, 4)) else []
    steps += draw(st.lists(DIALECT_STEPS[dialect], min_size=3, max_size=max_steps))
    return Case(dialect, setup, tuple(steps), draw(st.sampled_from([6.0, 15.0, 2.0])),
                tuple(draw(st.lists(st.integers(0, 10), min_size=1, max_size=4))))


core_update_fields = mutated(native_session_fields, 2)


def session_steps() -> st.SearchStrategy[Step]:
    by_kind: dict[str, st.SearchStrategy[Step]] = {
        "audio": st.builds(CoreAudio, audio_specs, st.none() | st.none() | st.integers(-1, 3)),
        "frames": st.builds(Frames, audio_specs),
        "update": st.builds(CoreCommand, st.just("update"), core_update_fields),
        "command": st.builds(CoreCommand, st.sampled_from(["commit", "commit", "clear", "close"])),
        "text": message_step(native_message()),
        "bytes": st.builds(Bytes, st.binary(max_size=300)),
        "decoder": decoder_steps,
        "hangup": st.just(Hangup()),
    }
    weights = {"audio": 10, "frames": 3, "update": 3, "command": 5, "text": 3, "bytes": 1, "decoder": 9, "hangup": 1}
    return weighted(by_kind, weights)


@st.composite
def session_cases(draw: st.DrawFn, max_steps: int = 30) -> Case:
    setup = {"config": draw(native_session_fields)}
    steps = draw(st.lists(SESSION_STEPS, min_size=3, max_size=max_steps))
    return Case("session", setup, tuple(steps), draw(st.sampled_from([6.0, 15.0, 2.0])),
                tuple(draw(st.lists(st.integers(0, 10), min_size=1, max_size=4))), draw(st.sampled_from([0, 0, 1, 4])))


DIALECT_STEPS = {dialect: dialect_steps(dialect) for dialect in DIALECTS}
SESSION_STEPS = session_steps()
CASES: dict[str, st.SearchStrategy[Case]] = {target: session_cases() if target == "session" else dialect_cases(target) for target in TARGETS}


def cases_for(target: str) -> st.SearchStrategy[Case]:
    return CASES[target]


all_cases = st.sampled_from(TARGETS).flatmap(cases_for)  # every target equally often


# ============================================================================================
# Audio synthesis in the connection's format
# ============================================================================================


def synthesize(spec: AudioSpec, rate: int) -> np.ndarray:
    """Mono float32 at ``rate``: burst ``k`` is a 220 Hz tone with RMS ``word_amplitude(k)``."""
    parts: list[np.ndarray] = []
    burst_t = np.arange(int(0.25 * rate)) / rate
    for i, k in enumerate(spec.words):
        if i:
            parts.append(np.zeros(int(spec.gap_ms * rate / 1000), np.float32))
        parts.append((word_amplitude(k) * np.sqrt(2) * np.sin(2 * np.pi * 220 * burst_t)).astype(np.float32))
    tail = int(spec.tail_ms * rate / 1000)
    if spec.noise:
        parts.append((np.random.default_rng(len(spec.words) + tail).standard_normal(tail) * 0.003).astype(np.float32))
    else:
        parts.append(np.zeros(tail, np.float32))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


@dataclasses.dataclass(frozen=True)
class AudioShape:
    format: str  # native input_audio_format
    rate: int
    channels: int


def encode(spec: AudioSpec, shape: AudioShape) -> bytes:
    mono = synthesize(spec, max(1, shape.rate))
    columns = [mono if spec.channel_mask & (1 << c) or (c == 0 and shape.channels == 1) else np.zeros_like(mono) for c in range(shape.channels)]
    samples = np.stack(columns, axis=1).reshape(-1) if shape.channels > 1 else mono
    if shape.format == "float32":
        return samples.astype("<f4").tobytes()
    if shape.format in ("g711_ulaw", "g711_alaw"):
        return _g711(samples, "ulaw" if shape.format == "g711_ulaw" else "alaw")
    return bytes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


_G711_ORDER: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _g711(samples: np.ndarray, law: str) -> bytes:
    if law not in _G711_ORDER:
        table = g711_table("ulaw" if law == "ulaw" else "alaw")
        order = np.argsort(table, kind="stable")
        _G711_ORDER[law] = (order, table[order])
    order, values = _G711_ORDER[law]
    index = np.clip(np.searchsorted(values, samples), 1, len(values) - 1)
    nearer_left = np.abs(samples - values[index - 1]) <= np.abs(values[index] - samples)
    return bytes(order[np.where(nearer_left, index - 1, index)].astype(np.uint8).tobytes())


def split(data: bytes, spec: AudioSpec, shape: AudioShape) -> list[bytes]:
    unit = SAMPLE_WIDTH[shape.format] * shape.channels if spec.aligned else 1
    points = sorted({int(c * len(data)) // unit * unit for c in spec.cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [data]


# ============================================================================================
# The rig: a dialect in front of a real core session, as ws.py wires them
# ============================================================================================


class Finding(Exception):
    """A property violated (not a crash): recorded with its kind."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class LogCounter(logging.Handler):
    """Counts records of ``stream_server`` loggers and formats each (a format error is a finding)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.count = 0
        self.format_errors: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1
        try:
            record.getMessage()
        except Exception as exc:  # noqa: BLE001 - a log call whose arguments cannot be formatted
            self.format_errors.append(f"{type(exc).__name__} formatting {record.msg!r}")


_LOG = LogCounter()


@contextlib.contextmanager
def capture_logs() -> Iterator[LogCounter]:
    """Every ``stream_server`` log record is counted (and kept off the console) meanwhile."""
    logger = logging.getLogger("stream_server")
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logger.addHandler(_LOG)
    try:
        yield _LOG
    finally:
        logger.removeHandler(_LOG)
        logger.setLevel(level)
        logger.propagate = propagate


class Rig:
    """One connection: ``dialect`` (None: commands go straight to the core) and its session."""

    def __init__(self, case: Case) -> None:
        self.case = case
        self.target = case.target
        self.sent_kinds: list[str] = []  # kinds of what the dialect sent for the current input
        self.core_errors: list[str] = []  # codes of the core's error events
        self.dialect: Dialect | None = None
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.inputs = 0
        limits = SessionLimits(max_utterance_s=case.max_utterance_s, final_context_lag=case.final_context_lag)
        base = p.SessionConfig.model_validate({"model": "tiny.en"})
        if case.target == "session":
            try:
                config = base.updated(case.setup.get("config", {}))
            except p.ProtocolError:
                config = base
        else:
            self.dialect = make_dialect(case.target, case.setup)
            config = base.updated(self.dialect.initial_config())
        self.session = Session(SESSION_ID, config=config, vad=EnergyVad(), limits=limits, model_exists=lambda name: name in KNOWN_MODELS)
        self.decoder = BurstDecoder()
        self.clock = 0
        self.submitted = 0
        self.inflight: list[tuple[int, DecodeTicket]] = []
        self.closes: list[Close] = []
        self.core_closed: int | None = None
        self.hung_up = False
        # Invariant state, from the core's events.
        self.deltas: dict[int, str] = collections.defaultdict(str)
        self.last_serial: dict[int, int] = {}
        self.segmented: set[str] = set()
        self.done: list[p.TranscriptDone] = []
        self.session.start()
        self.pump()

    # ------------------------------------------------------------ wiring

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self.check_send(action.message)
            elif isinstance(action, Close):
                self.closes.append(action)
            else:
                self.session.receive_message(action)
                self.pump()

    def pump(self) -> None:
        for ticket in self.session.decodes_to_submit():
            if not len(ticket.request.audio):
                raise Finding("empty decode audio", f"{'final' if ticket.final else 'interim'} request with no samples")
            latency = self.case.latencies[self.submitted % len(self.case.latencies)]
            self.submitted += 1
            self.inflight.append((self.clock + latency, ticket))
        self.session.decodes_to_promote()
        for event in self.session.events_to_send():
            self.check_event(event)
            if self.dialect is not None:
                self.apply(self.dialect.render(event))
        close = self.session.close_expected()
        if close is not None:
            if self.core_closed is not None:
                raise Finding("second close", f"core asked to close twice ({self.core_closed}, {close.code})")
            self.core_closed = close.code
        for index, ch in enumerate(self.session._channels):
            # At the bound a turn end is deferred (the turn runs on); the turn that runs on is
            # still split once it outgrows max_utterance_s (Whisper's window; one final), and the
            # channel's open utterance becomes a final beyond that when the session closes (never
            # dropped): bound + 2 (seen by the fuzzer: 8 finals, a split, then close). The shell
            # reads no further frame of a backlogged session until a final is back (``catch_up``);
            # without that, a client far ahead of the decoder added a split final per message
            # (seed 12 of ``--fuzz 5000 --fuzz-max-s 80`` found 11).
            if len(ch.finals) > MAX_PENDING_FINALS + 2:
                raise Finding("too many pending finals", f"channel {index} holds {len(ch.finals)} > {MAX_PENDING_FINALS} + 2")

    def answer(self, ticket: DecodeTicket, outcome: str) -> None:
        if outcome == "result":
            self.session.receive_decode_result(ticket, self.decoder.decode_one(ticket.request))
        elif outcome == "empty":
            self.session.receive_decode_result(ticket, DecodeResult((), "en", 0.9, -1.0))
        else:
            kind = {"dropped": FailureKind.DROPPED, "model_unavailable": FailureKind.MODEL_UNAVAILABLE}.get(outcome, FailureKind.DECODER_ERROR)
            self.session.receive_decode_failure(ticket, DecodeFailure(kind, f"fuzz: {outcome}"))
        self.pump()

    def tick(self, n: int) -> None:
        for _ in range(n):
            self.clock += 1
            due = [item for item in self.inflight if item[0] <= self.clock]
            self.inflight = [item for item in self.inflight if item[0] > self.clock]
            for _, ticket in due:
                self.answer(ticket, "result")

    # ------------------------------------------------------------ checks

    def check_event(self, event: p.ServerEvent) -> None:
        if self.done:
            raise Finding("event after done", type(event).__name__)
        if isinstance(event, p.TranscriptDelta):
            if event.item_id in self.segmented:
                raise Finding("delta after segment", event.item_id)
            self.deltas[event.channel] += event.delta
        elif isinstance(event, p.TranscriptSegment):
            if event.item_id in self.segmented:
                raise Finding("second segment", event.item_id)
            self.segmented.add(event.item_id)
            serial = int(event.item_id.rsplit("_", 1)[1])
            last = self.last_serial.get(event.channel)
            if last is not None and serial <= last:
                raise Finding("segment out of order", f"channel {event.channel}: item {serial} after {last}")
            self.last_serial[event.channel] = serial
        elif isinstance(event, p.Error):
            self.core_errors.append(event.error.code)
        elif isinstance(event, p.TranscriptDone):
            self.done.append(event)
            for channel in event.channels:
                if channel.text != self.deltas.get(channel.channel, ""):
                    raise Finding("deltas != done", f"channel {channel.channel}: deltas {self.deltas.get(channel.channel, '')!r} done {channel.text!r}")
            if len(event.channels) == 1 and event.text != self.deltas.get(0, ""):
                raise Finding("deltas != done", f"text {event.text!r} deltas {self.deltas.get(0, '')!r}")
            extra = set(self.deltas) - {c.channel for c in event.channels}
            if any(self.deltas[c] for c in extra):
                raise Finding("deltas != done", f"deltas on channels {sorted(extra)} missing from done")

    def check_send(self, message: str | bytes) -> None:
        if not isinstance(message, str):
            raise Finding("binary send", f"{len(message)} bytes")
        try:
            message.encode("utf-8")
        except UnicodeEncodeError:
            raise Finding("unsendable text (not UTF-8)", message[:200]) from None
        try:
            body = json.loads(message, parse_constant=_reject_constant)
        except ValueError as exc:
            raise Finding("non-standard JSON sent", f"{exc}: {message[:200]}") from None
        if not _error_shape_ok(self.target, body):
            raise Finding("malformed error message", message[:300])
        self.sent_kinds.append(_sent_kind(self.target, body))

    # ------------------------------------------------------------ steps

    def step(self, step: Step) -> None:
        if isinstance(step, Tick):
            self.tick(step.n)
        elif isinstance(step, Answer):
            if self.inflight:
                _, ticket = self.inflight.pop(step.index % len(self.inflight))
                self.answer(ticket, step.outcome)
        elif isinstance(step, Hangup):
            self.hung_up = True
            self.session.close()
            self.pump()
        elif isinstance(step, CoreAudio | CoreCommand):
            self.catch_up()
            self.core_input(step)
        elif not self.closes and self.core_closed is None:  # a closed connection reads nothing more
            for frame in self.frames(step):
                self.catch_up()
                self.client_input(frame)

    def catch_up(self) -> None:
        """The shell's flow control (``Connection._let_the_decoder_catch_up``): a backlogged
        session's next frame is read once the decoder has caught up, or after a bounded wait
        (here ``CATCH_UP_TICKS`` of the scheduler's clock, the longest latency a case draws)."""
        for _ in range(CATCH_UP_TICKS):
            if not self.session.backlogged or not self.inflight:
                return
            self.tick(1)

    def frames(self, step: Step) -> list[str | bytes]:
        if isinstance(step, Msg):
            text = dumps(self.resolve(step.value))
            return [text if step.cut is None else text[: step.cut]]
        if isinstance(step, RawText):
            return [step.text]
        if isinstance(step, Bytes):
            return [step.data]
        if isinstance(step, Frames):
            shape = self.audio_shape()
            return [*split(encode(step.spec, shape), step.spec, shape)]
        return []

    def client_input(self, frame: str | bytes) -> None:
        """One client frame through the dialect (or the core's own parser), classified."""
        self.inputs += 1
        logged_before = _LOG.count
        self.sent_kinds = []
        closes_before = len(self.closes)
        errors_before = len(self.core_errors)
        if self.dialect is None:
            if isinstance(frame, bytes):
                self.session.receive_bytes(frame)
            else:
                self.session.receive_text(frame)
            self.pump()
            self.outcomes[f"session:{self.core_outcome(errors_before)}"] += 1
            return
        state_before = self.dialect_state()
        actions = self.dialect.receive_bytes(frame) if isinstance(frame, bytes) else self.dialect.receive_text(frame)
        self.apply(actions)
        self.outcomes[f"{self.target}:{self.classify(frame, actions, state_before, closes_before, logged_before)}"] += 1

    def core_input(self, step: CoreAudio | CoreCommand) -> None:
        self.inputs += 1
        errors_before = len(self.core_errors)
        message: p.ClientMessage
        if isinstance(step, CoreAudio):
            shape = self.audio_shape()
            if step.channel is not None:
                shape = dataclasses.replace(shape, channels=1)
            message = p.AudioAppend(encode(step.spec, shape), channel=step.channel)
        elif step.kind == "update":
            fields = self.resolve(step.fields)
            message = p.SessionUpdate(fields if isinstance(fields, dict) else {"x": fields})
        elif step.kind == "commit":
            message = p.BufferCommit()
        elif step.kind == "clear":
            message = p.BufferClear()
        else:
            message = p.SessionClose()
        self.session.receive_message(message)
        self.pump()
        self.outcomes[f"session:{self.core_outcome(errors_before)}"] += 1

    def core_outcome(self, errors_before: int) -> str:
        if len(self.core_errors) > errors_before:
            return f"error {self.core_errors[-1]}"
        return "accepted"

    def finish(self) -> None:
        """Flush as the shell does, answer every decode, then check that the session closed once."""
        if not self.session.closing:
            self.session.close()
            self.pump()
        for _ in range(SETTLE_LIMIT):
            if not self.inflight:
                break
            self.clock = max(self.clock, min(due for due, _ in self.inflight) - 1)
            self.tick(1)
        else:
            raise Finding("session never settles", f"{len(self.inflight)} decodes still in flight after {SETTLE_LIMIT} answers")
        if not self.session.closed:
            pending = [(t.channel, t.state.name) for t in self.session.pending_tickets()]
            raise Finding("no close after close()", f"state {self.session.state.name}, pending tickets {pending}")
        if len(self.done) != 1:
            raise Finding("done count", f"{len(self.done)} transcript.text.done events")
        if self.core_closed != 1000:
            raise Finding("close code", f"core close {self.core_closed}")

    # ------------------------------------------------------------ per-protocol details

    def audio_shape(self) -> AudioShape:
        d = self.dialect
        if isinstance(d, deepgram.DeepgramDialect | deepgram_flux.FluxDialect):
            return AudioShape(d.audio.audio_format, d.audio.rate, d.audio.audio_channels)
        if isinstance(d, audiohook.AudioHookDialect):
            if d.media is None:
                return AudioShape("g711_ulaw", 8000, 1)
            return AudioShape(d.media.input_format, 8000, len(d.media.channels))
        if isinstance(d, twilio.TwilioDialect):
            return AudioShape("g711_ulaw", 8000, 1)
        config = self.session.config
        return AudioShape(config.input_audio_format, config.sample_rate, config.channels)

    def resolve(self, value: Any) -> Any:
        if isinstance(value, Auto):
            return self.auto(value)
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        return value

    def auto(self, auto: Auto) -> Any:
        d = self.dialect
        if auto.name == "b64":
            return base64.b64encode(encode(auto.arg, self.audio_shape())).decode()
        if auto.name == "ulaw_b64":
            return base64.b64encode(encode(auto.arg, AudioShape("g711_ulaw", 8000, 1))).decode()
        if isinstance(d, twilio.TwilioDialect):
            track = d.tracks.get(auto.arg) if isinstance(auto.arg, str) else None
            if auto.name == "seqno":
                return str((d._last_sequence or 0) + 1)
            if auto.name == "chunk":
                return str(track.chunk + 1 if track else 1)
            if auto.name == "timestamp":
                return str(track.written // twilio.SAMPLES_PER_MS if track else 0)
        if isinstance(d, audiohook.AudioHookDialect):
            if auto.name == "ah_id":
                return d.session_id or AUDIOHOOK_ID
            if auto.name == "ah_seq":
                return d._clientseq + 1
            if auto.name == "ah_serverseq":
                return d._seq
            if auto.name == "ah_position":
                return audiohook.duration(d._stream_s)
        return auto.name

    def dialect_state(self) -> tuple[bool, bool]:
        d = self.dialect
        if isinstance(d, deepgram.DeepgramDialect | deepgram_flux.FluxDialect):
            return d.audio.closing, d.audio.sniffing
        return False, False

    def classify(self, frame: str | bytes, actions: list[Action], state_before: tuple[bool, bool], closes_before: int, logged_before: int) -> str:
        """The outcome class of one client frame; an undefined outcome is a finding."""
        closes = [a for a in actions if isinstance(a, Close)]
        for close in closes:
            if close.code not in DOCUMENTED_CLOSE_CODES[self.target]:
                raise Finding("undocumented close code", f"{self.target} closed with {close.code} {close.reason!r}")
        if closes:
            return f"close {closes[0].code}"
        if "error" in self.sent_kinds:
            return "error reply"
        commands = [type(a).__name__ for a in actions if not isinstance(a, Send | Close)]
        if commands:
            return f"command {commands[0]}"
        if self.sent_kinds:
            return f"reply {self.sent_kinds[0]}"
        if _LOG.count > logged_before:
            return "dropped (logged)"
        was_closing, had_header = state_before
        if isinstance(self.dialect, deepgram_flux.FluxDialect) and isinstance(frame, str) and _json_type(frame, "type") == "ForceEndTurn":
            return "ForceEndTurn with no turn open (documented)"
        if isinstance(self.dialect, deepgram.DeepgramDialect | deepgram_flux.FluxDialect):
            if was_closing:
                return "ignored after CloseStream (documented)"
            if isinstance(frame, bytes) and (had_header or self.dialect.audio.sniffing):
                return "buffered WAV header (documented)"
            if isinstance(frame, bytes) and self.dialect.audio.mixing:
                return "buffered partial frame (documented)"
            if isinstance(frame, bytes) and self.dialect.audio.decoding:
                return "buffered in the compressed stream's decoder (documented)"
            if isinstance(frame, str) and _json_type(frame, "type") == "KeepAlive":
                return "KeepAlive (documented)"
        if isinstance(self.dialect, twilio.TwilioDialect) and isinstance(frame, str) and _json_type(frame, "event") == "connected":
            return "connected (documented)"
        raise Finding("undefined outcome", f"{self.target}: no command, reply, close or log for {_show(frame)}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def _json_type(text: str, key: str) -> Any:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return value.get(key) if isinstance(value, dict) else None


def _sent_kind(target: str, body: Any) -> str:
    if not isinstance(body, dict):
        return "?"
    if target == "audiohook":
        kind = body.get("type")
        if kind == "disconnect" and isinstance(body.get("parameters"), dict) and body["parameters"].get("reason") == "error":
            return "error"
        return str(kind)
    kind = body.get("type")
    if kind in ("error", "Error", "ConfigureFailure", "Warning"):
        return "error"
    return str(kind)


def _error_shape_ok(target: str, body: Any) -> bool:
    """Whether an error message has its protocol's shape (non-errors pass)."""
    if not isinstance(body, dict):
        return False
    kind = body.get("type")
    if target in ("native", "session", "openai") and kind == "error":
        error = body.get("error")
        keys = {"type", "code", "message", "param"} | ({"event_id"} if target == "openai" else set())
        return isinstance(error, dict) and keys <= set(error) and isinstance(error.get("message"), str)
    if target == "deepgram" and kind == "Error":
        return isinstance(body.get("variant"), str) and isinstance(body.get("description"), str)
    if target == "deepgram" and kind == "ConfigureFailure":
        return isinstance(body.get("code"), str) and isinstance(body.get("description"), str)
    if target == "flux" and kind in ("Error", "Warning", "ConfigureFailure"):
        return isinstance(body.get("code"), str) and isinstance(body.get("description"), str) and isinstance(body.get("sequence_id"), int)
    if target == "audiohook":
        return {"version", "id", "type", "seq", "clientseq", "parameters"} <= set(body)
    return True


def _show(frame: str | bytes, limit: int = 160) -> str:
    text = repr(frame)
    return text if len(text) <= limit else text[:limit] + f"... ({len(frame)} {'bytes' if isinstance(frame, bytes) else 'chars'})"


def make_dialect(target: str, setup: dict[str, Any]) -> Dialect:
    if target == "native":
        return native.NativeDialect()
    if target == "openai":
        headers = {"openai-beta": "realtime=v1"} if setup.get("beta") else {}
        query = {"intent": "transcription", **({"model": setup["model"]} if setup.get("model") else {})}
        return openai_realtime.create(Handshake("/v1/realtime", query, headers, (), "tiny.en", lambda n: n in KNOWN_MODELS))
    if target == "deepgram":
        handshake = Handshake("/v1/listen", setup.get("query", {}), {}, (), "tiny.en", lambda n: n in KNOWN_MODELS)
        return deepgram.create(handshake, now=_dt.datetime(2025, 1, 1, tzinfo=_dt.UTC))
    if target == "flux":
        return deepgram_flux.create(Handshake("/v2/listen", setup.get("query", {}), {}, (), "tiny.en", lambda n: n in KNOWN_MODELS))
    if target == "twilio":
        options = twilio.TwilioOptions(api_keys=frozenset(setup.get("api_keys", ())), default_model="tiny.en",
                                       model_exists=lambda n: n in KNOWN_MODELS)
        return twilio.TwilioDialect(options)
    if target == "audiohook":
        return audiohook.AudioHookDialect(audiohook.AudioHookOptions(organization_id=setup.get("organization_id"), default_model="tiny.en"))
    raise ValueError(target)


# ============================================================================================
# Running a case
# ============================================================================================


@dataclasses.dataclass
class CaseResult:
    target: str
    inputs: int = 0
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    crash: str | None = None  # "ExcType at file:line in function: message"
    crash_trace: str = ""
    finding: str | None = None  # kind of the violated property
    finding_detail: str = ""
    rejected: str | None = None  # the handshake was refused (HTTP status): a defined outcome


def run_case(case: Case) -> CaseResult:
    """Play ``case`` through a rig; never raises."""
    with capture_logs():
        return _run_case(case)


def _run_case(case: Case) -> CaseResult:
    result = CaseResult(case.target)
    rig: Rig | None = None
    try:
        try:
            rig = Rig(case)
        except HandshakeRejected as exc:
            result.rejected = f"handshake refused {exc.status}"
            result.outcomes[f"{case.target}:handshake refused {exc.status}"] += 1
            return result
        for step in case.steps:
            rig.step(step)
        rig.finish()
        for error in _LOG.format_errors:
            raise Finding("log call cannot be formatted", error)
    except Finding as finding:
        result.finding, result.finding_detail = finding.kind, finding.detail
    except Exception as exc:  # noqa: BLE001 - a crash is what the fuzzer looks for
        frames = traceback.extract_tb(exc.__traceback__)
        where = next((f for f in reversed(frames) if "stream_server" in f.filename and "bench/fuzz" not in f.filename), frames[-1])
        result.crash = f"{type(exc).__name__} at {Path(where.filename).name}:{where.lineno} in {where.name}: {str(exc)[:160]}"
        result.crash_trace = "".join(traceback.format_exception(exc))[-4000:]
    finally:
        _LOG.format_errors.clear()
        if rig is not None:
            release = getattr(rig.dialect, "release", None)  # as the WebSocket shell does
            if release is not None:
                release()
            result.inputs = rig.inputs
            result.outcomes.update(rig.outcomes)
    return result


# ============================================================================================
# The bench mode: N cases through Hypothesis' ``given`` machinery, on every CPU
# ============================================================================================

CHUNK = 250  # cases per seeded Hypothesis run (a fresh seed each: generation restarts small)
EXAMPLE_CHARS = 3000


@dataclasses.dataclass
class Stats:
    cases: int = 0
    inputs: int = 0
    by_target: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    crashes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    findings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    def add(self, case: Case, result: CaseResult) -> None:
        self.cases += 1
        self.inputs += result.inputs
        self.by_target[case.target] += 1
        self.outcomes.update(result.outcomes)
        if result.crash is not None:
            entry = self.crashes.setdefault(result.crash, {"count": 0, "target": case.target, "example": _example(case), "trace": result.crash_trace})
            entry["count"] += 1
        if result.finding is not None:
            entry = self.findings.setdefault(result.finding, {"count": 0, "target": case.target, "detail": result.finding_detail, "example": _example(case)})
            entry["count"] += 1

    def merge(self, other: Stats) -> None:
        self.cases += other.cases
        self.inputs += other.inputs
        self.by_target.update(other.by_target)
        self.outcomes.update(other.outcomes)
        for into, source in ((self.crashes, other.crashes), (self.findings, other.findings)):
            for key, entry in source.items():
                if key in into:
                    into[key]["count"] += entry["count"]
                else:
                    into[key] = dict(entry)


def _example(case: Case) -> str:
    text = repr(case)
    return text if len(text) <= EXAMPLE_CHARS else text[:EXAMPLE_CHARS] + f"... ({len(text)} characters)"


def run_chunk(seed: int, count: int, strategy: st.SearchStrategy[Case] = all_cases) -> Stats:
    """``count`` cases drawn by Hypothesis (generation phase only, seeded), every one played."""
    stats = Stats()

    @hypothesis_seed(seed)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate], derandomize=False,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(strategy)
    def play(case: Case) -> None:
        stats.add(case, run_case(case))

    play()
    return stats


def _worker(job: tuple[int, int, int, float | None]) -> Stats:
    seed, index, count, deadline = job
    stats = Stats()
    chunk = 0
    while stats.cases < count and (deadline is None or time.time() < deadline):
        stats.merge(run_chunk(hash((seed, index, chunk)) & 0xFFFFFFFF, min(CHUNK, count - stats.cases)))
        chunk += 1
    return stats


def run_fuzz(n: int, *, seed: int = 0, workers: int | None = None, max_seconds: float | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Play ``n`` generated cases (fewer if ``max_seconds`` runs out) on ``workers`` processes."""
    workers = max(1, min(workers or os.cpu_count() or 1, n))
    started = time.time()
    deadline = None if max_seconds is None else started + max_seconds
    shares = [n // workers + (i < n % workers) for i in range(workers)]
    jobs = [(seed, i, share, deadline) for i, share in enumerate(shares)]
    log(f"[fuzz] {n} cases on {workers} process(es){'' if max_seconds is None else f', at most {max_seconds:.0f} s'} ...")
    total = Stats()
    if workers == 1:
        total.merge(_worker(jobs[0]))
    else:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for stats in pool.imap_unordered(_worker, jobs):
                total.merge(stats)
                log(f"[fuzz] a worker finished: {total.cases} cases so far, {sum(e['count'] for e in total.crashes.values())} crashes")
    elapsed = time.time() - started
    crashes = sum(e["count"] for e in total.crashes.values())
    findings = sum(e["count"] for e in total.findings.values())
    outcomes: dict[str, dict[str, int]] = collections.defaultdict(dict)
    for key, count in sorted(total.outcomes.items()):
        target, _, outcome = key.partition(":")
        outcomes[target][outcome] = count
    return {
        "schema": 1,
        "tool": "stream_server.bench --fuzz",
        "created_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "config": {"requested": n, "seed": seed, "workers": workers, "max_seconds": max_seconds, "chunk": CHUNK},
        "environment": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "cases": total.cases,
        "inputs": total.inputs,
        "elapsed_s": round(elapsed, 1),
        "cases_per_s": round(total.cases / elapsed, 1) if elapsed else None,
        "inputs_per_s": round(total.inputs / elapsed, 1) if elapsed else None,
        "crashes": crashes,
        "findings": findings,
        "cases_by_target": dict(sorted(total.by_target.items())),
        "outcomes": outcomes,
        "crash_signatures": total.crashes,
        "finding_kinds": total.findings,
    }


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Fuzzing: dialects and session core",
        "",
        f"{results['cases']} cases ({results['inputs']} client frames and core commands) in {results['elapsed_s']} s "
        f"on {results['config']['workers']} process(es): {results['cases_per_s']} cases/s; seed {results['config']['seed']}.",
        "",
        f"**Crashes: {results['crashes']}** (uncaught exceptions in a dialect or the session). "
        f"**Property violations: {results['findings']}** (undefined outcomes, malformed output, session invariants).",
        "",
        "| target | cases |",
        "|---|---:|",
        *(f"| {t} | {c} |" for t, c in results["cases_by_target"].items()),
        "",
        "## Outcome classes (per client frame or core command)",
        "",
        "| target | outcome | count |",
        "|---|---|---:|",
    ]
    for target, outcomes in results["outcomes"].items():
        for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
            lines.append(f"| {target} | {outcome} | {count} |")
    for title, key in (("Crashes", "crash_signatures"), ("Property violations", "finding_kinds")):
        entries = results[key]
        lines += ["", f"## {title}", ""]
        if not entries:
            lines.append("None.")
        for signature, entry in sorted(entries.items(), key=lambda kv: -kv[1]["count"]):
            lines.append(f"- **{entry['count']}x** ({entry['target']}) `{signature}`" + (f": {entry['detail'][:300]}" if entry.get("detail") else ""))
            lines.append(f"  - first case: `{entry['example'][:600]}`")
    return "\n".join(lines) + "\n"


def main(n: int, *, out: Path, seed: int = 0, workers: int | None = None, max_seconds: float | None = None) -> int:
    """``stream-server bench --fuzz N``: run, write results.json and summary.md; 1 if anything crashed."""
    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results = run_fuzz(n, seed=seed, workers=workers, max_seconds=max_seconds, log=log)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = markdown(results)
    (out / "summary.md").write_text(md)
    log(f"[fuzz] wrote {out}/results.json, summary.md")
    print(md)
    return 1 if results["crashes"] else 0
