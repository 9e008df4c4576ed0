"""The Flux dialect (``/v2/listen``) in front of a real session with the tone-burst VAD and decoder:
the turn state machine, the messages against the official SDK's models, configuration, refusals."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pydantic
import pytest
from deepgram.core.unchecked_base_model import construct_type
from deepgram.listen.v2.socket_client import V2SocketClientResponse
from deepgram.listen.v2.types import (
    ListenV2ConfigureFailure,
    ListenV2ConfigureSuccess,
    ListenV2Connected,
    ListenV2FatalError,
    ListenV2TurnInfo,
    ListenV2Warning,
)

from stream_server import protocol as p
from stream_server.dialects import deepgram_flux as flux
from stream_server.dialects.base import Handshake, HandshakeRejected
from tests.dialect_harness import DialectHarness
from tests.fakes import silence, speech, to_pcm16
from tests.test_dialect_deepgram import _no_extra, check_documented, documented_fields

QUERY = {"model": "flux-general-en", "encoding": "linear16", "sample_rate": "16000"}

SDK_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "Connected": ListenV2Connected,
    "TurnInfo": ListenV2TurnInfo,
    "ConfigureSuccess": ListenV2ConfigureSuccess,
    "ConfigureFailure": ListenV2ConfigureFailure,
    "Warning": ListenV2Warning,
    "Error": ListenV2FatalError,
}

#: Flux's turn state machine (Deepgram's "Understanding the Flux State Machine"): state → event → next.
TRANSITIONS = {
    "initial": {"StartOfTurn": "ongoing"},
    "ongoing": {"Update": "ongoing", "EagerEndOfTurn": "awaiting", "EndOfTurn": "initial"},
    "awaiting": {"TurnResumed": "ongoing", "EndOfTurn": "initial"},
}


def sdk_validate(text: str) -> dict[str, Any]:
    """One server message, strictly against its SDK model and as the SDK's socket reads it."""
    data = json.loads(text)
    model = SDK_MODELS[data["type"]]
    parsed = model.model_validate_json(text, strict=True)
    _no_extra(parsed, data["type"])
    as_sdk_reads_it = construct_type(type_=V2SocketClientResponse, object_=data)  # type: ignore[arg-type]
    assert type(as_sdk_reads_it) is model, (data["type"], type(as_sdk_reads_it))
    return data


def check_turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every TurnInfo follows the state machine and its rules; the EndOfTurn messages."""
    state, index, eager = "initial", 0, None
    ends = []
    for message in messages:
        if message["type"] != "TurnInfo":
            continue
        event = message["event"]
        assert event in TRANSITIONS[state], (state, event, messages)
        assert message["turn_index"] == index
        if event == "EagerEndOfTurn":
            assert message["transcript"], "an EagerEndOfTurn always has a transcript"
            eager = message["transcript"]
        if event == "EndOfTurn":
            assert eager is None or message["transcript"] == eager, "EndOfTurn repeats the eager transcript, or TurnResumed came first"
            assert message["trigger"] in ("model", "manual", "timeout")
            ends.append(message)
            index += 1
        else:
            assert "trigger" not in message
        if event in ("TurnResumed", "EndOfTurn"):
            eager = None
        state = TRANSITIONS[state][event]
    assert [m["sequence_id"] for m in messages] == list(range(len(messages))), "sequence_id counts every message"
    return ends


def handshake(query: dict[str, str] | None = None, *, default_model: str = "tiny.en") -> Handshake:
    return Handshake(
        path="/v2/listen",
        query=QUERY if query is None else query,
        headers={"authorization": "Token secret"},
        subprotocols=(),
        default_model=default_model,
        model_exists=lambda name: name in ("tiny.en", "base"),
    )


class FluxHarness(DialectHarness):
    def __init__(self, query: dict[str, str] | None = None) -> None:
        super().__init__(flux.create(handshake(query)), "sess_flux01")

    def feed(self, samples: np.ndarray, frame: int = 320) -> None:
        data = to_pcm16(samples)
        for i in range(0, len(data), frame * 2):
            self.receive_bytes(data[i : i + frame * 2])
            self.tick()

    def send(self, message: dict[str, Any]) -> None:
        self.receive_text(json.dumps(message))

    def messages(self) -> list[dict[str, Any]]:
        return [sdk_validate(str(m)) for m in self.sent]


def words(*ks: int) -> str:
    return " ".join(f"w{k}" for k in ks)


def test_two_turns_follow_the_state_machine_and_end_with_their_words() -> None:
    h = FluxHarness()
    h.feed(np.concatenate([silence(0.3), speech([1, 2, 3]), silence(1.2), speech([4, 5]), silence(1.2)]))
    h.send({"type": "CloseStream"})
    h.settle()
    messages = h.messages()
    assert messages[0]["type"] == "Connected" and messages[0]["sequence_id"] == 0
    ends = check_turns(messages)
    assert [m["transcript"] for m in ends] == [words(1, 2, 3), words(4, 5)]
    assert [m["turn_index"] for m in ends] == [0, 1] and all(m["trigger"] == "model" for m in ends)
    events = [m["event"] for m in messages if m["type"] == "TurnInfo"]
    assert events.count("StartOfTurn") == 2 and "Update" in events
    assert "EagerEndOfTurn" not in events, "only with eager_eot_threshold"
    first = ends[0]
    assert 0 <= first["audio_window_start"] <= 0.3 and first["audio_window_end"] > first["words"][-1]["end"]
    assert [w["word"] for w in first["words"]] == ["w1", "w2", "w3"] and first["end_of_turn_confidence"] >= 0.7
    assert h.closes and h.closes[-1].code == 1000


def test_eager_end_of_turn_comes_at_the_pause_before_the_end_of_turn() -> None:
    h = FluxHarness({**QUERY, "eager_eot_threshold": "0.4"})
    h.feed(np.concatenate([silence(0.3), speech([1, 2]), silence(1.5)]))
    h.send({"type": "CloseStream"})
    h.settle()
    messages = h.messages()
    ends = check_turns(messages)
    events = [m["event"] for m in messages if m["type"] == "TurnInfo"]
    assert events.index("EagerEndOfTurn") < events.index("EndOfTurn")
    [eager] = [m for m in messages if m.get("event") == "EagerEndOfTurn"]
    assert eager["transcript"] == ends[0]["transcript"] == words(1, 2)
    assert eager["end_of_turn_confidence"] >= 0.4


def test_a_pause_that_is_not_the_end_resumes_the_turn() -> None:
    """A short pause inside a turn (shorter than the turn's silence) gives EagerEndOfTurn; the
    next words give TurnResumed, then Updates, and one EndOfTurn with all of it."""
    h = FluxHarness({**QUERY, "eager_eot_threshold": "0.5", "eot_threshold": "0.9"})  # turns end after 1 s
    h.feed(np.concatenate([silence(0.3), speech([1, 2]), silence(0.6), speech([3]), silence(1.8)]))
    h.send({"type": "CloseStream"})
    h.settle()
    messages = h.messages()
    ends = check_turns(messages)
    events = [m["event"] for m in messages if m["type"] == "TurnInfo"]
    assert "TurnResumed" in events and events.index("EagerEndOfTurn") < events.index("TurnResumed")
    assert [m["transcript"] for m in ends] == [words(1, 2, 3)]


def test_force_end_turn_ends_the_turn_at_once_with_a_manual_trigger() -> None:
    h = FluxHarness({**QUERY, "eot_threshold": "1.0", "eot_timeout_ms": "5000"})  # only ForceEndTurn ends turns
    h.feed(np.concatenate([silence(0.3), speech([1, 2]), silence(0.6)]))
    h.send({"type": "ForceEndTurn"})
    h.settle()
    ends = check_turns(h.messages())
    assert [(m["transcript"], m["trigger"], m["end_of_turn_confidence"]) for m in ends] == [(words(1, 2), "manual", 1.0)]
    h.send({"type": "ForceEndTurn"})  # no turn open: nothing to end
    assert check_turns(h.messages()) == ends


def test_configure_changes_the_thresholds_and_keyterms_and_says_what_is_in_force() -> None:
    h = FluxHarness()
    h.send({"type": "Configure", "thresholds": {"eot_threshold": 0.9, "eot_timeout_ms": 3000}, "keyterms": ["Kubernetes", "gRPC"]})
    h.send({"type": "Configure", "thresholds": {"eot_threshold": 2}})
    h.send({"type": "Configure", "keyterms": "not a list but one term"})
    success, failure, second = [m for m in h.messages() if m["type"] != "Connected"]
    assert success["type"] == "ConfigureSuccess" and success["thresholds"] == {"eot_threshold": 0.9, "eager_eot_threshold": None, "eot_timeout_ms": 3000}
    assert success["keyterms"] == ["Kubernetes", "gRPC"]
    assert failure["type"] == "ConfigureFailure" and "eot_threshold" in failure["description"]
    assert second["type"] == "ConfigureSuccess" and second["keyterms"] == ["not a list but one term"]
    config = h.session.config
    assert config.turn_detection is not None and config.turn_detection.silence_duration_ms == 1000
    assert config.prompt == "not a list but one term"


def test_bad_messages_get_warnings_and_the_stream_goes_on() -> None:
    h = FluxHarness()
    h.receive_text("{not json")
    h.send({"type": "Finalize"})
    h.feed(np.concatenate([silence(0.3), speech([1]), silence(1.2)]))
    h.send({"type": "CloseStream"})
    h.settle()
    messages = h.messages()
    assert [m["code"] for m in messages if m["type"] == "Warning"] == ["UNPARSABLE_CLIENT_MESSAGE", "UNKNOWN_MESSAGE_TYPE"]
    assert [m["transcript"] for m in check_turns(messages)] == [words(1)]


def test_turn_silence_follows_eot_threshold_and_the_timeout() -> None:
    assert flux.turn_silence_ms(0.7, 5000) == 500, "Flux's default threshold: the server's measured default"
    assert flux.turn_silence_ms(0.5, 5000) == 300 and flux.turn_silence_ms(0.9, 5000) == 1000
    assert flux.turn_silence_ms(1.0, 4000) == 4000 and flux.turn_silence_ms(1.0, 60000) == 5000
    assert flux.turn_silence_ms(0.9, 600) == 600, "never past eot_timeout_ms"


@pytest.mark.parametrize(
    ("query", "needle"),
    [
        ({"encoding": "linear16", "sample_rate": "16000"}, "requires a model"),
        ({**QUERY, "model": "nova-3"}, "neither a Flux model"),
        ({**QUERY, "sample_rate": "x"}, "sample_rate"),
        ({"model": "flux-general-en", "encoding": "linear16"}, "sample_rate is required"),
        ({**QUERY, "encoding": "flac"}, "encoding"),
        ({**QUERY, "eot_threshold": "0.2"}, "eot_threshold"),
        ({**QUERY, "eager_eot_threshold": "0.95"}, "eager_eot_threshold"),
        ({**QUERY, "eot_timeout_ms": "100"}, "eot_timeout_ms"),
        ({**QUERY, "model": "flux-general-multi"}, "English only"),
        ({**QUERY, "redact": "phi"}, "'phi' is not a redaction this server does"),
    ],
)
def test_invalid_queries_are_refused_before_the_upgrade(query: dict[str, str], needle: str) -> None:
    with pytest.raises(HandshakeRejected) as info:
        flux.create(handshake(query))
    assert info.value.status == 400 and needle in info.value.body["err_msg"], info.value.body


def test_redact_numbers_becomes_the_sessions_redaction() -> None:
    assert flux.create(handshake({**QUERY, "redact": "aggressive_numbers"})).initial_config()["redact"] == ["numbers"]
    assert "redact" not in flux.create(handshake(QUERY)).initial_config()


def test_flux_multi_detects_the_language_with_a_multilingual_model() -> None:
    dialect = flux.create(handshake({**QUERY, "model": "flux-general-multi"}, default_model="base"))
    assert dialect.initial_config()["language"] is None
    hinted = flux.create(handshake({**QUERY, "model": "flux-general-multi", "language_hint": "de"}, default_model="base"))
    assert hinted.initial_config()["language"] == "de"
    dialect.render(p.SpeechStarted("item_1", 0))
    words_ = [p.WordTiming(" Hallo", 0.1, 0.4, 0.9)]
    dialect.render(p.TranscriptDelta("item_1", " Hallo", [p.TokenLogprob.of(" Hallo", -0.1)], words_, language="de"))
    [end] = dialect.render(p.TranscriptSegment("item_1", 0.0, 0.9, " Hallo", "de", words_, -0.1, 0.0))
    message = sdk_validate(str(end.message))
    assert message["languages"] == ["de"] and message["transcript"] == "Hallo"


def test_an_update_never_shows_a_committed_word_twice() -> None:
    """The core commits words out of its interim tail (a delta), then sends the new, shorter tail
    in the same step: an Update between the two repeated the words ("which which" with the SDK)."""
    dialect = flux.create(handshake())
    w = [p.WordTiming(f" w{k}", k * 0.3, k * 0.3 + 0.2, 0.9) for k in range(1, 4)]
    events: list[p.ServerEvent] = [
        p.SessionCreated({"model": "tiny.en"}),
        p.SpeechStarted("item_1", 0),
        p.TranscriptInterim("item_1", " w1 w2", w[:2]),
        p.TranscriptDelta("item_1", " w1", [p.TokenLogprob.of(" w1", -0.1)], w[:1]),
        p.TranscriptInterim("item_1", " w2 w3", w[1:]),
        p.TranscriptDelta("item_1", " w2 w3", [p.TokenLogprob.of(" w2", -0.1), p.TokenLogprob.of(" w3", -0.1)], w[1:]),
        p.TranscriptInterim("item_1", "", []),
        p.TranscriptSegment("item_1", 0.0, 1.5, " w1 w2 w3", None, w, -0.1, 0.0),
    ]
    sent = [sdk_validate(str(a.message)) for e in events for a in dialect.render(e) if hasattr(a, "message")]
    shown = [(m["event"], m["transcript"]) for m in sent if m.get("event") in ("StartOfTurn", "Update")]
    assert shown == [("StartOfTurn", "w1 w2"), ("Update", "w1 w2 w3")]
    assert [m["transcript"] for m in check_turns(sent)] == ["w1 w2 w3"]


def test_every_message_type_validates_against_the_sdk_and_matches_the_doc() -> None:
    h = FluxHarness({**QUERY, "eager_eot_threshold": "0.5"})
    h.send({"type": "Configure", "thresholds": {"eot_threshold": 0.8}})
    h.send({"type": "Configure", "thresholds": {"eot_timeout_ms": 1}})
    h.send({"type": "Nope"})
    h.feed(np.concatenate([silence(0.3), speech([1, 2]), silence(1.5)]))
    h.send({"type": "CloseStream"})
    h.settle()
    broken = FluxHarness({"model": "flux-general-en"})  # containerized: bytes that are no audio
    broken.receive_bytes(b"this is not audio at all, in any container" * 3)
    broken.send({"type": "CloseStream"})
    messages = h.messages() + broken.messages()
    assert {m["type"] for m in messages} == set(SDK_MODELS)
    assert [m["code"] for m in broken.messages() if m["type"] == "Error"] == ["DATA-0000"]
    assert broken.closes and broken.closes[-1].code == 1008
    seen = check_documented(messages, "## Flux server messages")
    assert seen == set(documented_fields("## Flux server messages")), "the doc lists exactly the messages sent"


def test_a_turn_starts_with_its_first_words_and_noise_starts_none() -> None:
    """A VAD onset that the decoder hears no words in (a cough, a door) is no turn: no StartOfTurn
    interrupts an agent for it, and turn_index does not move."""
    dialect = flux.create(handshake())
    w = [p.WordTiming(" Hello.", 2.1, 2.5, 0.9)]
    events: list[p.ServerEvent] = [
        p.SessionCreated({"model": "tiny.en"}),
        p.SpeechStarted("item_1", 0),
        p.TranscriptInterim("item_1", "", []),
        p.TranscriptSegment("item_1", 0.0, 0.6, "", None, [], 0.0, 0.0),
        p.SpeechStarted("item_2", 2000),
        p.TranscriptInterim("item_2", " Hello.", w),
        p.TranscriptDelta("item_2", " Hello.", [p.TokenLogprob.of(" Hello.", -0.1)], w),
        p.TranscriptInterim("item_2", "", []),
        p.TranscriptSegment("item_2", 2.0, 2.9, " Hello.", None, w, -0.1, 0.0),
    ]
    sent = [sdk_validate(str(a.message)) for e in events for a in dialect.render(e) if hasattr(a, "message")]
    turns = [(m["event"], m["turn_index"], m["transcript"]) for m in sent if m["type"] == "TurnInfo"]
    assert turns == [("StartOfTurn", 0, "Hello."), ("EndOfTurn", 0, "Hello.")]
