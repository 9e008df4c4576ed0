"""The OpenAI Realtime transcription dialect, Sans-I/O: the real session core with the fake models.

A small in-process runner drives the dialect exactly as ``stream_server/runner.py`` does (commands
to the core, every core event through ``render`` right after the command that produced it). Every
message the dialect sends in these tests is validated strictly against the installed ``openai``
SDK's event models (current and beta) and against the field tables of ``docs/openai-realtime.md``.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soxr
from pydantic import BaseModel, TypeAdapter

from stream_server import protocol as p
from stream_server.dialects import openai_realtime as oa
from stream_server.dialects.base import Action, Close, Handshake, HandshakeRejected, Send
from stream_server.session import DecodeTicket, Session, SessionLimits
from tests.fakes import BurstDecoder, EnergyVad, silence, speech

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "openai-realtime.md"
CHUNK_S = 0.02

# --------------------------------------------------------------------------------------------
# Strict validation against the installed SDK (shared with the end-to-end test)
# --------------------------------------------------------------------------------------------


def _ga_models() -> dict[str, type[BaseModel]]:
    from openai.types import realtime as rt
    from openai.types.realtime.realtime_server_event import RealtimeServerEvent  # noqa: F401

    return {
        "session.created": rt.SessionCreatedEvent,
        "session.updated": rt.SessionUpdatedEvent,
        "input_audio_buffer.speech_started": rt.InputAudioBufferSpeechStartedEvent,
        "input_audio_buffer.speech_stopped": rt.InputAudioBufferSpeechStoppedEvent,
        "input_audio_buffer.committed": rt.InputAudioBufferCommittedEvent,
        "input_audio_buffer.cleared": rt.InputAudioBufferClearedEvent,
        "conversation.item.added": rt.ConversationItemAdded,
        "conversation.item.done": rt.ConversationItemDone,
        "conversation.item.created": rt.ConversationItemCreatedEvent,
        "conversation.item.input_audio_transcription.delta": rt.ConversationItemInputAudioTranscriptionDeltaEvent,
        "conversation.item.input_audio_transcription.completed": rt.ConversationItemInputAudioTranscriptionCompletedEvent,
        "conversation.item.input_audio_transcription.failed": rt.ConversationItemInputAudioTranscriptionFailedEvent,
        "error": rt.RealtimeErrorEvent,
    }


def _beta_models() -> dict[str, type[BaseModel]]:
    try:
        from openai.types.beta import realtime as beta
    except ImportError:  # newer SDKs may drop the beta namespace
        return {}
    return {
        "transcription_session.updated": beta.TranscriptionSessionUpdatedEvent,
        "input_audio_buffer.speech_started": beta.InputAudioBufferSpeechStartedEvent,
        "input_audio_buffer.speech_stopped": beta.InputAudioBufferSpeechStoppedEvent,
        "input_audio_buffer.committed": beta.InputAudioBufferCommittedEvent,
        "input_audio_buffer.cleared": beta.InputAudioBufferClearedEvent,
        "conversation.item.created": beta.ConversationItemCreatedEvent,
        "conversation.item.input_audio_transcription.delta": beta.ConversationItemInputAudioTranscriptionDeltaEvent,
        "conversation.item.input_audio_transcription.completed": beta.ConversationItemInputAudioTranscriptionCompletedEvent,
        "conversation.item.input_audio_transcription.failed": beta.ConversationItemInputAudioTranscriptionFailedEvent,
        "error": beta.ErrorEvent,
    }


def validate_openai_event(event: dict[str, Any]) -> list[str]:
    """Validate one server event strictly against every SDK model that describes it; returns the
    names of the models that accepted it (at least one, or the assertion fails)."""
    from openai.types.realtime import RealtimeTranscriptionSessionCreateResponse

    kind = event["type"]
    checked: list[str] = []
    ga, beta = _ga_models(), _beta_models()
    if kind in ga:
        ga[kind].model_validate(event, strict=True)
        checked.append(f"realtime.{ga[kind].__name__}")
        if kind != "conversation.item.created":  # also a member of the SDK's discriminated union
            from openai.types.realtime import RealtimeServerEvent

            parsed = TypeAdapter(RealtimeServerEvent).validate_python(event, strict=True)
            assert type(parsed) is ga[kind], (kind, type(parsed))
    if kind in ("session.created", "session.updated"):
        RealtimeTranscriptionSessionCreateResponse.model_validate(event["session"], strict=True)
        checked.append("RealtimeTranscriptionSessionCreateResponse")
    beta_kind = "transcription_session.updated" if kind == "transcription_session.created" else kind
    if beta_kind in beta:
        beta[beta_kind].model_validate({**event, "type": beta_kind}, strict=True)
        checked.append(f"beta.{beta[beta_kind].__name__}")
    assert checked, f"no SDK model describes {kind!r}"
    assert isinstance(event.get("event_id"), str) and event["event_id"]
    return checked


# --------------------------------------------------------------------------------------------
# The doc's field tables
# --------------------------------------------------------------------------------------------


def documented_events() -> dict[str, set[str]]:
    """Event type → top-level fields, from the 'Server events' table of docs/openai-realtime.md."""
    section = DOC.read_text().split("## Server events", 1)[1].split("\n## ", 1)[0]
    events: dict[str, set[str]] = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_.]+)` \| (.*?) \|", line)
        if m:
            events[m.group(1)] = set(re.findall(r"`([a-z_]+)`", m.group(2)))
    assert events, "the doc lists no server events"
    return events


def check_documented_fields(events: list[dict[str, Any]]) -> None:
    documented = documented_events()
    for event in events:
        assert event["type"] in documented, f"{event['type']} is sent but not documented"
        assert set(event) - {"type", "event_id"} == documented[event["type"]], event


# --------------------------------------------------------------------------------------------
# An in-process runner: dialect + real core + fake models
# --------------------------------------------------------------------------------------------

SEEN_TYPES: set[str] = set()


def handshake(
    *,
    query: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    subprotocols: tuple[str, ...] = (),
    known: tuple[str, ...] = ("tiny.en", "base"),
) -> Handshake:
    return Handshake(
        path="/v1/realtime",
        query={"intent": "transcription", **(query or {})},
        headers=headers or {},
        subprotocols=subprotocols,
        default_model="tiny.en",
        model_exists=lambda name: name in known,
    )


class Runner:
    """Applies the dialect's actions in order; renders each core event right after its cause."""

    def __init__(self, hs: Handshake | None = None, latency_chunks: int = 5) -> None:
        self.dialect = oa.create(hs or handshake())
        self.decoder = BurstDecoder()
        config = p.SessionConfig.model_validate({"model": "tiny.en"}).updated(self.dialect.initial_config())
        self.session = Session(
            "sess_test0001",
            config=config,
            vad=EnergyVad(),
            limits=SessionLimits(max_utterance_s=6.0),
            model_exists=lambda name: name in ("tiny.en", "base"),
        )
        self.latency = latency_chunks
        self.clock = 0
        self.inflight: list[tuple[int, DecodeTicket]] = []
        self.sent: list[dict[str, Any]] = []
        self.closed: Close | None = None
        self.session.start()
        self.drain()

    # plumbing -------------------------------------------------------------

    def apply(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Send):
                assert isinstance(action.message, str)
                event = json.loads(action.message)
                validate_openai_event(event)
                SEEN_TYPES.add(event["type"])
                self.sent.append(event)
            elif isinstance(action, Close):
                self.closed = action
            else:
                self.session.receive_message(action)
                self.drain()

    def drain(self) -> None:
        for ticket in self.session.decodes_to_submit():
            self.inflight.append((self.clock + self.latency, ticket))
        for event in self.session.events_to_send():
            self.apply(self.dialect.render(event))

    def tick(self) -> None:
        self.clock += 1
        due = [t for at, t in self.inflight if at <= self.clock]
        self.inflight = [(at, t) for at, t in self.inflight if at > self.clock]
        for ticket in due:
            try:
                [result] = self.decoder.decode_batch([ticket.request])
            except RuntimeError as exc:
                from stream_server.scheduler import failure_of

                self.session.receive_decode_failure(ticket, failure_of(exc))
            else:
                self.session.receive_decode_result(ticket, result)
            self.drain()

    def settle(self) -> None:
        while self.inflight:
            self.tick()

    # client side ------------------------------------------------------------

    def send(self, message: dict[str, Any] | str) -> list[dict[str, Any]]:
        """Send one client event; returns what the server sent in answer (synchronously)."""
        before = len(self.sent)
        self.apply(self.dialect.receive_text(message if isinstance(message, str) else json.dumps(message)))
        return self.sent[before:]

    def stream(self, samples16k: np.ndarray, *, rate: int = 24000, law: str | None = None) -> None:
        """Fake speech (made at 16 kHz) as the client's format, in 20 ms base64 appends."""
        audio = soxr.resample(samples16k, 16000, rate).astype(np.float32) if rate != 16000 else samples16k
        n = int(rate * CHUNK_S)
        for i in range(0, len(audio), n):
            chunk = audio[i : i + n]
            if law is None:
                data = (np.clip(chunk, -1, 1) * 32767).astype("<i2").tobytes()
            else:
                from stream_server.audio import encode_g711

                data = encode_g711(chunk, law)  # type: ignore[arg-type]
            self.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(data).decode()})
            self.tick()

    def update(self, session: dict[str, Any], *, beta: bool = False) -> dict[str, Any]:
        kind = "transcription_session.update" if beta else "session.update"
        [answer] = self.send({"type": kind, "session": session})
        return answer

    # reading ------------------------------------------------------------------

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.sent if e["type"] == kind]

    def kinds(self) -> list[str]:
        return [e["type"] for e in self.sent]


def ga_session(**input_fields: Any) -> dict[str, Any]:
    return {"type": "transcription", "audio": {"input": input_fields}}


def spoken(*words: int) -> str:
    return " ".join(f"w{k}" for k in words)


DELTA = "conversation.item.input_audio_transcription.delta"
COMPLETED = "conversation.item.input_audio_transcription.completed"
FAILED = "conversation.item.input_audio_transcription.failed"


@pytest.fixture(autouse=True)
def _fields_match_the_doc() -> Iterator[list[Runner]]:
    """Every test's runners: what was sent matches the doc's field tables."""
    runners: list[Runner] = []
    original = Runner.__init__

    def tracking_init(self: Runner, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        runners.append(self)

    Runner.__init__ = tracking_init  # type: ignore[method-assign]
    try:
        yield runners
    finally:
        Runner.__init__ = original  # type: ignore[method-assign]
    for runner in runners:
        check_documented_fields(runner.sent)


# --------------------------------------------------------------------------------------------
# Handshake
# --------------------------------------------------------------------------------------------


def test_bearer_header_is_the_api_key() -> None:
    dialect = oa.create(handshake(headers={"authorization": "Bearer sk-test"}))
    assert dialect.api_key == "sk-test" and dialect.subprotocol is None


def test_browser_subprotocols_carry_the_key_and_realtime_is_accepted() -> None:
    dialect = oa.create(handshake(subprotocols=("realtime", "openai-insecure-api-key.sk-browser")))
    assert dialect.api_key == "sk-browser"
    assert dialect.subprotocol == "realtime"


def test_no_key_is_none() -> None:
    assert oa.create(handshake()).api_key is None


def test_other_intents_are_refused_with_openai_error_body() -> None:
    with pytest.raises(HandshakeRejected) as info:
        oa.create(handshake(query={"intent": "conversation"}))
    assert info.value.status == 400
    error = info.value.body["error"]
    assert isinstance(error, dict) and error["param"] == "intent" and error["type"] == "invalid_request_error"


def test_session_created_in_current_form_with_24k_pcm_and_server_vad() -> None:
    r = Runner()
    [created] = r.sent
    assert created["type"] == "session.created"
    session = created["session"]
    assert session["type"] == "transcription" and session["id"] == "sess_test0001"
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 500,
    }
    assert session["include"] == []
    config = r.session.config
    assert (config.input_audio_format, config.sample_rate) == ("pcm16", 24000)
    assert config.include == ["logprobs"] and not config.interim_results


def test_beta_header_gets_transcription_session_created() -> None:
    r = Runner(handshake(headers={"openai-beta": "realtime=v1"}))
    [created] = r.sent
    assert created["type"] == "transcription_session.created"
    assert created["session"]["input_audio_format"] == "pcm16"


def test_model_in_the_query_is_used_when_the_server_has_it() -> None:
    r = Runner(handshake(query={"model": "base"}))
    assert r.session.config.model == "base"
    assert r.sent[0]["session"]["audio"]["input"]["transcription"]["model"] == "base"


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def test_current_form_update_maps_onto_the_native_config_and_is_echoed() -> None:
    r = Runner()
    answer = r.update(
        {
            **ga_session(
                format={"type": "audio/pcm", "rate": 24000},
                transcription={"model": "gpt-4o-transcribe", "language": "en-US", "prompt": "Acme"},
                turn_detection={
                    "type": "server_vad",
                    "threshold": 0.6,
                    "prefix_padding_ms": 200,
                    "silence_duration_ms": 700,
                },
                noise_reduction={"type": "near_field"},
            ),
            "include": ["item.input_audio_transcription.logprobs"],
        }
    )
    assert answer["type"] == "session.updated"
    audio_in = answer["session"]["audio"]["input"]
    assert audio_in["transcription"] == {"model": "gpt-4o-transcribe", "language": "en", "prompt": "Acme"}
    assert audio_in["turn_detection"]["threshold"] == 0.6 and audio_in["noise_reduction"] == {"type": "near_field"}
    assert answer["session"]["include"] == ["item.input_audio_transcription.logprobs"]
    config = r.session.config
    assert config.model == "tiny.en", "an OpenAI model name means the server's default model"
    assert (config.language, config.prompt) == ("en", "Acme")
    assert config.turn_detection == p.TurnDetection(threshold=0.6, prefix_padding_ms=200, silence_duration_ms=700)


@pytest.mark.parametrize(
    "name",
    [
        "whisper-1",
        "gpt-4o-transcribe",
        "gpt-4o-mini-transcribe",
        "gpt-transcribe",
        "gpt-realtime-whisper",
        "gpt-live-transcribe",
    ],
)
def test_openai_model_names_map_to_the_default_model(name: str) -> None:
    r = Runner()
    answer = r.update(ga_session(transcription={"model": name}))
    assert r.session.config.model == "tiny.en"
    assert answer["session"]["audio"]["input"]["transcription"]["model"] == name


def test_a_model_the_server_has_is_used_by_name() -> None:
    r = Runner()
    r.update(ga_session(transcription={"model": "base"}))
    assert r.session.config.model == "base"


@pytest.mark.parametrize(
    ("fmt", "native"), [({"type": "audio/pcmu"}, "g711_ulaw"), ({"type": "audio/pcma"}, "g711_alaw")]
)
def test_g711_formats_map_to_8k_native_formats(fmt: dict[str, str], native: str) -> None:
    r = Runner()
    answer = r.update(ga_session(format=fmt))
    assert answer["session"]["audio"]["input"]["format"] == fmt
    assert (r.session.config.input_audio_format, r.session.config.sample_rate) == (native, 8000)


@pytest.mark.parametrize(("eagerness", "silence_ms"), [("high", 500), ("medium", 1000), ("auto", 1000), ("low", 2000)])
def test_semantic_vad_is_server_vad_with_a_pause_chosen_by_eagerness(eagerness: str, silence_ms: int) -> None:
    r = Runner()
    answer = r.update(ga_session(turn_detection={"type": "semantic_vad", "eagerness": eagerness}))
    assert answer["session"]["audio"]["input"]["turn_detection"] == {"type": "semantic_vad", "eagerness": eagerness}
    td = r.session.config.turn_detection
    assert td is not None and td.silence_duration_ms == silence_ms


def test_turn_detection_null_switches_vad_off() -> None:
    r = Runner()
    answer = r.update(ga_session(turn_detection=None))
    assert answer["session"]["audio"]["input"]["turn_detection"] is None
    assert r.session.config.turn_detection is None


def test_keywords_and_a_single_language_from_languages() -> None:
    r = Runner()
    r.update(
        ga_session(transcription={"model": "base", "languages": ["de"], "keywords": ["Kubernetes", "Acme"]})
    )
    assert r.session.config.language == "de"
    assert r.session.config.prompt == "Kubernetes, Acme."


def test_a_language_the_english_only_model_cannot_transcribe_is_an_error_and_the_session_is_kept() -> None:
    r = Runner()
    r.update(ga_session(transcription={"model": "gpt-4o-transcribe", "language": "en"}))
    r.send({"type": "session.update", "session": ga_session(transcription={"model": "gpt-4o-transcribe", "language": "fr"})})
    [error] = [m for m in r.sent if m["type"] == "error"]
    assert error["error"]["code"] == "unsupported_language"
    assert error["error"]["param"] == "session.audio.input.transcription.language"
    assert "English only" in error["error"]["message"] and "'fr'" in error["error"]["message"]
    assert (r.session.config.model, r.session.config.language) == ("tiny.en", "en"), "the previous configuration is kept"
    r.send({"type": "session.update", "session": ga_session(transcription={"model": "base", "language": "fr"})})
    assert (r.session.config.model, r.session.config.language) == ("base", "fr"), "a multilingual model takes it"


def test_beta_form_update_answers_in_the_beta_form() -> None:
    r = Runner()
    answer = r.update(
        {
            "input_audio_format": "g711_ulaw",
            "input_audio_transcription": {"model": "gpt-4o-mini-transcribe", "language": "en"},
            "turn_detection": {"threshold": 0.4, "silence_duration_ms": 600},
            "input_audio_noise_reduction": None,
            "include": ["item.input_audio_transcription.logprobs"],
        },
        beta=True,
    )
    assert answer["type"] == "transcription_session.updated"
    session = answer["session"]
    assert session["input_audio_format"] == "g711_ulaw"
    assert session["input_audio_transcription"]["model"] == "gpt-4o-mini-transcribe"
    assert session["turn_detection"]["type"] == "server_vad" and session["turn_detection"]["threshold"] == 0.4
    config = r.session.config
    assert (config.input_audio_format, config.sample_rate, config.language) == ("g711_ulaw", 8000, "en")


def test_beta_form_reports_a_model_outside_its_schema_as_whisper_1() -> None:
    r = Runner()
    answer = r.update({"input_audio_transcription": {"model": "base"}}, beta=True)
    assert answer["session"]["input_audio_transcription"]["model"] == "whisper-1"
    assert r.session.config.model == "base"


# --------------------------------------------------------------------------------------------
# Utterances
# --------------------------------------------------------------------------------------------


def item_events(r: Runner, item_id: str) -> list[str]:
    return [e["type"] for e in r.sent if e.get("item_id") == item_id or e.get("item", {}).get("id") == item_id]


def test_vad_turn_in_openai_order_with_deltas_spelling_the_transcript() -> None:
    r = Runner()
    r.update({"type": "transcription", "include": ["item.input_audio_transcription.logprobs"]})
    r.stream(np.concatenate([silence(0.3), speech([1, 2, 3, 4, 5, 6]), silence(1.0)]))
    r.settle()
    [started] = r.of("input_audio_buffer.speech_started")
    item = started["item_id"]
    kinds = [k for k in item_events(r, item) if k != DELTA]
    assert kinds == [
        "input_audio_buffer.speech_started",
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
        COMPLETED,
    ]
    all_kinds = item_events(r, item)
    assert all_kinds.index(DELTA) < all_kinds.index("input_audio_buffer.speech_stopped"), (
        "text arrives while the speaker talks"
    )
    [completed] = r.of(COMPLETED)
    deltas = r.of(DELTA)
    assert "".join(d["delta"] for d in deltas) == completed["transcript"] == spoken(1, 2, 3, 4, 5, 6)
    assert [lp for d in deltas for lp in d["logprobs"]] == completed["logprobs"]
    assert "".join(lp["token"] for lp in completed["logprobs"]).strip() == completed["transcript"]
    assert completed["content_index"] == 0 and completed["usage"]["type"] == "duration"
    stopped = r.of("input_audio_buffer.speech_stopped")[0]
    assert completed["usage"]["seconds"] == pytest.approx((stopped["audio_end_ms"] - started["audio_start_ms"]) / 1000)
    assert r.of("input_audio_buffer.committed")[0]["previous_item_id"] is None


def test_logprobs_are_sent_only_when_included() -> None:
    r = Runner()
    r.stream(np.concatenate([speech([1, 2, 3]), silence(1.0)]))
    r.settle()
    assert r.of(COMPLETED) and all(e["logprobs"] is None for e in r.of(DELTA) + r.of(COMPLETED))


def test_each_item_starts_bare_and_previous_item_ids_chain() -> None:
    r = Runner()
    r.stream(np.concatenate([speech([1, 2]), silence(1.0), speech([3, 4]), silence(1.0)]))
    r.settle()
    completed = r.of(COMPLETED)
    assert [c["transcript"] for c in completed] == [spoken(1, 2), spoken(3, 4)]
    committed = r.of("input_audio_buffer.committed")
    assert [c["previous_item_id"] for c in committed] == [None, committed[0]["item_id"]]
    assert r.of("conversation.item.added")[1]["previous_item_id"] == committed[0]["item_id"]


def test_beta_form_announces_items_with_conversation_item_created() -> None:
    r = Runner(handshake(headers={"openai-beta": "realtime=v1"}))
    r.stream(np.concatenate([speech([1, 2]), silence(1.0)]))
    r.settle()
    assert r.of("conversation.item.created") and not r.of("conversation.item.added")
    assert r.of(COMPLETED)[0]["transcript"] == spoken(1, 2)


def test_telephone_mulaw_is_transcribed() -> None:
    r = Runner()
    r.update(ga_session(format={"type": "audio/pcmu"}))
    r.stream(np.concatenate([speech([2, 3, 4]), silence(1.0)]), rate=8000, law="ulaw")
    r.settle()
    assert [c["transcript"] for c in r.of(COMPLETED)] == [spoken(2, 3, 4)]


def test_manual_turns_have_no_speech_events_and_commit_makes_the_item() -> None:
    r = Runner()
    r.update(ga_session(turn_detection=None))
    r.stream(np.concatenate([speech([1, 2]), silence(1.5)]))
    assert not r.of(COMPLETED), "no VAD: only a commit ends the turn"
    answer = r.send({"type": "input_audio_buffer.commit", "event_id": "evt_c1"})
    assert [e["type"] for e in answer[:3]] == [
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    r.settle()
    assert [c["transcript"] for c in r.of(COMPLETED)] == [spoken(1, 2)]
    assert not r.of("input_audio_buffer.speech_started") and not r.of("input_audio_buffer.speech_stopped")


def test_empty_commit_is_openais_commit_empty_error_naming_the_client_event() -> None:
    r = Runner()
    r.stream(silence(0.5))
    [error] = r.send({"type": "input_audio_buffer.commit", "event_id": "evt_final"})
    assert error["type"] == "error"
    assert error["error"]["code"] == "input_audio_buffer_commit_empty"
    assert error["error"]["event_id"] == "evt_final"


def test_commit_during_speech_in_vad_mode_commits_once() -> None:
    r = Runner()
    r.stream(speech([1, 2, 3]))
    answer = r.send({"type": "input_audio_buffer.commit"})
    assert [e["type"] for e in answer][:4] == [
        "input_audio_buffer.speech_stopped",
        "input_audio_buffer.committed",
        "conversation.item.added",
        "conversation.item.done",
    ]
    r.stream(silence(1.0))
    r.settle()
    items = [c["item_id"] for c in r.of("input_audio_buffer.committed")]
    assert len(items) == len(set(items))
    assert [c["item_id"] for c in r.of(COMPLETED)] == items


def test_agents_sdk_ending_commit_then_clear_after_vad_committed() -> None:
    """What openai-agents sends when its input ends: commit (with an event_id) then clear."""
    r = Runner()
    r.stream(np.concatenate([speech([1, 2]), silence(1.0)]))
    r.send({"type": "input_audio_buffer.commit", "event_id": "final"})
    r.send({"type": "input_audio_buffer.clear"})
    r.settle()
    errors = r.of("error")
    assert [e["error"]["code"] for e in errors] == ["input_audio_buffer_commit_empty"]
    assert errors[0]["error"]["event_id"] == "final"
    assert r.kinds().index("input_audio_buffer.cleared") > r.kinds().index("error")
    assert [c["transcript"] for c in r.of(COMPLETED)] == [spoken(1, 2)]


def test_clear_mid_speech_creates_no_item_but_closes_sent_text() -> None:
    r = Runner(latency_chunks=2)
    r.stream(speech(list(range(1, 14))))  # 4.7 s: past min_commit_window_ms, words are sent during speech
    sent_text = "".join(d["delta"] for d in r.of(DELTA))
    assert sent_text
    answer = r.send({"type": "input_audio_buffer.clear"})
    kinds = [e["type"] for e in answer]
    assert kinds[0] == "input_audio_buffer.speech_stopped" and kinds[-1] == "input_audio_buffer.cleared"
    assert "input_audio_buffer.committed" not in kinds
    assert r.of(COMPLETED)[0]["transcript"] == sent_text, "deltas already sent are closed by completed"


def test_clear_before_any_text_sends_no_transcript() -> None:
    r = Runner(latency_chunks=200)
    r.stream(speech([1, 2]))
    answer = r.send({"type": "input_audio_buffer.clear"})
    assert [e["type"] for e in answer] == ["input_audio_buffer.speech_stopped", "input_audio_buffer.cleared"]
    r.stream(silence(0.5))
    r.settle()
    assert not r.of(COMPLETED) and not r.of(DELTA)


def test_binary_frames_are_audio_too() -> None:
    r = Runner()
    pcm = (soxr.resample(np.concatenate([speech([1, 2]), silence(1.0)]), 16000, 24000) * 32767).astype("<i2").tobytes()
    step = 960
    for i in range(0, len(pcm), step):
        r.apply(r.dialect.receive_bytes(pcm[i : i + step]))
        r.tick()
    r.settle()
    assert [c["transcript"] for c in r.of(COMPLETED)] == [spoken(1, 2)]


def test_a_failed_final_decode_is_failed_for_that_item_and_the_session_goes_on() -> None:
    r = Runner()
    r.update(ga_session(turn_detection=None))
    r.stream(np.concatenate([speech(list(range(1, 12))), silence(0.3)]))
    r.decoder.fail_next_final = 2  # the final decode fails, and so does its retry
    r.send({"type": "input_audio_buffer.commit"})
    for _ in range(20):
        r.tick()
    [failed] = r.of(FAILED)
    assert failed["item_id"] == r.of("input_audio_buffer.committed")[0]["item_id"]
    assert failed["error"]["code"] == "decode_failed" and failed["content_index"] == 0
    assert not r.of(COMPLETED)
    r.stream(np.concatenate([speech([5, 6]), silence(0.3)]))
    r.send({"type": "input_audio_buffer.commit"})
    r.settle()
    assert [c["transcript"] for c in r.of(COMPLETED)] == [spoken(5, 6)]


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ({"event_id": "e1"}, "missing_required_parameter", "type"),
        ({"type": "response.create"}, "invalid_value", "type"),
        ({"type": "session.close"}, "invalid_value", "type"),
        ({"type": "input_audio_buffer.append", "audio": "%%%"}, "invalid_value", "audio"),
        ({"type": "input_audio_buffer.append", "audio": 7}, "invalid_type", "audio"),
        ({"type": "session.update", "session": {"audio": {}}}, "missing_required_parameter", "session.type"),
        ({"type": "session.update", "session": {"type": "realtime"}}, "invalid_value", "session.type"),
        (
            {"type": "session.update", "session": {"type": "transcription", "voice": "x"}},
            "unknown_parameter",
            "session.voice",
        ),
        (
            {"type": "session.update", "session": ga_session(format={"type": "audio/pcm", "rate": 16000})},
            "invalid_value",
            "session.audio.input.format.rate",
        ),
        (
            {"type": "session.update", "session": ga_session(format={"type": "audio/opus"})},
            "invalid_value",
            "session.audio.input.format.type",
        ),
        (
            {"type": "session.update", "session": ga_session(turn_detection={"type": "server_vad", "threshold": 2})},
            "decimal_above_max_value",
            "session.audio.input.turn_detection.threshold",
        ),
        (
            {
                "type": "session.update",
                "session": ga_session(turn_detection={"type": "server_vad", "silence_duration_ms": "x"}),
            },
            "invalid_type",
            "session.audio.input.turn_detection.silence_duration_ms",
        ),
        (
            {"type": "session.update", "session": ga_session(turn_detection={"threshold": 0.5})},
            "missing_required_parameter",
            "session.audio.input.turn_detection.type",
        ),
        (
            {
                "type": "session.update",
                "session": ga_session(turn_detection={"type": "semantic_vad", "eagerness": "max"}),
            },
            "invalid_value",
            "session.audio.input.turn_detection.eagerness",
        ),
        (
            {"type": "session.update", "session": ga_session(transcription={"language": "english!"})},
            "invalid_value",
            "session.audio.input.transcription.language",
        ),
        (
            {"type": "session.update", "session": ga_session(transcription={"prompt": "x" * 1001})},
            "string_above_max_length",
            "session.audio.input.transcription.prompt",
        ),
        (
            {"type": "session.update", "session": {"type": "transcription", "include": ["words"]}},
            "invalid_value",
            "session.include[0]",
        ),
        (
            {"type": "transcription_session.update", "session": {"input_audio_format": "pcm8"}},
            "invalid_value",
            "session.input_audio_format",
        ),
        (
            {"type": "transcription_session.update", "session": {"turn_detection": {"prefix_padding_ms": -1}}},
            "integer_below_min_value",
            "session.turn_detection.prefix_padding_ms",
        ),
    ],
)
def test_bad_client_events_get_openai_errors_and_the_session_goes_on(
    message: dict[str, Any] | str, code: str, param: str | None
) -> None:
    r = Runner()
    before = r.session.config
    answer = r.send(message)
    [error] = answer
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert (error["error"]["code"], error["error"]["param"]) == (code, param)
    assert error["error"]["message"]
    if isinstance(message, dict) and "event_id" in message:
        assert error["error"]["event_id"] == message["event_id"]
    assert r.session.config == before, "a rejected update changes nothing"
    assert r.update(ga_session(turn_detection=None))["type"] == "session.updated", "the session goes on"


def test_error_names_the_client_event_id() -> None:
    r = Runner()
    [error] = r.send({"type": "session.update", "event_id": "evt_42", "session": {"type": "nope"}})
    assert error["error"]["event_id"] == "evt_42"


@pytest.mark.parametrize(
    ("code", "kind"),
    [
        ("message_too_large", "invalid_request_error"),
        ("server_busy", "server_error"),
        ("idle_timeout", "invalid_request_error"),
    ],
)
def test_shell_errors_are_in_openais_error_shape(code: str, kind: str) -> None:
    r = Runner()
    actions = r.dialect.error(p.Error(p.ErrorInfo(kind, code, "message for the client")))
    r.apply(actions)
    error = r.sent[-1]
    assert error["type"] == "error" and error["error"]["code"] == code and error["error"]["type"] == kind


def test_transcript_done_of_an_idle_flush_sends_nothing() -> None:
    r = Runner()
    assert r.dialect.render(p.TranscriptDone("", None, p.Usage(1.0))) == []


# --------------------------------------------------------------------------------------------
# The doc covers exactly what is sent
# --------------------------------------------------------------------------------------------


def test_every_documented_event_is_sent_and_every_sent_event_is_documented() -> None:
    """Scenarios that between them send every event type; the autouse fixture checks fields."""
    ga = Runner()
    ga.update({"type": "transcription", "include": ["item.input_audio_transcription.logprobs"]})
    ga.stream(np.concatenate([speech([1, 2, 3]), silence(1.0)]))
    ga.settle()
    ga.send({"type": "input_audio_buffer.commit"})
    ga.send({"type": "input_audio_buffer.clear"})
    ga.update(ga_session(turn_detection=None))
    ga.stream(speech(list(range(1, 12))))
    ga.decoder.fail_next_final = 2
    ga.send({"type": "input_audio_buffer.commit"})
    ga.settle()
    beta = Runner(handshake(headers={"openai-beta": "realtime=v1"}))
    beta.update({"input_audio_format": "pcm16"}, beta=True)
    beta.stream(np.concatenate([speech([1, 2]), silence(1.0)]))
    beta.settle()
    sent = {e["type"] for e in ga.sent + beta.sent}
    assert sent == set(documented_events())
