"""What a wire dialect is: a Sans-I/O translator between one wire protocol and the session core.

A dialect never touches a socket, a thread, a clock or the scheduler. The runner
(``stream_server/runner.py``) hands it what the client sent and every event the core produced; the
dialect answers with

* :data:`Command` values for the core — the native client messages of ``protocol.py``
  (``SessionUpdate`` with native configuration fields, ``AudioAppend`` with raw bytes in the
  session's ``input_audio_format``, ``BufferCommit``, ``BufferClear``, ``SessionClose``), and
* :class:`Send` / :class:`Close` values for the client, in its own wire shape.

The runner applies everything in the order the dialect returned it, so a dialect can interleave
its own replies (a pong, a validation error in its protocol's error shape) with core commands.

Adding a dialect means one new module here plus a route in ``server.py``; the core does not change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Protocol

from stream_server import protocol as p
from stream_server.settings import Settings

Command = p.ClientMessage


@dataclasses.dataclass(frozen=True)
class Send:
    """One message for the client: ``str`` goes out as a text frame, ``bytes`` as a binary one."""

    message: str | bytes


@dataclasses.dataclass(frozen=True)
class Close:
    """Close the connection after everything before it was sent (WebSocket close code)."""

    code: int
    reason: str = ""


Action = Command | Send | Close


@dataclasses.dataclass(frozen=True)
class Handshake:
    """What the client sent when it opened the WebSocket, as a dialect factory sees it."""

    path: str
    query: Mapping[str, str]  # last value wins for repeated names
    headers: Mapping[str, str]  # lower-case names
    subprotocols: tuple[str, ...]  # as offered by the client, in order
    default_model: str  # the server's default model (a registry name)
    model_exists: Callable[[str], bool] = lambda name: True  # whether the server knows a model
    #: Whether a model can transcribe a language (code or locale): an English-only one cannot.
    model_speaks: Callable[[str, str], bool] = p.speaks_by_name
    #: The server's settings (secrets a dialect checks at the upgrade: Twilio's auth token, the
    #: AudioHook client secret); None where a caller builds a handshake without a server.
    settings: Settings | None = None
    #: Every value of each query parameter, in order (Deepgram repeats ``keyterm`` for a list).
    query_lists: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)


class HandshakeRejected(Exception):
    """The connection is refused before it is accepted: an HTTP response with ``status`` and a
    body in the dialect's error shape (Deepgram answers bad query parameters with HTTP 400)."""

    def __init__(self, status: int, body: Mapping[str, object]) -> None:
        super().__init__(str(body))
        self.status = status
        self.body = body


class Dialect(Protocol):
    """One wire protocol, both directions. One instance per connection (it may keep state).

    A module in this package that defines a dialect exposes ``create(handshake: Handshake) ->
    Dialect`` (raising :class:`HandshakeRejected` for a request it refuses).

    Optional attributes the shell reads when a dialect has them: ``session_alias`` (the call's
    own id, once known: the session is also found under it), ``accept_headers`` (response headers
    of the upgrade), ``call_events()`` (key presses beside the audio), ``control(control)`` and
    ``drain()`` (an operator's pause, a server's shutdown), ``recorded`` (False once the
    session is known to be no conversation, as an AudioHook connection probe: it is not stored,
    posted or listed), ``release()`` (called once the connection is over: a dialect that
    holds a worker, as Deepgram's decoder of compressed audio, stops it), and for a dialect
    that makes audio in the background, ``set_wakeup(callback)`` (the callback is called from
    any thread when ``pending()`` has actions to collect) and ``closing`` (the client ended the
    stream: no idle timeout while its last audio is decoded).
    """

    #: Short name used in logs and metrics labels ("native", "openai", "deepgram", ...).
    name: str
    #: The subprotocol to accept (one the client offered), or None.
    subprotocol: str | None
    #: The API key the client presented (header or subprotocol), or None; the shell checks it.
    api_key: str | None
    #: Close the session when the client sends nothing for this long (None: the server setting).
    idle_timeout_s: float | None

    def initial_config(self) -> dict[str, object]:
        """Native ``session`` fields the core session is created with (e.g. query parameters)."""
        ...

    def receive_text(self, text: str) -> list[Action]:
        """A text frame from the client."""
        ...

    def receive_bytes(self, data: bytes) -> list[Action]:
        """A binary frame from the client."""
        ...

    def render(self, event: p.ServerEvent) -> list[Action]:
        """A core event, in this protocol's shape (zero, one or several messages)."""
        ...

    def error(self, event: p.Error) -> list[Action]:
        """A shell-level error (message too large, server busy, idle timeout) in this protocol's
        shape; ``render`` is used for core errors and may simply delegate here."""
        ...
