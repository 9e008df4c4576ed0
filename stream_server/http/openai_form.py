"""The form of ``POST /v1/audio/transcriptions``: its fields grouped and validated into options.

Kept apart from the route so that what a client may send (and how each mistake is reported) can
be read in one place; OpenAI's SDK and AI Refinery's client both send this form.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError
from starlette.datastructures import UploadFile

from stream_server import formats
from stream_server import protocol as p
from stream_server.audio_files import MAX_CHANNELS
from stream_server.http import airefinery_api
from stream_server.http.common import (
    invalid,
    parse_bool,
    parse_labels,
    parse_number,
    parse_optional_number,
    parse_string_list,
)

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
GRANULARITIES = ("word", "segment")
# ``logprobs`` is OpenAI's; ``words`` mirrors the WebSocket option; the rest are AI Refinery's.
INCLUDES = ("logprobs", *airefinery_api.AIREFINERY_INCLUDES, "words")
# Any of these in ``include`` asks for ``words`` in verbose_json, as ``timestamp_granularities[]=word`` does.
WORD_INCLUDES = (*airefinery_api.AIREFINERY_INCLUDES, "words")
PROMPT_CHARS = 1000  # the end of a longer prompt is kept: it is the text nearest the audio
_BRACKETED = re.compile(r"([A-Za-z_]+)\[([A-Za-z_]*)\]")


# ----------------------------------------------------------------------- chunking_strategy

_TD_FIELDS: dict[str, type] = {"type": str, "threshold": float, "prefix_padding_ms": int, "silence_duration_ms": int}
_CHUNKING = "chunking_strategy"
_CHUNKING_EXPECTED = 'expected "auto" or a JSON server_vad object'


def _td_value(key: str, raw: Any) -> Any:
    """One ``server_vad`` field, typed as the session's turn detection wants it."""
    param = f"{_CHUNKING}.{key}"
    if key not in _TD_FIELDS:
        raise invalid(param, "unknown field")
    kind = _TD_FIELDS[key]
    if kind is str:
        return raw
    if isinstance(raw, bool):
        raise invalid(param, f"expected a number, got {raw!r}")
    try:
        number = float(raw)
    except (TypeError, ValueError):
        raise invalid(param, f"expected a number, got {raw!r}") from None
    if kind is not int:
        return number
    if number != int(number):
        raise invalid(param, f"expected an integer, got {raw!r}")
    return int(number)


def _chunking_object(value: Any) -> dict[str, Any] | None:
    """The ``server_vad`` object a value holds, or None for ``auto`` (the server's VAD defaults)."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "auto", '"auto"'):
            return None
        try:
            value = p.loads_json(text)
        except json.JSONDecodeError:
            raise invalid(_CHUNKING, _CHUNKING_EXPECTED) from None
        if value == "auto":
            return None
    if not isinstance(value, dict):
        raise invalid(_CHUNKING, _CHUNKING_EXPECTED)
    return value


def parse_chunking(value: Any) -> p.TurnDetection:
    """``"auto"``, a JSON ``server_vad`` object, or the object in bracket form (OpenAI SDK)."""
    obj = _chunking_object(value)
    if obj is None:
        return p.TurnDetection()
    fields = {key: _td_value(key, raw) for key, raw in obj.items()}
    try:
        return p.TurnDetection.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise invalid(f"{_CHUNKING}.{loc}" if loc else _CHUNKING, first["msg"]) from None


# ---------------------------------------------------------------------------------- options


def _response_format(values: list[Any]) -> str:
    value = str(values[-1]).strip()
    if value not in RESPONSE_FORMATS:
        raise invalid("response_format", f"unsupported value {value!r}; expected one of {', '.join(RESPONSE_FORMATS)}")
    return value


# Fields that set one option each: the option's attribute and the parser of the field's values
# (all of them, in order; single-valued fields take the last).
_FIELD_PARSERS: dict[str, tuple[str, Callable[[list[Any]], Any]]] = {
    "model": ("model_name", lambda v: str(v[-1]).strip()),
    "prompt": ("prompt", lambda v: str(v[-1])[-PROMPT_CHARS:]),
    "response_format": ("response_format", _response_format),
    "timestamp_granularities": ("granularities", lambda v: parse_string_list("timestamp_granularities", v, GRANULARITIES)),
    "include": ("include", lambda v: parse_string_list("include", v, INCLUDES)),
    "temperature": ("temperature", lambda v: parse_number("temperature", v[-1], 0.0, 1.0)),
    "chunking_strategy": ("turn_detection", lambda v: parse_chunking(v[-1])),
    "stream": ("stream", lambda v: parse_bool("stream", v[-1])),
    "timeout": ("timeout", lambda v: parse_optional_number("timeout", v[-1], 0.0)),  # AI Refinery sends it
    # A recording whose channels are separate voices (a call's legs): each transcribed on its own.
    "multichannel": ("multichannel", lambda v: parse_bool("multichannel", v[-1])),
    "channel_labels": ("channel_labels", lambda v: parse_labels("channel_labels", v, MAX_CHANNELS) or None),
}


@dataclasses.dataclass
class FileOptions:
    """The validated options of one transcription request (OpenAI's or AI Refinery's encoding)."""

    model_name: str | None = None
    language: str | None = None
    language_given: str | None = None
    prompt: str = ""
    response_format: str = "json"
    granularities: list[str] = dataclasses.field(default_factory=lambda: ["segment"])
    include: list[str] = dataclasses.field(default_factory=list)
    temperature: float = 0.0
    turn_detection: p.TurnDetection = dataclasses.field(default_factory=p.TurnDetection)
    stream: bool = False
    timeout: float | None = None
    multichannel: bool = False
    channel_labels: list[str] | None = None
    # "translate" on /v1/audio/translations: English text, ``language`` (optional there) is the speech's.
    task: str = "transcribe"

    @property
    def split_channels(self) -> bool:
        """Each channel of the file on its own (``multichannel``, names given for them, or
        speakers asked for: ``diarized_json``), as Deepgram's and AssemblyAI's ``multichannel``
        do; else mixed to one voice, as OpenAI does."""
        return self.multichannel or self.channel_labels is not None or self.by_speaker

    @property
    def by_speaker(self) -> bool:
        """OpenAI's speaker-annotated answer (``diarized_json``): speakers are told apart by channel."""
        return self.response_format == "diarized_json"

    @classmethod
    def from_fields(cls, fields: dict[str, list[Any]]) -> FileOptions:
        """Validate form fields (each a list of its values, in order), first field's error first.

        Other fields (OpenAI's ``known_speaker_names[]``, SDK extras) are ignored, as
        OpenAI-compatible servers commonly do, so newer clients keep working.
        """
        opts = cls()
        for name, values in fields.items():
            if not values:
                continue
            if name == "language":
                opts._set_language(values[-1])
            elif name in _FIELD_PARSERS:
                attribute, parse = _FIELD_PARSERS[name]
                setattr(opts, attribute, parse(values))
        return opts

    def _set_language(self, value: Any) -> None:
        """Whisper's code for decoding, and the text as given for echoing a locale back."""
        if value is None or str(value).strip().lower() in ("", "auto", "none", "null"):
            self.language = self.language_given = None
            return
        try:
            self.language = p.SessionConfig(language=str(value)).language
        except ValidationError:
            raise invalid("language", f"{value!r} is not an ISO-639-1 code (en) or a locale (en-US)") from None
        self.language_given = str(value).strip()

    @property
    def wants_words(self) -> bool:
        return "word" in self.granularities or any(name in self.include for name in WORD_INCLUDES)

    @property
    def wants_logprobs(self) -> bool:
        return "logprobs" in self.include

    def reported_language(self, detected: str | None = None) -> str:
        """OpenAI writes ``english``; AI Refinery's clients send and expect locales (``en-US``).
        Without a language in the request, the one the decoder ``detected`` (else English, the
        ``.en`` models' language). A translation's is the text's: English, as OpenAI says."""
        if self.task == "translate":
            return formats.language_name("en")
        return airefinery_api.locale(self.language_given) or formats.language_name(self.language or detected or "en")

    def session_options(self) -> dict[str, Any]:
        """What these options set of the session's config (the model is resolved separately)."""
        return {"language": self.language, "task": self.task, "prompt": self.prompt, "turn_detection": self.turn_detection}


# ----------------------------------------------------------------------------------- fields


class FormFields:
    """A multipart form's items sorted out: the audio part, and the other fields by name."""

    def __init__(self) -> None:
        self.upload: UploadFile | None = None
        self.file_as_text = False  # a ``file`` field that was text, for a clearer missing_file
        self.fields: dict[str, list[Any]] = {}

    def add(self, name: str, value: str | UploadFile) -> None:
        """``a[]`` joins ``a``; ``a[k]`` builds an object (the OpenAI SDK's bracket form)."""
        if name == "file":
            if isinstance(value, UploadFile):
                self.upload = self.upload or value
            else:
                self.file_as_text = True
            return
        if isinstance(value, UploadFile):
            return  # stray file parts are ignored
        match = _BRACKETED.fullmatch(name)
        if match and match.group(2):
            base, key = match.groups()
            holder = self.fields.setdefault(base, [{}])
            if not isinstance(holder[-1], dict):
                holder.append({})
            holder[-1][key] = value
        else:
            self.fields.setdefault(match.group(1) if match else name, []).append(value)


def collect_fields(items: list[tuple[str, str | UploadFile]]) -> FormFields:
    """Group multipart items by field name, then apply AI Refinery's ``extra_body`` overrides."""
    form = FormFields()
    for name, value in items:
        form.add(name, value)
    airefinery_api.apply_extra_body(form.fields)
    return form
