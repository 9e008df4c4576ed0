"""The Sans-I/O session core: audio and client messages in, events and decode requests out.

Nothing here touches a socket, a thread or a clock. Time is audio time (samples at 16 kHz since the
session began). The shell (``server.py``) moves bytes in, submits the :class:`DecodeTicket` outputs
to the scheduler and feeds results back with :meth:`Session.receive_decode_result`.

Commit policy, per utterance (see ``commit.py`` for the word-level rules):

* While speech goes on, the open utterance is re-decoded each time ``interim_step`` of new audio
  has arrived and the previous decode came back (one decode in flight per channel, so a loaded
  server degrades to longer steps instead of a growing queue). Words that two successive
  hypotheses agree on are committed and sent as deltas; the committed tokens are forced as the
  decoder's prefix from then on, so committed text is never contradicted.
* When the speaker pauses for ``stable_silence_ms`` (shorter than the turn's
  ``silence_duration_ms``) a decode is started at once, and its words that end before the pause
  are committed: a pause is evidence the words before it are complete, and waiting for a second
  agreeing hypothesis would add a whole decode to the latency of the last word.
* At the end of the utterance, the rest is committed from a last decode, unless the last interim
  decode already heard the pause, in which case its hypothesis is the final one.
* An utterance longer than ``max_utterance_s`` is split at the end of its last committed word.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from stream_server import protocol as p
from stream_server.audio import MODEL_RATE, AudioInput
from stream_server.buffer import SampleBuffer
from stream_server.commit import agreed_prefix_length, words_before
from stream_server.decoding import (
    DecodeFailure,
    DecodeRequest,
    DecodeResult,
    FailureKind,
    Word,
)
from stream_server.vad import (
    FRAME,
    SpeechEnd,
    SpeechStart,
    TurnSegmenter,
    VadModel,
    VadParams,
)

MS = MODEL_RATE // 1000


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    """Knobs of the commit policy and memory bounds; defaults measured with the benchmark."""

    interim_step_ms: int = 300
    stable_silence_ms: int = 200
    min_decode_ms: int = 300
    max_utterance_s: float = 15.0
    trailing_audio_ms: int = 300  # silence kept after the speech end for the final decode
    context_chars: int = 200  # earlier text given to the decoder as its prompt
    # The decoder is forced to continue from at most this many committed words; older ones leave
    # the window and become context. CTranslate2 feeds forced tokens one step at a time, so an
    # unbounded prefix made every decode of a long turn as slow as decoding the whole turn.
    prefix_words: int = 8
    # Windows shorter than this get no earlier text as context: on a 0.4 s "four" the decoder
    # copied a whole earlier sentence out of the context (the largest single WER item on the
    # benchmark corpus). The client's own prompt is always given.
    min_context_window_ms: int = 1500
    # Agreement commits a word only once the decoder has heard this much audio after it: short
    # right context is where tiny models guess ("how do you marry" for "had he married").
    right_context_ms: int = 300
    # ... and only once the utterance is this long: the first words of a turn, decoded from a
    # second of audio, are the least reliable ones.
    min_commit_window_ms: int = 2000
    # A final decode's words that start this long after the VAD's speech end belong to the next
    # turn (its first syllable often sits in the trailing audio), not to this one.
    end_tolerance_ms: int = 250
    interim_decoding: bool = True  # False for whole files: one final decode per utterance


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
    final: bool
    window_start: int  # absolute sample of request.audio[0]
    window_end: int
    pause_start: int | None  # start of a pause that the window ends in, if any
    # Finals are applied strictly in audio order; an early result waits here for its turn.
    resolved: bool = False
    words: list[Word] = dataclasses.field(default_factory=list)
    attempt: int = 1
    committed: int = 0  # words the utterance had committed when this was submitted


Output = p.ServerEvent | DecodeTicket | CloseConnection


@dataclasses.dataclass(eq=False)
class Utterance:
    item_id: str
    serial: int
    start: int  # first sample of the utterance's audio (with prefix padding)
    onset: int  # first speech sample
    end: int | None = None
    committed: list[Word] = dataclasses.field(default_factory=list)  # absolute times
    tail: list[Word] = dataclasses.field(default_factory=list)  # last uncommitted hypothesis
    last_window_end: int = 0  # end of the last interim window submitted
    tail_window_end: int = 0  # end of the window whose hypothesis ``tail`` is
    no_speech_prob: float = 0.0
    language: str | None = None
    interim_sent: str = ""
    finished: bool = False

    def prefix_from(self, keep: int) -> int:
        """Index of the first committed word that stays in the decode window (the last ``keep``)."""
        return max(0, len(self.committed) - keep)

    def text(self) -> str:
        return "".join(w.text for w in self.committed)


class Channel:
    """One audio channel: its buffer, VAD state and the utterance pipeline."""

    def __init__(self, index: int, vad: VadModel, params: VadParams | None) -> None:
        self.index = index
        self.buffer = SampleBuffer()
        self.vad = vad
        self.vad_state = vad.new_state()
        self.vad_pos = 0  # next frame's first sample
        self.probs: list[float] = []  # per frame since probs_start
        self.probs_start = 0
        self.segmenter = TurnSegmenter(params) if params else None
        self.utterance: Utterance | None = None
        self.inflight: DecodeTicket | None = None
        self.finals: list[DecodeTicket] = []  # awaiting results, in audio order
        self.pause_decoded: int | None = None  # pause start that already got its early decode
        self.held: list[tuple[Utterance, p.ServerEvent]] = []  # see Session._in_order
        self.consumed = 0  # audio before this belongs to utterances already closed


class Session:
    def __init__(
        self,
        session_id: str,
        *,
        config: p.SessionConfig,
        vad: VadModel,
        limits: SessionLimits = SessionLimits(),
        model_exists: Callable[[str], bool] = lambda name: True,
    ) -> None:
        self.id = session_id
        self.config = config
        self.limits = limits
        self._model_exists = model_exists
        self._vad = vad
        self._audio_in = AudioInput(config.input_audio_format, config.sample_rate)
        self._channels = [Channel(0, vad, self._vad_params())]
        self._items = itertools.count(1)
        self._events = itertools.count(1)
        self._text_parts: list[str] = []
        self._logprobs: list[p.TokenLogprob] = []
        self._received = 0
        self.closing = False
        self.closed = False
        self._previous_model = config.model
        # Outputs, each on its own queue (as ``websockets``' protocol does): the runner drains
        # them after every input, so no caller routes a mixed list by type.
        self._events_out: list[p.ServerEvent] = []
        self._decodes_out: list[DecodeTicket] = []
        self._promotions_out: list[DecodeTicket] = []
        self._close_out: CloseConnection | None = None
        self._close_taken = False

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
                self._events_out.append(out)

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

    def _receive_bytes(self, data: bytes) -> list[Output]:
        if self.closing:
            return []
        decoded = self._audio_in.feed(data)
        out: list[Output] = []
        if decoded.invalid_samples:
            out.append(
                p.Error.invalid(
                    "invalid_audio",
                    f"{decoded.invalid_samples} float32 samples were NaN or infinite; replaced by silence",
                )
            )
        return out + self._push_audio(decoded.samples)

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
            return self._receive_bytes(message.audio)
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
        out = self._push_audio(self._audio_in.flush())
        self.closing = True
        for ch in self._channels:
            if ch.utterance is not None:
                out += self._end_utterance(ch, self._channel_end(ch), pause_end=None)
        return out + self._maybe_finish()

    def _receive_decode_result(self, ticket: DecodeTicket, result: DecodeResult) -> list[Output]:
        ch = self._channels[ticket.channel]
        if ticket.final:
            return self._final_result(ch, ticket, result)
        if ch.inflight is ticket:
            ch.inflight = None
        out: list[Output] = []
        utt = ticket.utterance
        if utt is ch.utterance and not utt.finished:
            self._previous_model = self.config.model
            out += self._interim_result(ch, ticket, result)
        return out + self._schedule(ch)

    def _receive_decode_failure(self, ticket: DecodeTicket, failure: DecodeFailure) -> list[Output]:
        """A decode that was shed under load, could not load its model, or raised."""
        ch = self._channels[ticket.channel]
        out: list[Output] = []
        if failure.kind is FailureKind.MODEL_UNAVAILABLE:
            if self.config.model == ticket.request.model:
                self.config = self.config.model_copy(update={"model": self._previous_model})
            out.append(p.Error.server(failure.kind.value, failure.message, "session.model"))
        elif failure.kind is FailureKind.DECODER_ERROR:
            out.append(p.Error.server(failure.kind.value, failure.message))
        dropped = failure.kind is FailureKind.DROPPED
        if ticket.final and (dropped or failure.kind is FailureKind.DECODER_ERROR and ticket.attempt < 2):
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
        return VadParams(td.threshold, td.prefix_padding_ms, td.silence_duration_ms)

    def _session_view(self) -> dict[str, Any]:
        return {"id": self.id, **self.config.model_dump()}

    def _update(self, changes: dict[str, Any]) -> list[Output]:
        try:
            new = self.config.updated(changes)
        except p.ProtocolError as exc:
            return [p.Error.invalid(exc.code, exc.message, exc.param)]
        if "model" in changes and not self._model_exists(new.model):
            return [p.Error.invalid("model_not_found", f"model {new.model!r} is not known to this server", "session.model")]
        out: list[Output] = []
        old = self.config
        self._previous_model = old.model
        self.config = new
        tail = self._audio_in.reconfigure(new.input_audio_format, new.sample_rate)
        out += self._push_audio(tail)
        if new.turn_detection != old.turn_detection:
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
        ch.buffer.append(samples)
        self._received = max(self._received, ch.buffer.end)
        out: list[Output] = []
        n_frames = (ch.buffer.end - ch.vad_pos) // FRAME
        if n_frames > 0:
            frames = ch.buffer.slice(ch.vad_pos, ch.vad_pos + n_frames * FRAME).reshape(n_frames, FRAME)
            probs, ch.vad_state = ch.vad.probabilities(frames, ch.vad_state)
            for prob in probs:
                out += self._on_frame(ch, float(prob), ch.vad_pos)
                ch.probs.append(float(prob))
                ch.vad_pos += FRAME
        start = max(ch.buffer.start, ch.consumed)
        if ch.segmenter is None and ch.utterance is None and ch.buffer.end > start:
            out += self._open_utterance(ch, start, start)
        out += self._split_if_too_long(ch)
        out += self._schedule(ch)
        self._trim(ch)
        return out

    def _on_frame(self, ch: Channel, prob: float, frame_start: int) -> list[Output]:
        if ch.segmenter is None:
            return []
        decision = ch.segmenter.push(prob, frame_start)
        if isinstance(decision, SpeechStart) and ch.utterance is None:
            return self._open_utterance(ch, decision.sample, decision.onset)
        if isinstance(decision, SpeechEnd) and ch.utterance is not None:
            return self._end_utterance(ch, decision.sample, pause_end=frame_start + FRAME)
        return []

    def _trim(self, ch: Channel) -> None:
        if ch.utterance is not None:
            keep_from = ch.utterance.start
        else:
            td = self.config.turn_detection
            padding = (td.prefix_padding_ms if td else 0) * MS
            keep_from = ch.vad_pos - padding - FRAME * 4
        keep_from = min(keep_from, ch.vad_pos)
        ch.buffer.trim_before(keep_from)
        drop = (keep_from - ch.probs_start) // FRAME
        if drop > 0:
            del ch.probs[:drop]
            ch.probs_start += drop * FRAME

    def _channel_end(self, ch: Channel) -> int:
        return ch.buffer.end

    # ---------------------------------------------------------------- utterance lifecycle

    def _open_utterance(self, ch: Channel, start: int, onset: int) -> list[Output]:
        start = max(start, ch.buffer.start)
        serial = next(self._items)
        utt = Utterance(item_id=f"item_{self.id[-8:]}_{serial}", serial=serial, start=start, onset=onset)
        utt.last_window_end = start
        ch.utterance = utt
        ch.pause_decoded = None
        return self._in_order(ch, utt, p.SpeechStarted(utt.item_id, start // MS))

    def _end_utterance(self, ch: Channel, end: int, *, pause_end: int | None) -> list[Output]:
        """Close the open utterance at ``end``; its last words come from a final decode or the
        last interim hypothesis when that one already heard the pause."""
        utt = ch.utterance
        assert utt is not None
        ch.utterance = None
        utt.end = max(end, utt.start)
        ch.consumed = max(ch.consumed, utt.end)
        out: list[Output] = self._in_order(ch, utt, p.SpeechStopped(utt.item_id, utt.end // MS))
        heard = utt.end + self.limits.stable_silence_ms * MS
        inflight = ch.inflight
        if pause_end is not None and inflight is not None and inflight.utterance is utt and inflight.window_end >= heard:
            # The decode already running heard the pause: its hypothesis becomes the final one.
            inflight.final = True
            ch.inflight = None
            ch.finals.append(inflight)
            self._promotions_out.append(inflight)
            return out
        if pause_end is not None and utt.tail_window_end >= heard:
            return out + self._resolve_without_decode(ch, utt, self._within_turn(utt, utt.tail))
        window_end = min(self._channel_end(ch), utt.end + self.limits.trailing_audio_ms * MS)
        ticket = self._ticket(ch, utt, utt.start, window_end, final=True, pause_start=None)
        ch.finals.append(ticket)
        out.append(ticket)
        return out

    def _resolve_without_decode(self, ch: Channel, utt: Utterance, words: list[Word]) -> list[Output]:
        """Close ``utt`` with ``words`` as its last text, after any finals still ahead of it."""
        ticket = self._ticket(ch, utt, utt.start, utt.start, final=True, pause_start=None)
        ticket.resolved = True
        ticket.words = list(words)
        ch.finals.append(ticket)
        return self._apply_resolved_finals(ch)

    def _apply_resolved_finals(self, ch: Channel) -> list[Output]:
        out: list[Output] = []
        while ch.finals and ch.finals[0].resolved:
            ticket = ch.finals.pop(0)
            utt = ticket.utterance
            utt.tail = []
            out += self._commit_words(utt, ticket.words)
            out += self._finish_utterance(ch, utt)
            out += self._release_held(ch)
        return out

    def _in_order(self, ch: Channel, utt: Utterance, event: p.ServerEvent) -> list[Output]:
        """Hold a later utterance's start/stop until every earlier utterance's segment is out.

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

    def _finish_utterance(self, ch: Channel, utt: Utterance) -> list[Output]:
        utt.finished = True
        out: list[Output] = []
        if utt.interim_sent:
            utt.interim_sent = ""
            if self.config.interim_results:
                out.append(p.TranscriptInterim(utt.item_id, "", [] if self.config.wants("words") else None))
        tokens = [t for w in utt.committed for t in w.tokens]
        logprobs = [t.logprob for t in tokens]
        wants_lp = self.config.wants("logprobs")
        start = utt.committed[0].start if utt.committed else utt.onset / MODEL_RATE
        end = (utt.end or utt.onset) / MODEL_RATE
        out.append(
            p.TranscriptSegment(
                item_id=utt.item_id,
                start=round(min(start, end), 3),
                end=round(end, 3),
                text=utt.text().strip(),
                logprobs=[p.TokenLogprob.of(t.text, t.logprob) for t in tokens] if wants_lp else None,
                words=_word_timings(utt.committed) if self.config.wants("words") else None,
                avg_logprob=round(float(np.mean(logprobs)), 4) if logprobs else 0.0,
                no_speech_prob=round(utt.no_speech_prob, 4),
            )
        )
        return out + self._maybe_finish()

    def _maybe_finish(self) -> list[Output]:
        if not self.closing or self.closed:
            return []
        if any(ch.finals or ch.utterance for ch in self._channels):
            return []
        self.closed = True
        text = "".join(self._text_parts)
        logprobs = self._logprobs if self.config.wants("logprobs") else None
        return [
            p.TranscriptDone(text, logprobs, p.Usage(round(self.audio_seconds, 3))),
            CloseConnection(1000, "session closed"),
        ]

    def _commit(self) -> list[Output]:
        ch = self._channels[0]
        utt = ch.utterance
        if utt is None:
            return [p.BufferCommitted(None)]
        now = self._channel_end(ch)
        out = self._end_utterance(ch, now, pause_end=None)
        out.append(p.BufferCommitted(utt.item_id))
        if ch.segmenter is not None and ch.segmenter.in_speech:
            # The speaker is still talking: what follows the commit is a new utterance.
            out += self._open_utterance(ch, now, now)
            ch.segmenter.force_start(now)
        return out

    def _clear(self) -> list[Output]:
        out: list[Output] = []
        for ch in self._channels:
            utt = ch.utterance
            if utt is not None:
                ch.utterance = None
                utt.end = self._channel_end(ch)
                ch.consumed = max(ch.consumed, utt.end)
                out += self._in_order(ch, utt, p.SpeechStopped(utt.item_id, utt.end // MS))
                out += self._resolve_without_decode(ch, utt, [])
            if ch.segmenter is not None:
                ch.segmenter.reset(floor=ch.vad_pos)
            ch.inflight = None
            ch.buffer.trim_before(ch.vad_pos)
        out.append(p.BufferCleared())
        return out

    # ---------------------------------------------------------------- decoding

    def _prompt(self, without: str = "") -> str:
        text = "".join(self._text_parts)
        if without and text.endswith(without):
            text = text[: len(text) - len(without)]  # the forced prefix is not context too
        history = text[-self.limits.context_chars :]
        if history and not history[0].isspace() and len(text) > self.limits.context_chars:
            history = history.split(" ", 1)[-1]  # do not start the context mid-word
        return " ".join(part for part in (self.config.prompt.strip(), history.strip()) if part)

    def _ticket(self, ch: Channel, utt: Utterance, start: int, end: int, *, final: bool, pause_start: int | None) -> DecodeTicket:
        """A request for ``[start, end)``; with committed words, the window starts at the first
        of the last ``prefix_words`` of them (those are forced as the prefix)."""
        k = utt.prefix_from(self.limits.prefix_words)
        kept = utt.committed[k:]
        if k and start == utt.start:
            start = max(utt.start, int((kept[0].start - 0.05) * MODEL_RATE))
        prefix_text = "".join(w.text for w in kept)
        if end - start >= self.limits.min_context_window_ms * MS:
            prompt = self._prompt(without=prefix_text)
        else:
            prompt = self.config.prompt.strip()
        request = DecodeRequest(
            audio=ch.buffer.slice(start, end),
            prefix=tuple(t.id for w in kept for t in w.tokens),
            prompt=prompt,
            language=self.config.language or utt.language,
            model=self.config.model,
            final=final,
            key=(self.id, ch.index),
        )
        return DecodeTicket(request, ch.index, utt, final, start, end, pause_start, committed=len(utt.committed))

    def _schedule(self, ch: Channel) -> list[Output]:
        """Start an interim decode of the open utterance when one is due and none is in flight."""
        utt = ch.utterance
        if not self.limits.interim_decoding or utt is None or ch.inflight is not None or ch.finals:
            return []
        now = ch.vad_pos  # decode only audio the VAD has already judged
        if now - utt.start < self.limits.min_decode_ms * MS:
            return []
        pause_start = None
        seg = ch.segmenter
        if seg is not None and seg.silence_samples >= self.limits.stable_silence_ms * MS:
            pause_start = now - seg.silence_samples
        early = pause_start is not None and ch.pause_decoded != pause_start
        if not early and now - utt.last_window_end < self.limits.interim_step_ms * MS:
            return []
        if early:
            ch.pause_decoded = pause_start
        utt.last_window_end = now
        ticket = self._ticket(ch, utt, utt.start, now, final=False, pause_start=pause_start)
        ch.inflight = ticket
        return [ticket]

    def _absolute(self, result: DecodeResult, window_start: int) -> list[Word]:
        offset = window_start / MODEL_RATE
        return [dataclasses.replace(w, start=w.start + offset, end=w.end + offset) for w in result.words]

    def _interim_result(self, ch: Channel, ticket: DecodeTicket, result: DecodeResult) -> list[Output]:
        utt = ticket.utterance
        utt.no_speech_prob = result.no_speech_prob
        if utt.language is None and self.config.language is None:
            utt.language = result.language
        words = self._absolute(result, ticket.window_start)
        if ticket.committed != len(utt.committed):
            return []  # decoded against an older prefix; its words no longer line up
        # The newest word waits for the word after it: until then its punctuation ("printed."
        # vs "printed in") is a guess. A pause settles it instead (below).
        n = min(agreed_prefix_length(utt.tail, words), max(0, len(words) - 1))
        horizon = (ticket.window_end - self.limits.right_context_ms * MS) / MODEL_RATE
        n = min(n, words_before(words, horizon, tolerance=0.0))
        if ticket.window_end - utt.start < self.limits.min_commit_window_ms * MS:
            n = 0
        if ticket.pause_start is not None:
            n = max(n, words_before(words, ticket.pause_start / MODEL_RATE))
        out = self._commit_words(utt, words[:n])
        utt.tail = words[n:]
        utt.tail_window_end = ticket.window_end
        if self.config.interim_results:
            interim = "".join(w.text for w in utt.tail)
            if interim != utt.interim_sent:
                utt.interim_sent = interim
                timings = _word_timings(utt.tail) if self.config.wants("words") else None
                out.append(p.TranscriptInterim(utt.item_id, interim, timings))
        return out

    def _final_result(self, ch: Channel, ticket: DecodeTicket, result: DecodeResult | None) -> list[Output]:
        ticket.resolved = True
        if result is not None and len(ticket.request.audio):
            ticket.utterance.no_speech_prob = result.no_speech_prob
            ticket.words = self._within_turn(ticket.utterance, self._absolute(result, ticket.window_start))
        return self._apply_resolved_finals(ch) + self._schedule(ch)

    def _within_turn(self, utt: Utterance, words: list[Word]) -> list[Word]:
        if utt.end is None:
            return words
        limit = (utt.end + self.limits.end_tolerance_ms * MS) / MODEL_RATE
        return [w for w in words if w.start <= limit]

    def _commit_words(self, utt: Utterance, words: list[Word]) -> list[Output]:
        if not words:
            return []
        utt.committed.extend(words)
        text = "".join(w.text for w in words)
        if not self._text_parts:
            text = text.lstrip()
        if not text:
            return []
        self._text_parts.append(text)
        tokens = [p.TokenLogprob.of(t.text, t.logprob) for w in words for t in w.tokens]
        if tokens and not "".join(self._text_parts[:-1]):
            tokens[0] = p.TokenLogprob.of(tokens[0].token.lstrip(), tokens[0].logprob)
        self._logprobs.extend(tokens)
        timings = _word_timings(words) if self.config.wants("words") else None
        return [p.TranscriptDelta(utt.item_id, text, tokens if self.config.wants("logprobs") else None, timings)]

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
        ch.utterance = None
        ch.inflight = None  # its result belongs to the old utterance and will be ignored
        utt.end = cut
        ch.consumed = max(ch.consumed, cut)
        out: list[Output] = self._in_order(ch, utt, p.SpeechStopped(utt.item_id, cut // MS))
        if utt.committed:
            out += self._resolve_without_decode(ch, utt, [])
        else:
            ticket = self._ticket(ch, utt, utt.start, cut, final=True, pause_start=None)
            ch.finals.append(ticket)
            out.append(ticket)
        return out + self._open_utterance(ch, cut, cut)

    def _quietest_point(self, ch: Channel, lo: int, hi: int) -> int:
        first = max(0, (lo - ch.probs_start) // FRAME)
        last = max(first + 1, (hi - ch.probs_start) // FRAME)
        window = ch.probs[first:last]
        if not window:
            return hi
        return ch.probs_start + (first + int(np.argmin(window))) * FRAME


def _word_timings(words: list[Word]) -> list[p.WordTiming]:
    """Words for the client; punctuation committed on its own joins the word before it."""
    merged: list[Word] = []
    for word in words:
        text = word.text
        if merged and not text.startswith(" ") and text.strip() and not any(c.isalnum() for c in text):
            last = merged[-1]
            merged[-1] = Word(last.text + text, last.start, max(last.end, word.end), last.tokens + word.tokens)
        else:
            merged.append(word)
    return [p.WordTiming(w.text.strip(), round(w.start, 3), round(w.end, 3), round(w.probability, 4)) for w in merged]
