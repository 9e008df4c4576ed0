"""Deepgram's live transcription protocol (``/v1/listen``, "Nova" v1) as a dialect.

A Deepgram client configures everything in the query string, streams binary audio, and sends a
few JSON control messages (``KeepAlive``, ``Finalize``, ``CloseStream``, ``Configure``). The server
answers with ``Results`` (interim and final transcripts), ``SpeechStarted``, ``UtteranceEnd``,
``Metadata`` and ``Error`` messages. ``docs/deepgram.md`` is the user-facing description; every
message shape here validates against the models of the official ``deepgram-sdk``.

How the core's events become ``Results`` (the one real design decision, see the doc for why):

* A final (``is_final: true``) carries exactly the core's committed text since the previous final,
  so concatenating final transcripts gives the session's text exactly once. Finals go out when
  every word heard so far is settled mid-turn (the speaker paused: the interim tail is empty),
  which is when the native deltas become final too, and when the core's turn ends (its
  ``transcript.segment``), then with ``speech_final`` (unless a ``Finalize`` forced it: then
  ``from_finalize``; or endpointing is off).
* Interim results (``is_final: false``) show the turn since its last final: committed words plus
  the current tail.
* Results tile the stream like Deepgram's: each result starts where the previous final ended.

Channels: with ``multichannel=true`` and ``channels=N`` (or an N-channel WAV) each channel is a
core channel with its own turns, and everything above holds per channel (results carry
``channel_index: [c, N]``, each channel tiles its own timeline). With ``multichannel`` false the
channels are mixed into one, as Deepgram does: the interleaved samples are averaged here and the
core gets mono float32.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from stream_server import protocol as p
from stream_server.dialects.base import (
    Action,
    Close,
    Handshake,
    HandshakeRejected,
    Send,
)
from stream_server.dialects.deepgram_audio import (
    DECODED_ENCODINGS,
    MAX_CHANNELS,
    RAW_ENCODINGS,
    AudioIntake,
    raw_config,
)
from stream_server.redaction import PLACEHOLDER, names_from
from stream_server.words import bare_word

#: Deepgram closes a stream that receives neither audio nor a text message for 10 seconds.
IDLE_TIMEOUT_S = 10.0
#: Close frame of that idle close: Deepgram uses 1011 with a NET-0001 reason.
IDLE_CLOSE = Close(
    1011,
    "NET-0001: no audio data or text message arrived within the 10 s timeout window "
    "(see https://dpgr.am/net0001)",
)
#: Encodings Deepgram accepts that this server cannot decode (refused with a clear 400): Speex
#: and G.729 come as bare frames that FFmpeg cannot delimit without a container.
UNSUPPORTED_ENCODINGS = {"speex", "g729"}
#: Deepgram model families; a name from them means "the server's model" unless the server knows it.
DEEPGRAM_MODEL_FAMILIES = (
    "nova-3", "nova-2", "nova", "enhanced", "base", "whisper",
    "general", "meeting", "phonecall", "finance", "conversationalai", "voicemail", "video",
)
MAX_ENDPOINTING_MS = 5000  # the core's silence_duration_ms bound
MAX_UTTERANCE_END_MS = 60_000
MAX_PROMPT_CHARS = 1000  # the core's `prompt` bound: keyterms beyond it are refused
MAX_EXTRA_CHARS = 2048  # one ``extra`` KEY:VALUE pair, as Deepgram bounds it
MAX_EXTRA_PAIRS = 64


# --------------------------------------------------------------------------------------------
# Query parameters
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ListenOptions:
    """The query parameters this server honours, parsed and validated."""

    encoding: str | None = None  # None: containerized audio (a WAV header, or FFmpeg recognises it)
    sample_rate: int | None = None
    channels: int = 1
    multichannel: bool = False
    interim_results: bool = False
    endpointing: int | None = None  # ms; None: the server's default silence duration
    endpointing_enabled: bool = True  # endpointing=false: speech_final is never true
    utterance_end_ms: int | None = None
    vad_events: bool = False
    punctuate: bool = False
    smart_format: bool = False
    language: str | None = "en"  # Deepgram's default; None (``multi`` or ``detect_language``): detect per utterance
    model: str | None = None  # a model this server knows; None: the server default
    keyterm: str | None = None
    utterances: bool = False  # pre-recorded (``POST /v1/listen``): every turn in ``results.utterances``
    paragraphs: bool = False  # pre-recorded: ``paragraphs`` in each channel's alternative (punctuated)
    # ``extra=KEY:VALUE`` (repeatable): the caller's labels, echoed as ``extra`` in the response's
    # metadata (a callback's receiver tells its calls apart by them).
    extra: tuple[tuple[str, str], ...] = ()
    redact: tuple[str, ...] = ()  # core redaction names (``redact_names``)


def reject(message: str, request_id: str) -> HandshakeRejected:
    """HTTP 400 in the shape Deepgram's API answers a bad request with."""
    return HandshakeRejected(400, {"err_code": "Bad Request", "err_msg": message, "request_id": request_id})


def _bool(query: Mapping[str, str], name: str, default: bool, request_id: str) -> bool:
    # The SDK sends "true"/"false"; Python callers passing True end up sending "True".
    raw = query.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value not in ("true", "false"):
        raise reject(f"Invalid value for query parameter `{name}`: expected true or false, got {raw!r}", request_id)
    return value == "true"


def query_number(query: Mapping[str, str], name: str, request_id: str, *, low: float, high: float, parse: Callable[[str], float] = float) -> float | None:
    """A numeric query parameter within ``[low, high]`` (``parse``: ``int`` or ``float``), None when absent."""
    raw = query.get(name)
    if raw is None:
        return None
    try:
        value = parse(raw.strip())
    except ValueError:
        kind = "an integer" if parse is int else "a number"
        raise reject(f"Invalid value for query parameter `{name}`: expected {kind}, got {raw!r}", request_id) from None
    if not low <= value <= high:
        raise reject(f"Invalid value for query parameter `{name}`: {value:g} is outside {low:g}..{high:g}", request_id)
    return value


def _int(query: Mapping[str, str], name: str, request_id: str, *, low: int, high: int) -> int | None:
    value = query_number(query, name, request_id, low=low, high=high, parse=int)
    return None if value is None else int(value)


def _endpointing(query: Mapping[str, str], request_id: str) -> tuple[int | None, bool]:
    raw = query.get("endpointing")
    if raw is None or raw.strip().lower() == "true":
        return None, True
    if raw.strip().lower() == "false":
        return None, False
    return _int(query, "endpointing", request_id, low=0, high=MAX_ENDPOINTING_MS), True


def _model(name: str | None, model_exists: Callable[[str], bool], request_id: str) -> str | None:
    """A Deepgram model name maps to the server default unless the server has that model."""
    if name is None or not name.strip():
        return None
    name = name.strip()
    if model_exists(name):
        return name
    if any(name == family or name.startswith(family + "-") for family in DEEPGRAM_MODEL_FAMILIES):
        return None
    raise reject(f"No such model: {name!r} is neither a Deepgram model name nor a model this server has", request_id)


def _encoding(query: Mapping[str, str], request_id: str) -> tuple[str | None, int | None]:
    raw = query.get("encoding")
    rate = _int(query, "sample_rate", request_id, low=8000, high=48000)
    if raw is None:
        return None, None  # containerized audio: the stream says its format, sample_rate is not read
    encoding = raw.strip().lower()
    if encoding in UNSUPPORTED_ENCODINGS:
        raise reject(
            f"encoding={encoding} is not supported by this server; use linear16, linear32, mulaw, alaw, "
            "opus, ogg-opus, flac, amr-nb or amr-wb (or send containerized audio without an encoding parameter)",
            request_id,
        )
    if encoding not in RAW_ENCODINGS and encoding not in DECODED_ENCODINGS:
        raise reject(f"Invalid value for query parameter `encoding`: {raw!r}", request_id)
    if rate is None and encoding in RAW_ENCODINGS:
        raise reject(f"sample_rate is required when encoding={encoding} (raw audio has no header)", request_id)
    return encoding, rate  # a decoded encoding's stream says its rate (the SDK's transcribe_file sends none)


def query_values(query: Mapping[str, str], lists: Mapping[str, Sequence[str]], name: str) -> list[str]:
    """Every value of a parameter that may be repeated (``keyterm=a&keyterm=b``, as the SDK
    sends a list), blank ones left out; ``lists`` holds the repeated ones, ``query`` the last."""
    return [v for v in (lists.get(name) or [query.get(name) or ""]) if v.strip()]


def terms_prompt(terms: Iterable[str]) -> str:
    """Keyterms as the decoder's prompt: "Kubernetes, gRPC" (blank terms dropped)."""
    return ", ".join(t.strip() for t in terms if t.strip())


def vocabulary_prompt(query: Mapping[str, str], lists: Mapping[str, Sequence[str]], request_id: str) -> str | None:
    """Every ``keyterm`` (Nova-3; repeated for several, as the SDK sends a list) and ``keywords``
    term (Nova-2's ``term:intensifier``; a negative intensifier asks to suppress the term, which
    a prompt cannot, so those are left out), joined as the decoder's prompt."""
    terms = query_values(query, lists, "keyterm")
    for keyword in query_values(query, lists, "keywords"):
        term, _, boost = keyword.rpartition(":") if ":" in keyword else (keyword, "", "")
        try:
            suppressed = bool(boost) and float(boost) < 0
        except ValueError:
            term, suppressed = keyword, False  # a colon inside the term
        if not suppressed:
            terms.append(term)
    prompt = terms_prompt(terms)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise reject(f"keyterm and keywords exceed {MAX_PROMPT_CHARS} characters", request_id)
    return prompt or None


def extra_pairs(query: Mapping[str, str], lists: Mapping[str, Sequence[str]], request_id: str) -> tuple[tuple[str, str], ...]:
    """Every ``extra=KEY:VALUE`` (split at the first colon; a later pair with the same key wins)."""
    values = query_values(query, lists, "extra")
    if len(values) > MAX_EXTRA_PAIRS:
        raise reject(f"At most {MAX_EXTRA_PAIRS} `extra` parameters are accepted, got {len(values)}", request_id)
    pairs: dict[str, str] = {}
    for value in values:
        key, colon, text = value.partition(":")
        if not colon or not key.strip():
            raise reject(f"Invalid value for query parameter `extra`: expected KEY:VALUE, got {value[:100]!r}", request_id)
        if len(value) > MAX_EXTRA_CHARS:
            raise reject(f"Invalid value for query parameter `extra`: a pair is limited to {MAX_EXTRA_CHARS} characters", request_id)
        pairs[key.strip()] = text
    return tuple(pairs.items())


#: Deepgram's names for the redactions this server does that are not the core's own.
DEEPGRAM_REDACT_ALIASES = {"true": "numbers", "aggressive_numbers": "numbers"}


def redact_names(query: Mapping[str, str], lists: Mapping[str, Sequence[str]], request_id: str) -> tuple[str, ...]:
    """Every ``redact=`` (repeated, as the SDK sends a list, or comma-separated) as core names:
    ``pci``, ``ssn``, ``numbers`` (``true``, ``aggressive_numbers``), ``credit_card``,
    ``credit_card_expiration``, ``cvv``; ``false`` is none. Deepgram's entity redaction of names,
    addresses and health terms (``pii``, ``phi``) needs an entity model this server lacks: it is
    refused (400) rather than accepted and left undone, which would hand back the very text the
    caller asked to have removed."""
    values = [v for raw in query_values(query, lists, "redact") for v in raw.split(",") if v.strip().lower() != "false"]
    try:
        return tuple(names_from(DEEPGRAM_REDACT_ALIASES.get(v.strip().lower(), v) for v in values))
    except ValueError as exc:
        raise reject(f"Invalid value for query parameter `redact`: {exc}", request_id) from None


def parse_options(
    query: Mapping[str, str],
    model_exists: Callable[[str], bool],
    request_id: str,
    lists: Mapping[str, Sequence[str]] | None = None,
) -> ListenOptions:
    """Validate the query parameters as Deepgram does; unknown parameters are ignored.
    ``lists``: every value of a repeated parameter (``keyterm``); without it, ``query``'s one."""
    encoding, rate = _encoding(query, request_id)
    channels = _int(query, "channels", request_id, low=1, high=MAX_CHANNELS) or 1
    if encoding is None:
        channels = 1  # as with Deepgram, only raw audio reads `channels`: a WAV header says it
    endpointing, endpointing_enabled = _endpointing(query, request_id)
    language = (query.get("language") or "en").strip()
    # ``language=multi`` is live Deepgram's way to ask for detection; ``detect_language=true`` is
    # its pre-recorded one, which clients reuse: either means detect per utterance.
    detect = language.lower() == "multi" or _bool(query, "detect_language", False, request_id)
    if not detect and not p.valid_language(language):
        # Here, not only at the live upgrade: the pre-recorded route builds its session from it.
        raise reject(f"Invalid value for query parameter `language`: {language!r}", request_id)
    keyterm = vocabulary_prompt(query, lists or {}, request_id)
    return ListenOptions(
        encoding=encoding,
        sample_rate=rate,
        channels=channels,
        multichannel=_bool(query, "multichannel", False, request_id),
        interim_results=_bool(query, "interim_results", False, request_id),
        endpointing=endpointing,
        endpointing_enabled=endpointing_enabled,
        utterance_end_ms=_int(query, "utterance_end_ms", request_id, low=1, high=MAX_UTTERANCE_END_MS),
        vad_events=_bool(query, "vad_events", False, request_id),
        punctuate=_bool(query, "punctuate", False, request_id),
        smart_format=_bool(query, "smart_format", False, request_id),
        language=None if detect else language,
        model=_model(query.get("model"), model_exists, request_id),
        keyterm=keyterm,
        utterances=_bool(query, "utterances", False, request_id),
        paragraphs=_bool(query, "paragraphs", False, request_id),
        extra=extra_pairs(query, lists or {}, request_id),
        redact=redact_names(query, lists or {}, request_id),
    )


def native_config(options: ListenOptions) -> dict[str, object]:
    """The core ``session`` fields for these options (words and logprobs are always included:
    Deepgram results carry word timings and confidences)."""
    config: dict[str, object] = {
        "language": options.language,
        "include": ["logprobs", "words"],
        # Always on in the core: an empty interim tail is how the dialect sees that every word
        # heard so far is final (see DeepgramDialect._interim); forwarded only when asked for.
        "interim_results": True,
    }
    config.update(raw_config(options.encoding, options.sample_rate, options.channels, options.multichannel))
    if options.model is not None:
        config["model"] = options.model
    if options.endpointing is not None:
        config["turn_detection"] = {"type": "server_vad", "silence_duration_ms": options.endpointing}
    if options.keyterm:
        config["prompt"] = options.keyterm
    if options.redact:
        config["redact"] = list(options.redact)
    return config


def api_key(handshake: Handshake) -> tuple[str | None, str | None]:
    """(key, subprotocol to accept): ``Authorization: Token|Bearer <key>`` or the browser form
    ``Sec-WebSocket-Protocol: token, <key>`` (``bearer, <jwt>`` for temporary tokens)."""
    offered = handshake.subprotocols
    if len(offered) >= 2 and offered[0].lower() in ("token", "bearer"):
        return offered[1], offered[0]
    scheme, _, key = handshake.headers.get("authorization", "").partition(" ")
    if scheme.lower() in ("token", "bearer") and key.strip():
        return key.strip(), None
    return None, None


# --------------------------------------------------------------------------------------------
# Text: Deepgram's plain vs punctuated forms
# --------------------------------------------------------------------------------------------


def plain_word(word: str) -> str:
    """Deepgram's ``word``: lower-case, without leading/trailing punctuation ("Hello," → "hello";
    "don't" and "3.5" keep their inner marks) — the server's one word normaliser. A redaction
    placeholder keeps its brackets ("[CREDIT_CARD_1]," → "[credit_card_1]"): without them it
    would read as a word that was said."""
    placeholder = PLACEHOLDER.search(word)
    if placeholder is not None:
        return placeholder.group().strip().lower()
    return bare_word(word)


def plain_text(text: str) -> str:
    """A transcript as Deepgram writes it without punctuate/smart_format."""
    return " ".join(w for w in (plain_word(t) for t in text.split()) if w)


#: Marks that close what came before them: a result never starts with one.
CLOSING_MARKS = ",.;:!?)]}"


def punctuated_text(text: str) -> str:
    """A result's transcript with the decoder's punctuation. A mark the decoder put after a word
    that an earlier final already carried (", the type" after "on the whole", the comma decided
    once the next words were heard) is left out: Deepgram clients join finals with a space, and
    "on the whole , the type" reads worse than the comma missing."""
    return text.strip().lstrip(CLOSING_MARKS).lstrip()


def result_words(words: Sequence[p.WordTiming], *, punctuated: bool, language: str | None = None) -> list[dict[str, Any]]:
    """Deepgram's ``words`` (live ``Results`` and pre-recorded ``alternatives`` alike): the plain
    word, its times and confidence, ``punctuated_word`` with punctuate/smart_format, ``language``
    when detected."""
    out: list[dict[str, Any]] = []
    for w in words:
        plain = plain_word(w.word.strip())
        if not plain:
            continue  # a lone punctuation mark is not a word
        item: dict[str, Any] = {
            "word": plain,
            "start": round(w.start, 3),
            "end": round(w.end, 3),
            "confidence": round(w.probability, 4),
        }
        if punctuated:
            item["punctuated_word"] = w.word.strip()
        if language is not None:
            item["language"] = language
        out.append(item)
    return out


def model_info(model: str) -> tuple[str, dict[str, str]]:
    """The uuid Deepgram's messages name the model by, and its ``model_info`` entry."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"stream-server:model:{model}")), {"name": model, "version": "latest", "arch": "whisper"}


def join_text(committed: str, tail: str) -> str:
    if committed and tail and not committed[-1].isspace() and not tail[0].isspace():
        return f"{committed} {tail}".strip()
    return (committed + tail).strip()


# --------------------------------------------------------------------------------------------
# The dialect
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpenUtterance:
    """The utterance in progress: its text not yet sent as a final, and the interim tail."""

    item_id: str
    pending: str = ""  # deltas since the last final of this utterance
    pending_words: list[p.WordTiming] = dataclasses.field(default_factory=list)
    pending_logprobs: list[float] = dataclasses.field(default_factory=list)
    tail: str = ""
    tail_words: list[p.WordTiming] = dataclasses.field(default_factory=list)
    shown: str = ""  # the last interim transcript sent
    language: str | None = None  # the language its latest delta was decoded in

    def take_pending(self) -> tuple[str, list[p.WordTiming], list[float]]:
        taken = (self.pending, self.pending_words, self.pending_logprobs)
        self.pending, self.pending_words, self.pending_logprobs, self.shown = "", [], [], ""
        return taken


@dataclasses.dataclass
class ChannelState:
    """One transcribed channel's place in the result stream (Deepgram tiles each channel's
    timeline on its own, so each has its own chunk start, open turn and UtteranceEnd wait)."""

    chunk_start: float = 0.0  # where the next result starts (end of the previous final)
    utterance: OpenUtterance | None = None
    stopped: str | None = None  # an item past speech_stopped, final not yet sent
    last_word_end: float | None = None  # pending UtteranceEnd, None when sent
    last_final: str | None = None  # the item whose turn-ending final went out last


NATIVE_ERROR_VARIANTS = {
    "invalid_json": "SchemaError",
    "unknown_message_type": "SchemaError",
    "invalid_value": "InvalidValue",
    "invalid_audio": "DataError",
    "model_not_found": "ModelError",
    "model_unavailable": "ModelError",
    "decode_failed": "InternalServerError",
    "message_too_large": "MessageTooLarge",
    "server_busy": "ServerBusy",
    "rate_limited": "RateLimited",  # a key's audio-per-minute allowance ran out (keys.py)
}


class DeepgramDialect:
    """One Deepgram live connection. Pure state machine: the clock-derived ``created`` and the
    ``request_id`` come in from :func:`create` so tests can fix them."""

    name = "deepgram"
    idle_timeout_s: float | None = IDLE_TIMEOUT_S

    def __init__(
        self,
        options: ListenOptions,
        *,
        request_id: str,
        created: datetime.datetime,
        api_key: str | None = None,
        subprotocol: str | None = None,
        default_model: str = "",
    ) -> None:
        self.options = options
        self.api_key = api_key
        self.subprotocol = subprotocol
        self.request_id = request_id
        # Deepgram names a stream by its request_id (the ``dg-request-id`` upgrade header and every
        # Metadata): the hub publishes the session under it too, so ``GET /v1/sessions/{request_id}/...``
        # finds the live or stored transcript by the id the client already holds.
        self.session_alias: str | None = request_id
        self.accept_headers = {"dg-request-id": request_id}
        self.created = created
        self.model = options.model or default_model
        self.punctuated = options.punctuate or options.smart_format
        self._channels: list[ChannelState] = []
        self.audio = AudioIntake(
            options.encoding,
            options.sample_rate,
            options.channels,
            options.multichannel,
            data_error=lambda description: [self._error("DataError", description)],
            on_channels=self._set_channels,
        )
        self._finalized: set[str] = set()  # items whose final comes from a Finalize
        self._finalize_pending = False  # a Finalize whose first BufferCommitted has not come back

    def _set_channels(self, transcribed: int) -> None:
        """The transcribed channels (one by one with ``multichannel``, else one mix)."""
        self._channels = [ChannelState() for _ in range(transcribed)]

    # ---------------------------------------------------------------- client → server

    def initial_config(self) -> dict[str, object]:
        return native_config(self.options)

    def receive_bytes(self, data: bytes) -> list[Action]:
        if self.audio.closing:
            return []
        if not data:
            # Deepgram's original way of ending a stream, still honoured: an empty binary frame.
            return self._close_stream()
        return [*self.audio.receive(data), *self._utterance_end_due()]

    def receive_text(self, text: str) -> list[Action]:
        try:
            message = p.loads_json(text)
        except (ValueError, RecursionError):  # bad JSON, absurd nesting, 4300+ digit numbers
            return [self._error("SchemaError", "The message could not be parsed as JSON.", message=text)]
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "KeepAlive":
            return []
        if kind == "Finalize":
            if self.audio.closing:
                return []
            self._finalize_pending = True
            return [p.BufferCommit()]
        if kind == "CloseStream":
            return self._close_stream()
        if kind == "Configure" and isinstance(message, dict):
            return self._configure(message)
        return [
            self._error(
                "SchemaError",
                f"Unknown message type {kind!r}; expected KeepAlive, Finalize, CloseStream or Configure.",
                message=text,
            )
        ]

    def _close_stream(self) -> list[Action]:
        return self.audio.end()

    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        """The shell's wake-up for the decoder of compressed audio (see :class:`AudioIntake`)."""
        self.audio.set_wakeup(wakeup)

    def pending(self) -> list[Action]:
        """Audio decoded in the background since the last message (see :class:`AudioIntake`)."""
        return [*self.audio.pending(), *self._utterance_end_due()]

    @property
    def closing(self) -> bool:
        """The client ended the stream (the shell stops waiting for its messages)."""
        return self.audio.closing

    def release(self) -> None:
        """The connection is gone: the decoder of a compressed stream stops (the shell calls this)."""
        self.audio.release()

    def _configure(self, message: dict[str, Any]) -> list[Action]:
        """Mid-stream reconfiguration: keyterms become the decoder's vocabulary prompt, the
        ``punctuate``/``smart_format`` features switch the transcript form."""
        features = message.get("features")
        keyterms = message.get("keyterms")
        if features is not None and not (
            isinstance(features, dict) and all(isinstance(v, bool) for v in features.values())
        ):
            return [self._configure_failure("CONFIGURE_INTERNAL_ERROR", "features must map feature names to booleans")]
        if keyterms is not None and not (isinstance(keyterms, list) and all(isinstance(k, str) for k in keyterms)):
            return [self._configure_failure("CONFIGURE_INTERNAL_ERROR", "keyterms must be a list of strings")]
        actions: list[Action] = []
        if keyterms is not None:
            prompt = terms_prompt(keyterms)
            if len(prompt) > MAX_PROMPT_CHARS:
                return [self._configure_failure("CONFIGURE_KEYTERM_LIMIT_EXCEEDED", f"keyterms exceed {MAX_PROMPT_CHARS} characters")]
            actions.append(p.SessionUpdate({"prompt": prompt}))
        if features:
            punctuate = features.get("punctuate", self.options.punctuate)
            smart = features.get("smart_format", self.options.smart_format)
            self.options = dataclasses.replace(self.options, punctuate=punctuate, smart_format=smart)
            self.punctuated = punctuate or smart
        success: dict[str, Any] = {"type": "ConfigureSuccess", "request_id": self.request_id}
        if keyterms is not None:
            success["keyterms"] = keyterms
        return [*actions, Send(_dumps(success))]

    def _configure_failure(self, code: str, description: str) -> Send:
        return Send(_dumps({"type": "ConfigureFailure", "request_id": self.request_id, "code": code, "description": description}))

    @property
    def audio_seconds(self) -> float:
        """Seconds of audio received so far (the clock Deepgram's times are in)."""
        return self.audio.seconds

    # ---------------------------------------------------------------- server → client

    def render(self, event: p.ServerEvent) -> list[Action]:
        if isinstance(event, (p.SessionCreated, p.SessionUpdated)):
            self.model = str(event.session.get("model") or self.model)
            return []
        if isinstance(event, p.SpeechStarted):
            return self._speech_started(event)
        if isinstance(event, p.SpeechStopped):
            self._channel(event.channel).stopped = event.item_id
            return []
        if isinstance(event, p.TranscriptDelta):
            return self._delta(event)
        if isinstance(event, p.TranscriptInterim):
            return self._interim(event)
        if isinstance(event, p.TranscriptSegment):
            return self._final(event)
        if isinstance(event, p.BufferCommitted):
            return self._committed(event)
        if isinstance(event, p.TranscriptDone):
            return [Send(_dumps(self.metadata(event.usage.seconds)))]
        if isinstance(event, p.Error):
            return self.error(event)
        return []  # BufferCleared: never asked for

    def error(self, event: p.Error) -> list[Action]:
        code = event.error.code
        if code == "idle_timeout":
            return [IDLE_CLOSE]
        variant = NATIVE_ERROR_VARIANTS.get(code, "InternalServerError")
        return [self._error(variant, event.error.message)]

    def _channel(self, index: int) -> ChannelState:
        # The core only sends channels the session has; a stray index must not crash the stream.
        return self._channels[index] if 0 <= index < len(self._channels) else self._channels[0]

    def _channel_tag(self, index: int) -> list[int]:
        """Deepgram's ``[channel, channel count]`` pair."""
        return [index, len(self._channels)]

    def _speech_started(self, event: p.SpeechStarted) -> list[Action]:
        self._channel(event.channel).utterance = OpenUtterance(event.item_id)
        if not self.options.vad_events:
            return []
        body = {"type": "SpeechStarted", "channel": self._channel_tag(event.channel), "timestamp": round(event.audio_start_ms / 1000, 3)}
        return [Send(_dumps(body))]

    def _open(self, item_id: str, channel: int) -> OpenUtterance:
        state = self._channel(channel)
        if state.utterance is None or state.utterance.item_id != item_id:
            state.utterance = OpenUtterance(item_id)
        return state.utterance

    def _delta(self, event: p.TranscriptDelta) -> list[Action]:
        utt = self._open(event.item_id, event.channel)
        utt.pending += event.delta
        utt.pending_words.extend(event.words or [])
        utt.pending_logprobs.extend(t.logprob for t in event.logprobs or [])
        utt.language = event.language or utt.language
        if not utt.tail and self._channel(event.channel).stopped != event.item_id:
            # Nothing was left unsettled before this delta: the core only sends a new interim
            # when the tail changes, so none may follow. Final now, as the native delta is.
            return self._send_final(utt, event.channel, end=None, speech_final=False, language=self._detected(utt.language))
        return []  # shown by the interim that follows in the same core step, or by a final

    def _interim(self, event: p.TranscriptInterim) -> list[Action]:
        """An empty tail while the speaker pauses (the VAD has not ended the turn) means every
        word heard so far is final: that is the moment Deepgram finalizes a segment too, so the
        committed text goes out as ``is_final`` now instead of waiting for the end of the turn."""
        utt = self._open(event.item_id, event.channel)
        utt.tail, utt.tail_words = event.text, list(event.words or [])
        if not event.text and utt.pending.strip() and self._channel(event.channel).stopped != event.item_id:
            return self._send_final(utt, event.channel, end=None, speech_final=False, language=self._detected(utt.language))
        if not self.options.interim_results:
            return []
        shown = join_text(utt.pending, utt.tail)
        if not shown or shown == utt.shown:
            return []
        utt.shown = shown
        words = [*utt.pending_words, *utt.tail_words]
        end = max([self.audio_seconds, *(w.end for w in words)])
        confidence = sum(w.probability for w in words) / len(words) if words else 0.0
        results = self.results(shown, words, end=end, confidence=confidence, is_final=False, channel=event.channel,
                               language=self._detected(utt.language))
        return [Send(_dumps(results))]

    def _final(self, event: p.TranscriptSegment) -> list[Action]:
        """The end of a core utterance: what was not finalized yet goes out as the final that
        ends the turn (``speech_final`` unless a Finalize forced it or endpointing is off)."""
        utt = self._open(event.item_id, event.channel)
        state = self._channel(event.channel)
        state.utterance = None
        state.last_final = event.item_id
        if state.stopped == event.item_id:
            state.stopped = None
        from_finalize = event.item_id in self._finalized
        self._finalized.discard(event.item_id)
        return self._send_final(
            utt,
            event.channel,
            end=event.end,
            speech_final=self.options.endpointing_enabled and not from_finalize,
            from_finalize=from_finalize,
            language=self._detected(event.language),
        )

    def _detected(self, language: str | None) -> str | None:
        """A detected language as Deepgram reports it: only with ``language=multi``."""
        return language if self.options.language is None else None

    def _send_final(
        self,
        utt: OpenUtterance,
        channel: int,
        *,
        end: float | None,
        speech_final: bool,
        from_finalize: bool = False,
        language: str | None = None,
    ) -> list[Action]:
        text, words, logprobs = utt.take_pending()
        state = self._channel(channel)
        # A final ends at its last word mid-turn (the next result starts there), at the turn's end
        # when the turn is over.
        end = max([state.chunk_start if end is None else end, *(w.end for w in words)])
        confidence = math.exp(sum(logprobs) / len(logprobs)) if logprobs and text.strip() else 0.0
        results = self.results(
            text,
            words,
            end=end,
            confidence=confidence,
            is_final=True,
            speech_final=speech_final,
            from_finalize=from_finalize,
            channel=channel,
            language=language,
        )
        if words:
            state.last_word_end = words[-1].end
        return [Send(_dumps(results)), *self._utterance_end_due()]

    def _committed(self, event: p.BufferCommitted) -> list[Action]:
        """A Finalize was applied (the core sends one ``committed`` per channel whose turn it
        closed, or one with no item when none was open). Each closed turn's final gets
        ``from_finalize``; so does a turn the VAD had already stopped, still waiting for its final;
        a channel with nothing pending gets an empty ``from_finalize`` result at once, so a client
        waiting for one per channel is not left hanging."""
        if event.item_id is not None:
            self._finalized.add(event.item_id)
        if not self._finalize_pending:
            return []
        self._finalize_pending = False
        out: list[Action] = []
        for index, state in enumerate(self._channels):
            if event.item_id is not None and event.item_id in (state.last_final, state.utterance and state.utterance.item_id):
                continue  # the channel whose turn this Finalize closed
            if state.stopped is not None:
                self._finalized.add(state.stopped)
            elif state.utterance is None:
                results = self.results(
                    "", [], end=self.audio_seconds, confidence=0.0, is_final=True, from_finalize=True, channel=index
                )
                out.append(Send(_dumps(results)))
        return out

    def _utterance_end_due(self) -> list[Action]:
        """Deepgram's UtteranceEnd, per channel: a gap of ``utterance_end_ms`` of audio after the
        channel's last finalized word, with no turn in progress there (new speech cancels it)."""
        gap_ms = self.options.utterance_end_ms
        if gap_ms is None:
            return []
        out: list[Action] = []
        for index, state in enumerate(self._channels):
            last = state.last_word_end
            if last is None or state.utterance is not None or self.audio_seconds < last + gap_ms / 1000:
                continue
            state.last_word_end = None
            body = {"type": "UtteranceEnd", "channel": self._channel_tag(index), "last_word_end": round(last, 3)}
            out.append(Send(_dumps(body)))
        return out

    # ---------------------------------------------------------------- message bodies

    def results(
        self,
        text: str,
        words: Sequence[p.WordTiming],
        *,
        end: float,
        confidence: float,
        is_final: bool,
        speech_final: bool = False,
        from_finalize: bool = False,
        channel: int = 0,
        language: str | None = None,
    ) -> dict[str, Any]:
        """A ``Results`` message of one channel covering ``[chunk start, end)`` of that channel;
        a final moves the channel's chunk start. ``language`` (detected; only with
        ``language=multi``) fills Deepgram's ``languages`` and each word's ``language``."""
        state = self._channel(channel)
        start = state.chunk_start
        end = max(end, start)
        if is_final:
            state.chunk_start = end
        alternative: dict[str, Any] = {
            "transcript": punctuated_text(text) if self.punctuated else plain_text(text),
            "confidence": round(confidence, 4),
            "words": self._words(words, language),
        }
        if language is not None:
            alternative["languages"] = [language]
        model_uuid, info = model_info(self.model)
        return {
            "type": "Results",
            "channel_index": self._channel_tag(channel),
            "duration": round(end - start, 3),
            "start": round(start, 3),
            "is_final": is_final,
            "speech_final": speech_final,
            "from_finalize": from_finalize,
            "channel": {"alternatives": [alternative]},
            "metadata": {"request_id": self.request_id, "model_info": info, "model_uuid": model_uuid},
        }

    def _words(self, words: Sequence[p.WordTiming], language: str | None = None) -> list[dict[str, Any]]:
        return result_words(words, punctuated=self.punctuated, language=language)

    def metadata(self, duration: float) -> dict[str, Any]:
        """The summary Deepgram sends after CloseStream, before closing."""
        return {
            "type": "Metadata",
            "transaction_key": "deprecated",
            "request_id": self.request_id,
            "sha256": self.audio.sha256.hexdigest(),
            "created": self.created.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "duration": round(duration, 3),
            "channels": len(self._channels),
            **({"extra": dict(self.options.extra)} if self.options.extra else {}),
        }

    def _error(self, variant: str, description: str, *, message: str | None = None) -> Send:
        body: dict[str, Any] = {"type": "Error", "variant": variant, "description": description}
        if message is not None:
            body["message"] = message
        return Send(_dumps(body))


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"))


def create(handshake: Handshake, *, now: datetime.datetime | None = None) -> DeepgramDialect:
    """Build the dialect for one ``/v1/listen`` upgrade, or refuse it with Deepgram's HTTP 400."""
    request_id = str(uuid.uuid4())
    options = parse_options(handshake.query, handshake.model_exists, request_id, handshake.query_lists)
    config = native_config(options)
    model = options.model or handshake.default_model
    if options.language is not None and not handshake.model_speaks(model, options.language):
        raise reject(p.unsupported_language_message(model, options.language), request_id)
    try:
        p.SessionConfig.model_validate({"model": handshake.default_model}).updated(config)
    except p.ProtocolError as exc:
        raise reject(f"Invalid query parameters: {exc.message}", request_id) from None
    key, subprotocol = api_key(handshake)
    return DeepgramDialect(
        options,
        request_id=request_id,
        created=now or datetime.datetime.now(datetime.UTC),
        api_key=key,
        subprotocol=subprotocol,
        default_model=handshake.default_model,
    )


__all__ = ["DeepgramDialect", "ListenOptions", "create", "native_config", "parse_options", "plain_text", "plain_word"]
