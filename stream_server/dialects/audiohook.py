"""Genesys Cloud AudioHook Monitor (``/v1/audiohook``, protocol version 2) as a dialect.

Genesys Cloud (the *client*) opens the WebSocket with ``Audiohook-Organization-Id``,
``Audiohook-Session-Id``, ``Audiohook-Correlation-Id`` and ``X-API-KEY`` headers, signed (HTTP
message signatures, HMAC-SHA256 under the integration's client secret). It then runs an ``open``
transaction offering media formats, streams binary audio frames, and pings; it may pause, report
discarded audio, change the language (``update``), and ends with a ``close`` transaction. Every
text message has the envelope ``{version: "2", id, type, seq, serverseq|clientseq, position,
parameters}``. ``docs/audiohook.md`` is the user-facing description.

How a stream becomes a session (the decisions, see the doc for why):

* ``opened`` picks one offered media: PCMU before L16 (half the bytes, what a phone line carries),
  two channels before one. Channel *i* of the core session is the *i*-th name of the chosen
  ``channels`` list (``external`` is the customer, ``internal`` the agent), and its ``speaker``
  label is that name. L16 frames are little-endian, the core's ``pcm16``, so no conversion.
* Times stay true to the call: a ``discarded`` or ``resumed`` message declares audio the client
  did not send; that much silence is put into the session so utterance times stay conversation
  time. Transcript ``offset``/``duration`` are reported on the client's own stream-position
  timeline (which the ``position`` of those messages states), so they match what Genesys plays.
* Transcripts go back as ``event`` messages with one ``transcript`` entity: each core
  ``transcript.segment`` becomes a final (``isFinal: true``); interim captions become
  ``isFinal: false`` entities of the same ``id`` only when ``customConfig.interimResults`` is
  true (Genesys acts on finals; subscribers of the session hub get interims either way).
* Bad input (not JSON, a broken envelope, an unknown type, a ``seq`` that is not the next one, a
  message out of protocol order) is answered with ``disconnect`` (reason ``error``, with
  ``info``), as the protocol defines; the server never sends ``error``. After a ``disconnect`` the
  dialect waits for the client's ``close`` and answers it with ``closed``.
* ``close`` flushes the core session: every utterance is finalized and sent as an ``event``, then
  ``closed`` goes out (the core's ``transcript.text.done`` marks that point).
* The server side of ``pause``/``resume``/``reconnect``/``disconnect``: an operator's pause or
  resume (``POST /v1/sessions/{conversationId}/pause``) reaches :meth:`AudioHookDialect.control`
  through the session hub and the shell, and goes out at once. The public ``request_*`` methods
  queue a message for a deployment's own policy instead; a Sans-I/O dialect only speaks when spoken
  to, so those go out ahead of the answer to the client's next message or frame.
* A server that drains (SIGTERM) calls :meth:`AudioHookDialect.drain`: every utterance open at that
  moment is finalized and sent, then ``reconnect`` asks Genesys to continue the conversation on a
  new session (another replica) instead of ending it; the connection stays open for the client's
  ``close``. A continued session's ``open`` (``continuedSessions``) is accepted like any other, its
  offsets continuing the client's ``position``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import decimal
import enum
import hashlib
import hmac
import json
import logging
import math
import re
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from stream_server import protocol as p
from stream_server.dialects.base import Action, Handshake, HandshakeRejected, Send
from stream_server.hub import Control, ControlRefused
from stream_server.redaction import names_from
from stream_server.settings import Settings, from_sources

log = logging.getLogger(__name__)

VERSION = "2"
SAMPLE_RATE = 8000
#: Text messages longer than this are refused (the protocol's own bound on a control message).
MAX_TEXT_CHARS = 65535
#: Silence put into the session for one declared gap at most; a longer gap (a long hold) only
#: moves the timeline, so a client cannot make the server buffer minutes of zeros.
MAX_FILL_S = 60.0
#: The ``conversationId`` of a connection probe: a session Genesys opens (and closes at once) to
#: check that the server answers, when an integration is set up and from time to time after. The
#: protocol's patterns ask that it be answered as any session and neither transcribed nor logged.
PROBE_CONVERSATION = "00000000-0000-0000-0000-000000000000"
#: Media formats understood: wire name → (core ``input_audio_format``, bytes per sample, silence).
FORMATS: dict[str, tuple[str, int, bytes]] = {"PCMU": ("g711_ulaw", 1, b"\xff"), "L16": ("pcm16", 2, b"\x00\x00")}
CHANNEL_NAMES = ("external", "internal")
CLIENT_TYPES = ("open", "close", "discarded", "error", "ping", "paused", "resumed", "update")
DISCONNECT_REASONS = ("completed", "unauthorized", "error")
ENVELOPE_FIELDS = ("version", "id", "type", "seq", "serverseq", "position", "parameters")
#: ``reconnect.info`` when the server drains (the protocol defines no reason field, only ``info``).
DRAIN_INFO = "the server is shutting down; continue the conversation on a new session"
#: A continued session lists at most this many earlier ones (a call that reconnects every minute
#: for a day stays far below it); more is bad input, not a call.
MAX_CONTINUED = 1000
#: ``PT<n>S`` as Genesys writes it; hours and minutes are accepted as ISO 8601 allows them.
DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


class State(enum.Enum):
    """Where the session is in the protocol (the server side of AudioHook's state machine)."""

    PREPARING = "preparing"  # before ``open``
    ACTIVE = "active"  # opened, audio flows
    PAUSED = "paused"  # the client said ``paused``
    DISCONNECTING = "disconnecting"  # ``disconnect`` sent: only ``close`` is answered
    CLOSING = "closing"  # ``close`` received: finals are being flushed, then ``closed``
    CLOSED = "closed"


class BadInput(Exception):
    """A client message the protocol does not allow; ``info`` goes into ``disconnect``."""

    def __init__(self, info: str) -> None:
        super().__init__(info)
        self.info = info


@dataclasses.dataclass(frozen=True)
class Media:
    """The media chosen from ``open.parameters.media``: ``offered`` is echoed in ``opened``."""

    format: str
    channels: tuple[str, ...]
    offered: dict[str, Any]

    @property
    def input_format(self) -> str:
        return FORMATS[self.format][0]

    @property
    def frame_bytes(self) -> int:
        """Bytes of one sample of every channel (an audio frame is a whole number of these)."""
        return FORMATS[self.format][1] * len(self.channels)

    @property
    def silence(self) -> bytes:
        return FORMATS[self.format][2] * len(self.channels)


@dataclasses.dataclass(frozen=True)
class AudioHookOptions:
    """What the dialect knows from the upgrade and the server's configuration."""

    session_id: str | None = None  # ``Audiohook-Session-Id``
    organization_id: str | None = None  # ``Audiohook-Organization-Id``
    correlation_id: str | None = None  # ``Audiohook-Correlation-Id``
    api_key: str | None = None  # ``X-API-KEY``
    default_model: str = "tiny.en"
    model_speaks: Callable[[str, str], bool] = p.speaks_by_name


@dataclasses.dataclass
class Utterance:
    """What an interim entity needs of one core utterance: where it started, what is committed."""

    start_s: float
    committed: str = ""


# --------------------------------------------------------------------------------------------
# ISO 8601 durations
# --------------------------------------------------------------------------------------------


MAX_DURATION_S = 1e9


def parse_duration(raw: object) -> float | None:
    """Seconds of an AudioHook duration (``PT1.25S``), or None if ``raw`` is not one."""
    if not isinstance(raw, str):
        return None
    match = DURATION.match(raw)
    if match is None or raw == "PT":
        return None
    hours, minutes, seconds = match.groups()
    try:
        value = int(hours or 0) * 3600 + int(minutes or 0) * 60 + float(seconds or 0)
    except (ValueError, OverflowError):  # 4300+ digit numbers
        return None
    # A position beyond ~31 years is no call's; it would also overflow the rendering of offsets.
    return value if math.isfinite(value) and value <= MAX_DURATION_S else None


def duration(seconds: float) -> str:
    """``PT<seconds>S`` with millisecond precision and no trailing zeros (``PT0S``, ``PT1.25S``)."""
    text = format(decimal.Decimal(max(0.0, seconds)).quantize(decimal.Decimal("0.001")), "f").rstrip("0").rstrip(".")
    return f"PT{text or '0'}S"


# --------------------------------------------------------------------------------------------
# The dialect
# --------------------------------------------------------------------------------------------


class AudioHookDialect:
    """One AudioHook session (one conversation's audio, one or two channels)."""

    name = "audiohook"
    subprotocol: str | None = None
    idle_timeout_s: float | None = None  # Genesys pings every few seconds, even while paused

    def __init__(self, options: AudioHookOptions | None = None) -> None:
        self.options = options or AudioHookOptions()
        self.api_key: str | None = self.options.api_key
        self.session_alias: str | None = None  # the conversationId, once ``open`` is accepted
        # False for a connection probe (``open`` with the nil conversationId, :data:`PROBE_CONVERSATION`):
        # Genesys checks that the server answers, and such a session is neither transcribed nor kept.
        self.recorded = True
        self.session_id: str | None = self.options.session_id
        self.state = State.PREPARING
        self.media: Media | None = None
        self.language: str | None = None
        self.interim_results = False
        self.client_errors: list[dict[str, Any]] = []  # ``error`` messages the client sent
        self.continued_sessions: list[dict[str, Any]] = []  # ``open.continuedSessions`` (a reconnect)
        self._server_paused = False  # the operator's ``pause`` is in force (until their ``resume``)
        self._drained_at: float | None = None  # core seconds heard when the server began to drain
        self._awaiting: set[str] = set()  # utterances open at the drain whose finals are not out yet
        self._reconnect_sent = False
        self._seq = 0  # the last server seq sent
        self._clientseq = 0  # the last client seq accepted
        self._close_requested = False  # a ``close`` is waiting for its ``closed``
        self._pending: list[tuple[str, dict[str, Any]]] = []  # requested server messages
        self._received = 0  # samples per channel of audio received
        self._core_samples = 0  # samples per channel handed to the core (audio + filled silence)
        self._stream_s = 0.0  # the client's stream position (audio received + declared gaps)
        self._timeline: list[tuple[float, float]] = [(0.0, 0.0)]  # (core s, stream s) breakpoints
        self._utterances: dict[str, Utterance] = {}

    @property
    def call(self) -> str:
        """How this session is named in the log: the conversation, else the session id."""
        return self.session_alias or self.session_id or "session ?"

    # ---------------------------------------------------------------- server-initiated messages

    def request_pause(self) -> None:
        """Ask the client to pause the audio (it answers ``paused``, later ``resumed`` with what it
        discarded); sent with the next output. Only an open, unpaused or paused stream is asked."""
        self._request("pause", {})

    def request_resume(self) -> None:
        """Ask the client to resume after a server-initiated pause."""
        self._request("resume", {})

    def request_reconnect(self, info: str = "") -> None:
        """Ask the client to continue the conversation on a new connection (e.g. before this
        server instance shuts down)."""
        self._request("reconnect", {"info": info} if info else {})

    def request_disconnect(self, reason: str = "completed", info: str = "") -> None:
        """End the session from the server side; the client then runs its ``close`` transaction."""
        if reason not in DISCONNECT_REASONS:
            raise ValueError(f"reason must be one of {DISCONNECT_REASONS}")
        self._request("disconnect", {"reason": reason, **({"info": info} if info else {})})

    def _request(self, kind: str, parameters: dict[str, Any]) -> None:
        self._pending.append((kind, parameters))

    def control(self, control: Control) -> list[Action]:
        """An operator's pause or resume (``POST /v1/sessions/{id}/pause|resume``): the message to
        send now, or :class:`ControlRefused` when the protocol state forbids it. Only an open
        stream is paused, once; only the server's own pause is resumed (a pause the client began
        is the client's to end)."""
        if self.state not in (State.ACTIVE, State.PAUSED):
            raise ControlRefused("invalid_state", f"the AudioHook session is {self.state.value}; only an open stream can be paused or resumed")
        if control is Control.PAUSE:
            if self._server_paused:
                raise ControlRefused("invalid_state", "the server has already paused this stream")
            self._server_paused = True
            log.info("audiohook %s: pause requested by an operator", self.call)
            return [self._message("pause", {})]
        if control is Control.RESUME:
            if not self._server_paused:
                raise ControlRefused("invalid_state", "the server has not paused this stream")
            self._server_paused = False
            log.info("audiohook %s: resume requested by an operator", self.call)
            return [self._message("resume", {})]
        raise ControlRefused("control_unsupported", f"AudioHook has no {control.value!r} control")

    def drain(self) -> list[Action] | None:
        """The server is shutting down: finalize every utterance open now (a commit), and once
        their finals are out ask the client to ``reconnect`` (to another replica) rather than
        end the call. Audio that still arrives is transcribed, and the client's ``close`` is
        answered with ``closed`` as usual. None before ``open`` or once the session is ending:
        the protocol has no reconnect there, and the shell's plain drain applies."""
        if self.state not in (State.ACTIVE, State.PAUSED):
            return None
        if self._drained_at is not None:
            return []
        self._drained_at = self._core_samples / SAMPLE_RATE
        self._awaiting = set(self._utterances)
        log.info("audiohook %s: server draining; %d utterance(s) to finalize before reconnect", self.call, len(self._awaiting))
        return [p.BufferCommit(), *self._reconnect_when_final()]

    def _reconnect_when_final(self) -> list[Action]:
        """``reconnect`` once every utterance open at the drain has sent its final."""
        if self._drained_at is None or self._reconnect_sent or self._awaiting or self.state not in (State.ACTIVE, State.PAUSED):
            return []
        self._reconnect_sent = True
        log.info("audiohook %s: finals sent; asking the client to reconnect", self.call)
        return [self._message("reconnect", {"info": DRAIN_INFO})]

    def _flush_requests(self) -> list[Action]:
        """Requested messages that the protocol state still allows, in the order requested."""
        out: list[Action] = []
        pending, self._pending = self._pending, []
        for kind, parameters in pending:
            if kind == "disconnect":
                out += self._disconnect(parameters["reason"], parameters.get("info", ""))
            elif self.state in (State.ACTIVE, State.PAUSED):
                out.append(self._message(kind, parameters))
            else:
                log.info("audiohook %s: requested %s not sent in state %s", self.call, kind, self.state.value)
        return out

    # ---------------------------------------------------------------- client → server

    def initial_config(self) -> dict[str, object]:
        # Telephone audio; the channels and format are known once ``open`` offers media. Word
        # timings feed the transcript tokens; interims feed the session hub's subscribers.
        return {
            "input_audio_format": "g711_ulaw",
            "sample_rate": SAMPLE_RATE,
            "interim_results": True,
            "include": ["logprobs", "words"],
        }

    def receive_text(self, text: str) -> list[Action]:
        out = self._flush_requests()
        try:
            return out + self._receive_text(text)
        except BadInput as bad:
            return out + self._bad_input(bad.info)

    def receive_bytes(self, data: bytes) -> list[Action]:
        out = self._flush_requests()
        try:
            return out + self._audio(data)
        except BadInput as bad:
            return out + self._bad_input(bad.info)

    def _bad_input(self, info: str) -> list[Action]:
        if self.state in (State.DISCONNECTING, State.CLOSING, State.CLOSED):
            # The protocol has no answer once the session is ending; the close transaction runs on.
            log.warning("audiohook %s: %s (ignored while %s)", self.call, info, self.state.value)
            return []
        log.warning("audiohook %s: bad input: %s; disconnecting", self.call, info)
        return self._disconnect("error", info)

    def _receive_text(self, text: str) -> list[Action]:
        message = self._envelope(text)
        kind = message["type"]
        if self.state is State.DISCONNECTING and kind not in ("close", "ping", "error"):
            log.info("audiohook %s: %s after disconnect ignored", self.call, kind)
            return []
        handler = self._handlers()[kind]
        return handler(message["parameters"], message)

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], dict[str, Any]], list[Action]]]:
        return {
            "open": self._open,
            "close": self._close,
            "discarded": self._discarded,
            "error": self._client_error,
            "ping": self._ping,
            "paused": self._paused,
            "resumed": self._resumed,
            "update": self._update,
        }

    def _envelope(self, text: str) -> dict[str, Any]:
        """Parse and check one client message's envelope, and accept its ``seq``."""
        if len(text) > MAX_TEXT_CHARS:
            raise BadInput(f"text message of {len(text)} characters exceeds {MAX_TEXT_CHARS}")
        try:
            message = p.loads_json(text)
        except (ValueError, RecursionError):
            raise BadInput("text message is not valid JSON") from None
        if not isinstance(message, dict):
            raise BadInput("message is not a JSON object")
        missing = [name for name in ENVELOPE_FIELDS if name not in message]
        if missing:
            raise BadInput(f"message is not a well-formed client message (missing {', '.join(missing)})")
        if message["version"] != VERSION:
            raise BadInput(f"unsupported protocol version {message['version']!r} (this server speaks {VERSION!r})")
        self._check_sequence(message)
        self._check_identity(message)
        if parse_duration(message["position"]) is None:
            raise BadInput(f"position {message['position']!r} is not an ISO 8601 duration")
        kind = message["type"]
        if kind not in CLIENT_TYPES:
            raise BadInput(f"{kind!r} is not a supported client message type")
        if not isinstance(message["parameters"], dict):
            raise BadInput(f"parameters of {kind!r} must be an object")
        return message

    def _check_sequence(self, message: dict[str, Any]) -> None:
        """``seq`` counts the client's messages from 1 without gaps; ``serverseq`` is the last
        server message the client has seen, so never more than was sent. After a ``disconnect``
        (perhaps for a bad ``seq``) the count is taken as the client has it, so that its ``close``
        transaction can complete."""
        seq, serverseq = message["seq"], message["serverseq"]
        if not _natural(seq) or seq == 0:
            raise BadInput(f"seq {seq!r} is not a positive integer")
        if seq != self._clientseq + 1 and self.state is not State.DISCONNECTING:
            raise BadInput(f"seq {seq} out of order: expected {self._clientseq + 1} (duplicate, lost or reordered message)")
        self._clientseq = seq
        if not _natural(serverseq):
            raise BadInput(f"serverseq {serverseq!r} is not a non-negative integer")
        if serverseq > self._seq:
            raise BadInput(f"serverseq {serverseq} is ahead of the last server message ({self._seq})")

    def _check_identity(self, message: dict[str, Any]) -> None:
        ident = message["id"]
        if not isinstance(ident, str) or not ident:
            raise BadInput("id must be the session's identifier (a UUID string)")
        if self.session_id is None:
            self.session_id = ident
        elif ident != self.session_id:
            raise BadInput(f"session identifier mismatch: {ident!r} is not this session ({self.session_id!r})")

    # ---------------------------------------------------------------- open

    def _open(self, parameters: dict[str, Any], message: dict[str, Any]) -> list[Action]:
        if self.state is not State.PREPARING:
            raise BadInput(f"'open' in state {self.state.value}: the session is already open")
        organization = parameters.get("organizationId")
        conversation = parameters.get("conversationId")
        if not isinstance(organization, str) or not isinstance(conversation, str) or not conversation:
            raise BadInput("open needs string organizationId and conversationId parameters")
        media = self._choose_media(parameters.get("media"))
        language = self._language(parameters.get("language"))
        custom = parameters.get("customConfig")
        if custom is not None and not isinstance(custom, dict):
            raise BadInput("open parameter customConfig must be an object")
        continued = _continued_sessions(parameters.get("continuedSessions"))
        if conversation == PROBE_CONVERSATION:
            self.recorded = False
        else:
            self.session_alias = conversation
        header_org = self.options.organization_id
        if header_org is not None and organization.lower() != header_org.lower():
            log.warning("audiohook %s: organizationId %s does not match the Audiohook-Organization-Id header %s", self.call, organization, header_org)
            return self._disconnect("unauthorized", "organizationId does not match the Audiohook-Organization-Id header")
        self.media, self.language = media, language
        self.interim_results = bool(custom and custom.get("interimResults") is True)
        redact = _redact(custom.get("redact") if custom else None)
        self.continued_sessions = continued
        self._start_timeline(_position(message))
        if continued:
            log.info("audiohook %s: continues session(s) %s at position %s", self.call,
                     ", ".join(f"{c['id']} (serverseq {c['serverseq']}, clientseq {c['clientseq']})" for c in continued), message["position"])
        self.state = State.ACTIVE
        if not self.recorded:
            log.info("audiohook %s: connection probe opened (%s, channels %s): not transcribed or stored", self.call, media.format, ",".join(media.channels))
        else:
            log.info("audiohook %s: opened (%s, channels %s, language %s)", self.call, media.format, ",".join(media.channels), language or "server default")
        opened: dict[str, Any] = {"media": [media.offered], "startPaused": False}
        if parameters.get("supportedLanguages") is True:
            opened["supportedLanguages"] = list(supported_languages(self.options.default_model))
        changes = self._session_changes(media, language)
        if redact:
            changes["redact"] = redact
        return [p.SessionUpdate(changes), self._message("opened", opened)]

    def _start_timeline(self, position: float) -> None:
        """The stream's position at ``open``: 0 for a new session; where a continued session's
        client says its stream is (the reconnect's position continues the conversation), so
        transcript offsets continue with it while the core session counts from 0."""
        self._stream_s = position
        self._timeline = [(0.0, position)]

    def _choose_media(self, offered: object) -> Media:
        """PCMU before L16, stereo before mono, among the offers at 8 kHz with known channels."""
        if not isinstance(offered, list):
            raise BadInput("open parameter media must be a list")
        usable: list[Media] = []
        for item in offered:
            media = _media(item)
            if media is not None:
                usable.append(media)
        if not usable:
            raise BadInput("none of the offered media is supported (audio, PCMU or L16, 8000 Hz, external/internal channels)")
        return min(usable, key=lambda m: (-len(m.channels), m.format != "PCMU"))

    def _language(self, raw: object) -> str | None:
        """The conversation's language (``en-US``), or None for the server's default."""
        if raw is None:
            return None
        if not isinstance(raw, str) or not p.valid_language(raw):
            raise BadInput(f"language {raw!r} is not a language tag such as 'en-US'")
        if not self.options.model_speaks(self.options.default_model, raw):
            raise BadInput(f"language {raw!r} is not supported by model {self.options.default_model} (supported: {', '.join(supported_languages(self.options.default_model))})")
        return raw

    def _session_changes(self, media: Media, language: str | None) -> dict[str, Any]:
        changes: dict[str, Any] = {
            "input_audio_format": media.input_format,
            "sample_rate": SAMPLE_RATE,
            "channels": len(media.channels),
            "channel_labels": list(media.channels),
        }
        if language is not None:
            changes["language"] = language
        return changes

    # ---------------------------------------------------------------- audio and gaps

    def _audio(self, data: bytes) -> list[Action]:
        if self.state is State.PREPARING:
            raise BadInput("audio before the open transaction completed")
        if self.state is State.PAUSED:
            raise BadInput("audio while the stream is paused")
        if self.state is not State.ACTIVE:
            log.info("audiohook %s: %d bytes of audio in state %s dropped", self.call, len(data), self.state.value)
            return []
        assert self.media is not None
        if not data:
            log.info("audiohook %s: empty audio frame ignored", self.call)
            return []
        if len(data) % self.media.frame_bytes:
            raise BadInput(f"audio frame of {len(data)} bytes is not a whole number of {self.media.frame_bytes}-byte samples ({self.media.format}, {len(self.media.channels)} channel(s))")
        samples = len(data) // self.media.frame_bytes
        self._received += samples
        self._stream_s += samples / SAMPLE_RATE
        if not self.recorded:
            return []  # a connection probe's audio is counted (its position), not transcribed
        self._core_samples += samples
        return [p.AudioAppend(data)]

    def _gap(self, length: float, position: float) -> list[Action]:
        """The client declares ``length`` seconds of audio that it did not send:
        that much silence keeps the session on conversation time (up to :data:`MAX_FILL_S`), and
        the stream position follows what the message's ``position`` says it is now (a client that
        counts the gap in its position moves ahead; one that does not, stays)."""
        assert self.media is not None
        fill = round(min(length, MAX_FILL_S) * SAMPLE_RATE) if self.recorded else 0
        if length > MAX_FILL_S:
            log.info("audiohook %s: gap of %.1f s: %.0f s of silence inserted, the rest skipped", self.call, length, MAX_FILL_S)
        self._core_samples += fill
        self._stream_s = max(self._stream_s, position)
        self._timeline.append((self._core_samples / SAMPLE_RATE, self._stream_s))
        return [p.AudioAppend(self.media.silence * fill)] if fill else []

    def _gap_parameters(self, kind: str, parameters: dict[str, Any]) -> tuple[float, float]:
        start, length = parse_duration(parameters.get("start")), parse_duration(parameters.get("discarded"))
        if start is None or length is None:
            raise BadInput(f"{kind} needs start and discarded durations")
        return start, length

    def _discarded(self, parameters: dict[str, Any], message: dict[str, Any]) -> list[Action]:
        if self.state not in (State.ACTIVE, State.PAUSED):
            raise BadInput(f"'discarded' in state {self.state.value}")
        start, length = self._gap_parameters("discarded", parameters)
        log.info("audiohook %s: client discarded %.3f s of audio at %.3f s", self.call, length, start)
        return self._gap(length, _position(message))

    def _paused(self, parameters: dict[str, Any], message: dict[str, Any]) -> list[Action]:
        if self.state not in (State.ACTIVE, State.PAUSED):
            raise BadInput(f"'paused' in state {self.state.value}")
        self.state = State.PAUSED
        log.info("audiohook %s: paused at %s", self.call, message["position"])
        return []

    def _resumed(self, parameters: dict[str, Any], message: dict[str, Any]) -> list[Action]:
        if self.state not in (State.ACTIVE, State.PAUSED):
            raise BadInput(f"'resumed' in state {self.state.value}")
        start, length = self._gap_parameters("resumed", parameters)
        self.state = State.ACTIVE
        log.info("audiohook %s: resumed at %.3f s, %.3f s discarded while paused", self.call, start, length)
        return self._gap(length, _position(message)) if length > 0 else []

    # ---------------------------------------------------------------- the other client messages

    def _ping(self, parameters: dict[str, Any], message: dict[str, Any]) -> list[Action]:
        return [self._message("pong", {})]

    def _update(self, parameters: dict[str, Any], message: dict[str, Any]) -> list[Action]:
        if self.state not in (State.ACTIVE, State.PAUSED):
            raise BadInput(f"'update' in state {self.state.value}")
        language = self._language(parameters.get("language"))
        if language is None:
            raise BadInput("update needs a language parameter")
        self.language = language
        log.info("audiohook %s: language changed to %s", self.call, language)
        return [p.SessionUpdate({"language": language}), self._message("updated", {})]

    def _client_error(self, parameters: dict[str, Any], message: dict[str, Any]) -> list[Action]:
        """The client reports a problem (it closes the session itself if it is fatal)."""
        self.client_errors.append(parameters)
        log.warning("audiohook %s: client error %s: %.200s", self.call, parameters.get("code"), parameters.get("message"))
        return []

    def _close(self, parameters: dict[str, Any], message: dict[str, Any]) -> list[Action]:
        if self.state in (State.CLOSING, State.CLOSED):
            log.info("audiohook %s: repeated close ignored", self.call)
            return []
        log.info("audiohook %s: close (%s) at %s; finalizing", self.call, parameters.get("reason"), message["position"])
        self.state = State.CLOSING
        self._close_requested = True
        return [p.SessionClose()]

    # ---------------------------------------------------------------- server → client

    def _message(self, kind: str, parameters: dict[str, Any]) -> Send:
        """One server message with the next ``seq`` and the last client ``seq`` seen."""
        self._seq += 1
        body = {
            "version": VERSION,
            "id": self.session_id or str(uuid.UUID(int=0)),
            "type": kind,
            "seq": self._seq,
            "clientseq": self._clientseq,
            "parameters": parameters,
        }
        return Send(json.dumps(body, ensure_ascii=False, separators=(",", ":")))

    def _disconnect(self, reason: str, info: str) -> list[Action]:
        if self.state in (State.DISCONNECTING, State.CLOSING, State.CLOSED):
            return []
        self.state = State.DISCONNECTING
        return [self._message("disconnect", {"reason": reason, "info": info[:500]})]

    def render(self, event: p.ServerEvent) -> list[Action]:
        if isinstance(event, p.SpeechStarted):
            self._utterances[event.item_id] = Utterance(event.audio_start_ms / 1000)
        elif isinstance(event, p.TranscriptDelta):
            self._utterances.setdefault(event.item_id, Utterance(0.0)).committed += event.delta
        elif isinstance(event, p.TranscriptInterim):
            return self._interim(event)
        elif isinstance(event, p.BufferCommitted):
            if event.item_id is not None and self._drained_at is not None and not self._reconnect_sent:
                self._awaiting.add(event.item_id)  # an utterance the drain's commit ended
        elif isinstance(event, p.TranscriptSegment):
            self._utterances.pop(event.item_id, None)
            self._awaiting.discard(event.item_id)
            return self._final(event) + self._reconnect_when_final()
        elif isinstance(event, p.TranscriptDone):
            return self._done()
        elif isinstance(event, p.Error):
            log.warning("audiohook %s: core %s %s: %s", self.call, event.error.type, event.error.code, event.error.message)
        return []

    def error(self, event: p.Error) -> list[Action]:
        """Shell errors (idle timeout, message too large, server busy) end the session: the
        protocol's way to say so is ``disconnect`` with reason ``error``."""
        log.warning("audiohook %s: %s: %s", self.call, event.error.code, event.error.message)
        return self._disconnect("error", event.error.message)

    def _done(self) -> list[Action]:
        """Every utterance is final: the ``close`` transaction completes."""
        if not self._close_requested:
            return []
        self._close_requested = False
        self.state = State.CLOSED
        log.info("audiohook %s: closed", self.call)
        return [self._message("closed", {})]

    def _events_allowed(self) -> bool:
        return self.state in (State.ACTIVE, State.PAUSED, State.CLOSING)

    def _final(self, segment: p.TranscriptSegment) -> list[Action]:
        if not segment.text or not self._events_allowed():
            return []
        tokens = [self._token(w, segment.language) for w in segment.words or [] if w.word.strip()]
        confidence = math.exp(min(0.0, segment.avg_logprob))
        data = self._entity(segment.item_id, segment.channel, True, segment.start, segment.end, segment.text, confidence, tokens,
                            segment.language)
        return [self._message("event", {"entities": [{"type": "transcript", "data": data}]})]

    def _interim(self, interim: p.TranscriptInterim) -> list[Action]:
        utterance = self._utterances.get(interim.item_id)
        if not self.interim_results or utterance is None or not self._events_allowed():
            return []
        text = (utterance.committed + interim.text).strip()
        if not text:
            return []
        end = max([w.end for w in interim.words or []], default=utterance.start_s)
        tokens = [self._token(w) for w in interim.words or [] if w.word.strip()]
        confidence = sum(w.probability for w in interim.words) / len(interim.words) if interim.words else 0.5
        data = self._entity(interim.item_id, interim.channel, False, utterance.start_s, end, text, confidence, tokens)
        return [self._message("event", {"entities": [{"type": "transcript", "data": data}]})]

    def _entity(self, item_id: str, channel: int, final: bool, start: float, end: float, text: str,
                confidence: float, tokens: list[dict[str, Any]], detected: str | None = None) -> dict[str, Any]:
        """``detected``: the utterance's language as the decoder found it (a final's), used when
        the client set none; the client's own tag wins otherwise."""
        language = self.language or detected
        offset = self.stream_time(start)
        alternative: dict[str, Any] = {
            "confidence": round(min(1.0, max(0.0, confidence)), 4),
            "interpretations": [{"type": "display", "transcript": text, "tokens": tokens}],
        }
        if language is not None:
            alternative["languages"] = [language]
        return {
            "id": self.utterance_id(item_id),
            "channelId": channel,
            "isFinal": final,
            "offset": duration(offset),
            "duration": duration(max(0.0, self.stream_time(end) - offset)),
            "alternatives": [alternative],
        }

    def _token(self, word: p.WordTiming, detected: str | None = None) -> dict[str, Any]:
        language = self.language or detected
        start = self.stream_time(word.start)
        token: dict[str, Any] = {
            "type": "word",
            "value": word.word.strip(),
            "confidence": round(min(1.0, max(0.0, word.probability)), 4),
            "offset": duration(start),
            "duration": duration(max(0.0, self.stream_time(word.end) - start)),
        }
        if language is not None:
            token["language"] = language
        return token

    def utterance_id(self, item_id: str) -> str:
        """A UUID per utterance, the same for its interim and final entities."""
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"audiohook:{self.session_id}:{item_id}"))

    def stream_time(self, core_s: float) -> float:
        """A time of the core session (conversation time, gaps filled) on the client's stream
        position timeline (where a gap the client does not count is left out)."""
        index = max(i for i, (core, _) in enumerate(self._timeline) if core <= core_s or i == 0)
        core, stream = self._timeline[index]
        mapped = stream + (core_s - core)
        if index + 1 < len(self._timeline):
            mapped = min(mapped, self._timeline[index + 1][1])
        return max(0.0, mapped)


def _natural(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _redact(raw: object) -> list[str]:
    """``customConfig.redact``: a list of redaction names or one comma-separated string. One the
    server does not do is bad input (``disconnect``, reason ``error``): the conversation is not
    transcribed unredacted."""
    if raw is None:
        return []
    values = [raw] if isinstance(raw, str) else raw
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise BadInput("open parameter customConfig.redact must be a string or a list of strings")
    try:
        return names_from(values)
    except ValueError as exc:
        raise BadInput(f"customConfig.redact: {exc}") from None


def _continued_sessions(raw: object) -> list[dict[str, Any]]:
    """``open.parameters.continuedSessions``: the sessions this one continues after a
    ``reconnect``, each ``{id, serverseq, clientseq}`` (their last sequence numbers)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or len(raw) > MAX_CONTINUED:
        raise BadInput(f"open parameter continuedSessions must be a list of at most {MAX_CONTINUED} sessions")
    out: list[dict[str, Any]] = []
    for item in raw:
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("id"), str)
            or not item["id"]
            or not _natural(item.get("serverseq"))
            or not _natural(item.get("clientseq"))
        ):
            raise BadInput("each continuedSessions entry needs an id and non-negative integer serverseq and clientseq")
        out.append({"id": item["id"], "serverseq": item["serverseq"], "clientseq": item["clientseq"]})
    return out


def _position(message: dict[str, Any]) -> float:
    position = parse_duration(message["position"])
    assert position is not None  # checked with the envelope
    return position


def _media(item: object) -> Media | None:
    """One offered media entry, if this server can take it."""
    if not isinstance(item, dict):
        return None
    channels = item.get("channels")
    if (
        item.get("type") != "audio"
        or not isinstance(item.get("format"), str)
        or item.get("format") not in FORMATS
        or item.get("rate") != SAMPLE_RATE
        or not isinstance(channels, list)
        or not 1 <= len(channels) <= 2
        or not all(isinstance(c, str) for c in channels)
        or len(set(channels)) != len(channels)
        or any(c not in CHANNEL_NAMES for c in channels)
    ):
        return None
    return Media(str(item["format"]), tuple(channels), dict(item))


def supported_languages(model: str) -> tuple[str, ...]:
    """What ``opened.supportedLanguages`` lists: English for an English-only model, else every
    language Whisper knows (as ISO 639-1 tags; any region of them is accepted)."""
    if p.english_only_model(model):
        return ("en-US",)
    try:
        from faster_whisper.tokenizer import _LANGUAGE_CODES
    except ImportError:  # pragma: no cover - faster-whisper is a dependency of the server
        return ("en-US",)
    return tuple(sorted(_LANGUAGE_CODES))


# --------------------------------------------------------------------------------------------
# The upgrade: HTTP message signatures (RFC 9421 style, as AudioHook signs its requests)
# --------------------------------------------------------------------------------------------

#: What an AudioHook signature must cover (Genesys signs exactly these).
REQUIRED_COMPONENTS = (
    "@request-target",
    "@authority",
    "audiohook-organization-id",
    "audiohook-session-id",
    "audiohook-correlation-id",
    "x-api-key",
)
MAX_SIGNATURE_AGE_S = 10
CLOCK_SKEW_S = 3
MIN_NONCE = 22  # characters: at least 128 bits of base64


class SignatureError(Exception):
    """Why a request's signature does not verify (logged; the client sees a plain 401)."""


@dataclasses.dataclass(frozen=True)
class SignatureInput:
    """One ``Signature-Input`` member: the covered components and the signature parameters."""

    components: list[str]
    params: list[tuple[str, str | int | bool]]

    def serialized(self) -> str:
        """The member value in RFC 8941 form: the ``@signature-params`` line of the base."""
        inner = " ".join(_sf_string(c) for c in self.components)
        return f"({inner})" + "".join(_sf_param(k, v) for k, v in self.params)

    def param(self, name: str) -> str | int | bool | None:
        return next((v for k, v in self.params if k == name), None)


class _Token(str):
    """An RFC 8941 token (serialized bare), as opposed to a string (serialized quoted)."""


class _Parser:
    """Just enough of RFC 8941 (structured fields) for ``Signature`` and ``Signature-Input``."""

    def __init__(self, text: str) -> None:
        self.text = text.strip()
        self.at = 0

    def dictionary(self, member: Callable[[_Parser], object]) -> dict[str, object]:
        out: dict[str, object] = {}
        while True:
            key = self.key()
            self.expect("=")
            out[key] = member(self)
            self.spaces()
            if self.at >= len(self.text):
                return out
            self.expect(",")
            self.spaces()

    def spaces(self) -> None:
        while self.at < len(self.text) and self.text[self.at] in " \t":
            self.at += 1

    def expect(self, char: str) -> None:
        if self.text[self.at : self.at + 1] != char:
            raise SignatureError(f"expected {char!r} at {self.at} in {self.text[:80]!r}")
        self.at += 1

    def key(self) -> str:
        match = re.compile(r"[a-z*][a-z0-9_\-.*]*").match(self.text, self.at)
        if match is None:
            raise SignatureError(f"expected a key at {self.at}")
        self.at = match.end()
        return match.group()

    def string(self) -> str:
        self.expect('"')
        out: list[str] = []
        while self.at < len(self.text):
            char = self.text[self.at]
            self.at += 1
            if char == "\\":
                out.append(self.text[self.at : self.at + 1])
                self.at += 1
            elif char == '"':
                return "".join(out)
            else:
                out.append(char)
        raise SignatureError("unterminated string")

    def bare(self) -> str | int | bool:
        char = self.text[self.at : self.at + 1]
        if char == '"':
            return self.string()
        if char == "?":
            self.at += 2
            return self.text[self.at - 1] == "1"
        match = re.compile(r"-?\d{1,15}|[A-Za-z*][A-Za-z0-9:/!#$%&'*+\-.^_`|~]*").match(self.text, self.at)
        if match is None:
            raise SignatureError(f"expected a value at {self.at}")
        self.at = match.end()
        return int(match.group()) if match.group().lstrip("-").isdigit() else _Token(match.group())

    def params(self) -> list[tuple[str, str | int | bool]]:
        out: list[tuple[str, str | int | bool]] = []
        while self.text[self.at : self.at + 1] == ";":
            self.at += 1
            key = self.key()
            value: str | int | bool = True
            if self.text[self.at : self.at + 1] == "=":
                self.at += 1
                value = self.bare()
            out.append((key, value))
        return out

    def signature_input(self) -> SignatureInput:
        self.expect("(")
        components: list[str] = []
        while True:
            self.spaces()
            if self.text[self.at : self.at + 1] == ")":
                self.at += 1
                break
            components.append(self.string())
            if self.params():
                raise SignatureError("component parameters are not supported")
        return SignatureInput(components, self.params())

    def byte_sequence(self) -> bytes:
        self.expect(":")
        end = self.text.find(":", self.at)
        if end < 0:
            raise SignatureError("unterminated byte sequence")
        raw, self.at = self.text[self.at : end], end + 1
        self.params()
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise SignatureError("signature is not base64") from None


def _sf_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _sf_param(key: str, value: str | int | bool) -> str:
    if value is True:
        return f";{key}"
    if value is False:
        return f";{key}=?0"
    if isinstance(value, int):
        return f";{key}={value}"
    return f";{key}={value}" if isinstance(value, _Token) else f";{key}={_sf_string(value)}"


def request_targets(handshake: Handshake) -> list[str]:
    """The request target as the client sent it: the path, and the query if there was one."""
    query = urllib.parse.urlencode(dict(handshake.query))
    return [handshake.path + (f"?{query}" if query else "")]


def authorities(handshake: Handshake) -> list[str]:
    """The host the client signed: ``Host``, or the one a reverse proxy forwarded."""
    hosts = [handshake.headers.get("host", ""), handshake.headers.get("x-forwarded-host", "").split(",")[0]]
    return list(dict.fromkeys(h.strip().lower() for h in hosts if h.strip()))


def verify_signature(handshake: Handshake, client_secret: str, *, now: float | None = None) -> None:
    """Raise :class:`SignatureError` unless the upgrade carries a valid AudioHook signature made
    with ``client_secret`` (base64, as Genesys shows it) over :data:`REQUIRED_COMPONENTS`."""
    headers = handshake.headers
    if "signature-input" not in headers or "signature" not in headers:
        raise SignatureError("the request is not signed (Signature and Signature-Input headers)")
    inputs = _Parser(headers["signature-input"]).dictionary(_Parser.signature_input)
    signatures = _Parser(headers["signature"]).dictionary(_Parser.byte_sequence)
    label, signed = next(iter(inputs.items()))
    signature = signatures.get(label)
    assert isinstance(signed, SignatureInput)
    if not isinstance(signature, bytes):
        raise SignatureError(f"no signature for label {label!r}")
    _check_parameters(signed, headers, time.time() if now is None else now)
    try:
        key = base64.b64decode(client_secret, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the configured AudioHook client secret is not base64") from None
    for base in _signature_bases(signed, handshake):
        expected = hmac.new(key, base.encode(), hashlib.sha256).digest()
        if hmac.compare_digest(expected, signature):
            return
    raise SignatureError("signature does not match the client secret")


def _check_parameters(signed: SignatureInput, headers: Mapping[str, str], now: float) -> None:
    missing = [c for c in REQUIRED_COMPONENTS if c not in signed.components]
    if missing:
        raise SignatureError(f"signature does not cover {', '.join(missing)}")
    if signed.param("keyid") != headers.get("x-api-key", "").strip():
        raise SignatureError("signature keyid does not match X-API-KEY")
    alg = signed.param("alg")
    if alg not in (None, "hmac-sha256"):
        raise SignatureError(f"signature algorithm {alg!r} is not supported")
    nonce = signed.param("nonce")
    if not isinstance(nonce, str) or len(nonce) < MIN_NONCE:
        raise SignatureError("signature nonce is missing or too short")
    created, expires = signed.param("created"), signed.param("expires")
    if not isinstance(created, int) or isinstance(created, bool):
        raise SignatureError("signature has no created time")
    if created > now + CLOCK_SKEW_S:
        raise SignatureError("signature created in the future")
    if created + MAX_SIGNATURE_AGE_S < now - CLOCK_SKEW_S:
        raise SignatureError("signature is too old")
    if isinstance(expires, int) and not isinstance(expires, bool) and expires < now - CLOCK_SKEW_S:
        raise SignatureError("signature expired")


def _signature_bases(signed: SignatureInput, handshake: Handshake) -> list[str]:
    """The signature base for each way the request target and authority may have looked."""
    bases: list[str] = []
    for target in request_targets(handshake):
        for authority in authorities(handshake) or [""]:
            lines = []
            for component in signed.components:
                value = _component(component, handshake, target, authority)
                lines.append(f"{_sf_string(component)}: {value}")
            lines.append(f'"@signature-params": {signed.serialized()}')
            bases.append("\n".join(lines))
    return bases


def _component(name: str, handshake: Handshake, target: str, authority: str) -> str:
    derived = {"@request-target": target, "@authority": authority, "@path": handshake.path, "@method": "GET"}
    if name.startswith("@"):
        if name not in derived:
            raise SignatureError(f"derived component {name} is not supported")
        return derived[name]
    if name not in handshake.headers:
        raise SignatureError(f"signed header {name} is not present")
    return re.sub(r"[ \t]*\r\n[ \t]+", " ", handshake.headers[name].strip())


# --------------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------------


def server_settings(handshake: Handshake) -> Settings:
    """The server's settings as the shell hands them over, else the environment's."""
    settings = getattr(handshake, "settings", None)
    return settings if isinstance(settings, Settings) else from_sources()


def _unauthorized(message: str) -> HandshakeRejected:
    return HandshakeRejected(401, {"error": {"type": "invalid_request_error", "code": "invalid_signature", "message": message}})


def create(handshake: Handshake, *, settings: Settings | None = None, now: float | None = None) -> AudioHookDialect:
    """Build the dialect for one ``/v1/audiohook`` upgrade; refuse it (401) when a client secret
    is configured and the request is not signed with it."""
    settings = settings or server_settings(handshake)
    headers = handshake.headers
    secret = getattr(settings, "audiohook_client_secret", "")
    if secret:
        try:
            verify_signature(handshake, secret, now=now)
        except SignatureError as exc:
            log.warning("audiohook: upgrade of session %s refused: %s", headers.get("audiohook-session-id", "?"), exc)
            raise _unauthorized("the request signature does not verify with the configured client secret") from None
    options = AudioHookOptions(
        session_id=headers.get("audiohook-session-id") or None,
        organization_id=headers.get("audiohook-organization-id") or None,
        correlation_id=headers.get("audiohook-correlation-id") or None,
        api_key=headers.get("x-api-key") or None,
        default_model=handshake.default_model,
        model_speaks=handshake.model_speaks,
    )
    log.info("audiohook: session %s (correlation %s) connecting", options.session_id or "?", options.correlation_id or "?")
    return AudioHookDialect(options)


__all__ = [
    "AudioHookDialect",
    "AudioHookOptions",
    "Media",
    "SignatureError",
    "create",
    "duration",
    "parse_duration",
    "supported_languages",
    "verify_signature",
]

