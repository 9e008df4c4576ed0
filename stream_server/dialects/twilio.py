"""Twilio Media Streams (``/v1/twilio``) as a dialect: a live call's two legs as one session.

Twilio opens the WebSocket itself when a call runs ``<Start><Stream url="wss://...">`` and sends
JSON text frames: ``connected``, ``start`` (the call, its tracks, the audio format and the
``<Parameter>`` values as ``customParameters``), then ``media`` frames of 20 ms of base64 μ-law
per track, interleaved in time, with ``dtmf`` and ``mark`` among them, and ``stop`` when the call
or stream ends. ``docs/twilio.md`` is the user-facing description.

How a stream becomes a session:

* The ``inbound`` track is channel 0 and the ``outbound`` track channel 1 (a stream of one track
  is a one-channel session); the channels are named from the ``inbound_label``/``outbound_label``
  parameters (``caller``/``callee``). Twilio drops query strings, so every setting, the API key
  included, travels in ``customParameters``.
* Times stay true to the call: each track's audio is placed at its ``timestamp``; a gap (lost
  frames) becomes μ-law silence on that track, a frame that would move time backwards (late,
  duplicate) is dropped. Small jitter is tolerated without touching the audio.
* Twilio has no error message and expects nothing back from a transcription stream, so this
  dialect sends nothing: bad input is logged with the ``callSid`` and the call goes on; only an
  API key that fails (close 1008) or audio that is not μ-law (close 1003) ends it. Transcripts are
  read from the session hub under the ``callSid`` (``GET /v1/sessions/{callSid}/...``).
* ``stop`` flushes the session: every utterance is finalized before the socket closes.
* A ``dtmf`` (a key the caller pressed) is not audio, so it never reaches the core: the dialect
  queues a :class:`~stream_server.hub.Dtmf` (digit, channel, speaker, time on that leg), and the
  shell takes it with :meth:`TwilioDialect.call_events` after each message and hands it to the
  session hub, which sends it to subscribers and keeps it in the stored transcript.
"""

from __future__ import annotations

import base64
import binascii
import collections
import dataclasses
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from typing import Any

from stream_server import protocol as p
from stream_server.dialects.base import Action, Close, Handshake, HandshakeRejected
from stream_server.hub import Dtmf
from stream_server.redaction import names_from
from stream_server.settings import Settings, from_sources

log = logging.getLogger(__name__)

SAMPLE_RATE = 8000
SAMPLES_PER_MS = SAMPLE_RATE // 1000
FRAME_BYTES = 160  # one 20 ms Twilio frame of 8 kHz μ-law (one byte per sample)
SILENCE = b"\xff"  # μ-law encoding of 0 (0x7F, its negative twin, decodes to zero as well)
#: A frame may arrive up to this early or late against its track's clock without being moved:
#: less than one frame is jitter; a whole frame missing is a lost packet (filled with silence),
#: a whole frame behind is a duplicate or a late arrival (dropped).
JITTER_SAMPLES = FRAME_BYTES
#: A forward jump larger than this is not a lost packet but a broken timestamp: the track's clock
#: is re-based instead of filling minutes of silence into memory.
MAX_GAP_MS = 60_000
#: Media frames held while ``start`` has not arrived (about 2.5 s of both tracks), then dropped.
MAX_EARLY_MEDIA = 250

TRACK_CHANNELS = ("inbound", "outbound")
DEFAULT_LABELS = {"inbound": "caller", "outbound": "callee"}
LABEL_PARAMETERS = {"inbound": "inbound_label", "outbound": "outbound_label"}
MEDIA_FORMAT: dict[str, object] = {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1}
MAX_LABEL = 64  # the core's bound on channel labels
DTMF_DIGITS = frozenset("0123456789*#ABCD")  # the sixteen DTMF keys (A-D are rare but valid)

POLICY_VIOLATION = 1008  # a missing or unknown API key
UNSUPPORTED_DATA = 1003  # a media format other than 8 kHz μ-law


@dataclasses.dataclass(frozen=True)
class TwilioOptions:
    """What the dialect needs from the server's configuration."""

    api_keys: frozenset[str] = frozenset()  # non-empty: ``customParameters.api_key`` must be one
    default_model: str = "tiny.en"
    model_exists: Callable[[str], bool] = lambda name: False
    model_speaks: Callable[[str, str], bool] = p.speaks_by_name


@dataclasses.dataclass
class Track:
    """One leg of the call: which channel it feeds and how much audio it has given the core."""

    name: str
    channel: int
    written: int = 0  # samples of this track handed to the core (= its clock, in samples)
    offset: int = 0  # samples added to timestamps after a re-base (a broken timestamp jump)
    chunk: int = 0  # the last ``chunk`` number accepted


class TwilioDialect:
    """One Twilio Media Stream (one call, one or two tracks)."""

    name = "twilio"
    subprotocol: str | None = None
    idle_timeout_s: float | None = None  # Twilio sends a frame every 20 ms; the server default is plenty
    #: The API key arrives in ``start``, after the upgrade (Twilio sends no custom headers): the
    #: shell must not refuse the upgrade for want of one; ``_authorize`` checks it instead.
    api_key_after_upgrade = True

    def __init__(self, options: TwilioOptions | None = None) -> None:
        self.options = options or TwilioOptions()
        self.api_key: str | None = None  # learned from ``start``, checked there (see ``_authorize``)
        self.session_alias: str | None = None  # the callSid, once ``start`` is accepted
        self.call_sid: str | None = None
        self.stream_sid: str | None = None
        self.tracks: dict[str, Track] = {}
        self.dtmf: list[str] = []  # digits pressed, in order
        self._call_events: list[Dtmf] = []  # key presses the shell has not taken yet
        self._labels: dict[str, str] = {}  # track → speaker label, once ``start`` is accepted
        self._redact: list[str] = []  # customParameters.redact, once ``start`` is accepted
        self._started = False
        self._stopped = False
        self._last_sequence: int | None = None
        self._early: list[dict[str, Any]] = []
        self._problems: collections.Counter[str] = collections.Counter()

    # ---------------------------------------------------------------- logging

    @property
    def call(self) -> str:
        """How this call is named in the log: the callSid, or the streamSid before ``start``."""
        return self.call_sid or self.stream_sid or "call ?"

    def _warn(self, kind: str, message: str, *args: object) -> None:
        """Log one problem with the call id. The first of each kind is a warning; repeats (a broken
        client sends 50 frames a second) go to debug and are counted in the summary at ``stop``."""
        self._problems[kind] += 1
        level = logging.WARNING if self._problems[kind] == 1 else logging.DEBUG
        log.log(level, "twilio %s: " + message, self.call, *args)

    def problems(self) -> dict[str, int]:
        """Bad input seen so far, by kind (for the log summary and for tests)."""
        return dict(self._problems)

    # ---------------------------------------------------------------- client → server

    def initial_config(self) -> dict[str, object]:
        # Telephone audio from the start; the channels are known once ``start`` names the tracks.
        # Interim results feed agent-assist screens through the session hub.
        return {"input_audio_format": "g711_ulaw", "sample_rate": SAMPLE_RATE, "interim_results": True}

    def receive_bytes(self, data: bytes) -> list[Action]:
        self._warn("binary_frame", "binary frame of %d bytes ignored (Twilio sends JSON text frames)", len(data))
        return []

    def receive_text(self, text: str) -> list[Action]:
        try:
            message = p.loads_json(text)
        except (ValueError, RecursionError) as exc:
            self._warn("malformed_json", "message is not JSON (%s): %.80r", type(exc).__name__, text)
            return []
        if not isinstance(message, dict):
            self._warn("not_an_object", "message is not a JSON object: %.80r", text)
            return []
        event = message.get("event")
        if self._stopped:
            self._warn("after_stop", "%r after stop ignored", _shown(event))
            return []
        if not self._in_sequence(message, event):
            return []
        handler = self._handlers().get(event) if isinstance(event, str) else None
        if handler is None:
            self._warn("unknown_event", "unknown event %r ignored", _shown(event))
            return []
        return handler(message)

    def _handlers(self) -> dict[str, Callable[[dict[str, Any]], list[Action]]]:
        return {
            "connected": self._connected,
            "start": self._start,
            "media": self._media,
            "dtmf": self._dtmf,
            "mark": self._mark,
            "stop": self._stop,
        }

    def _in_sequence(self, message: dict[str, Any], event: object) -> bool:
        """``sequenceNumber`` counts every message after ``connected`` from "1". A number at or
        below the last one is a duplicate or out of order: dropped, except a ``stop`` (it ends the
        call whatever its number) and the first ``start`` (media that overtook it are held for
        it). A jump ahead means messages were lost: logged, processed."""
        raw = message.get("sequenceNumber")
        if raw is None:
            if event != "connected":
                self._warn("sequence_missing", "%r without sequenceNumber", _shown(event))
            return True
        number = _integer(raw)
        if number is None:
            self._warn("sequence_invalid", "sequenceNumber %.20r is not a number", raw)
            return True
        last = self._last_sequence
        if last is not None and number <= last:
            self._warn("sequence_order", "%r with sequenceNumber %d after %d: duplicate or out of order", _shown(event), number, last)
            return event == "stop" or (event == "start" and not self._started)
        if last is not None and number > last + 1:
            self._warn("sequence_gap", "sequenceNumber jumped from %d to %d: %d messages lost", last, number, number - last - 1)
        self._last_sequence = number
        return True

    def _connected(self, message: dict[str, Any]) -> list[Action]:
        if message.get("protocol") != "Call":
            self._warn("connected_protocol", "connected with protocol %.20r (Twilio sends 'Call')", message.get("protocol"))
        return []

    # ---------------------------------------------------------------- start

    def _start(self, message: dict[str, Any]) -> list[Action]:
        start = message.get("start")
        if not isinstance(start, dict):
            self._warn("start_invalid", "start without a start object ignored")
            return []
        if self._started:
            self._warn("second_start", "second start (streamSid %.40r) ignored; the stream keeps its first configuration", start.get("streamSid"))
            return []
        self.stream_sid = _text(start.get("streamSid")) or _text(message.get("streamSid"))
        self.call_sid = _text(start.get("callSid"))
        if self.call_sid is None:
            self._warn("start_call_sid", "start without a callSid: transcripts are found under the session id only")
        refusal = self._check_media_format(start.get("mediaFormat"))
        if refusal is not None:
            return [refusal]
        parameters = self._parameters(start.get("customParameters"))
        refusal = self._authorize(parameters) or self._check_redact(parameters)
        if refusal is not None:
            return [refusal]
        names = self._track_names(start.get("tracks"))
        self.tracks = {name: Track(name, channel) for channel, name in enumerate(names)}
        self._labels = {name: self._label(name, parameters) for name in names}
        self._started = True
        self.session_alias = self.call_sid
        log.info("twilio %s: stream %s started, tracks %s", self.call, self.stream_sid, ", ".join(names))
        update: list[Action] = [p.SessionUpdate(self._session_changes(names, parameters))]
        early, self._early = self._early, []
        return update + [action for held in early for action in self._media(held)]

    def _check_media_format(self, media_format: object) -> Close | None:
        """Twilio streams 8 kHz mono μ-law and nothing else; anything else would be transcribed
        as noise, so the stream is refused rather than silently garbled."""
        if media_format is None:
            self._warn("media_format_missing", "start without mediaFormat: assuming %s", MEDIA_FORMAT)
            return None
        if isinstance(media_format, dict) and all(_same(media_format.get(k), v) for k, v in MEDIA_FORMAT.items()):
            return None
        log.warning("twilio %s: unsupported mediaFormat %.120r; closing (only %s is understood)", self.call, media_format, MEDIA_FORMAT)
        return Close(UNSUPPORTED_DATA, "unsupported mediaFormat: only audio/x-mulaw, 8000 Hz, 1 channel")

    def _parameters(self, raw: object) -> dict[str, str]:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self._warn("parameters_invalid", "customParameters is not an object; ignored")
            return {}
        return {str(k): v for k, v in raw.items() if isinstance(v, str)}

    def _authorize(self, parameters: Mapping[str, str]) -> Close | None:
        """With API keys configured, ``customParameters.api_key`` must be one of them. Twilio
        cannot send headers or query strings, so the key is only known now, after the upgrade;
        a missing or unknown key ends the stream with close code 1008 (Twilio has no error
        message to carry it) and is logged with the callSid."""
        key = parameters.get("api_key")
        self.api_key = key
        if not self.options.api_keys or key in self.options.api_keys:
            return None
        reason = "missing" if key is None else "unknown"
        log.warning("twilio %s: %s API key in customParameters.api_key; closing with %d", self.call, reason, POLICY_VIOLATION)
        return Close(POLICY_VIOLATION, f"{reason} API key")

    def _check_redact(self, parameters: Mapping[str, str]) -> Close | None:
        """``customParameters.redact`` (``pci,ssn``) must name redactions this server does: a
        call whose flow asks for one it does not (a typo, ``pii``) is ended with 1008 rather than
        transcribed unredacted, and logged with the callSid."""
        try:
            self._redact = names_from([parameters.get("redact", "")])
        except ValueError as exc:
            log.warning("twilio %s: customParameters.redact: %s; closing with %d", self.call, exc, POLICY_VIOLATION)
            return Close(POLICY_VIOLATION, "unsupported redact")
        return None

    def _track_names(self, raw: object) -> list[str]:
        """The tracks in channel order: ``inbound`` first. Unknown names are logged and left out;
        no usable track means Twilio's default, ``inbound``."""
        names = raw if isinstance(raw, list) else []
        known = [name for name in TRACK_CHANNELS if name in names]
        unknown = [name for name in names if name not in TRACK_CHANNELS]
        if unknown:
            self._warn("unknown_track", "start lists unknown tracks %.80r; ignored", unknown)
        if not known:
            self._warn("tracks_missing", "start names no inbound or outbound track (%.80r): assuming inbound", raw)
            known = ["inbound"]
        return known

    def _session_changes(self, names: list[str], parameters: Mapping[str, str]) -> dict[str, Any]:
        changes: dict[str, Any] = {
            "input_audio_format": "g711_ulaw",
            "sample_rate": SAMPLE_RATE,
            "channels": len(names),
            "channel_labels": [self._labels[name] for name in names],
        }
        if self._redact:
            changes["redact"] = self._redact
        model = parameters.get("model", "").strip()
        if model:
            if self.options.model_exists(model):
                changes["model"] = model
            else:
                log.info("twilio %s: model %.60r is not on this server; using %s", self.call, model, self.options.default_model)
        chosen = changes.get("model", self.options.default_model)
        language = parameters.get("language", "").strip()
        if language:
            # A refused language would make the core refuse the whole update (the call's format
            # and legs with it), so it is checked here and left out instead.
            if not p.valid_language(language):
                self._warn("language_invalid", "language %.40r is not an ISO-639-1 code or locale; the server default is used", language)
            elif not self.options.model_speaks(chosen, language):
                self._warn("language_unsupported", "language %.40r: %s; English is used", language,
                           p.unsupported_language_message(chosen, language))
            else:
                changes["language"] = language
        silence = parameters.get("silence_duration_ms", "").strip()
        if silence:
            # The turn end (segment) after this much silence; the words themselves are final at
            # the pause (~0.2 s) whatever it is. Agent-assist screens may want less.
            try:
                # Plain decimal digits only (no sign, "_" or "3e2"); int() refuses "²" and more than
                # 4300 digits with ValueError. The range is the core's own.
                ms = p.TurnDetection(silence_duration_ms=int(silence) if silence.isdecimal() else -1).silence_duration_ms
                changes["turn_detection"] = {"silence_duration_ms": ms}
            except ValueError:  # pydantic's ValidationError is one too
                self._warn("silence_invalid", "silence_duration_ms %.40r is not a turn_detection silence in ms; the default is used", silence)
        return changes

    def _label(self, track: str, parameters: Mapping[str, str]) -> str:
        label = parameters.get(LABEL_PARAMETERS[track], "").strip()
        if not label:
            return DEFAULT_LABELS[track]
        if len(label) > MAX_LABEL:
            self._warn("label_invalid", "%s longer than %d characters; using %r", LABEL_PARAMETERS[track], MAX_LABEL, DEFAULT_LABELS[track])
            return DEFAULT_LABELS[track]
        return label

    # ---------------------------------------------------------------- media

    def _media(self, message: dict[str, Any]) -> list[Action]:
        media = message.get("media")
        if not isinstance(media, dict):
            self._warn("media_invalid", "media without a media object ignored")
            return []
        if not self._started:
            return self._hold_early(message)
        name = media.get("track")
        track = self.tracks.get(name) if isinstance(name, str) else None
        if track is None:
            self._warn("unknown_track", "media on track %.40r, which this stream does not carry (%s); dropped", name, ", ".join(self.tracks))
            return []
        audio = self._payload(media.get("payload"))
        if audio is None or not self._next_chunk(track, media.get("chunk")):
            return []
        return self._place(track, audio, media.get("timestamp"))

    def _hold_early(self, message: dict[str, Any]) -> list[Action]:
        """Media before ``start``: the channel it belongs to is not known yet. Held (bounded) and
        replayed once ``start`` arrives, so a reordered start loses no audio."""
        if len(self._early) >= MAX_EARLY_MEDIA:
            self._warn("media_before_start", "media before start beyond %d held frames dropped", MAX_EARLY_MEDIA)
            return []
        self._warn("media_before_start", "media before start held until start arrives")
        self._early.append(message)
        return []

    def _payload(self, raw: object) -> bytes | None:
        if not isinstance(raw, str):
            self._warn("payload_invalid", "media payload is not a string; dropped")
            return None
        try:
            audio = base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            self._warn("payload_base64", "media payload is not base64 (%d characters); dropped", len(raw))
            return None
        if not audio:
            self._warn("payload_empty", "empty media payload ignored")
            return None
        if len(audio) % FRAME_BYTES:
            # Every byte is a μ-law sample, so the audio is used; Twilio sends whole 20 ms frames.
            self._warn("payload_partial", "media payload of %d bytes is not whole 20 ms frames of %d bytes; used as is", len(audio), FRAME_BYTES)
        return audio

    def _next_chunk(self, track: Track, raw: object) -> bool:
        """``chunk`` counts a track's frames from "1"; a number not above the last accepted one is
        a repeat of audio already placed."""
        if raw is None:
            return True
        number = _integer(raw)
        if number is None:
            self._warn("chunk_invalid", "chunk %.20r is not a number", raw)
            return True
        if number <= track.chunk:
            self._warn("chunk_repeat", "%s chunk %d after chunk %d: duplicate or late; dropped", track.name, number, track.chunk)
            return False
        track.chunk = number
        return True

    def _place(self, track: Track, audio: bytes, raw_timestamp: object) -> list[Action]:
        """Put a frame where its ``timestamp`` says on the track's clock (8 samples per ms):
        a whole frame or more ahead, the gap is filled with silence; a whole frame or more behind,
        it is late or a duplicate and dropped; within one frame either way, jitter: appended."""
        timestamp = _integer(raw_timestamp)
        if timestamp is None:
            self._warn("timestamp_invalid", "%s media without a usable timestamp (%.20r): appended in arrival order", track.name, raw_timestamp)
            return self._append(track, b"", audio)
        target = timestamp * SAMPLES_PER_MS + track.offset
        gap = target - track.written
        if gap <= -JITTER_SAMPLES:
            self._warn("media_late", "%s media at %d ms is %d ms behind the track: duplicate or late; dropped", track.name, timestamp, -gap // SAMPLES_PER_MS)
            return []
        if gap > MAX_GAP_MS * SAMPLES_PER_MS:
            self._warn("timestamp_jump", "%s timestamp jumped %d s ahead; track clock re-based, no silence inserted", track.name, gap // SAMPLE_RATE)
            track.offset -= gap
            return self._append(track, b"", audio)
        if gap >= JITTER_SAMPLES:
            log.debug("twilio %s: %s gap of %d ms filled with silence", self.call, track.name, gap // SAMPLES_PER_MS)
            return self._append(track, SILENCE * gap, audio)
        return self._append(track, b"", audio)

    def _append(self, track: Track, fill: bytes, audio: bytes) -> list[Action]:
        track.written += len(fill) + len(audio)
        return [p.AudioAppend(fill + audio, channel=track.channel)]

    # ---------------------------------------------------------------- dtmf, mark, stop

    def _dtmf(self, message: dict[str, Any]) -> list[Action]:
        """A key pressed on the call: a ``call.dtmf`` event for the session hub (see
        :meth:`call_events`), placed at the time its track has reached."""
        dtmf = message.get("dtmf")
        digit = dtmf.get("digit") if isinstance(dtmf, dict) else None
        if not isinstance(digit, str) or digit.upper() not in DTMF_DIGITS:
            self._warn("dtmf_invalid", "dtmf without a valid digit (%.20r) ignored", digit)
            return []
        if not self._started:
            self._warn("dtmf_before_start", "dtmf %s before start ignored (its call is not known yet)", digit)
            return []
        assert isinstance(dtmf, dict)
        track = self._dtmf_track(dtmf.get("track"))
        digit = digit.upper()
        self.dtmf.append(digit)
        time_s = track.written / SAMPLE_RATE
        log.info("twilio %s: DTMF %s on %s at %.2f s", self.call, digit, track.name, time_s)
        self._call_events.append(Dtmf(digit, track.channel, self._labels.get(track.name), time_s))
        return []

    def _dtmf_track(self, raw: object) -> Track:
        """The leg a key was pressed on: Twilio names it ``inbound_track`` (DTMF is detected on
        the caller's side); a missing or unknown one is taken as the first track, logged."""
        name = raw.removesuffix("_track") if isinstance(raw, str) else None
        track = self.tracks.get(name) if name is not None else None
        if track is None:
            track = next(iter(self.tracks.values()))
            self._warn("dtmf_track", "dtmf on track %.40r, which this stream does not carry; put on %s", raw, track.name)
        return track

    def call_events(self) -> list[Dtmf]:
        """Key presses since the last call, for the session hub (the shell takes them after every
        client message): not audio, so the core never sees them."""
        events, self._call_events = self._call_events, []
        return events

    def _mark(self, message: dict[str, Any]) -> list[Action]:
        # Twilio sends ``mark`` back for marks the server sent on a bidirectional stream; this
        # server sends none, so one arriving is noted and otherwise meaningless.
        mark = message.get("mark")
        log.debug("twilio %s: mark %.60r", self.call, mark.get("name") if isinstance(mark, dict) else mark)
        return []

    def _stop(self, message: dict[str, Any]) -> list[Action]:
        """The call or the stream ended: flush the session (every utterance is finalized, then
        ``transcript.text.done``); the shell closes the socket once that is out."""
        self._stopped = True
        if self._early:
            self._warn("media_before_start", "%d media frames held for a start that never came dropped", len(self._early))
            self._early = []
        if self._problems:
            log.warning("twilio %s: stream stopped; bad input seen: %s", self.call, dict(self._problems))
        else:
            log.info("twilio %s: stream stopped", self.call)
        return [p.SessionClose()]

    # ---------------------------------------------------------------- server → client

    def render(self, event: p.ServerEvent) -> list[Action]:
        """Nothing goes back to Twilio: a ``<Start><Stream>`` fork only listens, and transcripts
        are delivered through the session hub. Core errors are logged with the call id."""
        if isinstance(event, p.Error):
            return self.error(event)
        return []

    def error(self, event: p.Error) -> list[Action]:
        log.warning("twilio %s: %s (%s)", self.call, event.error.message, event.error.code)
        return []


# --------------------------------------------------------------------------------------------
# Small parsers
# --------------------------------------------------------------------------------------------


def _integer(raw: object) -> int | None:
    """Twilio sends numbers as decimal strings; a plain JSON integer is taken too."""
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw if raw >= 0 else None
    if isinstance(raw, str) and raw.isascii() and raw.isdigit():
        try:
            return int(raw)
        except ValueError:  # more digits than int() converts (4300): no number Twilio sends
            return None
    return None


def _shown(value: object) -> str:
    """A client-sent value as a log line shows it: a string cut to 40 characters, anything else by
    its type alone (its repr could be megabytes, or nested past the recursion limit, which makes
    the logging call itself fail)."""
    return value[:40] if isinstance(value, str) else f"<{type(value).__name__}>"


def _text(raw: object) -> str | None:
    return raw if isinstance(raw, str) and raw else None


def _same(value: object, expected: object) -> bool:
    if isinstance(expected, int):
        return _integer(value) == expected
    return isinstance(value, str) and value.lower() == str(expected)


# --------------------------------------------------------------------------------------------
# The upgrade: X-Twilio-Signature
# --------------------------------------------------------------------------------------------


def signed_urls(handshake: Handshake, public_url: str = "") -> list[str]:
    """The URLs Twilio may have signed: ``public_url`` (``--twilio-public-url``, the ``<Stream>``
    URL exactly as the TwiML has it) when one is configured, for a proxy that rewrites the path or
    host; otherwise the ``wss://`` URL rebuilt from the host the request arrived for (or the one a
    reverse proxy forwarded) and the path."""
    if public_url:
        return [public_url]
    query = urllib.parse.urlencode(dict(handshake.query))
    tail = handshake.path + (f"?{query}" if query else "")
    hosts = [handshake.headers.get("x-forwarded-host", "").split(",")[0].strip(), handshake.headers.get("host", "")]
    return [f"wss://{host}{tail}" for host in dict.fromkeys(h for h in hosts if h)]


def verify_signature(handshake: Handshake, auth_token: str, public_url: str = "") -> None:
    """Raise :class:`HandshakeRejected` (403) unless ``X-Twilio-Signature`` is Twilio's HMAC of
    the stream URL (:func:`signed_urls`) under ``auth_token`` (the ``twilio`` package's own
    validator)."""
    from twilio.request_validator import RequestValidator, get_signature_algorithm

    signature = handshake.headers.get("x-twilio-signature", "")
    if not signature:
        raise _forbidden("missing X-Twilio-Signature header")
    validator = RequestValidator(auth_token)
    algorithm = get_signature_algorithm(handshake.headers.get("x-twilio-webhooks-signature-settings"))
    urls = signed_urls(handshake, public_url)
    for url in urls:
        if validator.validate(url, {}, signature, algorithm=algorithm):
            return
    log.warning("twilio: X-Twilio-Signature does not match %s; upgrade refused", " or ".join(urls) or "(no Host)")
    raise _forbidden("X-Twilio-Signature does not match this URL and the configured auth token")


def _forbidden(message: str) -> HandshakeRejected:
    return HandshakeRejected(403, {"error": {"type": "invalid_request_error", "code": "invalid_signature", "message": message}})


def server_settings(handshake: Handshake) -> Settings:
    """The server's settings as the shell hands them over; a handshake built without a server
    (a test, a tool) gets the environment's (``STREAM_SERVER_*``), never nothing, so an auth
    token set there is still enforced."""
    return handshake.settings if handshake.settings is not None else from_sources()


def create(handshake: Handshake, *, settings: Settings | None = None) -> TwilioDialect:
    """Build the dialect for one ``/v1/twilio`` upgrade; refuse it (403) when a Twilio auth token
    is configured and the request is not signed with it."""
    settings = settings or server_settings(handshake)
    if settings.twilio_auth_token:
        verify_signature(handshake, settings.twilio_auth_token, settings.twilio_public_url.strip())
    options = TwilioOptions(
        api_keys=settings.api_key_set(),
        default_model=handshake.default_model,
        model_exists=handshake.model_exists,
        model_speaks=handshake.model_speaks,
    )
    return TwilioDialect(options)


__all__ = ["TwilioDialect", "TwilioOptions", "create", "signed_urls", "verify_signature"]
