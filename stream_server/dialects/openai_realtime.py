"""OpenAI Realtime transcription sessions (``/v1/realtime?intent=transcription``) as a dialect.

OpenAI's SDKs and the OpenAI Agents SDK open a WebSocket to ``{base_url}/realtime``, configure a
transcription session with ``session.update`` (the current form, ``session.type ==
"transcription"``) or ``transcription_session.update`` (the older beta form), stream base64 audio
with ``input_audio_buffer.append`` and read ``conversation.item.input_audio_transcription.*``
events. This module translates that protocol to the native core and back, without I/O: see
``docs/openai-realtime.md`` for the wire mapping and why each choice was made.

Two things differ from OpenAI's own service and are deliberate:

* text arrives while the speaker is still talking: the core's append-only deltas are sent as
  ``...transcription.delta`` as soon as they are stable, so deltas of an item may come before its
  ``speech_stopped``; ``completed`` follows the core's segment;
* ``semantic_vad`` has no semantic model behind it here; it is served by the server VAD with a
  pause length chosen from ``eagerness`` (:data:`SEMANTIC_SILENCE_MS`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import itertools
import json
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any, Literal, cast

from stream_server import protocol as p
from stream_server.dialects.base import Action, Handshake, HandshakeRejected, Send

Form = Literal["ga", "beta"]  # session.* (current) or transcription_session.* (older beta)
AudioFormat = Literal["pcm", "pcmu", "pcma"]

LOGPROBS_INCLUDE = "item.input_audio_transcription.logprobs"
PCM_RATE = 24000  # OpenAI's only PCM rate
G711_RATE = 8000

#: OpenAI format → native (input_audio_format, sample_rate).
NATIVE_FORMATS: dict[AudioFormat, tuple[str, int]] = {
    "pcm": ("pcm16", PCM_RATE),
    "pcmu": ("g711_ulaw", G711_RATE),
    "pcma": ("g711_alaw", G711_RATE),
}
GA_FORMAT_TYPES: dict[str, AudioFormat] = {"audio/pcm": "pcm", "audio/pcmu": "pcmu", "audio/pcma": "pcma"}
BETA_FORMATS: dict[str, AudioFormat] = {"pcm16": "pcm", "g711_ulaw": "pcmu", "g711_alaw": "pcma"}

#: ``semantic_vad`` eagerness → silence that ends a turn. OpenAI's semantic VAD waits at most
#: 2 / 4 / 8 s (high / medium / low) and ends earlier when the words sound finished; without a
#: semantic model we keep that 1 : 2 : 4 patience ratio with fixed pauses, anchored so that
#: ``high`` equals the ``server_vad`` default (500 ms). ``auto`` is documented as ``medium``.
SEMANTIC_SILENCE_MS: dict[str, int] = {"high": 500, "medium": 1000, "auto": 1000, "low": 2000}

#: The model names the beta session schema allows; another name is reported as ``whisper-1``.
BETA_MODEL_NAMES = ("gpt-4o-transcribe", "gpt-4o-mini-transcribe", "whisper-1")

CLIENT_EVENT_TYPES = (
    "session.update",
    "transcription_session.update",
    "input_audio_buffer.append",
    "input_audio_buffer.commit",
    "input_audio_buffer.clear",
)

#: Native ``session.*`` parameter names → the OpenAI names a client knows them by.
NATIVE_PARAMS = {
    "session.model": "session.audio.input.transcription.model",
    "session.language": "session.audio.input.transcription.language",
    "session.prompt": "session.audio.input.transcription.prompt",
    "session.turn_detection": "session.audio.input.turn_detection",
    "session.input_audio_format": "session.audio.input.format",
}


class RequestError(Exception):
    """A client mistake, in OpenAI's error vocabulary (``code`` and ``param`` as OpenAI uses them)."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param


# --------------------------------------------------------------------------------------------
# The session as an OpenAI client sees it
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TurnDetection:
    """``server_vad`` or ``semantic_vad`` as the client asked for it (echoed back unchanged)."""

    type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    eagerness: Literal["low", "medium", "high", "auto"] = "auto"

    def native(self) -> dict[str, Any]:
        """The core's ``turn_detection``: semantic VAD becomes server VAD with a chosen pause."""
        silence = self.silence_duration_ms
        if self.type == "semantic_vad":
            silence = SEMANTIC_SILENCE_MS[self.eagerness]
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": silence,
        }

    def view(self) -> dict[str, Any]:
        if self.type == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": self.eagerness}
        return {
            "type": "server_vad",
            "threshold": self.threshold,
            "prefix_padding_ms": self.prefix_padding_ms,
            "silence_duration_ms": self.silence_duration_ms,
        }


@dataclasses.dataclass(frozen=True)
class Settings:
    """The OpenAI-side configuration: what ``session.updated`` echoes and the core config derives from."""

    format: AudioFormat = "pcm"
    model: str | None = None  # the name the client asked for; None: never asked
    language: str | None = None
    prompt: str = ""
    keywords: tuple[str, ...] = ()
    turn_detection: TurnDetection | None = TurnDetection()
    noise_reduction: Mapping[str, Any] | None = None
    logprobs: bool = False

    def native(self, handshake: Handshake) -> dict[str, Any]:
        """Native ``session`` fields; logprobs are always asked for, whatever the client wants."""
        audio_format, rate = NATIVE_FORMATS[self.format]
        prompt = self.prompt.strip()
        if self.keywords:
            prompt = " ".join(part for part in (prompt, ", ".join(self.keywords) + ".") if part)
        return {
            "input_audio_format": audio_format,
            "sample_rate": rate,
            "model": native_model(self.model, handshake),
            "language": self.language,
            "prompt": prompt,
            "turn_detection": self.turn_detection.native() if self.turn_detection else None,
            "include": ["logprobs"],
            "interim_results": False,
        }


def native_model(name: str | None, handshake: Handshake) -> str:
    """Any OpenAI transcription model name means "the server's model", unless the server has one
    by that very name (a client may ask for ``tiny.en`` or ``base`` directly)."""
    if name and handshake.model_exists(name):
        return name
    return handshake.default_model


# --------------------------------------------------------------------------------------------
# Validation of what clients send, with OpenAI's error codes
# --------------------------------------------------------------------------------------------


def _object(value: Any, param: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(
            "invalid_type", f"Invalid type for '{param}': expected an object, but got {_kind(value)} instead.", param
        )
    return value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _known_keys(obj: Mapping[str, Any], allowed: set[str], param: str) -> None:
    for key in obj:
        if key not in allowed:
            raise RequestError("unknown_parameter", f"Unknown parameter: '{param}.{key}'.", f"{param}.{key}")


def _string(value: Any, param: str, *, nullable: bool = False, max_length: int | None = None) -> str | None:
    if value is None and nullable:
        return None
    if not isinstance(value, str):
        raise RequestError(
            "invalid_type", f"Invalid type for '{param}': expected a string, but got {_kind(value)} instead.", param
        )
    if max_length is not None and len(value) > max_length:
        raise RequestError(
            "string_above_max_length",
            f"Invalid '{param}': string too long. Expected a string with maximum length {max_length}, but got a string with length {len(value)} instead.",
            param,
        )
    return value


def _choice(value: Any, options: Mapping[str, Any] | tuple[str, ...], param: str) -> str:
    if not isinstance(value, str) or value not in options:
        supported = ", ".join(f"'{o}'" for o in options)
        raise RequestError(
            "invalid_value", f"Invalid value: {json.dumps(value)}. Supported values are: {supported}.", param
        )
    return value


def _number(value: Any, param: str, lo: float, hi: float, *, integer: bool) -> float:
    kind = "integer" if integer else "decimal"
    valid = isinstance(value, int) if integer else isinstance(value, int | float)
    if not valid or isinstance(value, bool):
        expected = "an integer" if integer else "a decimal"
        raise RequestError(
            "invalid_type", f"Invalid type for '{param}': expected {expected}, but got {_kind(value)} instead.", param
        )
    if value < lo:
        raise RequestError(
            f"{kind}_below_min_value",
            f"Invalid '{param}': {kind} below minimum value. Expected a value >= {lo:g}, but got {value} instead.",
            param,
        )
    if value > hi:
        raise RequestError(
            f"{kind}_above_max_value",
            f"Invalid '{param}': {kind} above maximum value. Expected a value <= {hi:g}, but got {value} instead.",
            param,
        )
    return float(value)


def _boolean(value: Any, param: str) -> None:
    if not isinstance(value, bool):
        raise RequestError(
            "invalid_type", f"Invalid type for '{param}': expected a boolean, but got {_kind(value)} instead.", param
        )


SERVER_VAD_KEYS = {
    "type",
    "threshold",
    "prefix_padding_ms",
    "silence_duration_ms",
    "create_response",
    "interrupt_response",
    "idle_timeout_ms",
}
SEMANTIC_VAD_KEYS = {"type", "eagerness", "create_response", "interrupt_response"}


def parse_turn_detection(value: Any, param: str, *, default_type: str | None) -> TurnDetection | None:
    """``null`` turns VAD off; an object replaces the previous one (omitted knobs take defaults).

    ``create_response`` / ``interrupt_response`` / ``idle_timeout_ms`` are accepted and ignored:
    they steer model responses, which a transcription session never creates.
    """
    if value is None:
        return None
    obj = _object(value, param)
    kind = obj.get("type", default_type)
    if kind is None:
        raise RequestError(
            "missing_required_parameter", f"Missing required parameter: '{param}.type'.", f"{param}.type"
        )
    kind = _choice(kind, ("server_vad", "semantic_vad"), f"{param}.type")
    for flag in ("create_response", "interrupt_response"):
        if flag in obj:
            _boolean(obj[flag], f"{param}.{flag}")
    if kind == "semantic_vad":
        _known_keys(obj, SEMANTIC_VAD_KEYS, param)
        eagerness = _choice(obj.get("eagerness", "auto"), tuple(SEMANTIC_SILENCE_MS), f"{param}.eagerness")
        return TurnDetection(type="semantic_vad", eagerness=cast(Literal["low", "medium", "high", "auto"], eagerness))
    _known_keys(obj, SERVER_VAD_KEYS, param)
    if "idle_timeout_ms" in obj and obj["idle_timeout_ms"] is not None:
        _number(obj["idle_timeout_ms"], f"{param}.idle_timeout_ms", 0, 86_400_000, integer=True)
    defaults = TurnDetection()
    return TurnDetection(
        type="server_vad",
        threshold=_number(obj.get("threshold", defaults.threshold), f"{param}.threshold", 0.0, 1.0, integer=False),
        prefix_padding_ms=int(
            _number(
                obj.get("prefix_padding_ms", defaults.prefix_padding_ms),
                f"{param}.prefix_padding_ms",
                0,
                5000,
                integer=True,
            )
        ),
        silence_duration_ms=int(
            _number(
                obj.get("silence_duration_ms", defaults.silence_duration_ms),
                f"{param}.silence_duration_ms",
                0,
                5000,
                integer=True,
            )
        ),
    )


TRANSCRIPTION_KEYS_GA = {"model", "language", "prompt", "languages", "keywords", "delay"}
TRANSCRIPTION_KEYS_BETA = {"model", "language", "prompt"}


def parse_transcription(value: Any, param: str, allowed: set[str]) -> dict[str, Any]:
    """``transcription`` → model / language / prompt / keywords changes (the object replaces the
    previous one, as OpenAI's does). ``languages`` with one entry means that language; with
    several, detection; ``keywords`` join the prompt, which is how Whisper takes vocabulary;
    ``delay`` is accepted and ignored (text is always sent as soon as it is stable)."""
    if value is None:
        return {"model": None, "language": None, "prompt": "", "keywords": ()}
    obj = _object(value, param)
    _known_keys(obj, allowed, param)
    language = _string(obj.get("language"), f"{param}.language", nullable=True)
    if "languages" in obj and language is None:
        languages = obj["languages"]
        if not isinstance(languages, list) or not all(isinstance(x, str) for x in languages):
            raise RequestError(
                "invalid_type",
                f"Invalid type for '{param}.languages': expected an array of strings.",
                f"{param}.languages",
            )
        language = languages[0] if len(languages) == 1 else None
    if language is not None:
        language = _language(language, f"{param}.language")
    keywords = obj.get("keywords") or []
    if not isinstance(keywords, list) or not all(isinstance(x, str) for x in keywords):
        raise RequestError(
            "invalid_type", f"Invalid type for '{param}.keywords': expected an array of strings.", f"{param}.keywords"
        )
    if "delay" in obj and obj["delay"] is not None:
        _choice(obj["delay"], ("minimal", "low", "medium", "high", "xhigh"), f"{param}.delay")
    prompt = _string(obj.get("prompt", ""), f"{param}.prompt", nullable=True, max_length=1000) or ""
    if len(prompt) + sum(len(k) + 2 for k in keywords) > 1000:
        raise RequestError(
            "string_above_max_length",
            f"Invalid '{param}.keywords': the prompt and keywords together exceed 1000 characters.",
            f"{param}.keywords",
        )
    return {
        "model": _string(obj.get("model"), f"{param}.model", nullable=True) or None,
        "language": language,
        "prompt": prompt,
        "keywords": tuple(k.strip() for k in keywords if k.strip()),
    }


def _language(value: str, param: str) -> str | None:
    """ISO-639-1 or a locale; validated with the core's own rule so the core never rejects it."""
    if not value.strip():
        return None
    try:
        return p.SessionConfig.model_validate({"language": value}).language
    except ValueError:
        raise RequestError(
            "invalid_value", f"Invalid value: '{value}'. Expected an ISO-639-1 language code such as 'en'.", param
        ) from None


def parse_noise_reduction(value: Any, param: str) -> Mapping[str, Any] | None:
    """Accepted and echoed; the server does not suppress noise (the VAD threshold is the knob)."""
    if value is None:
        return None
    obj = _object(value, param)
    _known_keys(obj, {"type", "strength"}, param)
    result: dict[str, Any] = {}
    if "type" in obj:
        result["type"] = _choice(obj["type"], ("near_field", "far_field"), f"{param}.type")
    if obj.get("strength") is not None:
        result["strength"] = _number(obj["strength"], f"{param}.strength", 0.0, 1_000_000.0, integer=False)
    return result


def parse_include(value: Any, param: str) -> bool:
    """Whether the client wants logprobs (the only ``include`` value a transcription session has)."""
    if value is None:
        return False
    if not isinstance(value, list):
        raise RequestError(
            "invalid_type", f"Invalid type for '{param}': expected an array, but got {_kind(value)} instead.", param
        )
    for i, entry in enumerate(value):
        _choice(entry, (LOGPROBS_INCLUDE,), f"{param}[{i}]")
    return LOGPROBS_INCLUDE in value


# Fields OpenAI's session objects carry that change nothing here; accepted so a client may send
# back what it received (id, object, ...), or fields of the other session kinds' defaults.
GA_SESSION_KEYS = {"type", "audio", "include", "id", "object", "expires_at", "client_secret"}
GA_INPUT_KEYS = {"format", "transcription", "turn_detection", "noise_reduction"}
BETA_SESSION_KEYS = {
    "input_audio_format",
    "input_audio_transcription",
    "turn_detection",
    "input_audio_noise_reduction",
    "include",
    "modalities",
    "client_secret",
    "id",
    "object",
    "expires_at",
}


def parse_ga_session(value: Any, current: Settings) -> Settings:
    """``session.update`` (current form): ``session.type`` must be ``"transcription"``."""
    session = _object(value, "session")
    if "type" not in session:
        raise RequestError("missing_required_parameter", "Missing required parameter: 'session.type'.", "session.type")
    if session["type"] != "transcription":
        raise RequestError(
            "invalid_value",
            f"Invalid value: {json.dumps(session['type'])}. This server only serves transcription sessions; supported values are: 'transcription'.",
            "session.type",
        )
    _known_keys(session, GA_SESSION_KEYS, "session")
    changes: dict[str, Any] = {}
    if "include" in session:
        changes["logprobs"] = parse_include(session["include"], "session.include")
    audio = _object(session.get("audio", {}), "session.audio")
    _known_keys(audio, {"input", "output"}, "session.audio")
    inp = _object(audio.get("input", {}), "session.audio.input")
    _known_keys(inp, GA_INPUT_KEYS, "session.audio.input")
    if "format" in inp:
        changes["format"] = _ga_format(inp["format"], "session.audio.input.format")
    if "transcription" in inp:
        changes.update(
            parse_transcription(inp["transcription"], "session.audio.input.transcription", TRANSCRIPTION_KEYS_GA)
        )
    if "turn_detection" in inp:
        changes["turn_detection"] = parse_turn_detection(
            inp["turn_detection"], "session.audio.input.turn_detection", default_type=None
        )
    if "noise_reduction" in inp:
        changes["noise_reduction"] = parse_noise_reduction(
            inp["noise_reduction"], "session.audio.input.noise_reduction"
        )
    return dataclasses.replace(current, **changes)


def _ga_format(value: Any, param: str) -> AudioFormat:
    obj = _object(value, param)
    _known_keys(obj, {"type", "rate"}, param)
    fmt = GA_FORMAT_TYPES[_choice(obj.get("type", "audio/pcm"), tuple(GA_FORMAT_TYPES), f"{param}.type")]
    if "rate" in obj and (fmt != "pcm" or obj["rate"] != PCM_RATE):
        allowed = "24000" if fmt == "pcm" else "no rate (G.711 is 8000 Hz)"
        raise RequestError(
            "invalid_value",
            f"Invalid value: {json.dumps(obj['rate'])}. Supported values are: {allowed}.",
            f"{param}.rate",
        )
    return fmt


def parse_beta_session(value: Any, current: Settings) -> Settings:
    """``transcription_session.update`` (the older beta form)."""
    session = _object(value, "session")
    _known_keys(session, BETA_SESSION_KEYS, "session")
    changes: dict[str, Any] = {}
    if "input_audio_format" in session:
        changes["format"] = BETA_FORMATS[
            _choice(session["input_audio_format"], tuple(BETA_FORMATS), "session.input_audio_format")
        ]
    if "input_audio_transcription" in session:
        changes.update(
            parse_transcription(
                session["input_audio_transcription"], "session.input_audio_transcription", TRANSCRIPTION_KEYS_BETA
            )
        )
    if "turn_detection" in session:
        changes["turn_detection"] = parse_turn_detection(
            session["turn_detection"], "session.turn_detection", default_type="server_vad"
        )
    if "input_audio_noise_reduction" in session:
        changes["noise_reduction"] = parse_noise_reduction(
            session["input_audio_noise_reduction"], "session.input_audio_noise_reduction"
        )
    if "include" in session:
        changes["logprobs"] = parse_include(session["include"], "session.include")
    return dataclasses.replace(current, **changes)


# --------------------------------------------------------------------------------------------
# Session objects as OpenAI sends them
# --------------------------------------------------------------------------------------------


def ga_session_view(settings: Settings, session_id: str, model: str) -> dict[str, Any]:
    """The current form's transcription session object (``session.created`` / ``.updated``)."""
    fmt: dict[str, Any] = {"type": f"audio/{settings.format}"}
    if settings.format == "pcm":
        fmt["rate"] = PCM_RATE
    transcription: dict[str, Any] = {
        "model": settings.model or model,
        "language": settings.language,
        "prompt": settings.prompt,
    }
    if settings.keywords:
        transcription["keywords"] = list(settings.keywords)
    return {
        "type": "transcription",
        "object": "realtime.transcription_session",
        "id": session_id,
        "audio": {
            "input": {
                "format": fmt,
                "transcription": transcription,
                "noise_reduction": dict(settings.noise_reduction) if settings.noise_reduction is not None else None,
                "turn_detection": settings.turn_detection.view() if settings.turn_detection else None,
            }
        },
        "include": [LOGPROBS_INCLUDE] if settings.logprobs else [],
    }


def beta_session_view(settings: Settings, session_id: str, model: str) -> dict[str, Any]:
    """The beta form's transcription session object. ``client_secret`` is present (empty) only
    because the SDK's beta model requires it; this server issues no ephemeral keys."""
    name = settings.model or model
    return {
        "id": session_id,
        "object": "realtime.transcription_session",
        "modalities": ["text"],
        "input_audio_format": {v: k for k, v in BETA_FORMATS.items()}[settings.format],
        "input_audio_transcription": {
            "model": name if name in BETA_MODEL_NAMES else "whisper-1",
            "language": settings.language,
            "prompt": settings.prompt,
        },
        "turn_detection": settings.turn_detection.view() if settings.turn_detection else None,
        "input_audio_noise_reduction": dict(settings.noise_reduction) if settings.noise_reduction is not None else None,
        "include": [LOGPROBS_INCLUDE] if settings.logprobs else None,
        "client_secret": {"value": "", "expires_at": 0},
    }


# --------------------------------------------------------------------------------------------
# Per-item bookkeeping
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Item:
    """One utterance as an OpenAI input-audio item: the text and tokens its deltas carried."""

    item_id: str
    audio_start_ms: int
    audio_end_ms: int | None = None
    announced: bool = False  # speech_started was sent
    committed: bool = False
    cleared: bool = False  # dropped by input_audio_buffer.clear: no item is created
    failed: bool = False
    text: str = ""
    logprobs: list[p.TokenLogprob] = dataclasses.field(default_factory=list)
    unsent_logprobs: list[p.TokenLogprob] = dataclasses.field(default_factory=list)

    @property
    def stopped(self) -> bool:
        return self.audio_end_ms is not None


@dataclasses.dataclass(frozen=True)
class PendingUpdate:
    settings: Settings
    form: Form
    event_id: str | None


# --------------------------------------------------------------------------------------------
# The dialect
# --------------------------------------------------------------------------------------------


class OpenAIRealtimeDialect:
    """One OpenAI Realtime transcription connection (Sans-I/O; see the module docstring)."""

    name = "openai"
    idle_timeout_s: float | None = None  # OpenAI has no idle close of its own: the server setting

    def __init__(
        self, handshake: Handshake, *, api_key: str | None, subprotocol: str | None, form: Form, model: str | None
    ) -> None:
        self.handshake = handshake
        self.api_key = api_key
        self.subprotocol = subprotocol
        self.form: Form = form
        self.settings = Settings(model=model)
        self.session_id = ""
        self._event_ids = itertools.count(1)
        self._id_prefix = uuid.uuid4().hex[:10]
        self._pending_updates: deque[PendingUpdate] = deque()
        self._pending_commits: deque[str | None] = deque()
        self._clearing = False
        self._items: dict[str, Item] = {}
        self._last_committed: str | None = None

    # ------------------------------------------------------------ configuration

    def initial_config(self) -> dict[str, object]:
        return dict(self.settings.native(self.handshake))

    def _model_name(self) -> str:
        return native_model(self.settings.model, self.handshake)

    # ------------------------------------------------------------ client → server

    def receive_text(self, text: str) -> list[Action]:
        try:
            message = p.loads_json(text)
        except json.JSONDecodeError as exc:
            return self._client_error(RequestError("invalid_json", f"The message is not valid JSON: {exc.msg}."), None)
        except (ValueError, RecursionError):  # absurd nesting, 4300+ digit numbers
            return self._client_error(RequestError("invalid_json", "The message is nested too deeply to parse."), None)
        if not isinstance(message, dict):
            return self._client_error(RequestError("invalid_json", "The message must be a JSON object."), None)
        event_id = message.get("event_id") if isinstance(message.get("event_id"), str) else None
        try:
            return self._dispatch(message, event_id)
        except RequestError as exc:
            return self._client_error(exc, event_id)

    def receive_bytes(self, data: bytes) -> list[Action]:
        """Not part of OpenAI's protocol; taken as raw audio in the session's format, which costs
        nothing and spares non-SDK clients the base64 step."""
        return [p.AudioAppend(data)]

    def _dispatch(self, message: dict[str, Any], event_id: str | None) -> list[Action]:
        kind = message.get("type")
        if kind == "input_audio_buffer.append":
            return [p.AudioAppend(_audio(message.get("audio")))]
        if kind == "input_audio_buffer.commit":
            self._pending_commits.append(event_id)
            return [p.BufferCommit()]
        if kind == "input_audio_buffer.clear":
            self._clearing = True
            return [p.BufferClear()]
        if kind == "session.update":
            return self._update(parse_ga_session(message.get("session"), self.settings), "ga", event_id)
        if kind == "transcription_session.update":
            return self._update(parse_beta_session(message.get("session"), self.settings), "beta", event_id)
        if kind is None:
            raise RequestError("missing_required_parameter", "Missing required parameter: 'type'.", "type")
        supported = ", ".join(f"'{t}'" for t in CLIENT_EVENT_TYPES)
        raise RequestError(
            "invalid_value",
            f"Invalid value: {json.dumps(kind)}. Supported values in a transcription session are: {supported}.",
            "type",
        )

    def _update(self, settings: Settings, form: Form, event_id: str | None) -> list[Action]:
        self._pending_updates.append(PendingUpdate(settings, form, event_id))
        return [p.SessionUpdate(settings.native(self.handshake))]

    # ------------------------------------------------------------ core → client

    def render(self, event: p.ServerEvent) -> list[Action]:
        if isinstance(event, p.SessionCreated):
            self.session_id = str(event.session.get("id", ""))
            return [self._session_event("created")]
        if isinstance(event, p.SessionUpdated):
            return self._session_updated()
        if isinstance(event, p.SpeechStarted):
            return self._speech_started(event)
        if isinstance(event, p.SpeechStopped):
            return self._speech_stopped(event)
        if isinstance(event, p.BufferCommitted):
            return self._buffer_committed(event)
        if isinstance(event, p.BufferCleared):
            self._clearing = False
            return [self._send({"type": "input_audio_buffer.cleared"})]
        if isinstance(event, p.TranscriptDelta):
            return self._delta(event)
        if isinstance(event, p.TranscriptSegment):
            return self._segment(event)
        if isinstance(event, p.Error):
            return self._core_error(event)
        # Interim text is not part of OpenAI's protocol (never asked for); TranscriptDone ends an
        # idle flush, after which the runner closes: OpenAI has no closing event.
        return []

    def error(self, event: p.Error) -> list[Action]:
        info = event.error
        return [self._error_event(info.type, info.code, info.message, self._openai_param(info.param), None)]

    # session ---------------------------------------------------------------

    def _session_event(self, verb: Literal["created", "updated"]) -> Send:
        if self.form == "beta":
            session = beta_session_view(self.settings, self.session_id, self._model_name())
            return self._send({"type": f"transcription_session.{verb}", "session": session})
        session = ga_session_view(self.settings, self.session_id, self._model_name())
        return self._send({"type": f"session.{verb}", "session": session})

    def _session_updated(self) -> list[Action]:
        if self._pending_updates:
            pending = self._pending_updates.popleft()
            self.settings, self.form = pending.settings, pending.form
        return [self._session_event("updated")]

    # utterances ------------------------------------------------------------

    def _speech_started(self, event: p.SpeechStarted) -> list[Action]:
        item = Item(event.item_id, event.audio_start_ms)
        self._items[event.item_id] = item
        if self.settings.turn_detection is None:
            return []  # OpenAI sends speech events only when it detects turns itself
        item.announced = True
        return [
            self._send(
                {
                    "type": "input_audio_buffer.speech_started",
                    "item_id": item.item_id,
                    "audio_start_ms": item.audio_start_ms,
                }
            )
        ]

    def _speech_stopped(self, event: p.SpeechStopped) -> list[Action]:
        item = self._item(event.item_id, event.audio_end_ms)
        item.audio_end_ms = event.audio_end_ms
        out: list[Action] = []
        if item.announced:
            out.append(
                self._send(
                    {
                        "type": "input_audio_buffer.speech_stopped",
                        "item_id": item.item_id,
                        "audio_end_ms": event.audio_end_ms,
                    }
                )
            )
        if self._clearing:
            item.cleared = True
            return out
        return out + self._commit_item(item)

    def _commit_item(self, item: Item) -> list[Action]:
        """``committed`` then the user item (``conversation.item.added``/``done`` in the current
        form, ``conversation.item.created`` in the beta form), as OpenAI announces a new item."""
        if item.committed:
            return []
        item.committed = True
        previous, self._last_committed = self._last_committed, item.item_id
        out: list[Action] = [
            self._send({"type": "input_audio_buffer.committed", "item_id": item.item_id, "previous_item_id": previous})
        ]
        user_item = {
            "id": item.item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        kinds = (
            ("conversation.item.created",)
            if self.form == "beta"
            else ("conversation.item.added", "conversation.item.done")
        )
        for kind in kinds:
            out.append(self._send({"type": kind, "previous_item_id": previous, "item": user_item}))
        return out

    def _buffer_committed(self, event: p.BufferCommitted) -> list[Action]:
        event_id = self._pending_commits.popleft() if self._pending_commits else None
        if event.item_id is not None:
            return []  # announced with its speech_stopped, which comes first (or is held back)
        return [
            self._error_event(
                "invalid_request_error",
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: the buffer holds no speech since the last commit.",
                None,
                event_id,
            )
        ]

    def _delta(self, event: p.TranscriptDelta) -> list[Action]:
        item = self._item(event.item_id, None)
        delta = event.delta if item.text else event.delta.lstrip()  # each item's text starts bare
        item.unsent_logprobs.extend(event.logprobs or [])
        if not delta:
            return []
        item.text += delta
        tokens, item.unsent_logprobs = item.unsent_logprobs, []
        item.logprobs.extend(tokens)
        return [
            self._send(
                {
                    "type": "conversation.item.input_audio_transcription.delta",
                    "item_id": item.item_id,
                    "content_index": 0,
                    "delta": delta,
                    "logprobs": _logprobs(tokens) if self.settings.logprobs else None,
                }
            )
        ]

    def _segment(self, event: p.TranscriptSegment) -> list[Action]:
        item = self._items.pop(event.item_id, None) or Item(
            event.item_id, int(event.start * 1000), int(event.end * 1000)
        )
        if item.failed or (item.cleared and not item.text):
            return []
        out: list[Action] = [] if item.committed or item.cleared else self._commit_item(item)
        end_ms = item.audio_end_ms if item.audio_end_ms is not None else int(event.end * 1000)
        seconds = round(max(0, end_ms - item.audio_start_ms) / 1000, 3)
        out.append(
            self._send(
                {
                    "type": "conversation.item.input_audio_transcription.completed",
                    "item_id": item.item_id,
                    "content_index": 0,
                    "transcript": item.text,
                    "logprobs": _logprobs(item.logprobs) if self.settings.logprobs else None,
                    "usage": {"type": "duration", "seconds": float(seconds)},
                }
            )
        )
        return out

    def _item(self, item_id: str, end_ms: int | None) -> Item:
        """The item an event names; one the dialect never saw start is created on the spot."""
        if item_id not in self._items:
            self._items[item_id] = Item(item_id, end_ms or 0)
        return self._items[item_id]

    # errors ------------------------------------------------------------------

    def _core_error(self, event: p.Error) -> list[Action]:
        info = event.error
        if info.code == "decode_failed":
            item = self._finalizing_item()
            if item is not None:
                item.failed = True
                error = {"type": info.type, "code": info.code, "message": info.message, "param": None}
                return [
                    self._send(
                        {
                            "type": "conversation.item.input_audio_transcription.failed",
                            "item_id": item.item_id,
                            "content_index": 0,
                            "error": error,
                        }
                    )
                ]
        event_id = None
        if self._pending_updates and (info.param or "").startswith("session"):
            event_id = self._pending_updates.popleft().event_id  # the core refused this update
        return [self._error_event(info.type, info.code, info.message, self._openai_param(info.param), event_id)]

    def _finalizing_item(self) -> Item | None:
        """The item whose final decode failed: the oldest one that stopped but is not complete
        (utterances never interleave). A failed interim decode of an open item is only an error."""
        for item in self._items.values():
            if item.stopped and not item.failed:
                return item
        return None

    def _openai_param(self, param: str | None) -> str | None:
        if param is None or self.form == "beta":
            return param
        return NATIVE_PARAMS.get(param, param)

    def _client_error(self, exc: RequestError, event_id: str | None) -> list[Action]:
        return [self._error_event("invalid_request_error", exc.code, exc.message, exc.param, event_id)]

    def _error_event(self, kind: str, code: str | None, message: str, param: str | None, event_id: str | None) -> Send:
        """OpenAI's error shape; ``error.event_id`` names the client event that caused it."""
        return self._send(
            {
                "type": "error",
                "error": {"type": kind, "code": code, "message": message, "param": param, "event_id": event_id},
            }
        )

    def _send(self, body: dict[str, Any]) -> Send:
        """Serialise with a fresh ``event_id`` (every OpenAI server event has one), type first."""
        event = {"type": body["type"], "event_id": f"event_{self._id_prefix}{next(self._event_ids)}", **body}
        return Send(json.dumps(event, ensure_ascii=False, separators=(",", ":")))


def _audio(value: Any) -> bytes:
    if not isinstance(value, str):
        raise RequestError(
            "invalid_type",
            f"Invalid type for 'audio': expected a base64-encoded string, but got {_kind(value)} instead.",
            "audio",
        )
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.", "audio") from None


def _logprobs(tokens: list[p.TokenLogprob]) -> list[dict[str, Any]]:
    return [{"token": t.token, "logprob": float(t.logprob), "bytes": list(t.bytes)} for t in tokens]


# --------------------------------------------------------------------------------------------
# Handshake
# --------------------------------------------------------------------------------------------

KEY_SUBPROTOCOL = "openai-insecure-api-key."
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"


def create(handshake: Handshake) -> OpenAIRealtimeDialect:
    """Accept ``/v1/realtime`` for transcription: the key from ``Authorization: Bearer`` or the
    browser subprotocol ``openai-insecure-api-key.<key>`` (with ``realtime``, which is accepted);
    the beta form from ``OpenAI-Beta: realtime=v1`` or the ``openai-beta.realtime-v1`` subprotocol."""
    intent = handshake.query.get("intent")
    if intent is not None and intent != "transcription":
        raise HandshakeRejected(
            400,
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "invalid_value",
                    "message": f"Invalid value: '{intent}'. This server only serves transcription sessions; supported values are: 'transcription'.",
                    "param": "intent",
                }
            },
        )
    beta = "realtime=v1" in handshake.headers.get("openai-beta", "") or BETA_SUBPROTOCOL in handshake.subprotocols
    model = handshake.query.get("model") or None
    return OpenAIRealtimeDialect(
        handshake,
        api_key=_api_key(handshake),
        subprotocol="realtime" if "realtime" in handshake.subprotocols else None,
        form="beta" if beta else "ga",
        model=model,
    )


def _api_key(handshake: Handshake) -> str | None:
    auth = handshake.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    for offered in handshake.subprotocols:
        if offered.startswith(KEY_SUBPROTOCOL) and len(offered) > len(KEY_SUBPROTOCOL):
            return offered[len(KEY_SUBPROTOCOL) :]
    return None


__all__ = ["OpenAIRealtimeDialect", "create"]
