"""The native /v1/stream protocol as a Sans-I/O dialect: frames in, typed commands out, events
serialised with session-unique ids, malformed messages answered in the protocol's error shape."""

from __future__ import annotations

import base64
import json

import pytest

from stream_server import protocol as p
from stream_server.dialects import native
from stream_server.dialects.base import Handshake, Send


def handshake(**headers: str) -> Handshake:
    return Handshake(path="/v1/stream", query={}, headers=headers, subprotocols=(), default_model="tiny.en")


def test_binary_frames_are_audio_and_text_frames_are_typed_commands() -> None:
    dialect = native.create(handshake())
    assert dialect.receive_bytes(b"\x01\x02") == [p.AudioAppend(b"\x01\x02")]
    audio = base64.b64encode(b"\x00\x01").decode()
    assert dialect.receive_text(json.dumps({"type": "input_audio_buffer.append", "audio": audio})) == [p.AudioAppend(b"\x00\x01")]
    assert dialect.receive_text('{"type": "session.close"}') == [p.SessionClose()]
    assert dialect.receive_text('{"type": "session.update", "session": {"language": "de"}}') == [p.SessionUpdate({"language": "de"})]


@pytest.mark.parametrize(
    "text,code",
    [("not json", "invalid_json"), ("[1]", "invalid_json"), ('{"type": "session.update", "session": {"x": NaN}}', "invalid_json"),
     ('{"type": "session.update", "session": {"x": 1e999}}', "invalid_json"),
     ('{"type": "nope"}', "unknown_message_type"),
     ('{"type": "input_audio_buffer.append", "audio": "%%%"}', "invalid_audio")],
)
def test_malformed_messages_become_error_events_not_commands(text: str, code: str) -> None:
    [action] = native.create(handshake()).receive_text(text)
    assert isinstance(action, Send) and isinstance(action.message, str)
    body = json.loads(action.message)
    assert body["type"] == "error" and body["error"]["code"] == code and body["error"]["type"] == "invalid_request_error"


def test_event_ids_are_unique_and_in_order_across_events_and_errors() -> None:
    dialect = native.create(handshake())
    actions = [*dialect.render(p.SessionCreated({"id": "s"})), *dialect.receive_text("{"), *dialect.render(p.BufferCleared())]
    ids = [json.loads(a.message)["event_id"] for a in actions if isinstance(a, Send) and isinstance(a.message, str)]
    assert ids == ["evt_1", "evt_2", "evt_3"]


def test_bearer_key_is_read_from_the_authorization_header() -> None:
    assert native.create(handshake(authorization="Bearer sk-123")).api_key == "sk-123"
    assert native.create(handshake(authorization="Basic abc")).api_key is None
    assert native.create(handshake()).api_key is None
