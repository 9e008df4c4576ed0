"""The native ``/v1/stream`` protocol (``protocol.md``) as a dialect: the first of several.

Its wire types are the core's own (``protocol.py``), so this translator is thin: binary frames are
audio, text frames are parsed into typed commands, and events are serialised with numbered ids.
"""

from __future__ import annotations

import itertools

from stream_server import protocol as p
from stream_server.dialects.base import Action, Close, Handshake, Send


class NativeDialect:
    name = "native"
    subprotocol: str | None = None
    idle_timeout_s: float | None = None

    def __init__(self, api_key: str | None = None) -> None:
        self.api_key = api_key
        self._ids = itertools.count(1)

    def initial_config(self) -> dict[str, object]:
        return {}

    def receive_text(self, text: str) -> list[Action]:
        try:
            return [p.parse_client_message(text)]
        except p.ProtocolError as exc:
            return self.render(p.Error.invalid(exc.code, exc.message, exc.param))

    def receive_bytes(self, data: bytes) -> list[Action]:
        return [p.AudioAppend(data)]

    def render(self, event: p.ServerEvent) -> list[Action]:
        return [Send(p.event_to_json(event, f"evt_{next(self._ids)}"))]

    def error(self, event: p.Error) -> list[Action]:
        return self.render(event)


def create(handshake: Handshake) -> NativeDialect:
    return NativeDialect(api_key=bearer_key(handshake))


def bearer_key(handshake: Handshake) -> str | None:
    """``Authorization: Bearer <key>``, the form most HTTP and WebSocket clients send."""
    auth = handshake.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() == "bearer" and key.strip():
        return key.strip()
    return None


__all__ = ["Close", "NativeDialect", "bearer_key", "create"]
