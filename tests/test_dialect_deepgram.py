"""The Deepgram dialect, Sans-I/O: query parsing, the wire mapping, and the real core driven through it.

``DeepgramHarness`` wires the dialect to a real :class:`Session` (with the deterministic fakes)
the way the WebSocket shell does: actions are applied in order and the events a command
produced are rendered right after it. Every message the dialect sends is validated strictly
against the installed ``deepgram-sdk``'s own models (``sdk_validate``), and ``docs/deepgram.md``'s
field tables are checked against what is sent.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import hashlib
import json
import math
import re
import struct
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
import pytest
from deepgram.core.unchecked_base_model import construct_type
from deepgram.listen.v1.socket_client import V1SocketClientResponse
from deepgram.listen.v1.types import (
    ListenV1ConfigureFailure,
    ListenV1ConfigureSuccess,
    ListenV1Error,
    ListenV1Metadata,
    ListenV1Results,
    ListenV1SpeechStarted,
    ListenV1UtteranceEnd,
)

from stream_server import protocol as p
from stream_server.dialects import deepgram as dg
from stream_server.dialects.base import Close, Handshake, HandshakeRejected, Send
from tests.dialect_harness import DialectHarness
from tests.fakes import silence, speech, to_pcm16
from tests.http_api_support import encode

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "deepgram.md"
NOW = datetime.datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=datetime.UTC)
SDK_QUERY = {"model": "nova-3", "encoding": "linear16", "sample_rate": "16000"}

SDK_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "Results": ListenV1Results,
    "Metadata": ListenV1Metadata,
    "SpeechStarted": ListenV1SpeechStarted,
    "UtteranceEnd": ListenV1UtteranceEnd,
    "Error": ListenV1Error,
    "ConfigureSuccess": ListenV1ConfigureSuccess,
    "ConfigureFailure": ListenV1ConfigureFailure,
}


# --------------------------------------------------------------------------------------------
# Helpers shared with the end-to-end test
# --------------------------------------------------------------------------------------------


#: Fields Deepgram sends that the SDK's generated models do not define (it keeps them as extras):
#: ``extra``, the caller's ``extra=KEY:VALUE`` pairs echoed in ``Metadata`` (Deepgram's "Extra
#: Metadata" documentation; its Rust SDK reads it there).
SDK_UNMODELLED = {"Metadata": {"extra"}}


def _no_extra(model: Any, where: str) -> None:
    """The SDK's models accept unknown keys silently; a field it does not know is a bug here."""
    if isinstance(model, pydantic.BaseModel):
        unknown = set(model.model_extra or ()) - SDK_UNMODELLED.get(where, set())
        assert not unknown, f"{where}: fields the SDK does not define: {sorted(unknown)}"
        for name in type(model).model_fields:
            _no_extra(getattr(model, name), f"{where}.{name}")
    elif isinstance(model, list):
        for item in model:
            _no_extra(item, f"{where}[]")


def sdk_validate(text: str) -> dict[str, Any]:
    """Validate one server message strictly against its SDK model, and check that the SDK's own
    socket parser (``construct_type`` over its response union) picks that same model."""
    data = json.loads(text)
    model = SDK_MODELS[data["type"]]
    parsed = model.model_validate_json(text, strict=True)
    _no_extra(parsed, data["type"])
    as_sdk_reads_it = construct_type(type_=V1SocketClientResponse, object_=data)  # type: ignore[arg-type]
    assert type(as_sdk_reads_it) is model, (data["type"], type(as_sdk_reads_it))
    return data


def field_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key of a JSON message as a dotted path, list items as ``[]``."""
    out: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            out.add(path)
            out |= field_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            out |= field_paths(item, prefix + "[]")
    return out


def documented_fields(heading: str = "## Server messages") -> dict[str, tuple[set[str], set[str]]]:
    """A table of ``docs/deepgram.md`` (by default the server messages'): type → (required
    paths, optional paths)."""
    section = DOC.read_text().split(heading, 1)[1].split("\n## ", 1)[0]
    table: dict[str, tuple[set[str], set[str]]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 2 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([^`]+)`", cells[1])
        required = {n for n in names if not n.endswith("?")}
        optional = {n[:-1] for n in names if n.endswith("?")}
        table[cells[0].strip("`")] = (required, optional)
    return table


def _ancestors(path: str) -> set[str]:
    parts = re.split(r"(?=\.)|(?=\[\])", path)
    return {"".join(parts[:i]).lstrip(".") for i in range(1, len(parts) + 1)} - {""}


def check_documented(messages: Iterable[dict[str, Any]], heading: str = "## Server messages") -> set[str]:
    """Every field sent is documented (in the table under ``heading``) and every documented
    required field is sent; returns the message types seen."""
    table = documented_fields(heading)
    seen: dict[str, set[str]] = {}
    for message in messages:
        seen.setdefault(message["type"], set()).update(field_paths(message))
    for kind, observed in seen.items():
        assert kind in table, f"{kind} is sent but not documented"
        required, optional = table[kind]
        allowed = set().union(*(_ancestors(x) for x in required | optional))
        assert observed <= allowed, f"{kind}: undocumented fields {sorted(observed - allowed)}"
        missing = required - observed
        assert not missing, f"{kind}: documented fields never sent {sorted(missing)}"
    return set(seen)


# --------------------------------------------------------------------------------------------
# A real core session behind the dialect, wired as the shell wires it
# --------------------------------------------------------------------------------------------


def handshake(query: dict[str, str] | None = None, **kwargs: Any) -> Handshake:
    return Handshake(
        path="/v1/listen",
        query=SDK_QUERY if query is None else query,
        headers=kwargs.get("headers", {"authorization": "Token secret"}),
        subprotocols=kwargs.get("subprotocols", ()),
        default_model="tiny.en",
        model_exists=lambda name: name in ("tiny.en", "base"),
    )


class DeepgramHarness(DialectHarness):
    """The dialect in front of a real session with the fake VAD and decoder."""

    def __init__(self, query: dict[str, str] | None = None, latency_chunks: int = 5) -> None:
        self.audio = bytearray()
        super().__init__(dg.create(handshake(query), now=NOW), "sess_deepgram01", latency_chunks)

    def feed(self, samples: np.ndarray, frame: int = 320) -> None:
        data = to_pcm16(samples)
        for i in range(0, len(data), frame * 2):
            self.send_bytes(data[i : i + frame * 2])
            self.tick()

    def send_bytes(self, data: bytes) -> None:
        self.audio += data
        self.receive_bytes(data)

    def send(self, message: dict[str, Any]) -> None:
        self.receive_text(json.dumps(message))

    def messages(self) -> list[dict[str, Any]]:
        return [sdk_validate(m) for m in self.sent if isinstance(m, str)]

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.messages() if m["type"] == kind]


def transcript(result: dict[str, Any]) -> str:
    return str(result["channel"]["alternatives"][0]["transcript"])


def finals(h: DeepgramHarness) -> list[dict[str, Any]]:
    return [r for r in h.of("Results") if r["is_final"]]


def spoken(*words: int) -> str:
    return " ".join(f"w{k}" for k in words)


def turns(h: DeepgramHarness) -> list[str]:
    """What a Deepgram client assembles: is_final transcripts joined until a speech_final."""
    out: list[str] = []
    parts: list[str] = []
    for result in finals(h):
        if transcript(result):
            parts.append(transcript(result))
        if result["speech_final"]:
            out.append(" ".join(parts))
            parts = []
    return out + ([" ".join(parts)] if parts else [])


# --------------------------------------------------------------------------------------------
# Query parameters and handshake
# --------------------------------------------------------------------------------------------


def rejected(query: dict[str, str]) -> HandshakeRejected:
    with pytest.raises(HandshakeRejected) as info:
        dg.create(handshake(query))
    assert info.value.status == 400
    assert set(info.value.body) == {"err_code", "err_msg", "request_id"}
    return info.value


def test_what_the_sdk_sends_maps_onto_the_native_config() -> None:
    query = {
        **SDK_QUERY,
        "interim_results": "true",
        "endpointing": "300",
        "utterance_end_ms": "1000",
        "vad_events": "true",
        "punctuate": "true",
        "language": "en-US",
        "smart_format": "false",
        "channels": "1",
        "multichannel": "false",
        "diarize": "true",  # unknown to this server: ignored, as Deepgram ignores what it does not use
    }
    config = dg.create(handshake(query)).initial_config()
    effective = p.SessionConfig.model_validate({"model": "tiny.en"}).updated(config)
    assert effective.input_audio_format == "pcm16" and effective.sample_rate == 16000
    assert effective.model == "tiny.en", "nova-3 means the server's default model"
    assert effective.interim_results is True
    assert effective.turn_detection is not None and effective.turn_detection.silence_duration_ms == 300
    assert effective.language == "en"
    assert set(effective.include) == {"words", "logprobs"}


@pytest.mark.parametrize(
    ("encoding", "rate", "native"),
    [("linear16", "16000", "pcm16"), ("mulaw", "8000", "g711_ulaw"), ("alaw", "8000", "g711_alaw"), ("linear16", "44100", "pcm16")],
)
def test_raw_encodings(encoding: str, rate: str, native: str) -> None:
    config = dg.create(handshake({"model": "nova-2", "encoding": encoding, "sample_rate": rate})).initial_config()
    assert config["input_audio_format"] == native and config["sample_rate"] == int(rate)


def test_a_model_the_server_has_is_used_and_booleans_are_case_insensitive() -> None:
    config = dg.create(handshake({**SDK_QUERY, "model": "base", "interim_results": "True"})).initial_config()
    assert config["model"] == "base" and config["interim_results"] is True


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ({"model": "nova-3", "encoding": "linear16"}, "sample_rate is required"),
        ({**SDK_QUERY, "encoding": "speex"}, "not supported"),
        ({**SDK_QUERY, "encoding": "wav9"}, "encoding"),
        ({**SDK_QUERY, "sample_rate": "96000"}, "sample_rate"),
        ({**SDK_QUERY, "sample_rate": "fast"}, "sample_rate"),
        ({**SDK_QUERY, "interim_results": "yes"}, "interim_results"),
        ({**SDK_QUERY, "channels": "9"}, "channels"),
        ({**SDK_QUERY, "endpointing": "-5"}, "endpointing"),
        ({**SDK_QUERY, "endpointing": "20000"}, "endpointing"),
        ({**SDK_QUERY, "utterance_end_ms": "soon"}, "utterance_end_ms"),
        ({**SDK_QUERY, "model": "my-custom-model"}, "model"),
        ({**SDK_QUERY, "language": "123"}, "language"),
    ],
)
def test_invalid_values_are_refused_before_the_upgrade(query: dict[str, str], says: str) -> None:
    assert says in str(rejected(query).body["err_msg"])


def test_endpointing_false_keeps_vad_segmentation_but_never_says_speech_final() -> None:
    h = DeepgramHarness({**SDK_QUERY, "endpointing": "false"})
    assert "turn_detection" not in h.dialect.initial_config()
    h.feed(np.concatenate([silence(0.3), speech([1, 2]), silence(1.0), speech([3]), silence(1.0)]))
    h.settle()
    results = finals(h)
    assert [transcript(r) for r in results if transcript(r)] == [spoken(1, 2), spoken(3)]
    assert not any(r["speech_final"] for r in results)


def test_a_language_the_model_cannot_transcribe_is_refused_before_the_upgrade() -> None:
    """Deepgram answers a model/language pair it does not have with HTTP 400; tiny.en (English
    only) would otherwise read Spanish speech as English words."""
    message = str(rejected({**SDK_QUERY, "language": "es"}).body["err_msg"])
    assert "'tiny.en' transcribes English only" in message and "'es'" in message
    assert "English only" in str(rejected({**SDK_QUERY, "language": "es", "model": "nova-3"}).body["err_msg"]), "nova-3 means the default"
    assert dg.create(handshake({**SDK_QUERY, "language": "es", "model": "base"})).initial_config()["language"] == "es"
    assert dg.create(handshake({**SDK_QUERY, "language": "en-GB"})).initial_config()["language"] == "en-GB"


def test_a_language_that_is_not_one_is_refused_by_the_parser_both_routes_share() -> None:
    """The pre-recorded route builds its session from ``parse_options`` alone: an unusable
    language must be refused there, in Deepgram's shape, not when the session is built."""
    with pytest.raises(HandshakeRejected) as info:
        dg.parse_options({**SDK_QUERY, "language": "123"}, lambda name: True, "req")
    assert info.value.status == 400 and "`language`" in str(info.value.body["err_msg"])
    assert dg.parse_options({**SDK_QUERY, "language": "multi"}, lambda name: True, "req").language is None


@pytest.mark.parametrize(
    ("values", "names"),
    [(["pci"], ["pci"]), (["pci", "ssn"], ["pci", "ssn"]), (["true"], ["numbers"]), (["aggressive_numbers,cvv"], ["numbers", "cvv"]), (["false"], None)],
)
def test_redact_becomes_the_sessions_redaction(values: list[str], names: list[str] | None) -> None:
    options = dg.parse_options({**SDK_QUERY, "redact": values[-1]}, lambda name: True, "req", lists={"redact": values})
    assert dg.native_config(options).get("redact") == names


def test_a_redaction_this_server_cannot_do_is_refused_not_ignored() -> None:
    """``pii`` and ``phi`` need an entity model: accepted and left undone, the caller would get
    back the names and addresses it asked to have removed."""
    message = str(rejected({**SDK_QUERY, "redact": "pii"}).body["err_msg"])
    assert "`redact`" in message and "'pii' is not a redaction this server does" in message


def test_a_redaction_placeholder_keeps_its_brackets_in_the_plain_form() -> None:
    assert dg.plain_word("[CREDIT_CARD_1],") == "[credit_card_1]"
    assert dg.plain_text("My card is [CREDIT_CARD_1]. Thanks") == "my card is [credit_card_1] thanks"


def test_language_multi_means_detect() -> None:
    assert dg.create(handshake({**SDK_QUERY, "language": "multi"})).initial_config()["language"] is None
    assert dg.create(handshake(SDK_QUERY)).initial_config()["language"] == "en", "Deepgram's default"


def test_api_key_from_header_or_subprotocol() -> None:
    assert dg.create(handshake(headers={"authorization": "Token abc"})).api_key == "abc"
    assert dg.create(handshake(headers={"authorization": "Bearer jwt1"})).api_key == "jwt1"
    via_protocol = dg.create(handshake(headers={}, subprotocols=("token", "k3y")))
    assert (via_protocol.api_key, via_protocol.subprotocol) == ("k3y", "token")
    nothing = dg.create(handshake(headers={}))
    assert (nothing.api_key, nothing.subprotocol) == (None, None)


# --------------------------------------------------------------------------------------------
# Results: the core's utterances as Deepgram interim/final results
# --------------------------------------------------------------------------------------------


def test_finals_spell_the_session_text_once_and_interims_show_the_utterance_so_far() -> None:
    h = DeepgramHarness({**SDK_QUERY, "interim_results": "true", "vad_events": "true"})
    h.feed(np.concatenate([silence(0.3), speech([1, 2, 3, 4, 5, 6]), silence(1.0), speech([7, 8]), silence(1.0)]))
    h.send({"type": "CloseStream"})
    h.settle()
    session_text = " ".join(transcript(r) for r in finals(h) if transcript(r))
    assert session_text == spoken(1, 2, 3, 4, 5, 6, 7, 8)
    interims = [r for r in h.of("Results") if not r["is_final"]]
    assert interims, "interim_results=true shows text while the speaker talks"
    first_utterance = [transcript(r) for r in interims if r["start"] == 0.0]
    assert any(len(t.split()) >= 3 for t in first_utterance), "an interim holds committed words plus the tail"
    for text in first_utterance:
        assert spoken(1, 2, 3, 4, 5, 6).startswith(text.rstrip("~").rsplit(" ", 1)[0]), text
    assert turns(h) == [spoken(1, 2, 3, 4, 5, 6), spoken(7, 8)], "the VAD ended each turn with speech_final"
    assert [m["type"] for m in h.messages()].count("SpeechStarted") == 2
    assert h.messages()[-1]["type"] == "Metadata"
    assert h.closes == [Close(1000, "session closed")]


def test_results_tile_the_stream_and_words_lie_inside_their_result() -> None:
    h = DeepgramHarness({**SDK_QUERY, "interim_results": "true"})
    h.feed(np.concatenate([silence(0.5), speech([1, 2]), silence(1.2), speech([3, 4]), silence(1.0)]))
    h.settle()
    position = 0.0
    for result in h.of("Results"):
        assert result["start"] == pytest.approx(position, abs=1e-6)
        end = result["start"] + result["duration"]
        for word in result["channel"]["alternatives"][0]["words"]:
            assert result["start"] - 1e-6 <= word["start"] <= word["end"] <= end + 1e-6
        if result["is_final"]:
            position = end
    assert position <= len(h.audio) / 2 / 16000 + 1e-6


def test_finalize_gives_a_from_finalize_final_and_speech_continues() -> None:
    h = DeepgramHarness(SDK_QUERY)
    h.feed(np.concatenate([silence(0.3), speech([1, 2, 3])]))
    h.send({"type": "Finalize"})
    assert isinstance(h.commands[-1], p.BufferCommit)
    h.settle()
    [final] = finals(h)
    assert final["from_finalize"] is True and final["speech_final"] is False
    assert transcript(final) == spoken(1, 2, 3)
    h.feed(np.concatenate([speech([4]), silence(1.0)]))
    h.settle()
    later = finals(h)[1:]
    assert [transcript(r) for r in later if transcript(r)] == [spoken(4)]
    assert not any(r["from_finalize"] for r in later) and later[-1]["speech_final"] is True


def test_finalize_with_nothing_pending_answers_with_an_empty_from_finalize_result() -> None:
    h = DeepgramHarness(SDK_QUERY)
    h.feed(silence(0.5))
    h.send({"type": "Finalize"})
    [final] = finals(h)
    assert final["from_finalize"] is True and transcript(final) == ""
    assert final["duration"] == pytest.approx(0.5)


def test_finalize_after_the_vad_already_stopped_marks_that_utterances_final() -> None:
    h = DeepgramHarness(SDK_QUERY, latency_chunks=40)  # a slow final decode
    h.feed(np.concatenate([silence(0.3), speech([1, 2]), silence(0.7)]))
    assert not finals(h) and h.dialect._channels[0].stopped is not None
    h.send({"type": "Finalize"})
    h.settle()
    [final] = finals(h)
    assert final["from_finalize"] is True and transcript(final) == spoken(1, 2)


def test_close_stream_flushes_then_metadata_then_close() -> None:
    h = DeepgramHarness(SDK_QUERY)
    h.feed(np.concatenate([silence(0.2), speech([1, 2])]))
    h.send({"type": "CloseStream"})
    h.settle()
    kinds = [m["type"] for m in h.messages()]
    assert kinds[-2:] == ["Results", "Metadata"]
    metadata = h.messages()[-1]
    assert metadata["sha256"] == hashlib.sha256(bytes(h.audio)).hexdigest()
    assert metadata["duration"] == pytest.approx(len(h.audio) / 2 / 16000, abs=1e-3)
    assert metadata["created"] == "2025-01-02T03:04:05.678Z" and metadata["channels"] == 1
    assert metadata["request_id"] == h.dialect.request_id == finals(h)[-1]["metadata"]["request_id"]
    # The same id names the upgrade (dg-request-id) and the session in the hub (/v1/sessions/{id}).
    assert h.dialect.accept_headers == {"dg-request-id": h.dialect.request_id} and h.dialect.session_alias == h.dialect.request_id
    assert h.closes == [Close(1000, "session closed")]
    assert h.dialect.receive_text(json.dumps({"type": "Finalize"})) == [], "nothing after CloseStream"


def test_extra_pairs_are_echoed_in_metadata() -> None:
    """``extra=KEY:VALUE``, repeated as the SDK sends a list: the pairs come back as an object in
    ``Metadata`` (split at the first colon; a later pair with the same key wins)."""
    lists = {"extra": ("call:4711", "route:billing:eu", "call:4712")}
    dialect = dg.create(dataclasses.replace(handshake({**SDK_QUERY, "extra": "call:4712"}), query_lists=lists), now=NOW)
    assert dialect.options.extra == (("call", "4712"), ("route", "billing:eu"))
    assert dialect.metadata(1.0)["extra"] == {"call": "4712", "route": "billing:eu"}
    assert "extra" not in dg.create(handshake(), now=NOW).metadata(1.0), "no extra, no field"
    h = DeepgramHarness({**SDK_QUERY, "extra": "agent:ada"})
    h.feed(np.concatenate([silence(0.2), speech([1])]))
    h.send({"type": "CloseStream"})
    h.settle()
    assert h.messages()[-1]["extra"] == {"agent": "ada"}
    for value, says in (("no-colon", "KEY:VALUE"), (":value", "KEY:VALUE"), ("k:" + "v" * 2048, "2048")):
        assert says in str(rejected({**SDK_QUERY, "extra": value}).body["err_msg"]), value


def test_an_empty_binary_frame_closes_the_stream_as_deepgram_once_did() -> None:
    h = DeepgramHarness(SDK_QUERY)
    h.feed(np.concatenate([silence(0.2), speech([5])]))
    h.send_bytes(b"")
    h.settle()
    assert isinstance(h.commands[-1], p.SessionClose)
    assert [transcript(r) for r in finals(h)] == [spoken(5)]


def test_utterance_end_after_a_gap_in_words_but_not_while_speech_goes_on() -> None:
    h = DeepgramHarness({**SDK_QUERY, "interim_results": "true", "utterance_end_ms": "1000"})
    h.feed(np.concatenate([silence(0.3), speech([1, 2]), silence(0.8), speech([3]), silence(0.5)]))
    h.settle()
    assert not h.of("UtteranceEnd"), "0.8 s pauses are shorter than utterance_end_ms"
    h.feed(silence(1.0))
    h.settle()
    [end] = h.of("UtteranceEnd")
    last_final = [r for r in finals(h) if transcript(r)][-1]
    assert end["last_word_end"] == last_final["channel"]["alternatives"][0]["words"][-1]["end"]
    kinds = [m["type"] for m in h.messages()]
    assert kinds.index("UtteranceEnd") > kinds.index("Results"), "after the final it follows"
    h.feed(silence(2.0))
    assert len(h.of("UtteranceEnd")) == 1, "once per gap"


def test_keepalive_is_silent_and_bad_text_gets_a_schema_error() -> None:
    h = DeepgramHarness(SDK_QUERY)
    h.send({"type": "KeepAlive"})
    assert h.sent == [] and h.commands == []
    h.apply(h.dialect.receive_text("{nope"))
    h.send({"type": "Transcribe"})
    errors = h.of("Error")
    assert [e["variant"] for e in errors] == ["SchemaError", "SchemaError"]
    assert errors[0]["message"] == "{nope"


def test_configure_keyterms_become_the_prompt_and_features_switch_punctuation() -> None:
    h = DeepgramHarness(SDK_QUERY)
    h.send({"type": "Configure", "keyterms": ["Kubernetes", "gRPC"], "features": {"punctuate": True}})
    assert h.session.config.prompt == "Kubernetes, gRPC"
    [success] = h.of("ConfigureSuccess")
    assert success["keyterms"] == ["Kubernetes", "gRPC"] and h.dialect.punctuated
    h.send({"type": "Configure", "keyterms": ["x" * 1200]})
    [failure] = h.of("ConfigureFailure")
    assert failure["code"] == "CONFIGURE_KEYTERM_LIMIT_EXCEEDED"


def test_every_keyterm_and_keyword_of_the_query_becomes_the_prompt() -> None:
    """The SDK sends a list of keyterms as ``keyterm`` repeated; Nova-2's ``keywords`` carry an
    intensifier, and a negative one (suppress the term) is left out: a prompt cannot suppress."""
    query = {**SDK_QUERY, "keyterm": "gRPC", "keywords": "Zyxel:-3"}
    lists = {"keyterm": ("Kubernetes", "customer service", "gRPC"), "keywords": ("Acme:2", "Zyxel:-3", "Subiaco")}
    dialect = dg.create(dataclasses.replace(handshake(query), query_lists=lists), now=NOW)
    assert dialect.initial_config()["prompt"] == "Kubernetes, customer service, gRPC, Acme, Subiaco"
    assert dg.create(handshake({**SDK_QUERY, "keyterm": "gRPC"}), now=NOW).initial_config()["prompt"] == "gRPC"
    assert "prompt" not in dg.create(handshake(), now=NOW).initial_config()
    with pytest.raises(HandshakeRejected) as refused:
        dg.create(dataclasses.replace(handshake(query), query_lists={"keyterm": ("x" * 600, "y" * 600)}), now=NOW)
    assert refused.value.status == 400 and "1000 characters" in str(refused.value.body["err_msg"])


def test_idle_close_is_deepgrams_net0001() -> None:
    dialect = dg.create(handshake())
    assert dialect.idle_timeout_s == 10.0
    [close] = dialect.error(p.Error.invalid("idle_timeout", "no message for 10 s; closing"))
    assert isinstance(close, Close) and close.code == 1011 and "NET-0001" in close.reason
    assert len(close.reason.encode()) <= 123, "a close reason must fit a control frame"


def test_core_errors_become_deepgram_error_messages() -> None:
    dialect = dg.create(handshake())
    [send] = dialect.render(p.Error.server("decode_failed", "the decoder failed"))
    assert isinstance(send, Send) and isinstance(send.message, str)
    error = sdk_validate(send.message)
    assert error == {"type": "Error", "variant": "InternalServerError", "description": "the decoder failed"}
    [send] = dialect.error(p.Error.invalid("rate_limited", "sk-a: audio limit of 6 audio seconds per minute spent"))
    assert isinstance(send, Send) and sdk_validate(str(send.message))["variant"] == "RateLimited"


def test_a_delta_with_nothing_unsettled_before_it_is_final_at_once() -> None:
    """The core sends no interim when the tail stays empty, so the delta itself must finalize."""
    dialect = dg.create(handshake(SDK_QUERY))
    word = p.WordTiming(" Yes.", 0.4, 0.7, 0.95)
    sent = [
        a
        for e in (
            p.SpeechStarted("item_1", 100),
            p.TranscriptDelta("item_1", "Yes.", tokens("Yes", "."), [word]),
            p.SpeechStopped("item_1", 800),
            p.TranscriptSegment("item_1", 0.4, 0.8, "Yes.", None, [word], -0.25, 0.01),
        )
        for a in dialect.render(e)
    ]
    early, end = (sdk_validate(str(a.message)) for a in sent if isinstance(a, Send))
    assert (transcript(early), early["is_final"], early["speech_final"]) == ("yes", True, False)
    assert (transcript(end), end["is_final"], end["speech_final"]) == ("", True, True)
    assert end["start"] == pytest.approx(0.7) and end["duration"] == pytest.approx(0.1)


# --------------------------------------------------------------------------------------------
# Transcript forms
# --------------------------------------------------------------------------------------------


def tokens(*texts: str) -> list[p.TokenLogprob]:
    return [p.TokenLogprob.of(t, -0.25) for t in texts]


def hand_made_utterance(dialect: dg.DeepgramDialect) -> list[dict[str, Any]]:
    words = [
        p.WordTiming(" Hello,", 0.5, 0.9, 0.9),
        p.WordTiming(" don't", 1.0, 1.2, 0.8),
        p.WordTiming(" stop", 1.2, 1.5, 0.7),
        p.WordTiming(" -", 1.5, 1.5, 0.5),
        p.WordTiming(" 3.5!", 1.6, 2.0, 0.6),
    ]
    text = "Hello, don't stop - 3.5!"
    events: list[p.ServerEvent] = [
        p.SessionCreated({"model": "tiny.en"}),
        p.SpeechStarted("item_1", 200),
        p.TranscriptInterim("item_1", "Hello, don't", words[:2]),
        p.TranscriptDelta("item_1", "Hello,", tokens("Hello", ","), words[:1]),
        p.TranscriptInterim("item_1", " don't stop", words[1:3]),
        p.SpeechStopped("item_1", 2100),
        p.TranscriptDelta("item_1", " don't stop - 3.5!", tokens(" don't", " stop", " -", " 3.5", "!"), words[1:]),
        p.TranscriptSegment("item_1", 0.5, 2.1, text, None, words, -0.25, 0.01),
    ]
    sent = [a for e in events for a in dialect.render(e)]
    return [sdk_validate(str(a.message)) for a in sent if isinstance(a, Send)]


def test_without_punctuate_transcripts_and_words_are_plain_lower_case() -> None:
    dialect = dg.create(handshake({**SDK_QUERY, "interim_results": "true"}))
    first, interim, final = hand_made_utterance(dialect)
    assert transcript(first) == "hello don't"
    assert transcript(interim) == "hello don't stop"
    assert transcript(final) == "hello don't stop 3.5"
    words = final["channel"]["alternatives"][0]["words"]
    assert [w["word"] for w in words] == ["hello", "don't", "stop", "3.5"]
    assert all("punctuated_word" not in w for w in words)
    assert final["channel"]["alternatives"][0]["confidence"] == pytest.approx(math.exp(-0.25), abs=1e-4)
    assert final["start"] == 0.0 and final["duration"] == pytest.approx(2.1)
    assert final["metadata"]["model_info"]["name"] == "tiny.en"


@pytest.mark.parametrize("flag", ["punctuate", "smart_format"])
def test_punctuate_or_smart_format_keep_the_decoders_text(flag: str) -> None:
    dialect = dg.create(handshake({**SDK_QUERY, "interim_results": "true", flag: "true"}))
    _, interim, final = hand_made_utterance(dialect)
    assert transcript(interim) == "Hello, don't stop"
    assert transcript(final) == "Hello, don't stop - 3.5!"
    words = final["channel"]["alternatives"][0]["words"]
    assert [(w["word"], w["punctuated_word"]) for w in words] == [
        ("hello", "Hello,"), ("don't", "don't"), ("stop", "stop"), ("3.5", "3.5!"),
    ]


def test_plain_word_strips_only_edge_punctuation() -> None:
    assert [dg.plain_word(w) for w in ["Hello,", "\"Quoted.\"", "U.S.", "it's", "—", "1,000", "5%.", "&"]] == [
        "hello", "quoted", "u.s", "it's", "", "1,000", "5%", "&",
    ]


# --------------------------------------------------------------------------------------------
# Containerized (WAV) audio without an encoding parameter
# --------------------------------------------------------------------------------------------


def wav_header(rate: int, tag: int = 1, bits: int = 16, channels: int = 1) -> bytes:
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    return b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"LIST" + struct.pack("<I", 4) + b"INFO" + b"data" + struct.pack("<I", 0xFFFFFFFF)


def test_a_wav_stream_announces_its_own_format_even_split_across_frames() -> None:
    h = DeepgramHarness({"model": "nova-3", "interim_results": "false"})
    audio = to_pcm16(np.concatenate([silence(0.2), speech([1, 2]), silence(1.0)]))
    stream = wav_header(16000) + audio
    h.send_bytes(stream[:7])
    h.send_bytes(stream[7:30])
    assert h.commands == []
    h.apply(h.dialect.receive_bytes(stream[30:]))
    assert h.commands[0] == p.SessionUpdate({"input_audio_format": "pcm16", "sample_rate": 16000})
    appended = b"".join(c.audio for c in h.commands if isinstance(c, p.AudioAppend))
    assert appended == audio
    h.send({"type": "CloseStream"})
    h.settle()
    assert [transcript(r) for r in finals(h) if transcript(r)] == [spoken(1, 2)]


def test_a_mulaw_wav_header_selects_g711() -> None:
    dialect = dg.create(handshake({"model": "nova-3"}))
    [update, _] = dialect.receive_bytes(wav_header(8000, tag=7, bits=8) + b"\xff" * 80)
    assert update == p.SessionUpdate({"input_audio_format": "g711_ulaw", "sample_rate": 8000})
    assert dialect.audio_seconds == pytest.approx(0.01)


@pytest.mark.parametrize("data", [wav_header(16000, channels=9), wav_header(16000, tag=85)])
def test_a_wav_header_this_server_cannot_read_is_refused_with_data_0000(data: bytes) -> None:
    dialect = dg.create(handshake({"model": "nova-3"}))
    error, close = dialect.receive_bytes(data)
    assert isinstance(error, Send) and sdk_validate(str(error.message))["variant"] == "DataError"
    assert isinstance(close, Close) and close.code == 1008 and close.reason.startswith("DATA-0000")


# --------------------------------------------------------------------------------------------
# Compressed containerized audio (WebM/Ogg Opus, MP3, FLAC, ...) and the decoded encodings
# --------------------------------------------------------------------------------------------


def flac_stream(samples: np.ndarray, tmp_path: Path) -> bytes:
    """``samples`` (mono, or one column per channel) as a FLAC stream: lossless, so the tone words survive."""
    return encode(samples, tmp_path / "stream.flac", "flac").read_bytes()


def send_in_pieces(h: DeepgramHarness, data: bytes, size: int = 1500) -> None:
    for i in range(0, len(data), size):
        h.send_bytes(data[i : i + size])
        h.tick()


@pytest.mark.parametrize("query", [{"model": "nova-3"}, {"model": "nova-3", "encoding": "flac", "sample_rate": "16000"}, {"model": "nova-3", "encoding": "flac"}])
def test_a_compressed_stream_is_decoded_as_it_comes(query: dict[str, str], tmp_path: Path) -> None:
    clip = np.concatenate([silence(0.3), speech([1, 2]), silence(1.0), speech([3]), silence(1.0)])
    data = flac_stream(clip, tmp_path)
    h = DeepgramHarness(query)
    send_in_pieces(h, data, size=200)
    h.settle()
    assert h.commands[0] == p.SessionUpdate({"input_audio_format": "float32", "sample_rate": 16000})
    assert turns(h) == [spoken(1, 2)], "transcripts come while the stream is still arriving"
    h.send({"type": "CloseStream"})
    h.settle()
    assert turns(h) == [spoken(1, 2), spoken(3)]
    metadata = h.of("Metadata")[-1]
    assert metadata["sha256"] == hashlib.sha256(data).hexdigest(), "of the bytes received, as Deepgram hashes them"
    assert metadata["duration"] == pytest.approx(len(clip) / 16000, abs=0.01)
    assert not h.of("Error") and all(c.code == 1000 for c in h.closes)


def test_a_stereo_compressed_stream_follows_multichannel(tmp_path: Path) -> None:
    left = np.concatenate([silence(0.3), speech([1, 2]), silence(2.0)])
    right = np.concatenate([silence(1.5), speech([3]), silence(1.0)])
    stereo = np.zeros((len(left), 2), np.float32)
    stereo[:, 0], stereo[: len(right), 1] = left, right
    data = flac_stream(stereo, tmp_path)
    h = DeepgramHarness({"model": "nova-3", "multichannel": "true"})
    send_in_pieces(h, data)
    assert h.commands[0] == p.SessionUpdate({"input_audio_format": "float32", "sample_rate": 16000, "channels": 2})
    h.send({"type": "CloseStream"})
    h.settle()
    assert [transcript(r) for r in of_channel(h, "Results", 0) if r["is_final"] and transcript(r)] == [spoken(1, 2)]
    assert [transcript(r) for r in of_channel(h, "Results", 1) if r["is_final"] and transcript(r)] == [spoken(3)]
    assert h.of("Metadata")[-1]["channels"] == 2


def test_bytes_that_are_no_audio_end_the_stream_with_data_0000_when_ffmpeg_gives_up() -> None:
    h = DeepgramHarness({"model": "nova-3"})
    h.send_bytes(b"ID3\x03\x00 an mp3 that is not one")
    assert h.sent == [] and h.closes == [], "a few bytes may still become a stream"
    h.send({"type": "CloseStream"})
    [error] = h.of("Error")
    assert error["variant"] == "DataError" and error["description"].startswith("DATA-0000: the file is not a recognised audio format")
    assert h.closes[0].code == 1008 and h.closes[0].reason.startswith("DATA-0000")


def test_a_stream_that_breaks_off_keeps_its_finals_and_says_where_it_broke(tmp_path: Path) -> None:
    clip = np.concatenate([silence(0.3), speech([1, 2]), silence(1.5)])
    data = flac_stream(clip, tmp_path)
    h = DeepgramHarness({"model": "nova-3"})
    send_in_pieces(h, data)
    h.send_bytes(b"OggS" + bytes(range(256)) * 40)  # another stream spliced in: FLAC's parser fails
    h.send({"type": "CloseStream"})
    h.settle()
    assert turns(h) == [spoken(1, 2)], "what was heard is transcribed"
    errors = h.of("Error")
    assert len(errors) <= 1 and all(e["description"].startswith("DATA-0000: the audio after") for e in errors)
    assert h.of("Metadata") and not any(c.code == 1008 for c in h.closes)


def test_amr_frames_without_their_magic_line_are_decoded(tmp_path: Path) -> None:
    clip = np.concatenate([silence(0.3), speech([1, 2], seconds=0.4), silence(1.0)])
    data = encode(clip, tmp_path / "clip.amr", "libopencore_amrnb", rate=8000, container="amr", bit_rate=12200).read_bytes()
    assert data.startswith(b"#!AMR\n")
    for stream_bytes in (data, data[6:]):
        dialect = dg.create(handshake({"model": "nova-3", "encoding": "amr-nb", "sample_rate": "8000"}))
        actions = dialect.receive_bytes(stream_bytes)
        actions += dialect.receive_text('{"type": "CloseStream"}')
        assert actions[0] == p.SessionUpdate({"input_audio_format": "float32", "sample_rate": 16000})
        assert dialect.audio_seconds == pytest.approx(len(clip) / 16000, abs=0.05)
        assert not any(isinstance(a, (Send, Close)) for a in actions), actions


def test_linear32_is_raw_float32() -> None:
    config = dg.create(handshake({"model": "nova-3", "encoding": "linear32", "sample_rate": "16000"})).initial_config()
    assert config["input_audio_format"] == "float32" and config["sample_rate"] == 16000


def test_a_dialect_released_mid_stream_stops_its_decoder(tmp_path: Path) -> None:
    import threading

    data = flac_stream(np.concatenate([silence(0.3), speech([1, 2])]), tmp_path)
    dialect = dg.create(handshake({"model": "nova-3"}))
    dialect.receive_bytes(data[: len(data) // 2])
    assert any(t.name == "audio-stream" for t in threading.enumerate())
    dialect.release()
    deadline = time.monotonic() + 5
    while any(t.name == "audio-stream" for t in threading.enumerate()) and time.monotonic() < deadline:
        gc.collect()  # streams that other tests dropped end too
        time.sleep(0.01)
    assert not any(t.name == "audio-stream" for t in threading.enumerate())


# --------------------------------------------------------------------------------------------
# Every message type against the SDK and the doc
# --------------------------------------------------------------------------------------------


def test_every_message_type_validates_against_the_sdk_and_matches_the_doc() -> None:
    h = DeepgramHarness(
        {**SDK_QUERY, "interim_results": "true", "vad_events": "true", "utterance_end_ms": "1000", "punctuate": "true"}
    )
    h.feed(np.concatenate([silence(0.3), speech([1, 2, 3]), silence(1.5)]))
    h.send({"type": "Finalize"})
    h.send({"type": "Configure", "keyterms": ["alpha"]})
    h.send({"type": "Configure", "keyterms": ["x" * 1200]})
    h.send({"type": "Nope"})
    h.feed(speech([4]))
    h.send({"type": "CloseStream"})
    h.settle()
    seen = check_documented(h.messages())
    assert seen == {"Results", "SpeechStarted", "UtteranceEnd", "Metadata", "Error", "ConfigureSuccess", "ConfigureFailure"}
    assert set(documented_fields()) == seen, "the doc lists exactly the messages sent"


# --------------------------------------------------------------------------------------------
# Several channels: multichannel=true transcribes each, otherwise they are mixed into one
# --------------------------------------------------------------------------------------------

STEREO_QUERY = {**SDK_QUERY, "channels": "2"}


def feed_stereo(h: DeepgramHarness, left: np.ndarray, right: np.ndarray, chunk: int = 1280) -> None:
    """Interleaved pcm16 in ``chunk``-byte messages (a size that may split a frame)."""
    n = max(len(left), len(right))
    frames = np.zeros((n, 2), np.float32)
    frames[: len(left), 0], frames[: len(right), 1] = left, right
    data = to_pcm16(frames.reshape(-1))
    for i in range(0, len(data), chunk):
        h.send_bytes(data[i : i + chunk])
        h.tick()


def of_channel(h: DeepgramHarness, kind: str, channel: int) -> list[dict[str, Any]]:
    key = "channel_index" if kind == "Results" else "channel"
    return [m for m in h.of(kind) if m[key][0] == channel]


def two_legs() -> tuple[np.ndarray, np.ndarray]:
    """The right leg starts while the left still talks, and keeps talking after it stops."""
    left = np.concatenate([silence(0.3), speech([1, 2, 3]), silence(2.0)])
    right = np.concatenate([silence(0.8), speech([4, 5, 6, 7]), silence(0.9), speech([8]), silence(1.5)])
    return left, right


def test_multichannel_gives_each_channel_its_own_results() -> None:
    query = {**STEREO_QUERY, "multichannel": "true", "interim_results": "true", "vad_events": "true", "utterance_end_ms": "1000"}
    h = DeepgramHarness(query)
    assert h.session.config.channels == 2 and h.session.config.input_audio_format == "pcm16"
    left, right = two_legs()
    feed_stereo(h, left, right, chunk=1002)  # 1002 bytes: frames split across messages
    h.send({"type": "CloseStream"})
    h.settle()
    messages = h.messages()
    assert {tuple(m["channel_index"]) for m in messages if m["type"] == "Results"} == {(0, 2), (1, 2)}
    for channel, words in ((0, [1, 2, 3]), (1, [4, 5, 6, 7, 8])):
        results = of_channel(h, "Results", channel)
        finals_here = [r for r in results if r["is_final"]]
        assert " ".join(transcript(r) for r in finals_here if transcript(r)) == spoken(*words)
        assert any(not r["is_final"] for r in results), "interims per channel"
        position = 0.0  # each channel tiles its own timeline
        for result in results:
            assert result["start"] == pytest.approx(position, abs=1e-6)
            if result["is_final"]:
                position = result["start"] + result["duration"]
        assert of_channel(h, "SpeechStarted", channel), "vad_events per channel"
    left_words = [w for r in of_channel(h, "Results", 0) if r["is_final"] for w in r["channel"]["alternatives"][0]["words"]]
    right_start = of_channel(h, "SpeechStarted", 1)[0]
    assert right_start["timestamp"] < left_words[-1]["end"], "the right leg starts while the left still talks"
    assert [m["channel"] for m in h.of("UtteranceEnd")] == [[0, 2], [1, 2]], "the left leg went quiet first"
    metadata = messages[-1]
    assert metadata["type"] == "Metadata" and metadata["channels"] == 2
    assert metadata["duration"] == pytest.approx(len(h.audio) / 4 / 16000, abs=1e-3), "seconds, not samples"
    assert metadata["sha256"] == hashlib.sha256(bytes(h.audio)).hexdigest()
    check_documented(messages)


def test_finalize_answers_every_channel() -> None:
    h = DeepgramHarness({**STEREO_QUERY, "multichannel": "true"})
    feed_stereo(h, np.concatenate([silence(0.3), speech([1, 2])]), silence(0.9))
    h.send({"type": "Finalize"})
    h.settle()
    [left] = [r for r in of_channel(h, "Results", 0) if r["is_final"]]
    [right] = [r for r in of_channel(h, "Results", 1) if r["is_final"]]
    assert (transcript(left), left["from_finalize"], left["speech_final"]) == (spoken(1, 2), True, False)
    assert (transcript(right), right["from_finalize"]) == ("", True), "nothing pending there: answered at once"


def test_channels_without_multichannel_are_mixed_into_one_transcript() -> None:
    h = DeepgramHarness({**STEREO_QUERY, "interim_results": "true"})
    assert h.session.config.channels == 1 and h.session.config.input_audio_format == "float32"
    # Each leg at twice a word's level: only the mean of the two channels spells w1 w2 ... w4.
    left = 2 * np.concatenate([silence(0.3), speech([1, 2]), silence(3.0)])
    right = 2 * np.concatenate([silence(2.0), speech([3, 4]), silence(1.0)])
    feed_stereo(h, left, right, chunk=998)
    h.send({"type": "CloseStream"})
    h.settle()
    appended = b"".join(c.audio for c in h.commands if isinstance(c, p.AudioAppend))
    assert len(appended) == len(h.audio) // 4 * 4, "every whole stereo frame became one float32 sample"
    assert {tuple(m["channel_index"]) for m in h.of("Results")} == {(0, 1)}
    assert turns(h) == [spoken(1, 2), spoken(3, 4)]
    assert h.messages()[-1]["channels"] == 1


def test_mulaw_channels_are_mixed_too() -> None:
    from stream_server.audio import encode_g711

    dialect = dg.create(handshake({"model": "nova-3", "encoding": "mulaw", "sample_rate": "8000", "channels": "2"}))
    assert dialect.initial_config()["input_audio_format"] == "float32"
    a, b = np.full(80, 0.25, np.float32), np.full(80, -0.05, np.float32)
    left, right = encode_g711(a, "ulaw"), encode_g711(b, "ulaw")
    interleaved = bytes(x for pair in zip(left, right, strict=True) for x in pair)
    [first] = dialect.receive_bytes(interleaved[:81])
    assert isinstance(first, p.AudioAppend) and len(first.audio) == 40 * 4, "40 whole frames, one byte kept"
    [rest] = dialect.receive_bytes(interleaved[81:])
    assert isinstance(rest, p.AudioAppend) and len(rest.audio) == 40 * 4, "the split frame joined the rest"
    mixed = np.frombuffer(first.audio + rest.audio, "<f4")
    assert mixed == pytest.approx(np.full(80, 0.1), abs=0.01), "the mean of the two legs"
    assert dialect.audio_seconds == pytest.approx(80 / 8000)


def test_a_stereo_wav_stream_follows_multichannel() -> None:
    header = wav_header(8000, tag=7, bits=8, channels=2)
    split = dg.create(handshake({"model": "nova-3", "multichannel": "true"}))
    [update, append] = split.receive_bytes(header + b"\xff" * 160)
    assert update == p.SessionUpdate({"input_audio_format": "g711_ulaw", "sample_rate": 8000, "channels": 2})
    assert isinstance(append, p.AudioAppend) and append.audio == b"\xff" * 160
    assert split.audio_seconds == pytest.approx(0.01)
    mixed = dg.create(handshake({"model": "nova-3"}))
    [update, append] = mixed.receive_bytes(header + b"\xff" * 160)
    assert update == p.SessionUpdate({"input_audio_format": "float32", "sample_rate": 8000})
    assert isinstance(append, p.AudioAppend) and len(append.audio) == 80 * 4


def test_channels_query_is_read_only_with_an_encoding_and_at_most_8() -> None:
    assert "channels" not in dg.create(handshake({"model": "nova-3", "channels": "2", "multichannel": "true"})).initial_config()
    assert dg.create(handshake({**STEREO_QUERY, "channels": "8", "multichannel": "true"})).initial_config()["channels"] == 8
    assert "9 is outside 1..8" in str(rejected({**SDK_QUERY, "channels": "9"}).body["err_msg"])


def test_a_mark_the_decoder_adds_after_an_earlier_final_does_not_start_the_next_one() -> None:
    """Seen with the real SDK: "on the whole" went out final at a pause, the comma after it came
    with the next words, and the client's finals joined read "on the whole , the type"."""
    dialect = dg.create(handshake({**SDK_QUERY, "smart_format": "true"}))
    first = [p.WordTiming(" On", 0.1, 0.3, 0.9), p.WordTiming(" the", 0.3, 0.4, 0.9), p.WordTiming(" whole", 0.4, 0.8, 0.9)]
    rest = [p.WordTiming(",", 0.8, 0.8, 0.9), p.WordTiming(" the", 1.2, 1.3, 0.9), p.WordTiming(" type.", 1.3, 1.7, 0.9)]
    events: list[p.ServerEvent] = [
        p.SpeechStarted("item_1", 100),
        p.TranscriptDelta("item_1", "On the whole", tokens("On", " the", " whole"), first),
        p.TranscriptInterim("item_1", "", []),
        p.TranscriptDelta("item_1", ", the type.", tokens(",", " the", " type", "."), rest),
        p.TranscriptSegment("item_1", 0.1, 1.8, "On the whole, the type.", None, first + rest, -0.1, 0.01),
    ]
    sent = [sdk_validate(str(a.message)) for e in events for a in dialect.render(e) if isinstance(a, Send)]
    results = [r for r in sent if r["type"] == "Results" and r["is_final"] and transcript(r)]
    assert [transcript(r) for r in results] == ["On the whole", "the type."]
    assert [w["punctuated_word"] for w in results[1]["channel"]["alternatives"][0]["words"]] == ["the", "type."]
    assert dg.punctuated_text(" ¿Qué? ") == "¿Qué?" and dg.punctuated_text('"Quoted," he said') == '"Quoted," he said'
