"""The Genesys AudioHook dialect, Sans-I/O: the protocol state machine, the wire mapping, bad
input, signatures, and a real core session driven through it with the deterministic fakes.

``GenesysClient`` writes client messages as Genesys Cloud does (the version 2 envelope, ``seq``
counting from 1, ``serverseq`` = the last server message seen, ``position`` = audio sent plus audio
discarded); the end-to-end test uses it too. ``AudioHookHarness`` wires the dialect to a real
:class:`Session` the way the WebSocket shell does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import uuid
from typing import Any

import numpy as np
import pytest

from stream_server import audio
from stream_server import protocol as p
from stream_server.dialects import audiohook as ah
from stream_server.dialects.base import Handshake, HandshakeRejected
from stream_server.hub import Control, ControlRefused
from stream_server.settings import Settings
from tests.dialect_harness import DialectHarness
from tests.fakes import silence, speech

RATE = 8000
ORG = "d7934305-0972-4844-938e-9060eef73d05"
SESSION = "30b0e395-84d3-4570-ac13-9a62d8f514c0"
CONVERSATION = "090eaa2f-72fa-480a-83e0-8667ff89c0ec"
STEREO_PCMU = {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000}
OFFER = [
    STEREO_PCMU,
    {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000},
    {"type": "audio", "format": "PCMU", "channels": ["internal"], "rate": 8000},
]


# --------------------------------------------------------------------------------------------
# Genesys' side: message builder (shared with the end-to-end test)
# --------------------------------------------------------------------------------------------


def fmt(seconds: float) -> str:
    return ah.duration(seconds)


class GenesysClient:
    """The client half of the envelope: ``seq``, ``serverseq``, ``position``."""

    def __init__(self, session_id: str = SESSION, conversation_id: str = CONVERSATION, organization_id: str = ORG) -> None:
        self.session_id = session_id
        self.conversation_id = conversation_id
        self.organization_id = organization_id
        self.seq = 0
        self.serverseq = 0
        self.position = 0.0  # seconds: audio sent + audio discarded

    def message(self, kind: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
        self.seq += 1
        return {
            "version": "2",
            "id": self.session_id,
            "type": kind,
            "seq": self.seq,
            "serverseq": self.serverseq,
            "position": fmt(self.position),
            "parameters": parameters or {},
        }

    def open(self, media: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
        parameters = {
            "organizationId": self.organization_id,
            "conversationId": self.conversation_id,
            "participant": {"id": str(uuid.uuid4()), "ani": "+13175550000", "aniName": "John Doe", "dnis": "+18005550000"},
            "media": OFFER if media is None else media,
            **extra,
        }
        return self.message("open", parameters)

    def seen(self, server_message: dict[str, Any]) -> None:
        """Note a server message (its seq must be the next one: the client checks that too)."""
        assert server_message["seq"] == self.serverseq + 1, (server_message, self.serverseq)
        self.serverseq = server_message["seq"]


def stereo_frames(external: bytes, internal: bytes) -> bytes:
    """Two mono PCMU legs interleaved sample by sample, in the order of the channels list."""
    both = np.empty(len(external) * 2, np.uint8)
    both[0::2] = np.frombuffer(external, np.uint8)
    both[1::2] = np.frombuffer(internal, np.uint8)
    return both.tobytes()


def to_8k(samples16k: np.ndarray) -> np.ndarray:
    """The fakes' 16 kHz test tones at 8 kHz (220 Hz tones: decimation does not alias)."""
    return samples16k[::2].copy()


def pcmu(samples16k: np.ndarray) -> bytes:
    return audio.encode_g711(to_8k(samples16k), "ulaw")


# --------------------------------------------------------------------------------------------
# A real core session behind the dialect
# --------------------------------------------------------------------------------------------


def handshake(headers: dict[str, str] | None = None, path: str = "/v1/audiohook", settings: Settings | None = None) -> Handshake:
    default = {
        "host": "audiohook.example.com",
        "audiohook-organization-id": ORG,
        "audiohook-session-id": SESSION,
        "audiohook-correlation-id": "e160e428-53e2-487c-977d-96989bf5c99d",
        "x-api-key": "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh",
    }
    return Handshake(path=path, query={}, headers=default if headers is None else headers, subprotocols=(), default_model="tiny.en",
                     settings=settings or Settings())


class AudioHookHarness(DialectHarness):
    """The dialect in front of a real session with the fake VAD and decoder."""

    def __init__(self, headers: dict[str, str] | None = None, latency_chunks: int = 3) -> None:
        self.client = GenesysClient()
        dialect = ah.create(handshake(headers))
        super().__init__(dialect, "sess_audiohook1", latency_chunks, known_models=("tiny.en",))
        self.dialect: ah.AudioHookDialect = dialect

    def on_send(self, message: str | bytes) -> None:
        self.client.seen(json.loads(message))

    def send(self, message: dict[str, Any]) -> None:
        self.receive_text(json.dumps(message))

    def send_raw(self, text: str) -> None:
        self.receive_text(text)

    def send_audio(self, data: bytes, frame: int = 320) -> None:
        """Binary frames of ``frame`` bytes (20 ms of stereo PCMU), advancing the position."""
        assert self.dialect.media is not None
        for i in range(0, len(data), frame):
            chunk = data[i : i + frame]
            self.receive_bytes(chunk)
            self.client.position += len(chunk) / self.dialect.media.frame_bytes / RATE
            self.tick()

    def open(self, **extra: Any) -> dict[str, Any]:
        self.send(self.client.open(**extra))
        return self.messages()[-1]

    def close(self) -> None:
        self.send(self.client.message("close", {"reason": "end"}))
        self.settle()

    def messages(self) -> list[dict[str, Any]]:
        return [json.loads(m) for m in self.sent if isinstance(m, str)]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages() if m["type"] == kind]

    def transcripts(self) -> list[dict[str, Any]]:
        out = []
        for event in self.of("event"):
            entities = event["parameters"]["entities"]
            assert entities, "never an event with an empty entity list"
            out += [e["data"] for e in entities if e["type"] == "transcript"]
        return out


def call_audio() -> tuple[bytes, list[int], list[int]]:
    """Stereo PCMU: the customer (external) says w1 w2 w3, then the agent (internal) w4 w5."""
    external = np.concatenate([silence(0.3), speech([1, 2, 3]), silence(2.5)])
    internal = np.concatenate([silence(1.6), speech([4, 5]), silence(1.0)])
    internal = np.concatenate([internal, silence((len(external) - len(internal)) / 16000)])
    return stereo_frames(pcmu(external), pcmu(internal)), [1, 2, 3], [4, 5]


def assert_envelope(message: dict[str, Any], clientseq: int | None = None) -> None:
    assert set(message) == {"version", "id", "type", "seq", "clientseq", "parameters"}
    assert message["version"] == "2" and message["id"] == SESSION
    if clientseq is not None:
        assert message["clientseq"] == clientseq


# --------------------------------------------------------------------------------------------
# open, media, ping, update
# --------------------------------------------------------------------------------------------


def test_open_chooses_stereo_pcmu_and_configures_two_labelled_channels() -> None:
    h = AudioHookHarness()
    opened = h.open()
    assert_envelope(opened, clientseq=1)
    assert opened["type"] == "opened" and opened["seq"] == 1
    assert opened["parameters"] == {"media": [STEREO_PCMU], "startPaused": False}
    assert h.dialect.session_alias == CONVERSATION
    assert h.session.config.channels == 2 and h.session.config.channel_labels == ["external", "internal"]
    assert h.session.config.input_audio_format == "g711_ulaw" and h.session.config.sample_rate == 8000


@pytest.mark.parametrize(
    ("offer", "chosen"),
    [
        # Stereo PCMU wins wherever it is in the list, with its channel order kept.
        ([{"type": "audio", "format": "L16", "channels": ["external", "internal"], "rate": 8000},
          {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000},
          {"type": "audio", "format": "PCMU", "channels": ["internal", "external"], "rate": 8000}], 2),
        # Stereo L16 before mono PCMU: both legs matter more than bytes.
        ([{"type": "audio", "format": "PCMU", "channels": ["internal"], "rate": 8000},
          {"type": "audio", "format": "L16", "channels": ["external", "internal"], "rate": 8000}], 1),
        # Unusable offers (16 kHz, unknown channel, video) are passed over.
        ([{"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 16000},
          {"type": "audio", "format": "PCMU", "channels": ["external", "other"], "rate": 8000},
          {"type": "video", "format": "PCMU", "channels": ["external"], "rate": 8000},
          {"type": "audio", "format": "PCMU", "channels": ["internal"], "rate": 8000}], 3),
    ],
)
def test_media_preference(offer: list[dict[str, Any]], chosen: int) -> None:
    h = AudioHookHarness()
    opened = h.open(media=offer)
    assert opened["parameters"]["media"] == [offer[chosen]]
    assert h.session.config.channel_labels == offer[chosen]["channels"]
    assert h.session.config.input_audio_format == {"PCMU": "g711_ulaw", "L16": "pcm16"}[offer[chosen]["format"]]


def test_ping_is_answered_with_pong_carrying_its_seq() -> None:
    h = AudioHookHarness()
    h.open()
    h.send(h.client.message("ping", {"rtt": "PT0.025S"}))
    pong = h.messages()[-1]
    assert pong["type"] == "pong" and pong["parameters"] == {}
    assert_envelope(pong, clientseq=2)
    assert pong["seq"] == 2


def test_language_and_supported_languages() -> None:
    h = AudioHookHarness()
    opened = h.open(language="en-US", supportedLanguages=True)
    assert opened["parameters"]["supportedLanguages"] == ["en-US"]
    assert h.session.config.language == "en"
    h.send(h.client.message("update", {"language": "en-GB"}))
    updated = h.messages()[-1]
    assert updated["type"] == "updated" and updated["parameters"] == {}
    assert h.dialect.language == "en-GB"


def test_a_language_the_model_cannot_speak_is_refused() -> None:
    h = AudioHookHarness()
    h.open(language="es-ES")
    [disconnect] = h.of("disconnect")
    assert disconnect["parameters"]["reason"] == "error" and "es-ES" in disconnect["parameters"]["info"]
    assert not h.of("opened")


def test_multilingual_models_list_their_languages() -> None:
    languages = ah.supported_languages("base")
    assert "en" in languages and "de" in languages and len(languages) > 50


def test_organization_mismatch_is_unauthorized() -> None:
    h = AudioHookHarness()
    h.client.organization_id = "00000000-0000-0000-0000-000000000001"
    h.open()
    [disconnect] = h.of("disconnect")
    assert disconnect["parameters"]["reason"] == "unauthorized"
    assert not h.of("opened")


# --------------------------------------------------------------------------------------------
# A call: transcripts as events, close → closed after the last final
# --------------------------------------------------------------------------------------------


def test_a_stereo_call_becomes_final_transcript_events_then_closed() -> None:
    h = AudioHookHarness()
    h.open()
    data, external_words, internal_words = call_audio()
    h.send_audio(data)
    h.send(h.client.message("ping"))
    h.close()
    kinds = [m["type"] for m in h.messages()]
    assert kinds[0] == "opened" and kinds[-1] == "closed", kinds
    assert [m["seq"] for m in h.messages()] == list(range(1, len(kinds) + 1))
    assert h.messages()[-1]["clientseq"] == h.client.seq
    finals = h.transcripts()
    assert all(f["isFinal"] for f in finals)
    by_channel = {c: " ".join(f["alternatives"][0]["interpretations"][0]["transcript"] for f in finals if f["channelId"] == c) for c in (0, 1)}
    assert by_channel == {0: " ".join(f"w{k}" for k in external_words), 1: " ".join(f"w{k}" for k in internal_words)}
    for f in finals:
        assert set(f) == {"id", "channelId", "isFinal", "offset", "duration", "alternatives"}
        uuid.UUID(f["id"])
        [alternative] = f["alternatives"]
        assert 0 <= alternative["confidence"] <= 1
        [interpretation] = alternative["interpretations"]
        assert interpretation["type"] == "display"
        tokens = interpretation["tokens"]
        assert [t["value"] for t in tokens] == interpretation["transcript"].split()
        assert all(t["type"] == "word" and ah.parse_duration(t["offset"]) is not None for t in tokens)
    # Offsets are the call's times: the customer starts at 0.3 s, the agent at 1.6 s.
    first = {c: min(ah.parse_duration(f["offset"]) or 0 for f in finals if f["channelId"] == c) for c in (0, 1)}
    assert first[0] == pytest.approx(0.3, abs=0.15) and first[1] == pytest.approx(1.6, abs=0.15)
    assert h.closes and h.closes[0].code == 1000, "the core closes after done; closed went out first"


@pytest.mark.parametrize("redact", [["pci", "ssn"], "pci, ssn"])
def test_custom_config_redact_reaches_the_session(redact: object) -> None:
    h = AudioHookHarness()
    h.open(customConfig={"redact": redact})
    assert h.session.config.redact == ["pci", "ssn"]
    assert h.of("opened") and not h.of("disconnect")


def test_interim_results_on_request_share_the_final_id() -> None:
    h = AudioHookHarness()
    h.open(customConfig={"interimResults": True})
    data, _, _ = call_audio()
    h.send_audio(data, frame=160)
    h.close()
    transcripts = h.transcripts()
    interims = [t for t in transcripts if not t["isFinal"]]
    finals = [t for t in transcripts if t["isFinal"]]
    assert interims, "interim results were asked for"
    assert {t["id"] for t in interims} <= {t["id"] for t in finals}
    assert all(t["alternatives"][0]["interpretations"][0]["transcript"] for t in interims)


def test_without_interim_results_only_finals_go_out() -> None:
    h = AudioHookHarness()
    h.open()
    data, _, _ = call_audio()
    h.send_audio(data, frame=160)
    h.close()
    assert h.transcripts() and all(t["isFinal"] for t in h.transcripts())


def test_silence_sends_no_events() -> None:
    h = AudioHookHarness()
    h.open()
    h.send_audio(stereo_frames(pcmu(silence(2.0)), pcmu(silence(2.0))))
    h.close()
    assert [m["type"] for m in h.messages()] == ["opened", "closed"]


def test_a_connection_probe_is_answered_but_not_transcribed() -> None:
    # Genesys probes an integration with the nil conversationId; its audio (if any) is not decoded.
    h = AudioHookHarness()
    h.client.conversation_id = ah.PROBE_CONVERSATION
    opened = h.open()
    assert opened["type"] == "opened" and opened["parameters"] == {"media": [STEREO_PCMU], "startPaused": False}
    assert h.dialect.recorded is False and h.dialect.session_alias is None
    audio, _, _ = call_audio()
    h.send_audio(audio)
    h.send(h.client.message("discarded", {"start": fmt(h.client.position), "discarded": "PT1S"}))
    h.send(h.client.message("ping", {}))
    h.close()
    assert [m["type"] for m in h.messages()] == ["opened", "pong", "closed"]
    assert h.session.audio_seconds == 0.0


def test_close_before_open_is_answered_with_closed() -> None:
    h = AudioHookHarness()
    h.close()
    assert [m["type"] for m in h.messages()] == ["closed"]


def test_l16_is_little_endian_pcm16() -> None:
    h = AudioHookHarness()
    h.open(media=[{"type": "audio", "format": "L16", "channels": ["external"], "rate": 8000}])
    samples = to_8k(np.concatenate([silence(0.3), speech([2, 6]), silence(1.5)]))
    h.send_audio((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes(), frame=320)
    h.close()
    assert [t["alternatives"][0]["interpretations"][0]["transcript"] for t in h.transcripts()] == ["w2 w6"]


# --------------------------------------------------------------------------------------------
# Pause, resume, discarded: times stay true
# --------------------------------------------------------------------------------------------


def test_server_pause_and_resume_with_the_clients_discarded_audio() -> None:
    h = AudioHookHarness()
    h.open()
    quiet = stereo_frames(pcmu(silence(1.0)), pcmu(silence(1.0)))
    h.send_audio(quiet)
    h.dialect.request_pause()
    assert h.of("pause") == [], "a Sans-I/O dialect speaks with its next output"
    h.send_audio(quiet[:320])
    [pause] = h.of("pause")
    assert pause["parameters"] == {}
    h.send(h.client.message("paused"))
    assert h.dialect.state is ah.State.PAUSED
    start = h.client.position
    h.client.position += 2.5  # the client discards 2.5 s while paused; its position counts them
    h.dialect.request_resume()
    h.send(h.client.message("ping"))
    assert h.of("resume") and h.messages()[-2]["type"] == "resume"
    h.send(h.client.message("resumed", {"start": fmt(start), "discarded": "PT2.5S"}))
    silence_in = [c for c in h.commands if isinstance(c, p.AudioAppend) and len(c.audio) == 2.5 * RATE * 2]
    assert silence_in and set(silence_in[0].audio) == {0xFF}, "2.5 s of stereo μ-law silence"
    external = np.concatenate([silence(0.2), speech([3, 4]), silence(1.5)])
    h.send_audio(stereo_frames(pcmu(external), pcmu(silence(len(external) / 16000))))
    h.close()
    [final] = h.transcripts()
    # The words were spoken 1.02 + 2.5 + 0.2 s into the call.
    assert ah.parse_duration(final["offset"]) == pytest.approx(1.02 + 2.5 + 0.2, abs=0.15)
    assert h.session.audio_seconds == pytest.approx(h.client.position, abs=0.05)


def test_a_client_that_does_not_count_paused_audio_keeps_its_own_timeline() -> None:
    h = AudioHookHarness()
    h.open()
    h.send_audio(stereo_frames(pcmu(silence(1.0)), pcmu(silence(1.0))))
    h.send(h.client.message("paused"))
    h.send(h.client.message("resumed", {"start": fmt(h.client.position), "discarded": "PT2S"}))  # position stays
    external = np.concatenate([silence(0.2), speech([3, 4]), silence(1.5)])
    h.send_audio(stereo_frames(pcmu(external), pcmu(silence(len(external) / 16000))))
    h.close()
    [final] = h.transcripts()
    assert ah.parse_duration(final["offset"]) == pytest.approx(1.0 + 0.2, abs=0.15), "offsets on the client's position timeline"
    assert h.session.audio_seconds == pytest.approx(h.client.position + 2.0, abs=0.05), "the session keeps conversation time"


def test_discarded_audio_becomes_silence() -> None:
    h = AudioHookHarness()
    h.open()
    h.send_audio(stereo_frames(pcmu(silence(0.5)), pcmu(silence(0.5))))
    start = h.client.position
    h.client.position += 1.5
    h.send(h.client.message("discarded", {"start": fmt(start), "discarded": "PT1.5S"}))
    external = np.concatenate([silence(0.2), speech([5]), silence(1.5)])
    h.send_audio(stereo_frames(pcmu(external), pcmu(silence(len(external) / 16000))))
    h.close()
    [final] = h.transcripts()
    assert ah.parse_duration(final["offset"]) == pytest.approx(0.5 + 1.5 + 0.2, abs=0.15)


def test_a_very_long_gap_moves_the_timeline_without_buffering_it() -> None:
    h = AudioHookHarness()
    h.open()
    h.send(h.client.message("paused"))
    h.client.position += 600.0
    h.send(h.client.message("resumed", {"start": "PT0S", "discarded": "PT600S"}))
    filled = sum(len(c.audio) for c in h.commands if isinstance(c, p.AudioAppend))
    assert filled == ah.MAX_FILL_S * RATE * 2
    external = np.concatenate([silence(0.2), speech([5]), silence(1.5)])
    h.send_audio(stereo_frames(pcmu(external), pcmu(silence(len(external) / 16000))))
    h.close()
    [final] = h.transcripts()
    assert ah.parse_duration(final["offset"]) == pytest.approx(600.2, abs=0.15)


# --------------------------------------------------------------------------------------------
# Server-initiated reconnect and disconnect; shell errors
# --------------------------------------------------------------------------------------------


def test_reconnect_and_completed_disconnect() -> None:
    h = AudioHookHarness()
    h.open()
    h.dialect.request_reconnect("server maintenance")
    h.dialect.request_disconnect("completed", "done here")
    h.send(h.client.message("ping"))
    kinds = [m["type"] for m in h.messages()]
    assert kinds[-3:] == ["reconnect", "disconnect", "pong"]
    assert h.of("reconnect")[0]["parameters"] == {"info": "server maintenance"}
    assert h.of("disconnect")[0]["parameters"] == {"reason": "completed", "info": "done here"}
    with pytest.raises(ValueError):
        h.dialect.request_disconnect("bored")
    h.close()
    assert h.messages()[-1]["type"] == "closed"


# --------------------------------------------------------------------------------------------
# An operator's pause/resume (POST /v1/sessions/{id}/pause), the drain's reconnect, continued sessions
# --------------------------------------------------------------------------------------------


def test_an_operators_pause_and_resume_go_out_at_once_when_the_state_allows_them() -> None:
    h = AudioHookHarness()
    with pytest.raises(ControlRefused) as before_open:
        h.dialect.control(Control.PAUSE)
    assert before_open.value.code == "invalid_state" and "preparing" in before_open.value.message
    h.open()
    with pytest.raises(ControlRefused, match="has not paused"):
        h.dialect.control(Control.RESUME)
    h.apply(h.dialect.control(Control.PAUSE))
    assert [m["type"] for m in h.messages()] == ["opened", "pause"], "sent now, not with the next output"
    assert h.of("pause")[0]["parameters"] == {} and h.of("pause")[0]["clientseq"] == 1
    with pytest.raises(ControlRefused, match="already paused"):
        h.dialect.control(Control.PAUSE)
    h.send(h.client.message("paused"))
    assert h.dialect.state is ah.State.PAUSED
    h.apply(h.dialect.control(Control.RESUME))
    assert h.messages()[-1]["type"] == "resume" and h.messages()[-1]["clientseq"] == 2
    h.close()
    with pytest.raises(ControlRefused, match="closed"):
        h.dialect.control(Control.PAUSE)
    assert [m["seq"] for m in h.messages()] == list(range(1, len(h.messages()) + 1))


def _speaking_at_the_drain(h: AudioHookHarness) -> None:
    """The customer says w1 w2 (finished) and starts w3 w4, still talking when the drain comes."""
    h.open()
    external = np.concatenate([silence(0.3), speech([1, 2]), silence(1.2), speech([3, 4])])
    h.send_audio(stereo_frames(pcmu(external), pcmu(silence(len(external) / 16000))))


def test_a_drain_sends_the_open_utterances_finals_then_reconnect_and_the_call_can_still_close() -> None:
    h = AudioHookHarness(latency_chunks=6)
    _speaking_at_the_drain(h)
    before = len(h.transcripts())
    actions = h.dialect.drain()
    assert actions is not None and isinstance(actions[0], p.BufferCommit)
    h.apply(actions)
    assert not h.of("reconnect"), "not before the finals of what was said up to the drain"
    h.settle()
    kinds = [m["type"] for m in h.messages()]
    assert kinds.count("reconnect") == 1 and kinds[-1] == "reconnect", kinds
    assert h.of("reconnect")[0]["parameters"] == {"info": ah.DRAIN_INFO}
    texts = [t["alternatives"][0]["interpretations"][0]["transcript"] for t in h.transcripts()]
    assert len(texts) > before and " ".join(texts) == "w1 w2 w3 w4", "every word said before the drain, final before reconnect"
    assert h.dialect.drain() == [], "a second drain changes nothing"
    # The connection stays: Genesys opens the new session, then closes this one.
    h.send(h.client.message("ping"))
    assert h.messages()[-1]["type"] == "pong"
    h.send(h.client.message("close", {"reason": "reconnect"}))
    h.settle()
    assert [m["type"] for m in h.messages()][-1] == "closed"
    assert [m["seq"] for m in h.messages()] == list(range(1, len(h.messages()) + 1))


def test_a_drain_with_nothing_open_reconnects_at_once_and_before_open_leaves_the_plain_drain() -> None:
    fresh = AudioHookHarness()
    assert fresh.dialect.drain() is None, "no open session: the shell flushes and closes as for any dialect"
    h = AudioHookHarness()
    h.open()
    h.send_audio(stereo_frames(pcmu(silence(0.5)), pcmu(silence(0.5))))
    h.apply(h.dialect.drain() or [])
    assert h.messages()[-1]["type"] == "reconnect"
    paused = AudioHookHarness()
    paused.open()
    paused.send(paused.client.message("paused"))
    paused.apply(paused.dialect.drain() or [])
    assert paused.messages()[-1]["type"] == "reconnect", "a paused stream is asked too"


def test_a_continued_session_is_opened_and_its_offsets_continue_the_clients_position() -> None:
    h = AudioHookHarness()
    h.client.position = 42.5  # the reconnecting client's stream went on in the session it leaves
    previous = {"id": "0d1e7c8a-6b0e-4c39-9c2e-7a4f1f0b2d31", "serverseq": 17, "clientseq": 63}
    opened = h.open(continuedSessions=[previous])
    assert opened["type"] == "opened" and opened["seq"] == 1 and opened["clientseq"] == 1
    assert h.dialect.continued_sessions == [previous]
    assert h.dialect.session_alias == CONVERSATION, "the same conversation: found under the same id"
    external = np.concatenate([silence(0.4), speech([5, 6]), silence(1.5)])
    h.send_audio(stereo_frames(pcmu(external), pcmu(silence(len(external) / 16000))))
    h.close()
    [final] = h.transcripts()
    assert ah.parse_duration(final["offset"]) == pytest.approx(42.5 + 0.4, abs=0.15), "on the client's position timeline"
    assert h.session.audio_seconds == pytest.approx(h.client.position - 42.5, abs=0.05), "the core counts this session's audio"


def test_shell_errors_disconnect_with_reason_error() -> None:
    h = AudioHookHarness()
    h.open()
    h.apply(h.dialect.error(p.Error.invalid("idle_timeout", "no message for 60 s; closing")))
    [disconnect] = h.of("disconnect")
    assert disconnect["parameters"] == {"reason": "error", "info": "no message for 60 s; closing"}


def test_client_error_messages_are_recorded_not_answered() -> None:
    h = AudioHookHarness()
    h.open()
    h.send(h.client.message("error", {"code": 408, "message": "Timeout waiting for pong"}))
    assert h.dialect.client_errors == [{"code": 408, "message": "Timeout waiting for pong"}]
    assert [m["type"] for m in h.messages()] == ["opened"]


# --------------------------------------------------------------------------------------------
# Bad input: disconnect with reason error and info, never a crash; then the close transaction
# --------------------------------------------------------------------------------------------


def _envelope_broken(change: dict[str, Any]) -> Any:
    def send(h: AudioHookHarness) -> None:
        message = h.client.message("ping")
        message.update(change)
        for key in [k for k, v in change.items() if v is ...]:
            del message[key]
        h.send(message)

    return send


BAD_INPUT: dict[str, tuple[Any, str]] = {
    "malformed JSON": (lambda h: h.send_raw('{"version": "2", "type": "ping"'), "not valid JSON"),
    "not an object": (lambda h: h.send_raw("[1, 2, 3]"), "not a JSON object"),
    "missing envelope field": (_envelope_broken({"position": ...}), "missing position"),
    "wrong version": (_envelope_broken({"version": "1"}), "version"),
    "unknown type": (lambda h: h.send(h.client.message("dance")), "'dance' is not a supported client message type"),
    "duplicate seq": (lambda h: (h.send(h.client.message("ping")), setattr(h.client, "seq", h.client.seq - 1), h.send(h.client.message("ping"))), "seq 2 out of order: expected 3"),
    "skipped seq": (lambda h: (setattr(h.client, "seq", h.client.seq + 2), h.send(h.client.message("ping"))), "seq 4 out of order: expected 2"),
    "seq not a number": (_envelope_broken({"seq": "2"}), "seq '2' is not a positive integer"),
    "serverseq ahead": (_envelope_broken({"serverseq": 99}), "serverseq 99 is ahead"),
    "session id mismatch": (_envelope_broken({"id": "8b4ab0b2-0000-0000-0000-000000000000"}), "session identifier mismatch"),
    "bad position": (_envelope_broken({"position": "1.5 seconds"}), "not an ISO 8601 duration"),
    "parameters not an object": (_envelope_broken({"parameters": []}), "parameters of 'ping' must be an object"),
    "second open": (lambda h: h.send(h.client.open()), "already open"),
    "frame not whole samples": (lambda h: h.apply(h.dialect.receive_bytes(b"\xff" * 3)), "not a whole number of 2-byte samples"),
    "audio while paused": (lambda h: (h.send(h.client.message("paused")), h.apply(h.dialect.receive_bytes(b"\xff" * 320))), "audio while the stream is paused"),
    "discarded without durations": (lambda h: h.send(h.client.message("discarded", {"start": 3})), "discarded needs start and discarded durations"),
    "update without language": (lambda h: h.send(h.client.message("update", {})), "update needs a language"),
    "text message too large": (lambda h: h.send_raw(" " * 70000), "exceeds 65535"),
}
BEFORE_OPEN: dict[str, tuple[Any, str]] = {
    "media before opened": (lambda h: h.apply(h.dialect.receive_bytes(b"\xff" * 320)), "audio before the open transaction completed"),
    "paused before open": (lambda h: h.send(h.client.message("paused")), "'paused' in state preparing"),
    "update before open": (lambda h: h.send(h.client.message("update", {"language": "en-US"})), "'update' in state preparing"),
    "discarded before open": (lambda h: h.send(h.client.message("discarded", {"start": "PT0S", "discarded": "PT1S"})), "'discarded' in state preparing"),
    "open without media": (lambda h: h.send(h.client.open(media=[])), "none of the offered media is supported"),
    # Python's JSON extensions are not JSON; read as such, opened echoed the -Infinity back (fuzz seed 47).
    "open with -Infinity": (lambda h: h.send_raw(json.dumps(h.client.open(media=[{**OFFER[0], "x": float("-inf")}]))), "not valid JSON"),
    # valid JSON that Python reads as infinity, echoed back as Infinity (fuzz seed 62)
    "open with 1e999": (lambda h: h.send_raw(json.dumps(h.client.open(media=[{**OFFER[0], "x": 1.5}])).replace("1.5", "1e999")), "not valid JSON"),
    "open without conversation": (lambda h: h.send(h.client.message("open", {"organizationId": ORG, "media": OFFER})), "conversationId"),
    "continuedSessions not a list": (lambda h: h.send(h.client.open(continuedSessions={"id": SESSION})), "continuedSessions must be a list"),
    "continuedSessions without seqs": (lambda h: h.send(h.client.open(continuedSessions=[{"id": SESSION}])), "serverseq and clientseq"),
    # a redaction the server does not do: the conversation is not transcribed unredacted
    "open with an unknown redaction": (lambda h: h.send(h.client.open(customConfig={"redact": ["pci", "pii"]})), "customConfig.redact: 'pii' is not a redaction"),
    "open with redact not text": (lambda h: h.send(h.client.open(customConfig={"redact": 3})), "customConfig.redact must be a string or a list of strings"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT) + list(BEFORE_OPEN))
def test_bad_input_gets_disconnect_error_with_info_then_close_works(case: str) -> None:
    h = AudioHookHarness()
    if case in BAD_INPUT:
        h.open()
        act, info = BAD_INPUT[case]
    else:
        act, info = BEFORE_OPEN[case]
    act(h)
    disconnects = h.of("disconnect")
    assert len(disconnects) == 1, h.messages()
    assert disconnects[0]["parameters"]["reason"] == "error"
    assert info in disconnects[0]["parameters"]["info"], disconnects[0]
    assert not h.of("error"), "the server never sends error"
    # Whatever comes next is not answered again, until the client's close transaction.
    h.apply(h.dialect.receive_bytes(b"\xff" * 320))
    h.send(h.client.message("paused"))
    assert len(h.of("disconnect")) == 1
    h.close()
    assert h.messages()[-1]["type"] == "closed"


def test_audio_after_close_is_dropped_without_a_second_answer() -> None:
    h = AudioHookHarness()
    h.open()
    h.send(h.client.message("close", {"reason": "end"}))
    h.apply(h.dialect.receive_bytes(b"\xff" * 320))
    h.send(h.client.message("close", {"reason": "end"}))
    h.settle()
    assert [m["type"] for m in h.messages()] == ["opened", "closed"]


# --------------------------------------------------------------------------------------------
# The upgrade: API key, signatures
# --------------------------------------------------------------------------------------------

#: The signed request of Genesys' AudioHook documentation (the reference implementation's test).
DOC_SECRET = "TXlTdXBlclNlY3JldEtleVRlbGxOby0xITJAMyM0JDU="
DOC_HEADERS = {
    "host": "audiohook.example.com",
    "audiohook-organization-id": ORG,
    "audiohook-session-id": SESSION,
    "audiohook-correlation-id": "e160e428-53e2-487c-977d-96989bf5c99d",
    "x-api-key": "SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh",
    "signature": "sig1=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:",
    "signature-input": 'sig1=("@request-target" "@authority" "audiohook-organization-id" "audiohook-session-id" "audiohook-correlation-id" "x-api-key");keyid="SGVsbG8sIEkgYW0gdGhlIEFQSSBrZXkh";nonce="VGhpc0lzQVVuaXF1ZU5vbmNl";alg="hmac-sha256";created=1641013200;expires=3282026430',
}
DOC_PATH = "/api/v1/voicebiometrics/ws"
DOC_NOW = 1641013201.0


def sign(headers: dict[str, str], path: str, secret: str, created: int, nonce: str = "VGhpc0lzQVVuaXF1ZU5vbmNlMTIz") -> dict[str, str]:
    """Sign an upgrade as Genesys does (used by the end-to-end test too)."""
    components = ["@request-target", "@authority", "audiohook-organization-id", "audiohook-session-id", "audiohook-correlation-id", "x-api-key"]
    params = "(" + " ".join(f'"{c}"' for c in components) + ")"
    params += f';keyid="{headers["x-api-key"]}";nonce="{nonce}";alg="hmac-sha256";created={created};expires={created + 3600}'
    values = {"@request-target": path, "@authority": headers["host"]} | headers
    base = "\n".join(f'"{c}": {values[c]}' for c in components) + f'\n"@signature-params": {params}'
    digest = hmac.new(base64.b64decode(secret), base.encode(), hashlib.sha256).digest()
    return {**headers, "signature-input": f"sig1={params}", "signature": f"sig1=:{base64.b64encode(digest).decode()}:"}


def test_the_documented_signature_verifies() -> None:
    ah.verify_signature(handshake(DOC_HEADERS, DOC_PATH), DOC_SECRET, now=DOC_NOW)
    dialect = ah.create(handshake(DOC_HEADERS, DOC_PATH, Settings(audiohook_client_secret=DOC_SECRET)), now=DOC_NOW)
    assert dialect.api_key == DOC_HEADERS["x-api-key"] and dialect.session_id == SESSION


def test_header_order_and_whitespace_do_not_matter() -> None:
    shuffled = {k: f"  {v} " if k.startswith("audiohook") else v for k, v in reversed(DOC_HEADERS.items())}
    ah.verify_signature(handshake(shuffled, DOC_PATH), DOC_SECRET, now=DOC_NOW)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"audiohook-session-id": "30b0e395-84d3-4570-ac13-9a62d8f514c1"}, "does not match"),
        ({"x-api-key": "another-key"}, "keyid does not match"),
        ({"signature": "sig1=:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=:"}, "does not match"),
        ({"signature": "sig2=:NZBwyBHRRyRoeLqy1IzOa9VYBuI8TgMFt2GRDkDuJh4=:"}, "no signature for label"),
        ({"signature-input": DOC_HEADERS["signature-input"].replace(' "x-api-key"', "")}, "does not cover x-api-key"),
        ({"signature-input": DOC_HEADERS["signature-input"].replace('alg="hmac-sha256"', 'alg="rsa-v1_5-sha256"')}, "algorithm"),
        ({"signature-input": DOC_HEADERS["signature-input"].replace("VGhpc0lzQVVuaXF1ZU5vbmNl", "short")}, "nonce"),
        ({"signature-input": "sig1=(", "signature": "sig1=:x:"}, "expected"),
    ],
)
def test_a_signature_that_does_not_verify(change: dict[str, str], reason: str) -> None:
    with pytest.raises(ah.SignatureError, match=reason):
        ah.verify_signature(handshake({**DOC_HEADERS, **change}, DOC_PATH), DOC_SECRET, now=DOC_NOW)


def test_stale_future_and_unsigned_requests_are_refused_with_401() -> None:
    settings = Settings(audiohook_client_secret=DOC_SECRET)
    for now in (DOC_NOW + 60, DOC_NOW - 60):
        with pytest.raises(HandshakeRejected) as refused:
            ah.create(handshake(DOC_HEADERS, DOC_PATH, settings), now=now)
        assert refused.value.status == 401
    unsigned = {k: v for k, v in DOC_HEADERS.items() if not k.startswith("signature")}
    with pytest.raises(HandshakeRejected) as refused:
        ah.create(handshake(unsigned, DOC_PATH, settings), now=DOC_NOW)
    assert refused.value.status == 401
    # Without a configured secret nothing is checked.
    assert ah.create(handshake(unsigned, DOC_PATH)).api_key == DOC_HEADERS["x-api-key"]


def test_a_fresh_signature_made_like_genesys_verifies_on_our_route() -> None:
    secret = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    headers = sign({k: v for k, v in DOC_HEADERS.items() if not k.startswith("signature")}, "/v1/audiohook", secret, created=1_700_000_000)
    ah.verify_signature(handshake(headers), secret, now=1_700_000_001)
    with pytest.raises(ah.SignatureError):
        ah.verify_signature(handshake(headers, path="/v1/other"), secret, now=1_700_000_001)


def test_durations() -> None:
    assert [ah.duration(s) for s in (0, 0.0004, 1.25, 12.3456, 3600)] == ["PT0S", "PT0S", "PT1.25S", "PT12.346S", "PT3600S"]
    assert [ah.parse_duration(s) for s in ("PT0S", "PT1.25S", "PT1H2M3S", "PT", "P1D", "1.5", 3)] == [0, 1.25, 3723, None, None, None, None]
