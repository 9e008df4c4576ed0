"""protocol.py against protocol.md, and the parsing/serialisation rules."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from stream_server import protocol as p
from stream_server.decoding import FailureKind
from tests.support import REPO


def documented_events() -> dict[str, set[str]]:
    """Event type → fields, from the 'Server → client events' table of protocol.md."""
    text = (REPO / "protocol.md").read_text()
    section = text.split("## Server → client events", 1)[1].split("\n## ", 1)[0]
    events: dict[str, set[str]] = {}
    for line in section.splitlines():
        m = re.match(r"\| `([a-z_.]+)` \| (.*) \|$", line)
        if m:
            events[m.group(1)] = set(re.findall(r"`([a-z_]+)`", m.group(2)))
    return events


def documented_messages() -> set[str]:
    text = (REPO / "protocol.md").read_text()
    section = text.split("## Client → server messages", 1)[1].split("###", 1)[0]
    return set(re.findall(r"^\| `([a-z_.]+)` \|", section, re.M))


def documented_config_fields() -> set[str]:
    text = (REPO / "protocol.md").read_text()
    section = text.split("### Session configuration", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_.]+)` \|", section, re.M))


def event_fields(cls: type[p.ServerEvent]) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_documented_event_is_a_class_with_exactly_those_fields() -> None:
    documented = documented_events()
    classes = {cls.type: cls for cls in p.SERVER_EVENT_TYPES}
    assert set(documented) == set(classes)
    for name, fields in documented.items():
        assert event_fields(classes[name]) == fields, name


def test_every_documented_message_parses() -> None:
    assert documented_messages() == set(p.CLIENT_MESSAGE_TYPES)
    for kind in p.CLIENT_MESSAGE_TYPES:
        body: dict = {"type": kind}
        if kind == "session.update":
            body["session"] = {}
        if kind == "input_audio_buffer.append":
            body["audio"] = ""
        assert p.parse_client_message(json.dumps(body)) is not None


def test_documented_config_fields_match_the_model() -> None:
    fields = set(p.SessionConfig.model_fields)
    fields |= {f"turn_detection.{name}" for name in p.TurnDetection.model_fields}
    assert documented_config_fields() == fields


def test_documented_defaults_are_the_defaults() -> None:
    config = p.SessionConfig()
    assert config.input_audio_format == "pcm16" and config.sample_rate == 16000
    assert config.turn_detection == p.TurnDetection(threshold=0.5, prefix_padding_ms=300, silence_duration_ms=500)
    assert config.include == ["logprobs"] and config.interim_results is False and config.language is None


def test_serialisation_puts_type_first_and_nests_dataclasses() -> None:
    event = p.TranscriptDelta("item_1", " hi", [p.TokenLogprob.of(" hi", -0.25)])
    body = json.loads(p.event_to_json(event, "evt_7"))
    assert list(body)[:2] == ["type", "event_id"]
    assert body == {
        "type": "transcript.text.delta",
        "event_id": "evt_7",
        "item_id": "item_1",
        "delta": " hi",
        "logprobs": [{"token": " hi", "logprob": -0.25, "bytes": [32, 104, 105]}],
        "words": None,
        "channel": 0,
        "speaker": None,
        "language": None,
    }
    error = json.loads(p.event_to_json(p.Error.invalid("invalid_value", "bad", "session.x")))
    assert error["error"] == {"type": "invalid_request_error", "code": "invalid_value", "message": "bad", "param": "session.x"}


def test_non_ascii_text_is_sent_as_utf8_not_escapes() -> None:
    assert "ü" in p.event_to_json(p.TranscriptInterim("i", "grün"))


@pytest.mark.parametrize("language,expected", [("en", "en"), ("en-US", "en"), ("pt_BR", "pt"), ("DE", "de"), (None, None)])
def test_language_accepts_codes_and_locales(language: str | None, expected: str | None) -> None:
    assert p.SessionConfig().updated({"language": language}).language == expected


def test_language_garbage_is_rejected_with_its_name() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.SessionConfig().updated({"language": "english please"})
    assert info.value.param == "session.language"


def test_turn_detection_merges_and_null_disables() -> None:
    config = p.SessionConfig().updated({"turn_detection": {"threshold": 1}})
    assert config.turn_detection.threshold == 1.0 and config.turn_detection.silence_duration_ms == 500
    assert p.SessionConfig().updated({"turn_detection": None}).turn_detection is None


def test_booleans_are_not_numbers() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.SessionConfig().updated({"sample_rate": True})
    assert info.value.param == "session.sample_rate"


def documented_error_codes() -> set[str]:
    """The codes of protocol.md's Errors table (a row may name several)."""
    text = (REPO / "protocol.md").read_text()
    table = text[text.index("## Errors") : text.index("## Close codes")]
    return {code for line in table.splitlines() if line.startswith("| `") for code in re.findall(r"`([a-z_]+)`", line.split("|")[1])}


def test_every_error_code_the_core_and_the_native_shell_send_is_documented() -> None:
    """Codes as written where they are made: ``Error.invalid``/``Error.server`` and
    ``ProtocolError`` calls, and the decoder's failures that reach the client."""
    made = re.compile(r"(?:Error\.(?:invalid|server)|ProtocolError)\(\s*\"([a-z_]+)\"")
    sources = [*(REPO / "stream_server").glob("*.py"), REPO / "stream_server" / "dialects" / "native.py"]
    codes = {code for path in sources for code in made.findall(path.read_text())}
    codes |= {kind.value for kind in FailureKind if kind is not FailureKind.DROPPED}  # a shed interim is asked again, silently
    assert {"unsupported_language", "model_not_found", "server_busy"} <= codes, "the pattern finds them"
    assert codes <= documented_error_codes(), sorted(codes - documented_error_codes())
