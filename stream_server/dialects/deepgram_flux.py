"""Deepgram's Flux API (``/v2/listen``: conversational speech recognition with turns) as a dialect.

A Flux client (``client.listen.v2.connect`` in the SDK; voice-agent frameworks) streams audio and
gets ``TurnInfo`` messages that follow one state machine per turn: ``StartOfTurn`` when the user
starts speaking, ``Update`` as the turn's transcript grows, ``EagerEndOfTurn`` (only with
``eager_eot_threshold``) when the user pauses and a reply may be prepared, ``TurnResumed`` when
they go on after all, and ``EndOfTurn`` with the turn's final transcript; ``turn_index`` counts
turns. ``docs/deepgram.md`` ("Flux") is the user-facing description; every message validates
against the official SDK's models (``tests/test_dialect_deepgram_flux.py``).

How the core maps onto it: a turn is one core utterance (the VAD's speech plus its trailing
silence). ``StartOfTurn`` comes with the turn's first words (a VAD onset that yields none, a
cough, starts no turn: an agent that stops talking on ``StartOfTurn`` is not interrupted by
noise); ``Update`` carries the turn's committed text and interim tail; ``EagerEndOfTurn`` is the moment every word heard so far is
final while the speaker pauses (the core's empty interim tail, ~0.2 s into the pause);
``EndOfTurn`` is the core's ``transcript.segment``. Flux's end-of-turn *model* is Whisper's VAD
silence here: ``eot_threshold`` chooses how long a pause ends a turn (:func:`turn_silence_ms`),
and ``end_of_turn_confidence`` is how much of that pause has passed.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from stream_server import protocol as p
from stream_server.dialects.base import Action, Handshake, Send
from stream_server.dialects.deepgram import (
    IDLE_CLOSE,
    IDLE_TIMEOUT_S,
    MAX_PROMPT_CHARS,
    api_key,
    punctuated_text,
    query_number,
    query_values,
    redact_names,
    reject,
    terms_prompt,
)
from stream_server.dialects.deepgram_audio import RAW_ENCODINGS, AudioIntake, raw_config
from stream_server.words import bare_word

#: Flux's encodings (raw, or Ogg Opus); without one the stream is containerized (WAV, Ogg, WebM).
FLUX_ENCODINGS = {*RAW_ENCODINGS, "opus", "ogg-opus"}
#: Flux's defaults and ranges (Deepgram's Flux configuration page).
EOT_THRESHOLD = 0.7
EOT_TIMEOUT_MS = 5000
EOT_RANGE = (0.5, 1.0)
EAGER_RANGE = (0.3, 0.9)
TIMEOUT_RANGE = (500, 60_000)
#: The longest pause the core waits for (its ``silence_duration_ms`` bound).
MAX_SILENCE_MS = 5000
#: Errors after which the connection closes: Flux's fatal ``Error``; others are ``Warning``s.
FATAL_CODES = {"idle_timeout", "message_too_large", "server_busy", "rate_limited", "invalid_api_key", "internal_error"}


def turn_silence_ms(eot_threshold: float, eot_timeout_ms: int) -> int:
    """The pause that ends a turn for Flux's ``eot_threshold``: the server's measured default
    (500 ms) at Flux's default 0.7, 300 ms at 0.5 (eager to answer), 1000 ms at 0.9, and at 1.0
    (natural end of turn suppressed) only ``eot_timeout_ms``; never longer than the timeout, and
    at most the core's 5 s."""
    if eot_threshold >= 1.0:
        silence = float(eot_timeout_ms)
    elif eot_threshold <= 0.7:
        silence = 300 + (eot_threshold - 0.5) / 0.2 * 200
    elif eot_threshold <= 0.9:
        silence = 500 + (eot_threshold - 0.7) / 0.2 * 500
    else:
        silence = 1000 + (eot_threshold - 0.9) / 0.1 * max(0, eot_timeout_ms - 1000)
    return round(min(silence, eot_timeout_ms, MAX_SILENCE_MS))


@dataclasses.dataclass(frozen=True)
class FluxOptions:
    """The query parameters this server honours, parsed and validated."""

    encoding: str | None = None  # None: containerized audio
    sample_rate: int | None = None
    eot_threshold: float = EOT_THRESHOLD
    eager_eot_threshold: float | None = None  # None: no EagerEndOfTurn
    eot_timeout_ms: int = EOT_TIMEOUT_MS
    keyterms: tuple[str, ...] = ()
    model: str | None = None  # a model this server has; None: the server default
    language: str | None = "en"  # flux-general-en; None: detect per turn (flux-general-multi)
    redact: tuple[str, ...] = ()  # core redaction names (``deepgram.redact_names``)


def _float(query: Mapping[str, str], name: str, bounds: tuple[float, float], request_id: str) -> float | None:
    return query_number(query, name, request_id, low=bounds[0], high=bounds[1])


def parse_options(
    query: Mapping[str, str],
    model_exists: Callable[[str], bool],
    request_id: str,
    lists: Mapping[str, Sequence[str]] | None = None,
) -> FluxOptions:
    """Validate the query as Flux does; unknown parameters are ignored."""
    raw_model = (query.get("model") or "").strip()
    if not raw_model:
        raise reject("Flux requires a model: model=flux-general-en (or flux-general-multi)", request_id)
    model = raw_model if model_exists(raw_model) else None
    if model is None and not raw_model.startswith("flux"):
        raise reject(f"No such model: {raw_model!r} is neither a Flux model name nor a model this server has", request_id)
    encoding = (query.get("encoding") or "").strip().lower() or None
    if encoding is not None and encoding not in FLUX_ENCODINGS:
        raise reject(f"Invalid value for query parameter `encoding`: {query.get('encoding')!r} (Flux takes {', '.join(sorted(FLUX_ENCODINGS))})", request_id)
    rate_value = _float(query, "sample_rate", (8000, 48000), request_id)
    rate = int(rate_value) if rate_value is not None else None
    if encoding in RAW_ENCODINGS and rate is None:
        raise reject(f"sample_rate is required when encoding={encoding} (raw audio has no header)", request_id)
    timeout = _float(query, "eot_timeout_ms", TIMEOUT_RANGE, request_id)
    keyterms = tuple(query_values(query, lists or {}, "keyterm"))
    if len(terms_prompt(keyterms)) > MAX_PROMPT_CHARS:
        raise reject(f"keyterm exceeds {MAX_PROMPT_CHARS} characters", request_id)
    language: str | None = "en"
    if raw_model == "flux-general-multi" or (model is not None and "multi" in raw_model):
        hints = query_values(query, lists or {}, "language_hint")
        language = hints[0].strip() if len(hints) == 1 else None
        if language is not None and not p.valid_language(language):
            raise reject(f"Invalid value for query parameter `language_hint`: {language!r}", request_id)
    return FluxOptions(
        encoding=encoding,
        sample_rate=rate,
        eot_threshold=_float(query, "eot_threshold", EOT_RANGE, request_id) or EOT_THRESHOLD,
        eager_eot_threshold=_float(query, "eager_eot_threshold", EAGER_RANGE, request_id),
        eot_timeout_ms=int(timeout) if timeout is not None else EOT_TIMEOUT_MS,
        keyterms=keyterms,
        model=model,
        language=language,
        redact=redact_names(query, lists or {}, request_id),
    )


def turn_detection(options: FluxOptions) -> dict[str, object]:
    """The core's ``turn_detection`` for the options' thresholds (:func:`turn_silence_ms`)."""
    return {"type": "server_vad", "silence_duration_ms": turn_silence_ms(options.eot_threshold, options.eot_timeout_ms)}


def native_config(options: FluxOptions) -> dict[str, object]:
    """The core ``session`` fields for these options."""
    config: dict[str, object] = {
        "language": options.language,
        "include": ["logprobs", "words"],
        "interim_results": True,
        "turn_detection": turn_detection(options),
    }
    config.update(raw_config(options.encoding, options.sample_rate, 1, False))
    if options.model is not None:
        config["model"] = options.model
    if options.keyterms:
        config["prompt"] = terms_prompt(options.keyterms)
    if options.redact:
        config["redact"] = list(options.redact)
    return config


@dataclasses.dataclass
class Turn:
    """The turn in progress (one core utterance)."""

    item_id: str
    start: float
    committed: str = ""
    committed_words: list[p.WordTiming] = dataclasses.field(default_factory=list)
    tail: str = ""
    tail_words: list[p.WordTiming] = dataclasses.field(default_factory=list)
    eager: str | None = None  # the transcript of the EagerEndOfTurn sent and not resumed
    shown: str = ""  # the transcript of the last TurnInfo
    language: str | None = None
    forced: bool = False  # a ForceEndTurn ends it
    started: bool = False  # its StartOfTurn went out (with its first words)

    @property
    def text(self) -> str:
        return punctuated_text(self.committed + self.tail)

    @property
    def words(self) -> list[p.WordTiming]:
        return [*self.committed_words, *self.tail_words]


class FluxDialect:
    """One Flux connection. Pure state machine, as the other dialects."""

    name = "deepgram-flux"
    idle_timeout_s: float | None = IDLE_TIMEOUT_S

    def __init__(
        self,
        options: FluxOptions,
        *,
        request_id: str,
        api_key: str | None = None,
        subprotocol: str | None = None,
    ) -> None:
        self.options = options
        self.api_key = api_key
        self.subprotocol = subprotocol
        self.request_id = request_id
        self.session_alias: str | None = request_id
        self.accept_headers = {"dg-request-id": request_id}
        self.audio = AudioIntake(options.encoding, options.sample_rate, 1, False, data_error=self._data_error)
        self._sequence = 0
        self._turn: Turn | None = None
        self._turn_index = 0
        self._last_word_end = 0.0

    # ---------------------------------------------------------------- client → server

    def initial_config(self) -> dict[str, object]:
        return native_config(self.options)

    def receive_bytes(self, data: bytes) -> list[Action]:
        if not data:
            return self.audio.end()
        return self.audio.receive(data)

    def receive_text(self, text: str) -> list[Action]:
        try:
            message = p.loads_json(text)
        except (ValueError, RecursionError):
            return [self._warning("UNPARSABLE_CLIENT_MESSAGE", "The message could not be parsed as JSON.")]
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "CloseStream":
            return self.audio.end()
        if kind == "ForceEndTurn":
            if self._turn is None or self.audio.closing:
                return []
            self._turn.forced = True
            return [p.BufferCommit()]
        if kind == "KeepAlive":
            return []
        if kind == "Configure" and isinstance(message, dict):
            return self._configure(message)
        return [self._warning("UNKNOWN_MESSAGE_TYPE", f"Unknown message type {kind!r}; expected CloseStream, ForceEndTurn or Configure.")]

    def _configure(self, message: dict[str, Any]) -> list[Action]:
        """New thresholds and keyterms, mid-stream; answered with the configuration in force."""
        thresholds = message.get("thresholds") or {}
        keyterms = message.get("keyterms")
        if isinstance(keyterms, str):
            keyterms = [keyterms]
        if not isinstance(thresholds, dict) or (keyterms is not None and not (isinstance(keyterms, list) and all(isinstance(k, str) for k in keyterms))):
            return [self._configure_failure("thresholds must be an object and keyterms a list of strings")]
        options = self.options
        try:
            values: dict[str, float] = {}
            for name, bounds in (("eot_threshold", EOT_RANGE), ("eager_eot_threshold", EAGER_RANGE), ("eot_timeout_ms", TIMEOUT_RANGE)):
                value = thresholds.get(name)
                if value is None:
                    continue
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not bounds[0] <= value <= bounds[1]:
                    raise ValueError(f"{name} must be a number in {bounds[0]:g}..{bounds[1]:g}")
                values[name] = float(value)
            options = dataclasses.replace(
                options,
                eot_threshold=values.get("eot_threshold", options.eot_threshold),
                eager_eot_threshold=values.get("eager_eot_threshold", options.eager_eot_threshold),
                eot_timeout_ms=int(values.get("eot_timeout_ms", options.eot_timeout_ms)),
            )
            if keyterms is not None:
                options = dataclasses.replace(options, keyterms=tuple(k for k in keyterms if k.strip()))
                if len(terms_prompt(options.keyterms)) > MAX_PROMPT_CHARS:
                    raise ValueError(f"keyterms exceed {MAX_PROMPT_CHARS} characters")
        except ValueError as exc:
            return [self._configure_failure(str(exc))]
        self.options = options
        update: dict[str, object] = {"turn_detection": turn_detection(options)}
        if keyterms is not None:
            update["prompt"] = terms_prompt(options.keyterms)
        success = {
            "type": "ConfigureSuccess",
            "request_id": self.request_id,
            "thresholds": {
                "eot_threshold": options.eot_threshold,
                "eager_eot_threshold": options.eager_eot_threshold,
                "eot_timeout_ms": options.eot_timeout_ms,
            },
            "keyterms": list(options.keyterms),
        }
        return [p.SessionUpdate(update), self._send(success)]

    def _configure_failure(self, description: str) -> Send:
        return self._send({"type": "ConfigureFailure", "request_id": self.request_id, "code": "INVALID_CONFIGURATION", "description": description})

    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        self.audio.set_wakeup(wakeup)

    def pending(self) -> list[Action]:
        return self.audio.pending()

    @property
    def closing(self) -> bool:
        return self.audio.closing

    def release(self) -> None:
        self.audio.release()

    # ---------------------------------------------------------------- server → client

    def render(self, event: p.ServerEvent) -> list[Action]:
        if isinstance(event, p.SessionCreated):
            return [self._send({"type": "Connected", "request_id": self.request_id})]
        if isinstance(event, p.SpeechStarted):
            self._turn = Turn(event.item_id, event.audio_start_ms / 1000)
            return []
        turn = self._turn
        if isinstance(event, p.TranscriptDelta) and turn is not None and event.item_id == turn.item_id:
            turn.committed += event.delta
            turn.committed_words.extend(event.words or [])
            turn.language = event.language or turn.language
            # The words it commits were the interim tail's: the interim that follows in the same
            # core step shows the turn (shown now, the old tail would repeat them).
            return [] if turn.tail else self._progress(turn)
        if isinstance(event, p.TranscriptInterim) and turn is not None and event.item_id == turn.item_id:
            turn.tail, turn.tail_words = event.text, list(event.words or [])
            if not event.text and turn.committed.strip() and self.options.eager_eot_threshold is not None and turn.eager is None:
                turn.eager = turn.text
                return [*self._start(turn), self._turn_info("EagerEndOfTurn", turn)]
            return self._progress(turn)
        if isinstance(event, p.TranscriptSegment) and turn is not None and event.item_id == turn.item_id:
            return self._end_of_turn(turn, event)
        if isinstance(event, p.Error):
            return self.error(event)
        return []

    def error(self, event: p.Error) -> list[Action]:
        code = event.error.code
        if code == "idle_timeout":
            return [self._fatal("NET-0001", event.error.message), IDLE_CLOSE]
        if code in FATAL_CODES:
            return [self._fatal(code.upper(), event.error.message)]
        return [self._warning(code.upper(), event.error.message)]

    def _progress(self, turn: Turn) -> list[Action]:
        """An ``Update`` when the turn's transcript changed (after a ``TurnResumed`` if the user
        went on past an ``EagerEndOfTurn``)."""
        text = turn.text
        if not turn.started:
            return self._start(turn)
        if text == turn.shown:
            return []
        out: list[Action] = []
        if turn.eager is not None and text != turn.eager:
            turn.eager = None
            out.append(self._turn_info("TurnResumed", turn))
        out.append(self._turn_info("Update", turn))
        return out

    def _start(self, turn: Turn) -> list[Action]:
        """``StartOfTurn``, once the turn has words."""
        if turn.started or not turn.text:
            return []
        turn.started = True
        return [self._turn_info("StartOfTurn", turn)]

    def _end_of_turn(self, turn: Turn, segment: p.TranscriptSegment) -> list[Action]:
        final = punctuated_text(segment.text)
        self._turn = None
        if not turn.started and not final:
            return []  # no words: no turn
        out: list[Action] = []
        if turn.eager is not None and final != turn.eager:
            out.append(self._turn_info("TurnResumed", turn))
        turn.committed, turn.committed_words, turn.tail, turn.tail_words = segment.text, list(segment.words or []), "", []
        turn.language = segment.language or turn.language
        out.extend(self._start(turn))
        out.append(self._turn_info("EndOfTurn", turn, end=segment.end, trigger="manual" if turn.forced else "model"))
        self._turn_index += 1
        return out

    # ---------------------------------------------------------------- message bodies

    def _turn_info(self, event: str, turn: Turn, *, end: float | None = None, trigger: str | None = None) -> Send:
        words = turn.words
        if words:
            self._last_word_end = max(self._last_word_end, words[-1].end)
        window_end = self.audio.seconds if end is None else end
        body: dict[str, Any] = {
            "type": "TurnInfo",
            "request_id": self.request_id,
            "event": event,
            "turn_index": self._turn_index,
            "audio_window_start": round(turn.start, 3),
            "audio_window_end": round(max(window_end, turn.start), 3),
            "transcript": turn.text,
            "words": [
                {"word": w.word.strip(), "confidence": round(w.probability, 4), "start": round(w.start, 3), "end": round(w.end, 3)}
                for w in words
                if bare_word(w.word)
            ],
            "end_of_turn_confidence": round(self._confidence(event, trigger, window_end), 4),
        }
        if trigger is not None:
            body["trigger"] = trigger
        if self.options.language is None and turn.language:
            body["languages"] = [turn.language]
        turn.shown = turn.text
        return self._send(body)

    def _confidence(self, event: str, trigger: str | None, at: float) -> float:
        """How much of the pause that ends a turn has passed since the last word (1 at the end)."""
        if event == "EndOfTurn":
            return 1.0 if trigger == "manual" else max(self.options.eot_threshold, self._pause_fraction(self.audio.seconds))
        fraction = self._pause_fraction(at) if event != "StartOfTurn" else 0.0
        if event == "EagerEndOfTurn" and self.options.eager_eot_threshold is not None:
            return max(fraction, self.options.eager_eot_threshold)
        return min(fraction, self.options.eot_threshold - 0.01) if event in ("Update", "TurnResumed") else fraction

    def _pause_fraction(self, at: float) -> float:
        silence_s = turn_silence_ms(self.options.eot_threshold, self.options.eot_timeout_ms) / 1000
        return min(1.0, max(0.0, at - self._last_word_end) / max(silence_s, 1e-3))

    def _send(self, body: dict[str, Any]) -> Send:
        body["sequence_id"] = self._sequence
        self._sequence += 1
        return Send(json.dumps(body, ensure_ascii=False, separators=(",", ":")))

    def _warning(self, code: str, description: str) -> Send:
        return self._send({"type": "Warning", "request_id": self.request_id, "code": code, "description": description})

    def _fatal(self, code: str, description: str) -> Send:
        return self._send({"type": "Error", "code": code, "description": description})

    def _data_error(self, description: str) -> list[Action]:
        return [self._fatal("DATA-0000", description)]


def create(handshake: Handshake) -> FluxDialect:
    """Build the dialect for one ``/v2/listen`` upgrade, or refuse it with Deepgram's HTTP 400."""
    request_id = str(uuid.uuid4())
    options = parse_options(handshake.query, handshake.model_exists, request_id, handshake.query_lists)
    model = options.model or handshake.default_model
    multilingual = handshake.model_speaks(model, "fr")  # any language but English tells
    if options.language is None and not multilingual:
        raise reject(f"flux-general-multi detects the language, but the model {model!r} transcribes English only; start the server with a multilingual model such as base", request_id)
    if options.language is not None and not handshake.model_speaks(model, options.language):
        raise reject(p.unsupported_language_message(model, options.language), request_id)
    try:
        p.SessionConfig.model_validate({"model": handshake.default_model}).updated(native_config(options))
    except p.ProtocolError as exc:
        raise reject(f"Invalid query parameters: {exc.message}", request_id) from None
    key, subprotocol = api_key(handshake)
    return FluxDialect(options, request_id=request_id, api_key=key, subprotocol=subprotocol)


__all__ = ["FluxDialect", "FluxOptions", "create", "native_config", "parse_options", "turn_silence_ms"]
