"""The Twilio Media Streams dialect, Sans-I/O: Twilio's messages in, one two-channel core session.

``TwilioStream`` writes messages exactly as Twilio sends them (field names, order, numbers as
strings); the end-to-end test replays a call with it too. ``TwilioHarness`` wires the dialect to a
real :class:`Session` with the deterministic fakes, as the WebSocket shell does: actions in order,
events rendered right after the command that produced them. Bad input must be logged with the
callSid and leave the call running, so most tests here check three things: the warning, that
nothing was sent back (Twilio has no error message), and that audio after it still arrives.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from twilio.request_validator import RequestValidator

from stream_server import protocol as p
from stream_server.audio import encode_g711
from stream_server.bench.calls import TwilioStream, call_parameters
from stream_server.dialects import twilio as tw
from stream_server.dialects.base import Close, Handshake, HandshakeRejected
from stream_server.settings import Settings
from tests.dialect_harness import DialectHarness
from tests.fakes import word_amplitude

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "twilio.md"
CALL_SID = "CA" + "1f" * 16
STREAM_SID = "MZ" + "2e" * 16
ACCOUNT_SID = "AC" + "3d" * 16
RATE = 8000
FRAME = 160  # bytes (= samples) of one 20 ms μ-law frame


# --------------------------------------------------------------------------------------------
# Twilio's side of the wire (shared with the end-to-end test)
# --------------------------------------------------------------------------------------------


def tone_words(words: list[int], *, gap_s: float = 0.12, word_s: float = 0.25) -> np.ndarray:
    """The fakes' "words" (220 Hz bursts whose loudness names the word) at 8 kHz."""
    t = np.arange(int(word_s * RATE)) / RATE
    parts: list[np.ndarray] = []
    for i, k in enumerate(words):
        if i:
            parts.append(np.zeros(int(gap_s * RATE), np.float32))
        parts.append((word_amplitude(k) * np.sin(2 * np.pi * 220 * t) * np.sqrt(2)).astype(np.float32))
    return np.concatenate(parts)


def quiet(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def ulaw(samples: np.ndarray) -> bytes:
    data = encode_g711(samples, "ulaw")
    return data + b"\xff" * (-len(data) % FRAME)  # whole frames, as Twilio sends


# --------------------------------------------------------------------------------------------
# The dialect in front of a real core session
# --------------------------------------------------------------------------------------------


def handshake(headers: dict[str, str] | None = None, path: str = "/v1/twilio") -> Handshake:
    return Handshake(
        path=path,
        query={},
        headers=headers if headers is not None else {"host": "calls.example.com"},
        subprotocols=(),
        default_model="tiny.en",
        model_exists=lambda name: name in ("tiny.en", "base"),
    )


class TwilioHarness(DialectHarness):
    def __init__(self, options: tw.TwilioOptions | None = None, latency_chunks: int = 3) -> None:
        self.twilio = TwilioStream(CALL_SID, STREAM_SID, ACCOUNT_SID)
        dialect = tw.TwilioDialect(options or tw.TwilioOptions(model_exists=lambda name: name in ("tiny.en", "base")))
        super().__init__(dialect, "sess_twilio01", latency_chunks)
        self.dialect: tw.TwilioDialect = dialect

    def send(self, message: dict[str, Any] | str) -> None:
        self.receive_text(message if isinstance(message, str) else json.dumps(message))

    def play(self, legs: dict[str, bytes], start_ms: int = 0) -> None:
        for message in self.twilio.frames(legs, start_ms=start_ms):
            self.send(message)
            self.tick()

    def begin(self, **kwargs: Any) -> None:
        self.send(self.twilio.connected())
        self.send(self.twilio.start(**kwargs))

    def appends(self, channel: int | None = None) -> list[p.AudioAppend]:
        return [c for c in self.commands if isinstance(c, p.AudioAppend) and (channel is None or c.channel == channel)]

    def audio(self, channel: int) -> bytes:
        return b"".join(a.audio for a in self.appends(channel))

    def of(self, kind: type[p.ServerEvent]) -> list[Any]:
        return self.core_events(kind)


def warned(caplog: pytest.LogCaptureFixture, pattern: str) -> list[str]:
    """Warnings of the dialect that name the call and match ``pattern``."""
    found = [r.getMessage() for r in caplog.records if r.name == tw.__name__ and r.levelno == logging.WARNING]
    matching = [m for m in found if re.search(pattern, m)]
    assert matching, f"no warning matching {pattern!r} in {found}"
    assert all(CALL_SID in m for m in matching), matching
    return matching


def still_running(h: TwilioHarness, channel: int = 0) -> None:
    """The call survived: nothing went back to Twilio, nothing closed, and new audio arrives."""
    before = len(h.audio(channel))
    track = "inbound" if channel == 0 else "outbound"
    frame = b"\x7f" * FRAME
    written = h.dialect.tracks[track].written
    h.send(h.twilio.media(track, frame, written // 8))
    assert len(h.audio(channel)) == before + FRAME
    assert h.sent == [] and h.closes == []


# --------------------------------------------------------------------------------------------
# start: the call becomes a session
# --------------------------------------------------------------------------------------------


def test_before_start_the_session_expects_telephone_audio() -> None:
    config = p.SessionConfig.model_validate({"model": "tiny.en"}).updated(tw.TwilioDialect().initial_config())
    assert (config.input_audio_format, config.sample_rate, config.channels) == ("g711_ulaw", 8000, 1)


def test_start_with_both_tracks_is_a_two_channel_session_named_by_the_call() -> None:
    h = TwilioHarness()
    h.begin()
    [update] = [c for c in h.commands if isinstance(c, p.SessionUpdate)]
    assert update.session == {
        "input_audio_format": "g711_ulaw",
        "sample_rate": 8000,
        "channels": 2,
        "channel_labels": ["caller", "callee"],
    }
    assert h.session.config.channels == 2 and h.session.config.channel_labels == ["caller", "callee"]
    assert h.dialect.session_alias == CALL_SID and h.dialect.call_sid == CALL_SID
    assert h.dialect.stream_sid == STREAM_SID
    assert h.sent == [] and h.closes == []


@pytest.mark.parametrize(("tracks", "label"), [(("inbound",), "caller"), (("outbound",), "callee")])
def test_one_track_is_channel_zero(tracks: tuple[str, ...], label: str) -> None:
    h = TwilioHarness()
    h.begin(tracks=tracks)
    assert h.session.config.channels == 1 and h.session.config.channel_labels == [label]
    h.send(h.twilio.media(tracks[0], b"\x7f" * FRAME, 0))
    assert [(a.channel, len(a.audio)) for a in h.appends()] == [(0, FRAME)]


def test_parameters_name_the_legs_and_choose_language_and_model(caplog: pytest.LogCaptureFixture) -> None:
    h = TwilioHarness()
    parameters = {"inbound_label": "customer", "outbound_label": "agent", "language": "en-US", "model": "base", "crm_id": "42"}
    h.begin(parameters=parameters)
    assert h.session.config.channel_labels == ["customer", "agent"]
    assert h.session.config.language == "en" and h.session.config.model == "base"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], "unknown parameters are ignored quietly"


def test_silence_duration_ms_sets_the_turn_end_and_a_bad_one_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = TwilioHarness()
    h.begin(parameters={"silence_duration_ms": "300"})
    td = h.session.config.turn_detection
    assert td is not None and td.silence_duration_ms == 300 and td.threshold == 0.5, "merged field by field"
    for bad in ("-1", "5001", "fast", "3e2", "²", "1" * 5000):
        h = TwilioHarness()
        h.begin(parameters={"silence_duration_ms": bad})
        td = h.session.config.turn_detection
        assert td is not None and td.silence_duration_ms == 500 and not h.of(p.Error)
    warned(caplog, "silence_duration_ms")


def test_the_call_bench_passes_extra_custom_parameters() -> None:
    assert call_parameters(["silence_duration_ms=300", "crm_id=a=b"]) == {"silence_duration_ms": "300", "crm_id": "a=b"}
    with pytest.raises(SystemExit, match="NAME=VALUE"):
        call_parameters(["silence_duration_ms"])
    h = TwilioHarness()
    start = h.twilio.start(parameters=call_parameters(["silence_duration_ms=250"]))
    h.send(start)
    assert h.session.config.turn_detection is not None and h.session.config.turn_detection.silence_duration_ms == 250


def test_a_model_the_server_lacks_means_the_default() -> None:
    h = TwilioHarness()
    h.begin(parameters={"model": "nova-3"})
    [update] = [c for c in h.commands if isinstance(c, p.SessionUpdate)]
    assert "model" not in update.session and h.session.config.model == "tiny.en"


def test_bad_language_and_label_fall_back_and_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = TwilioHarness()
    h.begin(parameters={"language": "not a language", "inbound_label": "x" * 65})
    assert h.session.config.language is None and h.session.config.channel_labels == ["caller", "callee"]
    warned(caplog, "language")
    warned(caplog, "inbound_label")
    assert not h.of(p.Error), "the update the core got is valid"


def test_a_language_the_model_cannot_transcribe_is_left_out_and_the_call_still_starts(caplog: pytest.LogCaptureFixture) -> None:
    """A refused language would make the core refuse the whole update (the μ-law format and the
    legs with it), so the dialect leaves it out and says why."""
    h = TwilioHarness()
    h.begin(parameters={"language": "es-MX", "inbound_label": "cliente"})
    config = h.session.config
    assert (config.language, config.input_audio_format, config.channels) == (None, "g711_ulaw", 2)
    assert config.channel_labels == ["cliente", "callee"]
    [message] = warned(caplog, "language")
    assert "English only" in message
    assert not h.of(p.Error)
    h = TwilioHarness()
    h.begin(parameters={"language": "es-MX", "model": "base"})
    assert (h.session.config.model, h.session.config.language) == ("base", "es")


def test_a_media_format_other_than_mulaw_closes_with_1003(caplog: pytest.LogCaptureFixture) -> None:
    h = TwilioHarness()
    start = h.twilio.start()
    start["start"]["mediaFormat"] = {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1}
    h.send(start)
    assert h.closes == [Close(1003, "unsupported mediaFormat: only audio/x-mulaw, 8000 Hz, 1 channel")]
    assert not [c for c in h.commands if isinstance(c, p.SessionUpdate)]
    warned(caplog, "unsupported mediaFormat")


# --------------------------------------------------------------------------------------------
# API keys travel in customParameters
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("parameters", "reason"), [({}, "missing API key"), ({"api_key": "wrong"}, "unknown API key")])
def test_with_keys_configured_a_bad_key_closes_with_1008(parameters: dict[str, str], reason: str, caplog: pytest.LogCaptureFixture) -> None:
    h = TwilioHarness(tw.TwilioOptions(api_keys=frozenset({"k1", "k2"})))
    h.begin(parameters=parameters)
    assert h.closes == [Close(1008, reason)]
    assert h.sent == [] and not [c for c in h.commands if isinstance(c, p.SessionUpdate)]
    assert h.dialect.session_alias is None, "an unauthorized call is not published under its callSid"
    warned(caplog, "API key")


def test_with_keys_configured_a_good_key_starts_the_call() -> None:
    h = TwilioHarness(tw.TwilioOptions(api_keys=frozenset({"k1", "k2"})))
    h.begin(parameters={"api_key": "k2"})
    assert h.closes == [] and h.dialect.api_key == "k2" and h.session.config.channels == 2


def test_a_redact_parameter_reaches_the_session() -> None:
    h = TwilioHarness()
    h.begin(parameters={"redact": "PCI, ssn"})
    assert h.closes == [] and h.session.config.redact == ["pci", "ssn"]


def test_a_redact_parameter_the_server_does_not_do_closes_with_1008(caplog: pytest.LogCaptureFixture) -> None:
    """A flow asking for ``pii`` (names, addresses: no entity model here) would otherwise have its
    call transcribed unredacted."""
    h = TwilioHarness()
    h.begin(parameters={"redact": "pci,pii"})
    assert h.closes == [Close(1008, "unsupported redact")]
    assert not [c for c in h.commands if isinstance(c, p.SessionUpdate)]
    warned(caplog, "'pii' is not a redaction this server does")


def test_without_keys_configured_any_key_is_ignored() -> None:
    h = TwilioHarness()
    h.begin(parameters={"api_key": "anything"})
    assert h.closes == [] and h.session.config.channels == 2


# --------------------------------------------------------------------------------------------
# media: tracks to channels, timestamps to the call's clock
# --------------------------------------------------------------------------------------------


def test_each_track_feeds_its_channel_with_the_payload_bytes() -> None:
    h = TwilioHarness()
    h.begin()
    inbound, outbound = bytes(range(160)), bytes(range(160, 256)) + bytes(64)
    h.send(h.twilio.media("inbound", inbound, 0))
    h.send(h.twilio.media("outbound", outbound, 0))
    h.send(h.twilio.media("inbound", inbound[::-1], 20))
    assert h.audio(0) == inbound + inbound[::-1]
    assert h.audio(1) == outbound
    assert all(a.channel in (0, 1) for a in h.appends()), "audio always names its channel"


def test_a_gap_in_timestamps_becomes_silence_on_that_track_only() -> None:
    h = TwilioHarness()
    h.begin()
    frame = b"\x10" * FRAME
    h.send(h.twilio.media("inbound", frame, 0))
    h.send(h.twilio.media("outbound", frame, 0))
    h.send(h.twilio.media("inbound", frame, 20))
    h.send(h.twilio.media("outbound", frame, 80))  # 40 and 60 ms lost on the outbound leg
    assert h.audio(0) == frame * 2
    assert h.audio(1) == frame + b"\xff" * (3 * FRAME) + frame
    assert h.dialect.tracks["outbound"].written == 100 * 8


def test_a_track_that_starts_late_starts_at_its_timestamp() -> None:
    h = TwilioHarness()
    h.begin()
    h.send(h.twilio.media("outbound", b"\x10" * FRAME, 1500))
    assert h.audio(1) == b"\xff" * (1500 * 8) + b"\x10" * FRAME


def test_jitter_under_a_frame_leaves_the_audio_alone() -> None:
    h = TwilioHarness()
    h.begin()
    for timestamp in (0, 21, 39, 61, 80):
        h.send(h.twilio.media("inbound", b"\x10" * FRAME, timestamp))
    assert h.audio(0) == b"\x10" * (5 * FRAME)


def test_a_late_or_repeated_frame_is_dropped_not_moved_back(caplog: pytest.LogCaptureFixture) -> None:
    h = TwilioHarness()
    h.begin()
    for timestamp in (0, 20, 40):
        h.send(h.twilio.media("inbound", b"\x10" * FRAME, timestamp))
    h.send(h.twilio.media("inbound", b"\x99" * FRAME, 20))  # new chunk number, old time
    assert h.audio(0) == b"\x10" * (3 * FRAME)
    warned(caplog, "behind the track")
    still_running(h)


def test_a_timestamp_leap_rebases_instead_of_filling_hours(caplog: pytest.LogCaptureFixture) -> None:
    h = TwilioHarness()
    h.begin()
    h.send(h.twilio.media("inbound", b"\x10" * FRAME, 0))
    h.send(h.twilio.media("inbound", b"\x11" * FRAME, 3_600_000))
    h.send(h.twilio.media("inbound", b"\x12" * FRAME, 3_600_020))
    assert h.audio(0) == b"\x10" * FRAME + b"\x11" * FRAME + b"\x12" * FRAME
    warned(caplog, "re-based")


def test_numbers_sent_as_json_integers_are_understood() -> None:
    h = TwilioHarness()
    h.begin()
    message = h.twilio.media("inbound", b"\x10" * FRAME, 40)
    message["sequenceNumber"] = int(message["sequenceNumber"])
    message["media"]["timestamp"] = 40
    h.send(message)
    assert h.audio(0) == b"\xff" * (40 * 8) + b"\x10" * FRAME


# --------------------------------------------------------------------------------------------
# Bad input: logged with the callSid, never answered (Twilio has no error message), call goes on
# --------------------------------------------------------------------------------------------


def started(caplog: pytest.LogCaptureFixture) -> TwilioHarness:
    caplog.set_level(logging.DEBUG, logger=tw.__name__)
    h = TwilioHarness()
    h.begin()
    h.send(h.twilio.media("inbound", b"\x10" * FRAME, 0))
    return h


def test_malformed_json(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    h.send('{"event": "media", "media": ')
    h.send("[1, 2]")
    warned(caplog, "not JSON")
    warned(caplog, "not a JSON object")
    still_running(h)


def test_unknown_event(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    h.send({"event": "clear", "sequenceNumber": str(h.twilio.sequence + 1), "streamSid": STREAM_SID})
    h.twilio.sequence += 1
    warned(caplog, "unknown event 'clear'")
    still_running(h)


def test_payload_not_base64(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    message = h.twilio.media("inbound", b"\x10" * FRAME, 20)
    message["media"]["payload"] = "not base64!"
    h.send(message)
    assert h.audio(0) == b"\x10" * FRAME
    warned(caplog, "not base64")
    h.send(h.twilio.media("inbound", b"\x7f" * FRAME, 40))
    assert h.audio(0) == b"\x10" * FRAME + b"\xff" * FRAME + b"\x7f" * FRAME, "the lost frame became silence"
    still_running(h)


def test_payload_not_whole_frames_is_used_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    h.send(h.twilio.media("inbound", b"\x20" * 100, 20))
    assert h.audio(0) == b"\x10" * FRAME + b"\x20" * 100, "every μ-law byte is a sample: nothing is lost"
    warned(caplog, "not whole 20 ms frames")
    still_running(h)


def test_empty_payload(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    h.send(h.twilio.media("inbound", b"", 20))
    warned(caplog, "empty media payload")
    still_running(h)


def test_unknown_track(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    message = h.twilio.media("inbound", b"\x10" * FRAME, 20)
    message["media"]["track"] = "inbound_track"
    h.send(message)
    assert h.audio(0) == b"\x10" * FRAME
    warned(caplog, "track 'inbound_track'")
    still_running(h)


def test_a_track_the_stream_does_not_carry(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=tw.__name__)
    h = TwilioHarness()
    h.begin(tracks=("inbound",))
    h.send(h.twilio.media("outbound", b"\x10" * FRAME, 0))
    assert h.appends() == []
    warned(caplog, "track 'outbound'")
    still_running(h)


def test_numbers_too_long_for_int_are_invalid_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    """Twilio's numbers are decimal strings; one of 5000 digits made int() raise out of the dialect."""
    h = TwilioHarness()
    h.begin()
    media = h.twilio.media("inbound", b"\x7f" * FRAME, 0)
    media["sequenceNumber"] = media["media"]["chunk"] = media["media"]["timestamp"] = "9" * 5000
    h.send(media)
    assert [(a.channel, len(a.audio)) for a in h.appends()] == [(0, FRAME)], "the frame is kept, in arrival order"
    for name in ("sequenceNumber", "chunk", "usable timestamp"):
        warned(caplog, name)


def test_duplicate_sequence_number(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    message = h.twilio.media("inbound", b"\x10" * FRAME, 20)
    h.send(message)
    h.send(message)
    assert h.audio(0) == b"\x10" * (2 * FRAME)
    warned(caplog, "duplicate or out of order")
    still_running(h)


def test_out_of_order_sequence_numbers(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    first = h.twilio.media("inbound", b"\x21" * FRAME, 20)
    second = h.twilio.media("inbound", b"\x22" * FRAME, 40)
    h.send(second)
    h.send(first)
    assert h.audio(0) == b"\x10" * FRAME + b"\xff" * FRAME + b"\x22" * FRAME, "time never runs backwards"
    warned(caplog, "1 messages lost")
    warned(caplog, "duplicate or out of order")
    still_running(h)


def test_repeated_chunk_number(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    message = h.twilio.media("inbound", b"\x10" * FRAME, 20)
    message["media"]["chunk"] = "1"
    h.send(message)
    warned(caplog, "chunk 1 after chunk 1")
    assert h.audio(0) == b"\x10" * FRAME
    still_running(h)


def test_media_before_start_is_held_and_placed_once_start_arrives(caplog: pytest.LogCaptureFixture) -> None:
    h = TwilioHarness()
    h.send(h.twilio.connected())
    start = h.twilio.start()  # sequenceNumber "1", overtaken by the media numbered after it
    early = [h.twilio.media("outbound", b"\x30" * FRAME, 0), h.twilio.media("inbound", b"\x31" * FRAME, 0)]
    for message in early:
        h.send(message)
    assert h.appends() == []
    h.send(start)
    assert [(a.channel, a.audio) for a in h.appends()] == [(1, b"\x30" * FRAME), (0, b"\x31" * FRAME)]
    assert h.session.config.channels == 2
    assert any("media before start" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    still_running(h)


def test_a_second_start_is_ignored(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    h.send(h.twilio.start(tracks=("outbound",), parameters={"inbound_label": "other"}))
    assert h.session.config.channels == 2 and h.session.config.channel_labels == ["caller", "callee"]
    assert len([c for c in h.commands if isinstance(c, p.SessionUpdate)]) == 1
    warned(caplog, "second start")
    still_running(h)


def test_binary_frames_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    h.apply(h.dialect.receive_bytes(b"\x00" * 320))
    warned(caplog, "binary frame")
    still_running(h)


def test_repeats_of_a_problem_are_counted_not_flooded(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    for _ in range(5):
        h.send("nonsense")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "not JSON" in r.getMessage()]
    assert len(warnings) == 1 and h.dialect.problems()["malformed_json"] == 5
    h.send(h.twilio.stop())
    summary = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "stopped" in r.getMessage()]
    assert summary and "'malformed_json': 5" in summary[0] and CALL_SID in summary[0]


def test_messages_after_stop_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    h.send(h.twilio.stop())
    count = len(h.commands)
    h.send(h.twilio.media("inbound", b"\x10" * FRAME, 20))
    assert len(h.commands) == count
    warned(caplog, "after stop")


def test_dtmf_and_mark_are_noted_and_change_nothing(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    h.send(h.twilio.dtmf("5"))
    h.send(h.twilio.mark("greeting-played"))
    assert h.dialect.dtmf == ["5"]
    assert h.dialect.problems() == {}
    assert not any(isinstance(c, p.AudioAppend) and c.audio == b"" for c in h.commands), "no command for the core"
    still_running(h)


def test_each_key_becomes_a_call_event_at_its_time_on_its_leg() -> None:
    """Twilio's exact ``dtmf`` JSON; the digit is placed where the caller's leg has got to."""
    h = TwilioHarness()
    h.begin(parameters={"inbound_label": "customer", "outbound_label": "agent"})
    h.play({"inbound": ulaw(quiet(1.2)), "outbound": ulaw(quiet(1.2))})
    # As Twilio writes it (its docs' example, our stream's ids): numbers as strings, the track named with _track.
    h.send('{"event": "dtmf", "streamSid": "%s", "sequenceNumber": "%s", "dtmf": {"track": "inbound_track", "digit": "5"}}' % (STREAM_SID, h.twilio._next()))
    h.send(h.twilio.dtmf("#"))
    [five, hash_key] = h.dialect.call_events()
    assert (five.digit, five.channel, five.speaker, five.time) == ("5", 0, "customer", pytest.approx(1.2, abs=0.021))
    assert five.event() == {"type": "call.dtmf", "digit": "5", "channel": 0, "speaker": "customer", "time": pytest.approx(1.2, abs=0.021)}
    assert hash_key.digit == "#"
    assert h.dialect.call_events() == [], "each key is handed over once"
    assert h.sent == [] and h.dialect.problems() == {}


def test_keys_that_are_not_keys_or_come_before_start_are_logged_and_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=tw.__name__)
    h = TwilioHarness()
    h.send(h.twilio.connected())
    early = h.twilio.dtmf("1")
    h.send(h.twilio.start())
    h.send(early)  # out of order as well: dropped by its sequence number, before the digit is read
    h.send(h.twilio.dtmf("x"))
    h.send({**h.twilio.dtmf("2"), "dtmf": {"digit": "2", "track": "sideways_track"}})
    [key] = h.dialect.call_events()
    assert (key.digit, key.channel) == ("2", 0), "an unknown track is taken as the caller's"
    warned(caplog, "valid digit")
    warned(caplog, "does not carry")
    lone = TwilioHarness()
    lone.send(lone.twilio.connected())
    lone.send(lone.twilio.dtmf("3"))
    assert lone.dialect.call_events() == [] and lone.dialect.problems().get("dtmf_before_start") == 1


def test_nothing_is_ever_sent_back_and_core_errors_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    h = started(caplog)
    assert h.dialect.render(p.Error.invalid("invalid_value", "session.x: nope")) == []
    assert h.dialect.error(p.Error.invalid("idle_timeout", "no message for 60 s; closing")) == []
    warned(caplog, "idle_timeout")


# --------------------------------------------------------------------------------------------
# A whole call through the core: two legs, their own utterances, flushed by stop
# --------------------------------------------------------------------------------------------


def two_leg_call() -> dict[str, bytes]:
    """Caller says w1 w2, callee answers w3 w4 while the caller's last word still sounds
    (overlap), then the caller says w5 right as the callee stops (abutting turns)."""
    inbound = np.concatenate([quiet(0.2), tone_words([1, 2]), quiet(1.2), tone_words([5]), quiet(0.1)])
    outbound = np.concatenate([quiet(0.6), tone_words([3, 4]), quiet(2.0)])
    return {"inbound": ulaw(inbound), "outbound": ulaw(outbound)}


def test_a_two_leg_call_is_transcribed_per_leg_and_flushed_by_stop() -> None:
    h = TwilioHarness()
    h.begin(parameters={"inbound_label": "customer", "outbound_label": "agent"})
    h.play(two_leg_call())
    h.send(h.twilio.dtmf("1"))
    h.send(h.twilio.stop())
    h.settle()
    segments = h.of(p.TranscriptSegment)
    by_channel = {c: " ".join(s.text.strip() for s in segments if s.channel == c) for c in (0, 1)}
    assert by_channel == {0: "w1 w2 w5", 1: "w3 w4"}
    assert {(s.channel, s.speaker) for s in segments} == {(0, "customer"), (1, "agent")}
    [done] = h.of(p.TranscriptDone)
    assert [(c.channel, c.speaker, c.text.strip()) for c in done.channels] == [(0, "customer", "w1 w2 w5"), (1, "agent", "w3 w4")]
    assert [t.speaker for t in done.turns] == ["customer", "agent", "customer"]
    assert [t.start for t in done.turns] == sorted(t.start for t in done.turns)
    assert h.closes and h.closes[0].code == 1000
    assert h.sent == []


def test_turn_times_follow_the_call_clock_across_lost_frames() -> None:
    """Frames lost on one leg do not shift its later words: the gap is silence, so the callee's
    word after the loss keeps its time in the call."""
    h = TwilioHarness()
    h.begin()
    legs = two_leg_call()
    messages = list(h.twilio.frames(legs))
    lost = {id(m) for m in messages if m["media"]["track"] == "outbound" and 300 <= int(m["media"]["timestamp"]) < 500}
    for message in messages:
        if id(message) not in lost:
            h.send(message)
            h.tick()
    h.send(h.twilio.stop())
    h.settle()
    [callee] = [s for s in h.of(p.TranscriptSegment) if s.channel == 1]
    assert callee.text.strip() == "w3 w4"
    assert callee.start == pytest.approx(0.6, abs=0.35), "the callee's turn starts where it starts in the call"
    assert len(h.audio(1)) == len(legs["outbound"]), "lost frames were replaced by exactly as much silence"


# --------------------------------------------------------------------------------------------
# The upgrade: X-Twilio-Signature
# --------------------------------------------------------------------------------------------

TOKEN = "12345678901234567890123456789012"


def signed(url: str, token: str = TOKEN, **extra: str) -> dict[str, str]:
    host = url.split("/")[2]
    return {"host": host, "x-twilio-signature": RequestValidator(token).compute_signature(url, {}), **extra}


def test_a_signed_upgrade_is_accepted() -> None:
    dialect = tw.create(handshake(signed("wss://calls.example.com/v1/twilio")), settings=Settings(twilio_auth_token=TOKEN))
    assert isinstance(dialect, tw.TwilioDialect)


def test_a_signature_over_the_url_with_its_port_is_accepted() -> None:
    tw.create(handshake(signed("wss://calls.example.com:8443/v1/twilio")), settings=Settings(twilio_auth_token=TOKEN))


def test_behind_a_proxy_the_forwarded_host_is_what_twilio_signed() -> None:
    headers = signed("wss://calls.example.com/v1/twilio")
    headers = {**headers, "host": "127.0.0.1:8000", "x-forwarded-host": "calls.example.com"}
    tw.create(handshake(headers), settings=Settings(twilio_auth_token=TOKEN))


@pytest.mark.parametrize(
    "headers",
    [
        {"host": "calls.example.com"},  # not signed
        signed("wss://calls.example.com/v1/twilio", token="another-token"),
        signed("wss://calls.example.com/v1/other"),  # signed for another URL
        {**signed("wss://calls.example.com/v1/twilio"), "host": "evil.example.com"},
    ],
)
def test_a_bad_signature_is_refused_with_403(headers: dict[str, str]) -> None:
    with pytest.raises(HandshakeRejected) as info:
        tw.create(handshake(headers), settings=Settings(twilio_auth_token=TOKEN))
    assert info.value.status == 403
    error = info.value.body["error"]
    assert isinstance(error, dict) and error["code"] == "invalid_signature"


def test_behind_a_proxy_that_rewrites_the_path_the_public_url_is_what_twilio_signed() -> None:
    """``--twilio-public-url``: the proxy serves wss://calls.example.com/telephony/stream and
    forwards it to /v1/twilio on another host; the signature covers the public URL only."""
    public = "wss://calls.example.com/telephony/stream"
    settings = Settings(twilio_auth_token=TOKEN, twilio_public_url=public)
    arriving = {"host": "10.0.0.7:8000", "x-twilio-signature": RequestValidator(TOKEN).compute_signature(public, {})}
    assert isinstance(tw.create(handshake(arriving), settings=settings), tw.TwilioDialect)
    with pytest.raises(HandshakeRejected):  # without the setting, the rebuilt URL is not what was signed
        tw.create(handshake(arriving), settings=Settings(twilio_auth_token=TOKEN))
    rebuilt = signed("wss://10.0.0.7:8000/v1/twilio")
    with pytest.raises(HandshakeRejected):  # with it, only the public URL counts
        tw.create(handshake(rebuilt), settings=settings)
    assert tw.signed_urls(handshake(arriving), public) == [public]


def test_without_a_token_signatures_are_not_checked() -> None:
    tw.create(handshake({"host": "calls.example.com"}), settings=Settings())


def test_the_token_and_keys_come_from_the_handshake_settings() -> None:
    settings = Settings(twilio_auth_token=TOKEN, api_keys="k1, k2")
    with pytest.raises(HandshakeRejected):
        tw.create(dataclasses.replace(handshake({"host": "calls.example.com"}), settings=settings))
    dialect = tw.create(dataclasses.replace(handshake(signed("wss://calls.example.com/v1/twilio")), settings=settings))
    assert dialect.options.api_keys == frozenset({"k1", "k2"})


def test_without_handshake_settings_the_environment_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STREAM_SERVER_TWILIO_AUTH_TOKEN", TOKEN)
    monkeypatch.setenv("STREAM_SERVER_API_KEYS", "k1")
    with pytest.raises(HandshakeRejected):
        tw.create(handshake({"host": "calls.example.com"}))
    dialect = tw.create(handshake(signed("wss://calls.example.com/v1/twilio")))
    assert dialect.options.api_keys == frozenset({"k1"})


# --------------------------------------------------------------------------------------------
# The doc says what the code reads
# --------------------------------------------------------------------------------------------


def test_the_doc_names_every_parameter_and_close_code() -> None:
    doc = DOC.read_text()
    for name in ("inbound_label", "outbound_label", "language", "model", "api_key"):
        assert f"`{name}`" in doc, name
    for default in tw.DEFAULT_LABELS.values():
        assert f"`{default}`" in doc
    for code in (tw.POLICY_VIOLATION, tw.UNSUPPORTED_DATA):
        assert str(code) in doc
    assert 'track="both_tracks"' in doc and "<Parameter name=" in doc
    assert "--twilio-auth-token" in doc and "--ssl-certfile" in doc and "--ssl-keyfile" in doc
    assert "--twilio-public-url" in doc and "call.dtmf" in doc and "[DTMF" in doc


def test_settings_carry_the_twilio_and_tls_options() -> None:
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert {"twilio_auth_token", "twilio_public_url", "ssl_certfile", "ssl_keyfile"} <= fields
