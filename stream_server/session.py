"""The Sans-I/O session core: audio and client messages in, events and decode requests out.

Nothing here touches a socket, a thread or a clock. Time is audio time (samples at 16 kHz since the
session began). The runner (``runner.py``) moves bytes in, submits the :class:`DecodeTicket`
outputs to the scheduler and feeds results back with :meth:`Session.receive_decode_result`.

This module orchestrates: audio intake, VAD framing, channels, the utterance lifecycle, final
ordering and retries. The parts it orchestrates each live in their own module:

* ``state.py`` — session / utterance / ticket states and the one table of their transitions;
* ``policy.py`` — the commit decisions (which words become final), as pure functions;
* ``planner.py`` — when to decode and what (window, forced prefix, prompt), and :class:`SessionLimits`;
* ``transcript.py`` — how committed words read on the wire (deltas, segments, done).

Commit policy, per utterance:

* While speech goes on, the open utterance is re-decoded each time ``interim_step`` of new audio
  has arrived and the previous decode came back (one decode in flight per channel, so a loaded
  server degrades to longer steps instead of a growing queue). Words that two successive
  hypotheses agree on are committed and sent as deltas; the committed tokens are forced as the
  decoder's prefix from then on, so committed text is never contradicted.
* When the speaker pauses for ``pause_decode_ms`` a decode is started at once, and once the
  pause has lasted ``stable_silence_ms`` (shorter than the turn's ``silence_duration_ms``) its
  words that end before the pause are committed: a pause is evidence the words before it are
  complete, and waiting for a second agreeing hypothesis would add a whole decode to the latency
  of the last word. A result back sooner waits for that; if the speaker goes on first, it is an
  ordinary interim. The rest of the pause is not decoded again.
* At the end of the utterance, the rest is committed from a last decode, unless the last interim
  decode already heard the pause, in which case its hypothesis is the final one. The last decode
  runs without the forced prefix and keeps what follows the committed words it repeats; only one
  that contradicts them is run again, forced (a forced boundary can make the decoder mishear the
  next word: "And so | am I fellow" where the whole window says "And so, my fellow").
* An utterance longer than ``max_utterance_s`` is split at the end of its last committed word.
* A short turn that starts soon after the channel's previous one is decoded, in its pause and
  final decodes, as that turn's continuation: the window starts at its last words, forced as the
  prefix (``SessionLimits.carry_gap_ms``); a turn of a second decoded alone is where tiny models
  guess ("S not" for JFK's "ask not").
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from stream_server import protocol as p
from stream_server import transcript as render
from stream_server.audio import MODEL_RATE, AudioInput, split_channels
from stream_server.buffer import SampleBuffer
from stream_server.crosstalk import FLOOR_DB, CrosstalkGate, frame_levels
from stream_server.decoding import (
    LANGUAGE_SETTLE_PROBABILITY,
    LANGUAGE_SETTLE_S,
    DecodeFailure,
    DecodeRequest,
    DecodeResult,
    FailureKind,
    Word,
    language_settled,
)
from stream_server.planner import (
    NARROWBAND_RATE,
    SessionLimits,
    carried,
    carry_audio_from,
    carry_of,
    carry_start,
    interim_due,
    plan_decode,
    token_ids,
)
from stream_server.policy import (
    MS,
    absolute,
    after_agreeing_prefix,
    continued_sentence_case,
    heard_the_pause,
    interim_commit_count,
    mean_logprob,
    read_past,
    surer_reading,
    unread_speech,
    within_turn,
    without_trailing_punctuation,
    words_starting_before,
)
from stream_server.redaction import HeldRun, Redactor, ends_in_number, kinds_of, without_placeholders
from stream_server.state import SessionState, TicketState, UtteranceState, transition
from stream_server.transcript import Transcript
from stream_server.vad import (
    FRAME,
    FreshListener,
    SpeechEnd,
    SpeechStart,
    TurnSegmenter,
    VadModel,
    VadParams,
    level_onset,
    noise_floor,
    quiet_lead,
)

__all__ = ["MS", "CloseConnection", "DecodeTicket", "Output", "Session", "SessionLimits", "Utterance"]


@dataclasses.dataclass(frozen=True)
class CloseConnection:
    code: int
    reason: str = ""


@dataclasses.dataclass(eq=False)
class DecodeTicket:
    """A decode request plus what the session needs to interpret its result."""

    request: DecodeRequest
    channel: int
    utterance: Utterance
    state: TicketState
    window_start: int  # absolute sample of request.audio[0]
    window_end: int
    pause_start: int | None  # start of a pause that the window ends in, if any
    # Finals are applied strictly in audio order; an early result waits (RESOLVED) for its turn.
    words: list[Word] = dataclasses.field(default_factory=list)
    attempt: int = 1
    committed: int = 0  # words the utterance had committed when this was submitted
    # A final planned before the turn its context ends with is final (``final_context_lag``):
    # queued in order, sent to the decoder once that turn is final.
    waiting_for_context: bool = False
    forced: tuple[Word, ...] = ()  # the committed words the planner forced as the prefix
    # A final sent without that prefix (``SessionLimits.final_agreement``): a result that does not
    # repeat ``forced`` is decoded again with it.
    unforced: bool = False
    # Such a result's words past the committed ones (``policy.read_past``), kept in case the
    # forced readings stop early: forced on from "0, 0, 0," tiny.en read nothing more of a card
    # and the sentence after it, where the unforced reading (which skipped zeros) read on.
    unforced_rest: list[Word] | None = None
    carried: int = 0  # how many of ``forced`` are the previous turn's words (a continuation)
    # A pause decode: whether its pause has lasted ``stable_silence_ms`` (its words before the
    # pause may be committed). An interim's result until it is applied: one that decoded a pause
    # and came back sooner is held here, the ticket staying in flight, until the pause has
    # lasted or the speaker went on first.
    pause_stable: bool = False
    pending_result: DecodeResult | None = None
    # A promoted hypothesis's own final decode, planned when it was promoted (the buffer may lose
    # the audio before its result is back), sent if its words are not sure enough
    # (``SessionLimits.recheck_logprob``); and on such a final, the reading it competes with.
    recheck: DecodeTicket | None = None
    rival: list[Word] | None = None
    # A final's result unsure of its language while the channel's other finals, which may settle
    # it, are still out (``Session._waits_for_language``): kept here, the ticket still pending.
    parked: DecodeResult | None = None

    @property
    def final(self) -> bool:
        """Whether this decode gives its utterance's last words (submitted so, or promoted)."""
        return self.state is not TicketState.INTERIM

    @property
    def resolved(self) -> bool:
        return self.state is TicketState.RESOLVED

    def promote(self) -> None:
        self.state = transition(self.state, TicketState.FINAL)

    def resolve(self, words: list[Word] | None = None) -> None:
        self.state = transition(self.state, TicketState.RESOLVED)
        if words is not None:
            self.words = words


Output = p.ServerEvent | DecodeTicket | CloseConnection


@dataclasses.dataclass(eq=False)
class Utterance:
    item_id: str
    serial: int
    start: int  # first sample of the utterance's audio (with prefix padding)
    onset: int  # first speech sample
    end: int | None = None  # set when it ends
    state: UtteranceState = UtteranceState.OPEN
    committed: list[Word] = dataclasses.field(default_factory=list)  # absolute times
    # What its deltas spelled: ``committed`` with redacted runs replaced (``redaction.py``), less
    # the run of numbers ``number_run`` holds back until it ends.
    shown: list[Word] = dataclasses.field(default_factory=list)
    number_run: HeldRun = dataclasses.field(default_factory=lambda: HeldRun(Redactor(frozenset())))
    tail: list[Word] = dataclasses.field(default_factory=list)  # last uncommitted hypothesis
    last_window_end: int = 0  # end of the last interim window submitted
    tail_window_end: int = 0  # end of the window whose hypothesis ``tail`` is
    no_speech_prob: float = 0.0
    language: str | None = None  # settled detected language, forced on its later decodes
    detected: str | None = None  # the language of its latest decode: what its segment reports
    interim_sent: str = ""
    # A decode of it as the last turn's continuation gave it no words while its own decodes heard
    # some (tiny.en, forced to go on from "... fell in americans", said nothing for "ask not"):
    # its later decodes are its own.
    carry_refused: bool = False
    # The pause whose decode held back words that the hypothesis before read otherwise (a short
    # turn's dissent, ``policy._settled_at_pause``): they are committed as heard once that pause
    # lasts ``SessionLimits.held_commit_ms`` (None: nothing held).
    held_pause: int | None = None
    # Its held words were too unsure to commit at that pause (``SessionLimits.held_sure_logprob``):
    # the turn's end decodes them again, as a recheck, instead of making them final as heard.
    held_unsure: bool = False

    def end_at(self, sample: int) -> None:
        """The turn ended at ``sample``: the audio is fixed, the last words are on their way."""
        self.state = transition(self.state, UtteranceState.ENDED)
        self.end = sample

    def finish(self) -> None:
        self.state = transition(self.state, UtteranceState.FINAL)

    def text(self) -> str:
        return "".join(w.text for w in self.committed)


#: Audio kept before the frame where a turn's level rose (``Session._turn_start``).
LEVEL_ONSET_LEAD_MS = 100
#: Frames a fresh Silero state hears before the frame that made it listen (``vad.FreshListener``):
#: 0.26 s, within the quiet before a word (reaching 1 s back into the words before, it heard
#: "four" faintly again).
FRESH_PREROLL_FRAMES = 8


class Channel:
    """One audio channel: its buffer, VAD state and the utterance pipeline."""

    def __init__(self, index: int, vad: VadModel, params: VadParams | None, *, fresh_listen_prob: float = 0.0) -> None:
        self.index = index
        self.buffer = SampleBuffer()
        self.vad = vad
        self.vad_state = vad.new_state()
        self.listener = FreshListener(vad, trigger=fresh_listen_prob, preroll=FRESH_PREROLL_FRAMES)
        # The level of the channel's noise before its current turn's onset (``vad.noise_floor``;
        # None: not measured): the silence that ends the turn began where the level fell to it.
        self.noise_floor: float | None = None
        self.vad_pos = 0  # next frame's first sample
        self.probs: list[float] = []  # per frame since probs_start
        self.levels: list[float] = []  # dBFS per frame since probs_start (``vad.level_onset``)
        self.probs_start = 0
        self.segmenter = TurnSegmenter(params) if params else None
        self.utterance: Utterance | None = None
        self.inflight: DecodeTicket | None = None
        # Audio the VAD judged while the last interim decode was out: its round trip on the audio
        # clock, the load signal that paces the next one (``SessionLimits.interim_pace``).
        self.round_trip = 0
        self.finals: list[DecodeTicket] = []  # awaiting results, in audio order
        self.pause_decoded: int | None = None  # pause start that already got its early decode
        self.held: list[tuple[Utterance, p.ServerEvent]] = []  # see Session._in_order
        self.consumed = 0  # audio before this belongs to utterances already closed
        self.transcript = Transcript()  # this channel's committed text (its deltas spell it)
        self.turn_ends: list[int] = []  # len(transcript.text) after each finished turn, in order
        self.language: str | None = None  # the last language an utterance settled on: the next one's hint
        # The last finished turn's last words, which a short turn after it continues from
        # (``SessionLimits.carry_gap_ms``); their audio is kept while that can still happen.
        self.carry: tuple[Word, ...] = ()
        # Where the last closed turn's speech ended, and the audio of it kept for a continuation
        # (None: this session never carries): its final, which sets ``carry``, may come back
        # after the trim that would have dropped that audio.
        self.carry_turn_end = 0
        self.carry_keep: int | None = None

    def frame_index(self, sample: int) -> int:
        """The index in ``probs`` and ``levels`` of the frame that starts at ``sample``."""
        return (sample - self.probs_start) // FRAME

    def measured_frame(self, sample: int) -> int | None:
        """:meth:`frame_index` of ``sample`` when ``levels`` holds frames before it (None: the
        channel measures no levels, or none before it are kept)."""
        index = self.frame_index(sample)
        return index if 0 < index <= len(self.levels) else None


class Session:
    def __init__(
        self,
        session_id: str,
        *,
        config: p.SessionConfig,
        vad: VadModel,
        limits: SessionLimits = SessionLimits(),
        model_exists: Callable[[str], bool] = lambda name: True,
        model_speaks: Callable[[str, str], bool] = p.speaks_by_name,
        redact_floor: Iterable[str] = (),
    ) -> None:
        self.id = session_id
        # The server's ``--redact``: kinds every session redacts, whatever its client asks.
        self._redact_floor = frozenset(redact_floor)
        config = self._with_floor(config)
        self.config = config
        self._redactor = Redactor(kinds_of(config.redact))
        self.limits = limits
        self._model_exists = model_exists
        self._model_speaks = model_speaks
        self._vad = vad
        # The intake step the runner asks for while the server is behind (``set_load_intake_step_ms``).
        self._load_step_ms = 0
        self._audio_in = self._audio_input(config, config.channels)
        # Mono inputs for transports that send each channel separately (Twilio's two tracks).
        self._channel_in: dict[int, AudioInput] = {}
        self._channels = [Channel(c, vad, self._vad_params(), fresh_listen_prob=self.limits.fresh_listen_prob) for c in range(config.channels)]
        # Which frames of a channel are another channel's speech heard faintly (line echo).
        self._crosstalk = CrosstalkGate(config.channels, limits.crosstalk_margin_db)
        self._item_channel: dict[str, int] = {}  # open items -> channel, to stamp their events
        self._segments: list[p.TranscriptSegment] = []  # the conversation so far, for ``done``
        self._items = itertools.count(1)
        self._events = itertools.count(1)
        self._received = 0
        self._state = SessionState.OPEN
        self._previous_model = config.model
        # Outputs, each on its own queue (as ``websockets``' protocol does): the runner drains
        # them after every input, so no caller routes a mixed list by type.
        self._events_out: list[p.ServerEvent] = []
        self._decodes_out: list[DecodeTicket] = []
        self._promotions_out: list[DecodeTicket] = []
        self._close_out: CloseConnection | None = None
        self._close_taken = False

    @property
    def state(self) -> SessionState:
        return self._state

    def _with_floor(self, config: p.SessionConfig) -> p.SessionConfig:
        """``config`` with the server's redaction floor added to what it asks for."""
        missing = self._redact_floor - set(config.redact)
        return config.model_copy(update={"redact": [*config.redact, *sorted(missing)]}) if missing else config

    @property
    def closing(self) -> bool:
        """No more input is accepted (closing or closed)."""
        return self._state is not SessionState.OPEN

    @property
    def closed(self) -> bool:
        """``transcript.text.done`` and the close request have been produced."""
        return self._state is SessionState.CLOSED

    @property
    def backlogged(self) -> bool:
        """Some channel has ``max_pending_finals`` turns waiting for their finals. A shell that can
        stop reading should, until this clears: audio sent faster than real time then keeps its
        turns as the VAD ends them, where reading on would make further turns run on into one
        another (``_on_frame`` defers their ends so pending work stays bounded)."""
        return any(self._at_pending_bound(ch) for ch in self._channels)

    def _at_pending_bound(self, ch: Channel) -> bool:
        """``ch`` has ``max_pending_finals`` finals out: it queues no more (turn ends are deferred,
        commits refused)."""
        return len(ch.finals) >= self.limits.max_pending_finals

    # ---------------------------------------------------------------- outputs

    def events_to_send(self) -> list[p.ServerEvent]:
        """Events produced since the last call, in the order the client must see them."""
        events, self._events_out = self._events_out, []
        return events

    def decodes_to_submit(self) -> list[DecodeTicket]:
        """New decode requests for the scheduler, oldest first."""
        decodes, self._decodes_out = self._decodes_out, []
        return decodes

    def decodes_to_promote(self) -> list[DecodeTicket]:
        """Interim decodes already submitted whose result became an utterance's final one: the
        scheduler should now treat them as finals (never shed, served first)."""
        promoted, self._promotions_out = self._promotions_out, []
        return promoted

    def close_expected(self) -> CloseConnection | None:
        """The close the session asks for (once, after its last event), or None."""
        if self._close_out is None or self._close_taken:
            return None
        self._close_taken = True
        return self._close_out

    def _emit(self, outputs: list[Output]) -> None:
        """The one place that sorts the core's outputs onto their queues."""
        for out in outputs:
            if isinstance(out, DecodeTicket):
                self._decodes_out.append(out)
            elif isinstance(out, CloseConnection):
                self._close_out = out
            else:
                self._events_out.append(self._stamp(out))

    def _stamp(self, event: p.ServerEvent) -> p.ServerEvent:
        """Utterance events carry their channel and its speaker label: stamped here, once,
        rather than at each of the places that create them."""
        if not isinstance(event, p.CHANNEL_EVENTS):
            return event
        channel = self._item_channel.get(event.item_id, 0)
        if isinstance(event, p.TranscriptSegment):
            self._item_channel.pop(event.item_id, None)  # an utterance's last event
        return dataclasses.replace(event, channel=channel, speaker=self.config.speaker(channel))

    # ---------------------------------------------------------------- inputs

    def start(self) -> None:
        """Announce the session (``session.created``)."""
        self._emit([p.SessionCreated(self._session_view())])

    def receive_bytes(self, data: bytes) -> None:
        """Audio in the session's input format (any length; partial samples are kept)."""
        self._emit(self._receive_bytes(data))

    def receive_text(self, text: str) -> None:
        """A native JSON client message (tests and the native dialect's fallback)."""
        self._emit(self._receive_text(text))

    def receive_message(self, message: p.ClientMessage) -> None:
        """One typed client command: what every dialect hands the core."""
        self._emit(self._receive_message(message))

    def close(self) -> None:
        """Flush: finalize every open utterance, then done + close once all finals are back."""
        self._emit(self._close())

    def receive_decode_result(self, ticket: DecodeTicket, result: DecodeResult) -> None:
        self._emit(self._receive_decode_result(ticket, result))

    def receive_decode_failure(self, ticket: DecodeTicket, failure: DecodeFailure) -> None:
        self._emit(self._receive_decode_failure(ticket, failure))

    def _receive_bytes(self, data: bytes, channel: int | None = None) -> list[Output]:
        """Interleaved frames of every channel, or (``channel``) mono samples of one channel."""
        if self.closing:
            return []
        if channel is not None and not 0 <= channel < len(self._channels):
            message = f"channel {channel} does not exist; the session has {len(self._channels)} channel(s)"
            return [p.Error.invalid("invalid_value", message, "channel")]
        source = self._audio_in if channel is None else self._mono_input(channel)
        decoded = source.feed(data)
        out: list[Output] = []
        if decoded.invalid_samples:
            message = f"{decoded.invalid_samples} float32 samples were NaN or infinite; replaced by silence"
            out.append(p.Error.invalid("invalid_audio", message))
        return out + self._push_channels(decoded.samples, channel)

    def _audio_input(self, config: p.SessionConfig, channels: int = 1) -> AudioInput:
        """Client bytes of ``config``'s format and rate in, 16 kHz samples out, in this server's steps."""
        return AudioInput(config.input_audio_format, config.sample_rate, channels, step_ms=self._intake_step_ms(config))

    def _intake_step_ms(self, config: p.SessionConfig) -> int:
        """The step audio reaches the VAD in: the configured one (a phone line's at least
        ``narrowband_intake_step_ms``), or longer while the runner says the server is behind."""
        step = max(self.limits.intake_step_ms, self._load_step_ms)
        if config.sample_rate <= NARROWBAND_RATE:
            step = max(step, self.limits.narrowband_intake_step_ms)
        return step

    def set_load_intake_step_ms(self, step_ms: int) -> None:
        """Take audio in steps of at least ``step_ms`` from the next message on (0: the configured
        step). The runner asks for this while the event loop is behind (``loop_lag.LoopLag``):
        each resampler call and VAD run then covers several frames, so intake costs the loop
        less; turns end at the same audio times whatever the step (``test_session``), each up
        to one step later on the wall clock."""
        if step_ms == self._load_step_ms:
            return
        self._load_step_ms = step_ms
        self._restep()

    def _restep(self) -> None:
        """Every input of the session takes the current step (after a load change or a new rate)."""
        step = self._intake_step_ms(self.config)
        for source in (self._audio_in, *self._channel_in.values()):
            source.step_ms = step

    def _mono_input(self, channel: int) -> AudioInput:
        if channel not in self._channel_in:
            self._channel_in[channel] = self._audio_input(self.config)
        return self._channel_in[channel]

    def _push_channels(self, samples: np.ndarray, channel: int | None = None) -> list[Output]:
        """Samples of one channel, or interleaved ``(n, channels)`` / mono samples of all (every
        channel's share is in before any is judged: the crosstalk gate compares them)."""
        if channel is not None:
            return self._push_audio(samples, channel)
        columns = [(self._channels[index], column) for index, column in enumerate(split_channels(samples)) if len(column)]
        for ch, column in columns:
            self._append(ch, column)
        out: list[Output] = []
        for ch, _ in columns:
            out += self._advance(ch)
        return out

    def _drain_inputs(self, *, reset: bool) -> list[Output]:
        """What the resamplers still hold, pushed to the channels (close, commit)."""
        out = self._push_channels(self._audio_in.drain() if reset else self._audio_in.flush())
        for channel, source in self._channel_in.items():
            out += self._push_audio(source.drain() if reset else source.flush(), channel)
        return out

    def _receive_text(self, text: str) -> list[Output]:
        if self.closing:
            return []
        try:
            message = p.parse_client_message(text)
        except p.ProtocolError as exc:
            return [p.Error.invalid(exc.code, exc.message, exc.param)]
        return self._receive_message(message)

    def _receive_message(self, message: p.ClientMessage) -> list[Output]:
        if self.closing:
            return []
        if isinstance(message, p.AudioAppend):
            return self._receive_bytes(message.audio, message.channel)
        if isinstance(message, p.SessionUpdate):
            return self._update(message.session)
        if isinstance(message, p.BufferCommit):
            return self._commit()
        if isinstance(message, p.BufferClear):
            return self._clear()
        return self._close()

    def _close(self) -> list[Output]:
        if self.closing:
            return []
        out = self._drain_inputs(reset=False)
        self._state = transition(self._state, SessionState.CLOSING)
        for ch in self._channels:
            utt = ch.utterance
            if utt is None:
                continue
            if self._unannounced_and_empty(ch, utt):
                self._drop_utterance(ch, utt)
            else:
                out += self._end_utterance(ch, self._channel_end(ch), pause_end=None)
        return out + self._maybe_finish()

    def _unannounced_and_empty(self, ch: Channel, utt: Utterance) -> bool:
        """Whether ``utt`` holds less than a frame of audio and nothing of it has reached the
        client: the utterance a commit opens while the speaker is mid-word (``_commit``), when the
        stream then ends. Closing it as any other would send a turn of no audio (``speech_started``
        and ``speech_stopped`` at the same millisecond, an empty segment) after the real one,
        which is what a client that commits and closes (OpenAI Realtime, Deepgram's Finalize and
        CloseStream) got every time its audio ended in speech."""
        if self._channel_end(ch) - utt.start >= FRAME:
            return False
        return any(u is utt and isinstance(event, p.SpeechStarted) for u, event in ch.held)

    def _drop_utterance(self, ch: Channel, utt: Utterance) -> None:
        """Forget ``utt`` and the events it holds back (see ``_unannounced_and_empty``)."""
        ch.held = [(u, event) for u, event in ch.held if u is not utt]
        ch.utterance = None

    def _receive_decode_result(self, ticket: DecodeTicket, result: DecodeResult) -> list[Output]:
        ch = self._channels[ticket.channel]
        if ticket.final:
            return self._final_result(ch, ticket, result)
        if ch.inflight is not ticket:
            return self._apply_interim(ch, ticket, result) + self._schedule(ch)
        ch.round_trip = max(0, ch.vad_pos - ticket.window_end)
        ticket.pending_result = result
        # Applied now, unless it decoded a pause that goes on and has not lasted yet.
        return self._follow_pause(ch) + self._schedule(ch)

    def _apply_interim(self, ch: Channel, ticket: DecodeTicket, result: DecodeResult) -> list[Output]:
        """An interim result, for the utterance it decoded if that is still the open one."""
        utt = ticket.utterance
        if utt is ch.utterance and utt.state is UtteranceState.OPEN:
            self._previous_model = self.config.model
            out: list[Output] = []
            for output in self._interim_result(ticket, result):
                out += self._in_order(ch, utt, output) if isinstance(output, p.ServerEvent) else [output]
            return out
        return []

    def _receive_decode_failure(self, ticket: DecodeTicket, failure: DecodeFailure) -> list[Output]:
        """A decode that was shed under load, could not load its model, or raised."""
        if self.closed:
            return []  # a late interim failure after done: nothing may follow done
        ch = self._channels[ticket.channel]
        out: list[Output] = []
        if failure.kind is FailureKind.MODEL_UNAVAILABLE:
            if self.config.model == ticket.request.model:
                self.config = self.config.model_copy(update={"model": self._previous_model})
            out.append(p.Error.server(failure.kind.value, failure.message, "session.model"))
        elif failure.kind is FailureKind.DECODER_ERROR:
            out.append(p.Error.server(failure.kind.value, failure.message))
        dropped = failure.kind is FailureKind.DROPPED
        if ticket.final and (dropped or (failure.kind is FailureKind.DECODER_ERROR and ticket.attempt < 2)):
            # A promoted interim shed under load, or a first failure (often transient: memory):
            # decode the utterance once more before settling for its committed text.
            # Same audio and prefix as the failed request: the buffer may have been trimmed since.
            retry = dataclasses.replace(ticket, request=dataclasses.replace(ticket.request, final=True))
            retry.attempt = ticket.attempt + (not dropped)
            ch.finals[ch.finals.index(ticket)] = retry
            return [retry]
        if ticket.final:
            # The utterance still ends, with the text that was already final: nothing sent is lost.
            return out + self._final_result(ch, ticket, None)
        if ch.inflight is ticket:
            ch.inflight = None
            ch.round_trip = max(0, ch.vad_pos - ticket.window_end)
        if dropped:
            return out + self._schedule(ch)
        return out

    @property
    def audio_seconds(self) -> float:
        return self._received / MODEL_RATE

    def pending_tickets(self) -> list[DecodeTicket]:
        return [t for ch in self._channels for t in ([ch.inflight] if ch.inflight else []) + ch.finals]

    # ---------------------------------------------------------------- config

    def _vad_params(self) -> VadParams | None:
        td = self.config.turn_detection
        if td is None:
            return None
        return VadParams(td.threshold, self._prefix_padding_ms(), td.silence_duration_ms)

    def _prefix_padding_ms(self) -> int:
        """Audio kept before the VAD's speech onset: the client's ``prefix_padding_ms``, and more
        on a phone line, where the onset comes late (``SessionLimits.narrowband_padding_ms``)."""
        td = self.config.turn_detection
        if td is None:
            return 0
        narrowband = self.config.sample_rate <= NARROWBAND_RATE
        return td.prefix_padding_ms + (self.limits.narrowband_padding_ms if narrowband else 0)

    def _session_view(self) -> dict[str, Any]:
        return {"id": self.id, **self.config.model_dump()}

    def _update(self, changes: dict[str, Any]) -> list[Output]:
        try:
            new = self._with_floor(self.config.updated(changes))
        except p.ProtocolError as exc:
            return [p.Error.invalid(exc.code, exc.message, exc.param)]
        if "model" in changes and not self._model_exists(new.model):
            return [p.Error.invalid("model_not_found", f"model {new.model!r} is not known to this server", "session.model")]
        if ("model" in changes or "language" in changes) and new.language and not self._model_speaks(new.model, new.language):
            message = p.unsupported_language_message(new.model, str(changes.get("language") or new.language))
            return [p.Error.invalid("unsupported_language", message, "session.language")]
        if new.channels != self.config.channels:
            if self._received or self._audio_in.has_pending() or self._channel_in:
                message = "channels cannot change once audio has arrived"
                return [p.Error.invalid("invalid_value", message, "session.channels")]
            self._audio_in = self._audio_input(new, new.channels)
            self._channels = [Channel(c, self._vad, self._vad_params(), fresh_listen_prob=self.limits.fresh_listen_prob) for c in range(new.channels)]
            self._crosstalk = CrosstalkGate(new.channels, self.limits.crosstalk_margin_db)
        out: list[Output] = []
        old = self.config
        self._previous_model = old.model
        self.config = new
        self._redactor.kinds = kinds_of(new.redact)
        out += self._push_channels(self._audio_in.reconfigure(new.input_audio_format, new.sample_rate))
        for channel, source in self._channel_in.items():
            out += self._push_audio(source.reconfigure(new.input_audio_format, new.sample_rate), channel)
        self._restep()
        if new.turn_detection != old.turn_detection or new.sample_rate != old.sample_rate:
            params = self._vad_params()
            for ch in self._channels:
                if params is None:
                    ch.segmenter = None
                elif ch.segmenter is None:
                    ch.segmenter = TurnSegmenter(params, floor=ch.vad_pos)
                    if ch.utterance is not None:
                        ch.segmenter.force_start(ch.vad_pos)
                else:
                    ch.segmenter.params = params
        return [*out, p.SessionUpdated(self._session_view())]

    # ---------------------------------------------------------------- audio and VAD

    def _push_audio(self, samples: np.ndarray, channel: int = 0) -> list[Output]:
        if not len(samples):
            return []
        ch = self._channels[channel]
        self._append(ch, samples)
        return self._advance(ch)

    def _append(self, ch: Channel, samples: np.ndarray) -> None:
        """``samples`` into ``ch``'s buffer, and the levels of its new whole frames into the
        crosstalk gate (when it compares channels)."""
        ch.buffer.append(samples)
        self._received = max(self._received, ch.buffer.end)
        gate = self._crosstalk
        if gate.active:
            first = gate.recorded(ch.index) * FRAME
            n_frames = (ch.buffer.end - first) // FRAME
            if n_frames > 0:
                gate.record(ch.index, frame_levels(ch.buffer.slice(first, first + n_frames * FRAME).reshape(n_frames, FRAME)))

    def _advance(self, ch: Channel) -> list[Output]:
        """The VAD over ``ch``'s new whole frames (a frame that is another channel's speech heard
        faintly counts as silence), then what follows from them."""
        out: list[Output] = []
        n_frames = (ch.buffer.end - ch.vad_pos) // FRAME
        if n_frames > 0:
            frames = ch.buffer.slice(ch.vad_pos, ch.vad_pos + n_frames * FRAME).reshape(n_frames, FRAME)
            probs, ch.vad_state = ch.vad.probabilities(frames, ch.vad_state)
            levels = self._frame_levels(ch, frames)
            for k, value in enumerate(probs):
                elsewhere = self._crosstalk.heard_from_elsewhere(ch.index, ch.vad_pos // FRAME)
                if len(levels):  # another channel's echo is no level rise of this one's
                    ch.levels.append(FLOOR_DB if elsewhere else float(levels[k]))
                prob = 0.0 if elsewhere else self._heard(ch, frames, k, float(value))
                out += self._on_frame(ch, prob, ch.vad_pos)
                ch.probs.append(prob)
                ch.vad_pos += FRAME
        start = max(ch.buffer.start, ch.consumed)
        if ch.segmenter is None and ch.utterance is None and ch.buffer.end > start:
            out += self._open_utterance(ch, start, start)
        out += self._split_if_too_long(ch)
        out += self._schedule(ch)
        self._trim(ch)
        return out

    def _frame_levels(self, ch: Channel, frames: np.ndarray) -> Sequence[float]:
        """The levels of the frames the VAD is about to judge (from ``ch.vad_pos``), where the
        level rules want them (none otherwise): the crosstalk gate's, which ``_append`` measured
        on the same frame grid, or measured now."""
        if not (self.limits.level_onset_reach_ms or self.limits.level_end_reach_ms):
            return ()
        if self._crosstalk.active and ch.vad_pos % FRAME == 0:
            recorded = self._crosstalk.levels(ch.index, ch.vad_pos // FRAME, len(frames))
            if recorded is not None:
                return recorded
        levels: Sequence[float] = frame_levels(frames).tolist()
        return levels

    def _heard(self, ch: Channel, frames: np.ndarray, k: int, prob: float) -> float:
        """Frame ``k`` of ``frames`` (at ``ch.vad_pos``)'s speech probability for the segmenter:
        between turns a fresh Silero state may hear a short word better (``vad.FreshListener``)."""
        seg = ch.segmenter
        if seg is None:
            return prob

        def before() -> np.ndarray:
            grid = ch.buffer.start + (ch.vad_pos - ch.buffer.start) % FRAME
            start = max(grid, ch.vad_pos - FRESH_PREROLL_FRAMES * FRAME)
            return ch.buffer.slice(start, ch.vad_pos).reshape(-1, FRAME)

        return ch.listener.probability(frames[k], before, prob, between_turns=not seg.in_speech)

    def _on_frame(self, ch: Channel, prob: float, frame_start: int) -> list[Output]:
        if ch.segmenter is None:
            return []
        decision = ch.segmenter.push(prob, frame_start, self._quiet_lead(ch, prob, frame_start))
        out = self._follow_pause(ch, ended_at=decision.sample if isinstance(decision, SpeechEnd) else None)
        if decision is None:
            out += self._settle_held(ch)
        if isinstance(decision, SpeechStart) and ch.utterance is None:
            onset = ch.measured_frame(decision.onset)
            off = ch.segmenter.params.off_threshold
            ch.noise_floor = noise_floor(ch.levels, ch.probs, onset, below=off) if onset is not None else None
            out += self._handover(ch)
            return out + self._open_utterance(ch, self._turn_start(ch, decision, onset), decision.onset)
        if isinstance(decision, SpeechEnd) and ch.utterance is not None:
            if self._at_pending_bound(ch):
                # The decoder is that far behind this channel (audio sent faster than real time,
                # or a VAD tuned to end a turn every few frames): the turn runs on into the next
                # speech instead of queueing another final, so pending work and the audio it holds
                # stay bounded; nothing is dropped, the words arrive with the next turn end.
                return out
            return out + self._end_utterance(ch, decision.sample, pause_end=frame_start + FRAME)
        return out

    def _handover(self, speaker: Channel) -> list[Output]:
        """``speaker`` starts a turn: end the other channels' turns that are in a pause of
        ``handover_pause_ms`` or more (the legs of a call take turns; an agent-assist screen
        wants the customer's words as the agent answers, not half a second later)."""
        limit = self.limits.handover_pause_ms * MS
        out: list[Output] = []
        if not limit:
            return out
        for ch in self._channels:
            seg = ch.segmenter
            if ch is speaker or ch.utterance is None or seg is None:
                continue
            if seg.ending_silence < limit or self._at_pending_bound(ch):
                continue
            end = seg.end_in_pause()
            assert end is not None
            out += self._follow_pause(ch, ended_at=end.sample)
            out += self._end_utterance(ch, end.sample, pause_end=ch.vad_pos)
        return out

    def _quiet_lead(self, ch: Channel, prob: float, frame_start: int) -> int:
        """On the first frame of a pause in speech, how many frames before it the channel's level
        had already fallen to its noise (``SessionLimits.level_end_reach_ms``): the silence that
        ends the turn is counted from there."""
        reach = self.limits.level_end_reach_ms * MS // FRAME
        seg = ch.segmenter
        if not reach or ch.noise_floor is None or seg is None or not seg.pause_begins(prob):
            return 0
        return quiet_lead(ch.levels, ch.frame_index(frame_start), ch.noise_floor, reach)

    def _turn_start(self, ch: Channel, start: SpeechStart, onset: int | None) -> int:
        """Where a new turn's audio starts: the VAD's onset minus the padding; where the level
        rose toward that onset (frame ``onset`` of ``ch.levels``) when that is earlier
        (``SessionLimits.level_onset_reach_ms``: the VAD heard the first syllable late); just
        before the sound when it began after the padding did (``padding_from_level_ms``: the
        padding held only noise), once the channel's noise has been heard (``Channel.noise_floor``:
        a stream that opens with a word keeps its padding); never before the last turn's end."""
        reach = self.limits.level_onset_reach_ms * MS // FRAME
        if not reach or onset is None or ch.segmenter is None:
            return start.sample
        rise = level_onset(ch.levels, onset, reach)
        sound = ch.probs_start + rise * FRAME  # the sample where the level rose
        begin = min(start.sample, sound - LEVEL_ONSET_LEAD_MS * MS)
        keep = self.limits.padding_from_level_ms
        if keep and rise < onset and ch.noise_floor is not None:
            begin = max(begin, sound - keep * MS)
        return max(begin, ch.segmenter.floor, ch.buffer.start)

    def _pause_outcome(self, ch: Channel, ticket: DecodeTicket, *, ended_at: int | None = None) -> bool | None:
        """Whether the pause ``ticket`` decoded lasted ``stable_silence_ms`` (or the turn ended
        in it, at ``ended_at``): True, its words before the pause may be committed; False, the
        speaker went on first; None, it goes on and has not lasted that long yet. A pause that has
        lasted is recorded on the ticket: it may end before the result comes back."""
        if ticket.pause_start is None:
            return False
        seg = ch.segmenter
        if not ticket.pause_stable:
            if ended_at == ticket.pause_start:
                ticket.pause_stable = True
            elif seg is None or seg.pause_start != ticket.pause_start:
                return False
            elif seg.silence_samples >= self.limits.stable_silence_ms * MS:
                ticket.pause_stable = True
        return True if ticket.pause_stable else None

    def _follow_pause(self, ch: Channel, *, ended_at: int | None = None, closing: bool = False) -> list[Output]:
        """Each VAD frame, and as a turn ends (``ended_at``; ``closing``: whatever ended it):
        follow the pause the decode in flight heard, and apply its result if that came back early
        and the pause has now lasted, or the speaker went on first (then as an ordinary interim:
        it heard no pause after all)."""
        ticket = ch.inflight
        if ticket is None or (ticket.pause_start is None and ticket.pending_result is None):
            return []
        lasted = self._pause_outcome(ch, ticket, ended_at=ended_at)
        if lasted is None and closing:
            lasted = False  # the turn ends before its pause lasted (a commit, the stream's end)
        if ticket.pending_result is None or lasted is None:
            return []
        result, ticket.pending_result = ticket.pending_result, None
        ch.inflight = None
        if not lasted:
            ticket.pause_start = None  # the speaker went on first: no pause to commit at
        return self._apply_interim(ch, ticket, result)

    def _trim(self, ch: Channel) -> None:
        if ch.utterance is not None:
            keep_from = ch.utterance.start
        else:
            # The padding, and how far a turn's start may reach back to where its level rose.
            keep_from = ch.vad_pos - (self._prefix_padding_ms() + self.limits.level_onset_reach_ms) * MS - FRAME * 4
        if ch.carry_keep is not None and keep_from - ch.carry_turn_end <= self.limits.carry_gap_ms * MS:
            keep_from = min(keep_from, ch.carry_keep)  # a short turn may still continue from its words
        keep_from = min(keep_from, ch.vad_pos)
        ch.buffer.trim_before(keep_from)
        drop = ch.frame_index(keep_from)
        if drop > 0:
            del ch.probs[:drop]
            del ch.levels[:drop]
            ch.probs_start += drop * FRAME

    def _channel_end(self, ch: Channel) -> int:
        return ch.buffer.end

    # ---------------------------------------------------------------- utterance lifecycle

    def _open_utterance(self, ch: Channel, start: int, onset: int) -> list[Output]:
        start = max(start, ch.buffer.start)
        serial = next(self._items)
        utt = Utterance(item_id=f"item_{self.id[-8:]}_{serial}", serial=serial, start=start, onset=onset,
                        number_run=HeldRun(self._redactor, ch.index))
        self._item_channel[utt.item_id] = ch.index
        utt.last_window_end = start
        ch.utterance = utt
        ch.pause_decoded = None
        return self._in_order(ch, utt, p.SpeechStarted(utt.item_id, start // MS))

    def _close_utterance(self, ch: Channel, end: int) -> tuple[Utterance, list[Output]]:
        """End the open utterance at ``end``: it leaves the channel and ``speech_stopped`` is due."""
        utt = ch.utterance
        assert utt is not None
        ch.utterance = None
        if ch.segmenter is not None and (params := self._vad_params()) is not None:
            ch.segmenter.params = params  # the next turn ends after its own silence
        utt.end_at(end)
        ch.consumed = max(ch.consumed, end)
        ch.carry_turn_end = end
        ch.carry_keep = carry_audio_from(self.limits, utt.start, end)
        return utt, self._in_order(ch, utt, p.SpeechStopped(utt.item_id, end // MS))

    def _end_utterance(self, ch: Channel, end: int, *, pause_end: int | None) -> list[Output]:
        """Close the open utterance at ``end``; its last words come from a final decode or the
        last interim hypothesis when that one already heard the pause."""
        assert ch.utterance is not None
        held = self._follow_pause(ch, ended_at=end, closing=True)  # a pause decode waiting for its pause to last
        utt, out = self._close_utterance(ch, max(end, ch.utterance.start))
        out = held + out
        turn_end = utt.end
        assert turn_end is not None
        stable = self.limits.pause_heard_ms
        inflight = ch.inflight
        window_end = min(self._channel_end(ch), turn_end + self.limits.trailing_audio_ms * MS)
        decodable = window_end - utt.start >= self.limits.min_final_ms * MS
        # An unsure hypothesis may be decoded again (``recheck_logprob``), except in files, whose
        # turns wait for their context (``final_context_lag``) and each get a final decode anyway.
        may_recheck = decodable and not self.limits.final_context_lag
        if pause_end is not None and inflight is not None and inflight.utterance is utt and heard_the_pause(inflight.window_end, turn_end, stable):
            # The decode already running heard the pause: its hypothesis becomes the final one.
            inflight.promote()
            if may_recheck:
                inflight.recheck = self._final_ticket(ch, utt, window_end, recheck=True)
            ch.inflight = None
            ch.finals.append(inflight)
            self._promotions_out.append(inflight)
            return out
        if pause_end is not None and heard_the_pause(utt.tail_window_end, turn_end, stable):
            tail = self._within_turn(utt, utt.tail)
            if self._unsure(utt, tail) and may_recheck:
                return out + self._submit_final(ch, utt, window_end, rival=tail)
            return out + self._resolve_without_decode(ch, utt, tail)
        if not decodable:
            return out + self._resolve_without_decode(ch, utt, self._within_turn(utt, utt.tail))
        return out + self._submit_final(ch, utt, window_end)

    def _submit_final(self, ch: Channel, utt: Utterance, window_end: int, *, rival: list[Word] | None = None) -> list[Output]:
        """A final decode of the whole utterance, queued behind the finals ahead of it (and held
        back until its context is final, with ``final_context_lag``); ``rival``: an earlier
        reading of its last words it competes with."""
        ticket = self._final_ticket(ch, utt, window_end, recheck=rival is not None)
        ticket.rival = rival
        ch.finals.append(ticket)
        return [] if ticket.waiting_for_context else [ticket]

    def _final_ticket(self, ch: Channel, utt: Utterance, window_end: int, *, recheck: bool = False) -> DecodeTicket:
        """The final decode of ``utt`` up to ``window_end``, as :meth:`_submit_final` queues it;
        a ``recheck`` of an unsure reading searches wider (``recheck_beam``)."""
        lag = self.limits.final_context_lag
        waits = bool(lag) and len(ch.finals) >= lag  # the turn its context ends with is not final yet
        context = None  # without a lag: the whole transcript so far
        if lag:
            # The prompt of a waiting final is planned again when it is released.
            context = "" if waits else self._context_of(ch, len(ch.turn_ends) + len(ch.finals))
        ticket = self._ticket(ch, utt, utt.start, window_end, state=TicketState.FINAL, pause_start=None, context=context)
        ticket.waiting_for_context = waits
        if recheck:
            ticket.request = dataclasses.replace(ticket.request, beam_size=self.limits.recheck_beam)
        if self.limits.final_agreement and ticket.request.prefix and not ticket.carried:
            ticket.unforced = True
            ticket.request = dataclasses.replace(ticket.request, prefix=())
        return ticket

    def _context_of(self, ch: Channel, turn: int) -> str:
        """The channel's text up to the end of turn ``turn - final_context_lag`` ("" before it)."""
        last = turn - self.limits.final_context_lag
        text = ch.transcript.text[: ch.turn_ends[last]] if last >= 0 else ""
        return without_placeholders(text) if self._redactor.active else text

    def _release_waiting_finals(self, ch: Channel) -> list[Output]:
        """Send the finals whose context turn has just become final, planned with that text."""
        out: list[Output] = []
        lag = self.limits.final_context_lag
        for position, waiting in enumerate(ch.finals[:lag]):
            if not waiting.waiting_for_context:
                continue
            utt = waiting.utterance
            # Only the prompt changes: the buffer may have been trimmed past this audio since.
            plan = plan_decode(self.limits, committed=utt.committed, utterance_start=utt.start, start=waiting.window_start,
                               end=waiting.window_end, client_prompt=self.config.prompt,
                               transcript=self._context_of(ch, len(ch.turn_ends) + position))
            waiting.request = dataclasses.replace(waiting.request, prompt=plan.prompt, hint=plan.hint)
            waiting.waiting_for_context = False
            out.append(waiting)
        return out

    def _resolve_without_decode(self, ch: Channel, utt: Utterance, words: list[Word]) -> list[Output]:
        """Close ``utt`` with ``words`` as its last text, after any finals still ahead of it."""
        ticket = self._ticket(ch, utt, utt.start, utt.start, state=TicketState.FINAL, pause_start=None)
        ticket.resolve(list(words))
        ch.finals.append(ticket)
        return self._apply_resolved_finals(ch)

    def _apply_resolved_finals(self, ch: Channel) -> list[Output]:
        out: list[Output] = []
        while ch.finals and ch.finals[0].resolved:
            ticket = ch.finals.pop(0)
            utt = ticket.utterance
            utt.tail = []
            out += self._commit_words(ch, utt, ticket.words, closing=True)
            ch.carry = carry_of(self.limits, utt.committed, utt.end)
            ch.turn_ends.append(len(ch.transcript.text))
            out += self._finish_utterance(utt)
            out += self._release_held(ch)
        if self.limits.final_context_lag:
            out += self._release_waiting_finals(ch)
        return out

    def _in_order(self, ch: Channel, utt: Utterance, event: p.ServerEvent) -> list[Output]:
        """Hold a later utterance's start, stop and interim text until every earlier utterance's
        segment is out.

        Clients then see whole utterances one after another (started → text → stopped →
        segment), even when a final decode is still running as the next speaker turn begins.
        """
        if ch.held or any(t.utterance.serial < utt.serial for t in ch.finals):
            ch.held.append((utt, event))
            return []
        return [event]

    def _release_held(self, ch: Channel) -> list[Output]:
        out: list[Output] = []
        while ch.held and not any(t.utterance.serial < ch.held[0][0].serial for t in ch.finals):
            out.append(ch.held.pop(0)[1])
        return out

    def _finish_utterance(self, utt: Utterance) -> list[Output]:
        utt.finish()
        out: list[Output] = []
        if utt.interim_sent:
            utt.interim_sent = ""
            if self.config.interim_results:
                out.append(render.interim(utt.item_id, [], timings=self.config.wants("words")))
        wants = self.config.wants
        segment = render.segment(utt.item_id, utt.shown, onset=utt.onset, end=utt.end, no_speech_prob=utt.no_speech_prob,
                                 logprobs=wants("logprobs"), timings=wants("words"), language=utt.detected or self.config.language)
        channel = self._item_channel.get(utt.item_id, 0)
        self._segments.append(dataclasses.replace(segment, channel=channel, speaker=self.config.speaker(channel)))
        out.append(segment)
        return out + self._maybe_finish()

    def _maybe_finish(self) -> list[Output]:
        if self._state is not SessionState.CLOSING:
            return []
        if any(ch.finals or ch.utterance for ch in self._channels):
            return []
        self._state = transition(self._state, SessionState.CLOSED)
        speakers = [self.config.speaker(ch.index) for ch in self._channels]
        transcripts = [ch.transcript for ch in self._channels]
        done = render.done(transcripts, self._segments, speakers, self.audio_seconds, logprobs=self.config.wants("logprobs"))
        return [done, CloseConnection(1000, "session closed")]

    def _commit(self) -> list[Output]:
        """End every channel's open utterance now (as if its speaker paused)."""
        out = self._drain_inputs(reset=True)
        if self.backlogged:
            message = f"more than {self.limits.max_pending_finals} utterances are still being finalized; commit refused, audio kept"
            return out + [p.Error.invalid("rate_limited", message)]
        committed = 0
        for ch in self._channels:
            utt = ch.utterance
            if utt is None or self._channel_end(ch) - utt.start < FRAME:
                continue  # nothing new since the last commit: committing it would be an empty turn
            committed += 1
            now = self._channel_end(ch)
            out += self._end_utterance(ch, now, pause_end=None)
            out.append(p.BufferCommitted(utt.item_id))
            if ch.segmenter is not None and ch.segmenter.in_speech:
                # The speaker is still talking: what follows the commit is a new utterance.
                out += self._open_utterance(ch, now, now)
                ch.segmenter.force_start(now)
        if not committed:
            out.append(p.BufferCommitted(None))
        return out

    def _clear(self) -> list[Output]:
        out: list[Output] = []
        for ch in self._channels:
            if ch.utterance is not None:
                utt, stopped = self._close_utterance(ch, self._channel_end(ch))
                out += stopped
                out += self._resolve_without_decode(ch, utt, [])
            if ch.segmenter is not None:
                ch.segmenter.reset(floor=ch.vad_pos)
            ch.inflight = None
            ch.carry = ()
            ch.buffer.trim_before(ch.vad_pos)
        out.append(p.BufferCleared())
        return out

    # ---------------------------------------------------------------- decoding

    def _ticket(self, ch: Channel, utt: Utterance, start: int, end: int, *, state: TicketState, pause_start: int | None,
                context: str | None = None) -> DecodeTicket:
        """A request for ``[start, end)`` as the planner shapes it (window, prefix, prompt);
        ``context``: the earlier text to prompt with, when not the channel's whole transcript.
        A decode that can commit a short turn's words continues from the previous turn's."""
        committing = state is TicketState.FINAL or pause_start is not None
        carry = carried(self.limits, ch.carry, utterance_start=utt.start, end=end, committing=committing,
                        audio_from=ch.buffer.start) if start == utt.start < end and not utt.carry_refused else ()
        if carry:
            start = max(carry_start(carry), ch.buffer.start)
        plan = plan_decode(self.limits, committed=[*carry, *utt.committed], utterance_start=start, start=start, end=end,
                           client_prompt=self.config.prompt, transcript=ch.transcript.text if context is None else context)
        request = DecodeRequest(
            audio=ch.buffer.slice(plan.start, plan.end),
            prefix=plan.prefix,
            prompt=plan.prompt,
            hint=plan.hint,
            language=self.config.language or utt.language,
            task=self.config.task,
            language_hint=ch.language,
            model=self.config.model,
            final=state is TicketState.FINAL,
            key=(self.id, ch.index, utt.serial),
            commits=committing,
            background=not self.limits.interim_decoding,  # a whole file
        )
        return DecodeTicket(request, ch.index, utt, state, plan.start, plan.end, pause_start, committed=len(utt.committed),
                            forced=plan.kept, carried=max(0, len(plan.kept) - len(utt.committed)))

    def _schedule(self, ch: Channel) -> list[Output]:
        """Start an interim decode of the open utterance when one is due and none is in flight."""
        utt = ch.utterance
        if utt is None or ch.inflight is not None:
            return []
        # While earlier turns' finals run, only this turn's first words may be decoded: a decode
        # that could commit (a pause decode, an agreeing re-decode) waits, since this turn's text
        # must not reach the transcript before theirs; the first interim's text waits in
        # ``ch.held`` (``_in_order``) and shows the moment their segments are out, instead of
        # being asked for only then (under load, a round trip later).
        waiting, shows_text = bool(ch.finals), bool(utt.committed or utt.tail)
        if waiting and shows_text:
            return []
        seg = ch.segmenter
        # ``now`` is ch.vad_pos: decode only audio the VAD has already judged.
        due = interim_due(self.limits, now=ch.vad_pos, utterance_start=utt.start, last_window_end=utt.last_window_end,
                          silence_samples=seg.silence_samples if seg is not None else None, pause_decoded=ch.pause_decoded,
                          round_trip=ch.round_trip if shows_text else 0, last_round_trip=ch.round_trip,
                          onset=utt.onset)
        if due is None or (waiting and due.early):
            return []
        if due.early:
            ch.pause_decoded = due.pause_start
        utt.last_window_end = due.end
        ticket = self._ticket(ch, utt, utt.start, due.end, state=TicketState.INTERIM, pause_start=due.pause_start)
        self._pause_outcome(ch, ticket)  # a pause that already lasted (pause_decode_ms >= stable_silence_ms)
        ch.inflight = ticket
        return [ticket]

    def _interim_result(self, ticket: DecodeTicket, result: DecodeResult) -> list[Output]:
        utt = ticket.utterance
        utt.no_speech_prob = result.no_speech_prob
        utt.detected = result.language
        if utt.language is None and self.config.language is None and language_settled(len(ticket.request.audio), result.language_probability):
            utt.language = self._channels[ticket.channel].language = result.language
        words = self._words_of(ticket, result)
        if ticket.committed != len(utt.committed):
            return []  # decoded against an older prefix; its words no longer line up
        if self._continuation_failed(ticket, words):
            utt.carry_refused = True
            return []  # the turn's end decodes it on its own
        limits = self.limits
        n = interim_commit_count(utt.tail, words, utterance_start=utt.start, window_end=ticket.window_end, pause_start=ticket.pause_start,
                                 right_context_ms=limits.right_context_ms, min_commit_window_ms=limits.min_commit_window_ms,
                                 previous_window_end=utt.tail_window_end)
        held = ticket.pause_start is not None and words_starting_before(words, ticket.pause_start / MODEL_RATE) > n
        utt.held_pause = ticket.pause_start if held else None
        utt.held_unsure = False
        out = self._commit_at(self._channels[ticket.channel], utt, words, n, at_pause=ticket.pause_start is not None)
        utt.tail_window_end = ticket.window_end
        return out

    def _commit_at(self, ch: Channel, utt: Utterance, words: list[Word], n: int, *, at_pause: bool) -> list[Output]:
        """Commit the first ``n`` of ``words`` (the rest become the tail, shown as the interim);
        the newest word, committed at a pause, without its punctuation, which waits for what follows."""
        committed, tail = words[:n], words[n:]
        if committed and not tail and at_pause:
            spoken, marks = without_trailing_punctuation(committed[-1])
            committed, tail = [*committed[:-1], spoken], [marks] if marks is not None else []
        out = self._commit_words(ch, utt, committed)
        utt.tail = tail
        self._pace_turn_end(ch, utt)
        if self.config.interim_results:
            caption = render.interim(utt.item_id, utt.number_run.caption(utt.tail), timings=self.config.wants("words"))
            if caption.text != utt.interim_sent:
                utt.interim_sent = caption.text
                out.append(caption)
        return out

    def _pace_turn_end(self, ch: Channel, utt: Utterance) -> None:
        """With redaction on, the silence that ends ``utt`` is ``number_pause_ms`` while its
        words so far end in a number (its committed words, or with its latest hypothesis: a
        hypothesis that ends in a word misheard at the window's end does not end the number),
        the turn's own otherwise: a card read in groups stays one turn, judged at once."""
        base = self._vad_params()
        if ch.segmenter is None or base is None or not self._redactor.active or self.limits.number_pause_ms <= base.silence_duration_ms:
            return  # (the turn's own silence: set when the turn began, ``_close_utterance``)
        held = utt.number_run.words
        if ends_in_number(held) or ends_in_number([*held, *utt.tail]):
            base = dataclasses.replace(base, silence_duration_ms=self.limits.number_pause_ms)
        ch.segmenter.params = base

    def _settle_held(self, ch: Channel) -> list[Output]:
        """Each VAD frame: words a pause decode held back on a dissent are committed as it heard
        them once the pause has lasted ``held_commit_ms`` (the turn's end would make them final
        as heard anyway, only later); a reading under ``held_sure_logprob`` waits for the turn's
        end, which decodes it again (``Utterance.held_unsure``) and keeps the surer reading."""
        utt, seg = ch.utterance, ch.segmenter
        if utt is None or utt.held_pause is None or seg is None:
            return []
        if seg.pause_start != utt.held_pause:
            utt.held_pause = None  # the speaker went on: agreement decides
            return []
        limit = self.limits.held_commit_ms
        if not limit or seg.silence_samples < limit * MS:
            return []
        pause, utt.held_pause = utt.held_pause, None
        n = words_starting_before(utt.tail, pause / MODEL_RATE)
        if not n or mean_logprob(utt.tail[:n]) < self.limits.held_sure_logprob:
            utt.held_unsure = bool(n)
            return []
        return self._commit_at(ch, utt, list(utt.tail), n, at_pause=True)

    def _final_result(self, ch: Channel, ticket: DecodeTicket, result: DecodeResult | None) -> list[Output]:
        if result is not None and len(ticket.request.audio):
            if self._hint_came_late(ch, ticket, result):
                retry = dataclasses.replace(ticket, request=dataclasses.replace(ticket.request, language_hint=ch.language))
                ch.finals[ch.finals.index(ticket)] = retry
                return [retry]
            if self._waits_for_language(ch, ticket, result):
                ticket.parked = result
                return []
            words = self._words_of(ticket, result)
            if self._continuation_failed(ticket, words):
                retry = self._without_carry(ch, ticket)
                ch.finals[ch.finals.index(ticket)] = retry
                return [retry]
            if ticket.unforced:
                rest = after_agreeing_prefix(ticket.forced, words)
                if rest is None:  # it contradicts committed text: decode again, forced
                    retry = dataclasses.replace(ticket, request=dataclasses.replace(ticket.request, prefix=token_ids(ticket.forced)), unforced=False,
                                                unforced_rest=read_past(ticket.utterance.committed, words))
                    ch.finals[ch.finals.index(ticket)] = retry
                    return [retry]
                words = rest
            words = self._within_turn(ticket.utterance, words)
            if ticket.recheck is not None and self._unsure(ticket.utterance, words):
                # A promoted hypothesis the decoder was unsure of: the turn's own final decides.
                recheck = ticket.recheck
                recheck.rival = words
                ch.finals[ch.finals.index(ticket)] = recheck
                return [recheck]
            if ticket.rival is None and ticket.request.beam_size < self.limits.recheck_beam and self._stops_early(ticket.utterance, words):
                # A final that stopped reading early (a file's turn, or a live one with no
                # reading that heard its pause): decoded again with a beam, the further reading kept.
                retry = dataclasses.replace(ticket, request=dataclasses.replace(ticket.request, beam_size=self.limits.recheck_beam), rival=words)
                ch.finals[ch.finals.index(ticket)] = retry
                return [retry]
            if ticket.rival is not None:
                words = surer_reading(ticket.rival, words, speech_end_s=self._speech_end_s(ticket.utterance), unread_s=self.limits.unread_speech_ms / 1000)
            if ticket.unforced_rest and self._stops_early(ticket.utterance, words):
                words = surer_reading(self._within_turn(ticket.utterance, ticket.unforced_rest), words,
                                      speech_end_s=self._speech_end_s(ticket.utterance), unread_s=self.limits.unread_speech_ms / 1000)
            ticket.utterance.no_speech_prob = result.no_speech_prob
            ticket.utterance.detected = result.language
            if language_settled(len(ticket.request.audio), result.language_probability):
                ch.language = result.language
            ticket.resolve(words)
        else:
            ticket.resolve(ticket.rival)  # a failed recheck keeps the reading it was to check
        return self._apply_resolved_finals(ch) + self._schedule(ch) + self._unpark(ch)

    @staticmethod
    def _language_guessed(ticket: DecodeTicket, result: DecodeResult) -> bool:
        """Whether a final's language is the detector's unsure guess: decoded with no language
        (neither the session's nor its utterance's settled one) and no hint, below the settling
        probability. The channel's settled language, when it has one, is the better guess."""
        request = ticket.request
        return (
            request.language is None
            and request.language_hint is None
            and result.language_probability < LANGUAGE_SETTLE_PROBABILITY
        )

    def _hint_came_late(self, ch: Channel, ticket: DecodeTicket, result: DecodeResult) -> bool:
        """Whether a guessed language (``_language_guessed``) differs from the one the channel
        has settled on since the final was asked for. A file's turns are all asked for at once,
        before any has settled the channel's language, so a short Spanish turn came back
        Portuguese ("e de nem muito pouca assistência") where a live one, hinted, reads Spanish;
        it is decoded again with the hint, as it would have been asked for live."""
        return ch.language is not None and result.language != ch.language and self._language_guessed(ticket, result)

    def _waits_for_language(self, ch: Channel, ticket: DecodeTicket, result: DecodeResult) -> bool:
        """Whether a final with a guessed language waits for the channel to settle one: the
        channel has none yet and another of its finals that heard enough audio to settle it is
        still out. A file's first turns ("Olá, bom dia", read as Portuguese before a Catalan turn
        settled) are then decoded again with the hint (``_hint_came_late``) instead of keeping
        a guess."""
        return ch.language is None and self._language_guessed(ticket, result) and self._may_settle(ch, ticket)

    @staticmethod
    def _may_settle(ch: Channel, ticket: DecodeTicket) -> bool:
        """Whether a final of ``ch`` other than ``ticket`` is still out and long enough to settle
        the channel's language. A final not yet sent, waiting for an earlier turn's text as its
        context (``final_context_lag``), may be waiting for ``ticket`` itself: not counted."""
        return any(
            other is not ticket and not other.resolved and other.parked is None and not other.waiting_for_context
            and len(other.request.audio) >= LANGUAGE_SETTLE_S * MODEL_RATE
            for other in ch.finals
        )

    def _unpark(self, ch: Channel) -> list[Output]:
        """Finish the parked finals that can be finished: the channel settled a language (a
        different one is decoded again with it as the hint), or nothing still out could settle it
        (the result stands)."""
        out: list[Output] = []
        for ticket in list(ch.finals):
            result = ticket.parked
            if result is not None and ticket in ch.finals and (ch.language is not None or not self._may_settle(ch, ticket)):
                ticket.parked = None
                out += self._final_result(ch, ticket, result)
        return out

    def _unsure(self, utt: Utterance, words: list[Word]) -> bool:
        """Whether ``utt``'s last words, read as ``words`` by a hypothesis that heard its pause,
        are decoded again before they are final: the decoder was unsure of them
        (``recheck_logprob``), or of the words it held back there (``held_sure_logprob``), or
        they stop well before the turn's speech does (``unread_speech_ms``)."""
        if words and (mean_logprob(words) < self.limits.recheck_logprob or utt.held_unsure):
            return True
        return self._stops_early(utt, words)

    def _stops_early(self, utt: Utterance, words: list[Word]) -> bool:
        """Whether ``utt``, read as its committed words and then ``words``, stops well before its
        speech does (``unread_speech_ms``)."""
        return unread_speech([*utt.committed, *words], self._speech_end_s(utt), self.limits.unread_speech_ms / 1000)

    @staticmethod
    def _speech_end_s(utt: Utterance) -> float:
        """Where ``utt``'s speech ends (its turn's end; the audio so far while it is open)."""
        return (utt.end if utt.end is not None else utt.last_window_end) / MODEL_RATE

    @staticmethod
    def _continuation_failed(ticket: DecodeTicket, words: list[Word]) -> bool:
        """A continuation decode that gave its turn no words: the VAD heard speech there, and the
        decoder, forced on from the last turn's words, may have ended that sentence instead
        ("... for your country." over a spoken "eight"). Its turn is decoded alone. Whether the
        turn's own decodes heard words does not decide it: under load they are the ones shed
        (24 streams lost one-word turns so, with no final decode at all)."""
        return bool(ticket.carried) and not words

    def _without_carry(self, ch: Channel, ticket: DecodeTicket) -> DecodeTicket:
        """``ticket``'s decode of its turn alone, from the audio it holds (the buffer may have
        been trimmed past the turn since)."""
        utt = ticket.utterance
        utt.carry_refused = True
        plan = plan_decode(self.limits, committed=utt.committed, utterance_start=utt.start, start=utt.start, end=ticket.window_end,
                           client_prompt=self.config.prompt, transcript=ch.transcript.text)
        audio = ticket.request.audio[plan.start - ticket.window_start :]
        request = dataclasses.replace(ticket.request, audio=audio, prefix=plan.prefix, prompt=plan.prompt, hint=plan.hint)
        return dataclasses.replace(ticket, request=request, window_start=plan.start, forced=plan.kept, carried=0)

    @staticmethod
    def _words_of(ticket: DecodeTicket, result: DecodeResult) -> list[Word]:
        """A result's words on the session clock; a continuation's words heard before its own
        turn began (in the pause after the carried words) are not this turn's."""
        words = absolute(result.words, ticket.window_start)
        if ticket.carried:
            words = [w for w in words if w.end * MODEL_RATE > ticket.utterance.start]
            words = continued_sentence_case(ticket.forced[: ticket.carried], words)
        return words

    def _within_turn(self, utt: Utterance, words: list[Word]) -> list[Word]:
        return within_turn(words, utt.end, self.limits.end_tolerance_ms)

    def _commit_words(self, ch: Channel, utt: Utterance, words: list[Word], *, closing: bool = False) -> list[Output]:
        """Commit ``words``; their delta spells them redacted, less a run of numbers that may
        still grow (``closing``: the utterance's last words, so nothing is held back)."""
        utt.committed.extend(words)
        shown = utt.number_run.push(words)
        if closing:
            shown += utt.number_run.flush()
        if not shown:
            return []
        utt.shown.extend(shown)
        delta = ch.transcript.delta(utt.item_id, shown, logprobs=self.config.wants("logprobs"), timings=self.config.wants("words"),
                                    language=utt.detected)
        return [delta] if delta is not None else []

    # ---------------------------------------------------------------- long speech

    def _split_if_too_long(self, ch: Channel) -> list[Output]:
        """Split an utterance that outgrew ``max_utterance_s`` (and Whisper's window).

        With stable words, the first part is exactly its committed text and the cut is between
        the last committed word and the next one, so no decode is needed and no word is cut. With
        nothing stable, the cut goes to the quietest frame of the second half and the first part
        gets a final decode.
        """
        utt = ch.utterance
        limit = int(self.limits.max_utterance_s * MODEL_RATE)
        length = ch.vad_pos - utt.start if utt else 0
        if utt is None or length < limit:
            return []
        if utt.committed:
            cut = int(utt.committed[-1].end * MODEL_RATE)
            if utt.tail:
                cut = (cut + int(utt.tail[0].start * MODEL_RATE)) // 2
            if cut - utt.start < limit // 2 and length < limit + 5 * MODEL_RATE:
                return []  # too little is stable yet; give agreement a few more seconds
        else:
            cut = self._quietest_point(ch, utt.start + limit // 2, ch.vad_pos)
        cut = max(utt.start + FRAME, min(cut, ch.vad_pos))
        ch.inflight = None  # its result belongs to the old utterance and will be ignored
        _, out = self._close_utterance(ch, cut)
        if utt.committed:
            out += self._resolve_without_decode(ch, utt, [])
        else:
            out += self._submit_final(ch, utt, cut)
        return out + self._open_utterance(ch, cut, cut)

    def _quietest_point(self, ch: Channel, lo: int, hi: int) -> int:
        first = max(0, ch.frame_index(lo))
        last = max(first + 1, ch.frame_index(hi))
        window = ch.probs[first:last]
        if not window:
            return hi
        return ch.probs_start + (first + int(np.argmin(window))) * FRAME
