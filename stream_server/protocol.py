"""Wire protocol: typed client messages, typed server events, and the one place that serialises.

Every server event is a frozen dataclass whose ``type`` class attribute is its wire name. Fields
are exactly the wire fields (``protocol.md`` is checked against this module by a test). Client
messages are parsed into small dataclasses here too, so that the session core never sees raw
JSON and every malformed message becomes one typed :class:`ProtocolError`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

# --------------------------------------------------------------------------------------------
# Session configuration
# --------------------------------------------------------------------------------------------


class TurnDetection(BaseModel):
    """OpenAI ``server_vad`` knobs; ranges bound the memory a client can pin (padding, silence)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["server_vad"] = "server_vad"
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    prefix_padding_ms: int = Field(300, ge=0, le=5000)
    silence_duration_ms: int = Field(500, ge=0, le=5000)

    @field_validator("threshold", mode="before")
    @classmethod
    def _int_threshold_is_fine(cls, value: Any) -> Any:
        # JSON has one number type; ``1`` is a valid threshold even though it parses as int.
        if isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        return value


class SessionConfig(BaseModel):
    """The effective configuration of a session (defaults documented in protocol.md)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    G711_AUDIO_FORMATS: ClassVar[tuple[str, ...]] = ("g711_ulaw", "g711_alaw")
    G711_SAMPLE_RATE: ClassVar[int] = 8000  # implied by a G.711 format unless sample_rate says otherwise

    input_audio_format: Literal["pcm16", "float32", "g711_ulaw", "g711_alaw"] = "pcm16"
    sample_rate: int = Field(16000, ge=8000, le=48000)
    language: str | None = None
    # ``translate``: English text of speech in any language (Whisper's own task; a multilingual
    # model). ``language`` is then the speech's language, not the text's.
    task: Literal["transcribe", "translate"] = "transcribe"
    prompt: str = Field("", max_length=1000)
    model: str = "tiny.en"
    turn_detection: TurnDetection | None = Field(default_factory=TurnDetection)
    include: list[Literal["logprobs", "words"]] = Field(default_factory=lambda: ["logprobs"])  # type: ignore[arg-type]
    interim_results: bool = False
    # Interleaved input channels (a call's legs, a stereo recording): each has its own VAD and
    # utterances; events say which channel they belong to. At most 8 bounds per-session VAD work.
    channels: int = Field(1, ge=1, le=8)
    channel_labels: list[str] | None = None  # names echoed as ``speaker`` ("agent", "customer")
    # Spoken numbers replaced by placeholders in every event (``redaction.py``): ``pci`` (card
    # numbers, expiry dates, security codes), ``ssn``, ``numbers`` (any 3+ digits), or one kind.
    redact: list[Literal["pci", "credit_card", "credit_card_expiration", "cvv", "ssn", "numbers"]] = Field(default_factory=list)

    @field_validator("channel_labels")
    @classmethod
    def _labels_match_channels(cls, value: list[str] | None, info: ValidationInfo) -> list[str] | None:
        channels = info.data.get("channels", 1)
        if value is not None:
            if len(value) != channels:
                raise ValueError(f"must name each of the {channels} channels")
            if any(not label or len(label) > 64 for label in value):
                raise ValueError("labels must be 1-64 characters")
        return value

    def speaker(self, channel: int) -> str | None:
        return self.channel_labels[channel] if self.channel_labels else None

    @field_validator("language")
    @classmethod
    def _normalise_language(cls, value: str | None) -> str | None:
        # Locale forms (en-US, pt_BR) are what browsers and SDKs send; Whisper wants ISO-639-1.
        if value is None:
            return None
        code = language_code(value)
        if not (2 <= len(code) <= 3 and code.isalpha()):
            raise ValueError("must be an ISO-639-1 code such as 'en' or a locale such as 'en-US'")
        return code

    def updated(self, changes: dict[str, Any]) -> SessionConfig:
        """Return a new config with ``changes`` merged in; raises ProtocolError naming the field.

        ``turn_detection`` objects merge field by field, so a client can change only the
        threshold without restating the padding; ``null`` switches VAD off. Choosing a G.711
        format without stating ``sample_rate`` means 8000 Hz, because telephone audio is 8 kHz and
        keeping the previous (default 16 kHz) rate would silently play it at double speed.
        """
        if not isinstance(changes, dict):
            raise ProtocolError("invalid_value", "session must be an object", param="session")
        merged = self.model_dump()
        if changes.get("input_audio_format") in self.G711_AUDIO_FORMATS and "sample_rate" not in changes:
            merged["sample_rate"] = self.G711_SAMPLE_RATE
        for key, value in changes.items():
            if key == "turn_detection" and isinstance(value, dict) and merged.get(key):
                merged[key] = {**merged[key], **value}
            else:
                merged[key] = value
        try:
            return SessionConfig.model_validate(merged)
        except ValidationError as exc:
            raise _validation_error(exc) from None

    def wants(self, what: Literal["logprobs", "words"]) -> bool:
        return what in self.include


def _validation_error(exc: ValidationError) -> ProtocolError:
    first = exc.errors()[0]
    loc = [str(part) for part in first["loc"] if not str(part).isdigit() or first["type"] != "literal_error"]
    # pydantic puts union branch names into the location; they mean nothing to a client.
    loc = [part for part in loc if part not in ("TurnDetection", "literal['logprobs','words']")]
    param = ".".join(["session", *loc])
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        message = f"unknown field {loc[-1]!r}"
    return ProtocolError("invalid_value", f"{param}: {message}", param=param)


def valid_language(language: str) -> bool:
    """Whether ``language`` is a code or locale a session accepts (for dialects' own validation)."""
    try:
        SessionConfig().updated({"language": language})
    except ProtocolError:
        return False
    return True


def english_only_model(model: str) -> bool:
    """Whether a model's name marks it English-only: Whisper's English checkpoints end in ``.en``
    (``tiny.en``, ``Systran/faster-whisper-small.en``). A loaded model's own flag is surer
    (``ModelRegistry.speaks``); the name is what is known before loading."""
    return model.rstrip("/").endswith(".en")


def speaks_by_name(model: str, language: str) -> bool:
    """Whether ``model`` can transcribe ``language`` (a code or locale), judged by its name."""
    return not english_only_model(model) or language_code(language) == "en"


def language_code(language: str) -> str:
    """The ISO-639-1 part of a code or locale: ``en-US``, ``pt_BR`` -> ``en``, ``pt``."""
    return language.replace("_", "-").split("-")[0].strip().lower()


def unsupported_language_message(model: str, language: str) -> str:
    """What every front end says when an English-only model is asked for another language."""
    return f"model {model!r} transcribes English only; language {language!r} needs a multilingual model (such as 'base')"


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ProtocolError(Exception):
    """A client mistake with a stable ``code`` (see protocol.md's error table)."""

    def __init__(self, code: str, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# --------------------------------------------------------------------------------------------
# Client messages
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SessionUpdate:
    session: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class AudioAppend:
    """Audio in the session's format: interleaved frames of every channel (``channel`` None), or
    mono samples of one channel, for transports that carry a call's legs separately (Twilio)."""

    audio: bytes
    channel: int | None = None


@dataclasses.dataclass(frozen=True)
class BufferCommit:
    pass


@dataclasses.dataclass(frozen=True)
class BufferClear:
    pass


@dataclasses.dataclass(frozen=True)
class SessionClose:
    pass


ClientMessage = SessionUpdate | AudioAppend | BufferCommit | BufferClear | SessionClose

CLIENT_MESSAGE_TYPES = (
    "session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
    "session.close",
)


def _no_constant(name: str) -> Any:
    raise json.JSONDecodeError(f"{name} is not JSON", name, 0)


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` without Python's ``NaN``/``Infinity`` extensions, which are not JSON (RFC
    8259): a client that sends them gets its protocol's malformed-JSON answer like any other bad
    JSON, and nothing it sent comes back inside a message (an AudioHook ``open`` offering media
    with a ``-Infinity`` field made ``opened`` echo it: the fuzzer's seed 47). Every client's JSON,
    on every wire protocol and HTTP route, is read with it. A number too large for a float
    ("1e999", valid JSON) is refused as well: Python reads it as infinity, which would go back out
    as ``Infinity`` (the fuzzer's seed 62, in an offered medium's extra field)."""
    return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise json.JSONDecodeError(f"{text[:20]} is too large a number", text, 0)
    return value


def parse_client_message(text: str) -> ClientMessage:
    """Turn one JSON text frame into a typed message, or raise ProtocolError."""
    try:
        data = loads_json(text)
    except json.JSONDecodeError as exc:
        raise ProtocolError("invalid_json", f"message is not valid JSON: {exc.msg}") from None
    except (ValueError, RecursionError) as exc:  # undecodable text, absurd nesting, 4300+ digit numbers
        raise ProtocolError("invalid_json", f"message is not valid JSON: {type(exc).__name__}") from None
    if not isinstance(data, dict):
        raise ProtocolError("invalid_json", "message must be a JSON object")
    kind = data.get("type")
    if kind == "session.update":
        session = data.get("session")
        if not isinstance(session, dict):
            raise ProtocolError("invalid_value", "session must be an object", param="session")
        return SessionUpdate(session)
    if kind == "input_audio_buffer.append":
        audio = data.get("audio")
        if not isinstance(audio, str):
            raise ProtocolError("invalid_value", "audio must be a base64 string", param="audio")
        try:
            return AudioAppend(base64.b64decode(audio, validate=True))
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_audio", "audio is not valid base64", param="audio") from None
    if kind == "input_audio_buffer.commit":
        return BufferCommit()
    if kind == "input_audio_buffer.clear":
        return BufferClear()
    if kind == "session.close":
        return SessionClose()
    raise ProtocolError(
        "unknown_message_type",
        f"unknown message type {kind!r}; expected one of {', '.join(CLIENT_MESSAGE_TYPES)}",
        param="type",
    )


# --------------------------------------------------------------------------------------------
# Server events
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    bytes: list[int]

    @classmethod
    def of(cls, token: str, logprob: float) -> TokenLogprob:
        return cls(token=token, logprob=logprob, bytes=list(token.encode("utf-8")))


@dataclasses.dataclass(frozen=True)
class WordTiming:
    word: str
    start: float
    end: float
    probability: float


@dataclasses.dataclass(frozen=True)
class ErrorInfo:
    type: str
    code: str
    message: str
    param: str | None = None


@dataclasses.dataclass(frozen=True)
class ServerEvent:
    """Base of every server event; ``type`` is the wire name and is not a dataclass field."""

    type: ClassVar[str] = ""


@dataclasses.dataclass(frozen=True)
class SessionCreated(ServerEvent):
    type: ClassVar[str] = "session.created"
    session: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SessionUpdated(ServerEvent):
    type: ClassVar[str] = "session.updated"
    session: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class SpeechStarted(ServerEvent):
    type: ClassVar[str] = "input_audio_buffer.speech_started"
    item_id: str
    audio_start_ms: int
    channel: int = 0
    speaker: str | None = None


@dataclasses.dataclass(frozen=True)
class SpeechStopped(ServerEvent):
    type: ClassVar[str] = "input_audio_buffer.speech_stopped"
    item_id: str
    audio_end_ms: int
    channel: int = 0
    speaker: str | None = None


@dataclasses.dataclass(frozen=True)
class BufferCommitted(ServerEvent):
    type: ClassVar[str] = "input_audio_buffer.committed"
    item_id: str | None


@dataclasses.dataclass(frozen=True)
class BufferCleared(ServerEvent):
    type: ClassVar[str] = "input_audio_buffer.cleared"


@dataclasses.dataclass(frozen=True)
class TranscriptDelta(ServerEvent):
    type: ClassVar[str] = "transcript.text.delta"
    item_id: str
    delta: str
    logprobs: list[TokenLogprob] | None
    words: list[WordTiming] | None = None  # when ``words`` is in ``include``
    channel: int = 0
    speaker: str | None = None
    language: str | None = None  # the language the decode that produced this text ran in


@dataclasses.dataclass(frozen=True)
class TranscriptInterim(ServerEvent):
    type: ClassVar[str] = "transcript.text.interim"
    item_id: str
    text: str
    words: list[WordTiming] | None = None  # when ``words`` is in ``include``
    channel: int = 0
    speaker: str | None = None


@dataclasses.dataclass(frozen=True)
class TranscriptSegment(ServerEvent):
    type: ClassVar[str] = "transcript.segment"
    item_id: str
    start: float
    end: float
    text: str
    logprobs: list[TokenLogprob] | None
    words: list[WordTiming] | None
    avg_logprob: float
    no_speech_prob: float
    channel: int = 0
    speaker: str | None = None
    # ISO-639-1 code of the language the utterance's final text was decoded in: the session's
    # language, or with ``language: null`` the one detected for this utterance (None: no decode).
    language: str | None = None


@dataclasses.dataclass(frozen=True)
class Usage:
    seconds: float
    type: str = "duration"


@dataclasses.dataclass(frozen=True)
class ChannelText:
    channel: int
    speaker: str | None
    text: str


@dataclasses.dataclass(frozen=True)
class Turn:
    """One utterance of the merged conversation."""

    channel: int
    speaker: str | None
    start: float
    end: float
    text: str


@dataclasses.dataclass(frozen=True)
class TranscriptDone(ServerEvent):
    type: ClassVar[str] = "transcript.text.done"
    text: str
    logprobs: list[TokenLogprob] | None
    usage: Usage
    channels: list[ChannelText] = dataclasses.field(default_factory=list)  # text per channel
    turns: list[Turn] = dataclasses.field(default_factory=list)  # every segment, in time order


@dataclasses.dataclass(frozen=True)
class Error(ServerEvent):
    type: ClassVar[str] = "error"
    error: ErrorInfo

    @classmethod
    def invalid(cls, code: str, message: str, param: str | None = None) -> Error:
        return cls(ErrorInfo("invalid_request_error", code, message, param))

    @classmethod
    def server(cls, code: str, message: str, param: str | None = None) -> Error:
        return cls(ErrorInfo("server_error", code, message, param))


# Events that belong to one utterance of one channel (they carry ``channel`` and ``speaker``).
CHANNEL_EVENTS = (SpeechStarted, SpeechStopped, TranscriptDelta, TranscriptInterim, TranscriptSegment)

SERVER_EVENT_TYPES: tuple[type[ServerEvent], ...] = (
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    BufferCommitted,
    BufferCleared,
    TranscriptDelta,
    TranscriptInterim,
    TranscriptSegment,
    TranscriptDone,
    Error,
)


def event_to_dict(event: ServerEvent, event_id: str | None = None) -> dict[str, Any]:
    """The single serialisation point: dataclass fields become JSON fields, ``type`` first."""
    body: dict[str, Any] = {"type": event.type}
    if event_id is not None:
        body["event_id"] = event_id
    body.update(_plain_fields(event))
    return body


def _plain_fields(obj: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` for events, ~4x faster: events hold only dataclasses, lists,
    tuples, dicts and JSON scalars, so nothing needs ``asdict``'s deep copy of other objects."""
    return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}


def _plain(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain_fields(value)
    return value



def event_to_json(event: ServerEvent, event_id: str | None = None) -> str:
    return json.dumps(event_to_dict(event, event_id), ensure_ascii=False, separators=(",", ":"))
