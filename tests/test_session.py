"""The Sans-I/O core driven with the deterministic fakes: segmentation, commit policy, event order."""

from __future__ import annotations

import base64
import dataclasses
import itertools
import json
from collections.abc import Callable

import numpy as np
import pytest

from stream_server import protocol as p
from stream_server.decoding import DecodeFailure, DecodeRequest, DecodeResult, FailureKind, Token
from stream_server.scheduler import DecodeDropped, failure_of
from stream_server.session import CloseConnection, DecodeTicket, Session, SessionLimits
from tests.fakes import BurstDecoder, EnergyVad, silence, speech, to_pcm16

CHUNK = 320  # 20 ms


#: The fake speech's turns last 1-4 s; the tests of the commit mechanics (agreement while the
#: speaker goes on, pauses, finals) let agreement start at 1 s. The default's first 3.5 s, where
#: only agreed words commit even at a pause, has tests of its own here and in test_policy.
MECHANICS_COMMIT_WINDOW_MS = 1000


class Driver:
    """Feeds audio in 20 ms frames; decodes complete ``latency_chunks`` frames after submission."""

    def __init__(self, session: Session | None = None, latency_chunks: int = 5, first_interim_ms: int = SessionLimits.first_interim_ms, **config) -> None:
        self.decoder = BurstDecoder()
        self.session = session or Session(
            "sess_test0001",
            config=p.SessionConfig(**{"interim_results": True, **config}),
            vad=EnergyVad(),
            limits=SessionLimits(max_utterance_s=6.0, min_commit_window_ms=MECHANICS_COMMIT_WINDOW_MS, first_interim_ms=first_interim_ms),
            model_exists=lambda name: name in ("tiny.en", "base"),
        )
        self.latency = latency_chunks
        self.inflight: list[tuple[int, DecodeTicket]] = []
        self.clock = 0
        self.events: list[p.ServerEvent] = []
        self.closed: CloseConnection | None = None
        self.session.start()
        self.drain()

    def drain(self) -> None:
        """Take the session's outputs off their queues (what the runner does after each input)."""
        for ticket in self.session.decodes_to_submit():
            self.inflight.append((self.clock + self.latency, ticket))
        self.promoted = getattr(self, "promoted", []) + self.session.decodes_to_promote()
        self.events += self.session.events_to_send()
        self.closed = self.session.close_expected() or self.closed

    def tick(self) -> None:
        self.clock += 1
        due = [item for item in self.inflight if item[0] <= self.clock]
        self.inflight = [item for item in self.inflight if item[0] > self.clock]
        for _, ticket in due:
            self.resolve(ticket)

    def resolve(self, ticket: DecodeTicket) -> None:
        try:
            [result] = self.decoder.decode_batch([ticket.request])
        except (RuntimeError, DecodeDropped) as exc:  # a failure, or work shed under load
            self.session.receive_decode_failure(ticket, failure_of(exc))
        else:
            self.session.receive_decode_result(ticket, result)
        self.drain()

    def feed(self, samples: np.ndarray) -> None:
        data = to_pcm16(samples)
        for i in range(0, len(data), CHUNK * 2):
            self.session.receive_bytes(data[i : i + CHUNK * 2])
            self.drain()
            self.tick()

    def send(self, message: dict) -> None:
        self.session.receive_text(json.dumps(message))
        self.drain()

    def close(self) -> None:
        self.session.close()
        self.drain()
        while self.inflight:
            self.tick()

    def of(self, kind: type) -> list:
        return [e for e in self.events if isinstance(e, kind)]

    def types(self) -> list[str]:
        return [e.type for e in self.events]


def spoken(*words: int) -> str:
    return " ".join(f"w{k}" for k in words)


def test_one_utterance_events_in_order_and_deltas_spell_done() -> None:
    d = Driver()
    d.feed(silence(0.5))
    d.feed(speech([1, 2, 3, 4, 5]))
    d.feed(silence(1.0))
    d.close()
    assert d.closed == CloseConnection(1000, "session closed")
    kinds = [t for t in d.types() if t != "transcript.text.interim"]
    assert kinds[:3] == ["session.created", "input_audio_buffer.speech_started", "transcript.text.delta"]
    assert kinds[-2:] == ["transcript.segment", "transcript.text.done"]
    assert kinds.index("input_audio_buffer.speech_stopped") < kinds.index("transcript.segment")
    done = d.of(p.TranscriptDone)[0]
    assert done.text == spoken(1, 2, 3, 4, 5)
    assert "".join(e.delta for e in d.of(p.TranscriptDelta)) == done.text
    [segment] = d.of(p.TranscriptSegment)
    assert segment.text == done.text
    assert segment.avg_logprob < 0
    assert [lp.token.strip() for lp in done.logprobs] == done.text.split()
    assert all(lp.logprob < 0 for lp in done.logprobs)
    assert done.usage.seconds == pytest.approx(0.5 + 1.73 + 1.0, abs=0.05)


def test_words_become_final_before_the_turn_ends() -> None:
    """Agreement commits early words while speech goes on; the pause commits the rest."""
    d = Driver()
    d.feed(speech([1, 2, 3, 4, 5, 6, 7, 8]))
    deltas_during_speech = "".join(e.delta for e in d.of(p.TranscriptDelta))
    assert deltas_during_speech.split()[:5] == ["w1", "w2", "w3", "w4", "w5"]
    d.feed(silence(0.45))  # shorter than silence_duration_ms: the turn is still open
    assert not d.of(p.SpeechStopped)
    assert "".join(e.delta for e in d.of(p.TranscriptDelta)) == spoken(*range(1, 9))


def test_partial_words_are_never_committed() -> None:
    d = Driver()
    d.feed(speech([1, 2, 3]))
    d.feed(silence(1.0))
    d.close()
    assert all("~" not in e.delta for e in d.of(p.TranscriptDelta))
    # ...though captions did show them while they were being spoken.
    assert any("~" in e.text for e in d.of(p.TranscriptInterim))


def test_prefix_padding_is_included_in_the_utterance() -> None:
    d = Driver(turn_detection={"prefix_padding_ms": 200, "silence_duration_ms": 500})
    d.feed(silence(1.0))
    d.feed(speech([1, 2]))
    [started] = d.of(p.SpeechStarted)
    assert started.audio_start_ms == pytest.approx(800, abs=40)


@pytest.mark.parametrize(("rate", "start_ms"), [(16000, 800), (8000, 600)])
def test_a_phone_line_starts_its_utterances_earlier_than_the_padding(rate: int, start_ms: int) -> None:
    """On telephone-band input the VAD's onset comes late (SessionLimits.narrowband_padding_ms):
    an 8 kHz stream keeps 200 ms more than ``prefix_padding_ms`` before it, for the decoder."""
    d = Driver(sample_rate=rate, turn_detection={"prefix_padding_ms": 200, "silence_duration_ms": 500})
    step = 16000 // rate  # the 220 Hz tone survives taking every other sample
    d.feed(silence(1.0)[::step])
    d.feed(speech([1, 2])[::step])
    d.feed(silence(1.0)[::step])
    d.close()
    [started] = d.of(p.SpeechStarted)
    assert started.audio_start_ms == pytest.approx(start_ms, abs=40)
    [segment] = d.of(p.TranscriptSegment)
    assert segment.text == spoken(1, 2)


def test_a_session_that_changes_to_a_phone_rate_pads_as_a_phone_line() -> None:
    d = Driver(turn_detection={"prefix_padding_ms": 200, "silence_duration_ms": 500})
    d.send({"type": "session.update", "session": {"sample_rate": 8000}})
    d.feed(silence(1.0)[::2])
    d.feed(speech([1, 2])[::2])
    [started] = d.of(p.SpeechStarted)
    assert started.audio_start_ms == pytest.approx(600, abs=40)


def test_pause_longer_than_silence_duration_splits_turns() -> None:
    d = Driver(turn_detection={"silence_duration_ms": 500})
    d.feed(speech([1, 2]) )
    d.feed(silence(0.8))
    d.feed(speech([3, 4]))
    d.feed(silence(0.8))
    d.close()
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(1, 2), spoken(3, 4)]
    assert len(d.of(p.SpeechStarted)) == 2


def test_audio_taken_in_steps_gives_the_same_turns_at_the_same_audio_times() -> None:
    """``intake_step_ms`` changes when the session hears the audio, not what it hears: the turns
    end at the same samples and read the same; only the events come later (by up to a step)."""
    runs = []
    for step_ms in (0, 100):
        session = Session(
            "sess_step0001",
            config=p.SessionConfig(interim_results=True),
            vad=EnergyVad(),
            limits=SessionLimits(max_utterance_s=6.0, min_commit_window_ms=MECHANICS_COMMIT_WINDOW_MS, intake_step_ms=step_ms),
        )
        d = Driver(session=session)
        d.feed(speech([1, 2]))
        d.feed(silence(0.8))
        d.feed(speech([3, 4]))
        d.feed(silence(0.8))
        d.close()
        runs.append(([s.text for s in d.of(p.TranscriptSegment)], [e.audio_end_ms for e in d.of(p.SpeechStopped)]))
    assert runs[0] == runs[1]
    assert runs[0][0] == [spoken(1, 2), spoken(3, 4)]


def test_a_phone_line_is_taken_in_steps_of_narrowband_intake_step_ms() -> None:
    """With ``narrowband_intake_step_ms``, input at 8 kHz (Twilio, AudioHook: 20 ms frames per
    leg) reaches the VAD in steps of at least that; wideband input as it arrives, unless
    ``intake_step_ms``; without it (the default) a phone line as it arrives too."""
    def heard_after_frames(rate: int, frames: int, **limits: int) -> float:
        session = Session("sess_phone001", config=p.SessionConfig(sample_rate=rate), vad=EnergyVad(), limits=SessionLimits(**limits))
        session.start()
        for _ in range(frames):
            session.receive_bytes(to_pcm16(silence(0.02 * rate / 16000)))
        return session.audio_seconds

    # (the streaming resampler holds back its last ~4 ms until more audio comes)
    one, two, three, four = (heard_after_frames(8000, n, narrowband_intake_step_ms=60) for n in (1, 2, 3, 4))
    assert one == two == 0.0 and three == four == pytest.approx(0.06, abs=0.005)
    assert heard_after_frames(8000, 1) == pytest.approx(0.02, abs=0.005)
    assert heard_after_frames(16000, 1, narrowband_intake_step_ms=60) == 0.02
    assert heard_after_frames(16000, 1, intake_step_ms=60) == 0.0


def test_a_load_intake_step_set_and_lifted_mid_stream_gives_the_same_turns() -> None:
    """The runner lengthens the intake step while the server is behind and lifts it after
    (``set_load_intake_step_ms``, every message): the turns end at the same samples and read the
    same as audio taken as it arrives, however often the step changes, held samples included."""
    runs = []
    for schedule in ((0,), (100, 0, 0, 100, 40, 0, 100)):
        session = Session(
            "sess_loadstep1",
            config=p.SessionConfig(interim_results=True),
            vad=EnergyVad(),
            limits=SessionLimits(max_utterance_s=6.0, min_commit_window_ms=MECHANICS_COMMIT_WINDOW_MS),
        )
        d = Driver(session=session)
        steps = itertools.cycle(schedule)
        for part in (speech([1, 2]), silence(0.8), speech([3, 4]), silence(0.8)):
            data = to_pcm16(part)
            for i in range(0, len(data), CHUNK * 2):
                session.set_load_intake_step_ms(next(steps))
                session.receive_bytes(data[i : i + CHUNK * 2])
                d.drain()
                d.tick()
        d.close()
        runs.append(([s.text for s in d.of(p.TranscriptSegment)], [e.audio_end_ms for e in d.of(p.SpeechStopped)]))
    assert runs[0] == runs[1]
    assert runs[0][0] == [spoken(1, 2), spoken(3, 4)]


def test_a_load_intake_step_holds_audio_for_its_step_on_every_input_of_the_session() -> None:
    """While the load step is set, each input (interleaved channels, or a channel sent on its
    own as Twilio sends a track) releases audio per step; at 0 the configured step is back and
    what was held goes out with the next message."""
    session = Session("sess_loadstep2", config=p.SessionConfig(channels=2), vad=EnergyVad(), limits=SessionLimits())
    session.start()
    frame = to_pcm16(silence(0.02))
    session.set_load_intake_step_ms(60)
    session.receive_message(p.AudioAppend(frame, channel=1))
    session.receive_message(p.AudioAppend(frame, channel=1))
    assert session.audio_seconds == 0.0
    session.receive_message(p.AudioAppend(frame, channel=1))
    assert session.audio_seconds == pytest.approx(0.06)
    session.receive_message(p.AudioAppend(frame, channel=1))
    session.set_load_intake_step_ms(0)
    session.receive_message(p.AudioAppend(frame, channel=1))
    assert session.audio_seconds == pytest.approx(0.10)


def test_pause_shorter_than_silence_duration_keeps_one_turn() -> None:
    d = Driver(turn_detection={"silence_duration_ms": 1200})
    d.feed(speech([1, 2]))
    d.feed(silence(0.8))
    d.feed(speech([3, 4]))
    d.feed(silence(1.5))
    d.close()
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(1, 2, 3, 4)]


def test_each_segment_precedes_the_next_utterances_text() -> None:
    d = Driver(latency_chunks=20)  # slow decoder: finals overlap the next utterance
    for words in ([1, 2], [3, 4], [5, 6]):
        d.feed(speech(words))
        d.feed(silence(0.6))
    d.close()
    order = [(e.type, getattr(e, "item_id", None)) for e in d.events if isinstance(e, (p.TranscriptDelta, p.TranscriptSegment))]
    seen_segments: set[str] = set()
    items_in_order: list[str] = []
    for kind, item in order:
        if item not in items_in_order:
            items_in_order.append(item)
            assert all(prev in seen_segments for prev in items_in_order[:-1])
        if kind == "transcript.segment":
            seen_segments.add(item)
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4, 5, 6)
    # Whole utterances one after another: the next start waits for the previous segment.
    lifecycle = [(e.type, e.item_id) for e in d.events if isinstance(e, (p.SpeechStarted, p.SpeechStopped, p.TranscriptSegment))]
    items = [e.item_id for e in d.of(p.SpeechStarted)]
    assert lifecycle == [
        (kind, item)
        for item in items
        for kind in ("input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped", "transcript.segment")
    ]


class SubmissionLog(Driver):
    """A Driver that notes, for each decode submitted, its utterance and the events out by then."""

    def __init__(self, **kwargs) -> None:  # type: ignore[no-untyped-def]
        self.submitted: list[tuple[DecodeTicket, int]] = []
        super().__init__(**kwargs)

    def drain(self) -> None:
        tickets = self.session.decodes_to_submit()
        self.submitted += [(t, len(self.events)) for t in tickets]
        for ticket in tickets:
            self.inflight.append((self.clock + self.latency, ticket))
        self.promoted = getattr(self, "promoted", []) + self.session.decodes_to_promote()
        self.events += self.session.events_to_send()
        self.closed = self.session.close_expected() or self.closed


def test_a_turn_that_starts_while_the_last_final_runs_gets_its_first_interim_then_shown_in_order() -> None:
    """Under load a final takes a while, and the next speaker's turn starts meanwhile: its first
    interim goes out at once (not after that final), nothing of it that could commit does, and
    its text waits, with its start, for the earlier segment."""
    d = SubmissionLog(latency_chunks=60)  # 1.2 s per decode: the first final outlasts the next turn's start
    d.feed(speech([1, 2, 3, 4]))
    d.feed(silence(0.6))
    d.feed(speech([5, 6, 7, 8]))
    d.feed(silence(0.6))
    d.close()
    first_item = d.of(p.SpeechStarted)[0].item_id
    first_segment_at = next(i for i, e in enumerate(d.events) if isinstance(e, p.TranscriptSegment) and e.item_id == first_item)
    second = [(t, n) for t, n in d.submitted if t.utterance.item_id != first_item]
    early = [t for t, n in second if n <= first_segment_at]
    assert any(t.final for t, n in d.submitted if t.utterance.item_id == first_item), "the first turn had a final decode"
    assert early and not early[0].final, "the second turn's first interim went out while the first final ran"
    assert len(early) == 1 and early[0].pause_start is None and not early[0].request.commits, "nothing that commits"
    second_events = [i for i, e in enumerate(d.events) if getattr(e, "item_id", first_item) != first_item]
    assert second_events and min(second_events) > first_segment_at, "its start and text come after the first segment"
    assert any(isinstance(d.events[i], p.TranscriptInterim) for i in second_events)
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4, 5, 6, 7, 8)


def test_commit_finalizes_mid_speech_and_speech_continues() -> None:
    d = Driver()
    d.feed(speech([1, 2, 3]))
    d.send({"type": "input_audio_buffer.commit"})
    assert d.of(p.BufferCommitted)[0].item_id == d.of(p.SpeechStarted)[0].item_id
    d.feed(speech([4, 5]))
    d.feed(silence(1.0))
    d.close()
    segments = d.of(p.TranscriptSegment)
    assert len(segments) == 2
    assert d.of(p.TranscriptDone)[0].text.split() == spoken(1, 2, 3, 4, 5).split()


def test_commit_in_mid_speech_then_close_sends_no_turn_without_audio() -> None:
    """A client that commits and closes while its audio still ends in speech (OpenAI Realtime's
    commit, Deepgram's Finalize then CloseStream) got the commit's next utterance too: a
    ``speech_started`` and ``speech_stopped`` at the same millisecond and an empty segment. Nothing
    of it had been sent (its start waited for the first segment) and it held no audio: it goes."""
    d = Driver()
    d.feed(silence(0.3))
    d.feed(speech([1, 2, 3]))
    d.send({"type": "input_audio_buffer.commit"})
    d.close()
    assert [e.item_id for e in d.of(p.SpeechStarted)] == [d.of(p.BufferCommitted)[0].item_id]
    assert len(d.of(p.SpeechStopped)) == 1
    [segment] = d.of(p.TranscriptSegment)
    assert segment.text.split() == spoken(1, 2, 3).split() and segment.end > segment.start
    assert d.of(p.TranscriptDone)[0].text.split() == spoken(1, 2, 3).split()
    assert d.closed == CloseConnection(1000, "session closed")


def test_a_turn_a_commit_opened_is_kept_once_it_was_announced() -> None:
    """The same turn, once its start went out (the first segment came back before the client
    closed), is closed as any other: every ``speech_started`` gets its stop and segment."""
    d = Driver()
    d.feed(silence(0.3))
    d.feed(speech([1, 2, 3]))
    d.send({"type": "input_audio_buffer.commit"})
    while d.inflight:
        d.tick()
    d.close()
    starts, stops, segments = d.of(p.SpeechStarted), d.of(p.SpeechStopped), d.of(p.TranscriptSegment)
    assert len(starts) == len(stops) == len(segments) == 2
    assert segments[1].text == ""


def test_commit_with_nothing_buffered_says_so() -> None:
    d = Driver()
    d.feed(silence(0.5))
    d.send({"type": "input_audio_buffer.commit"})
    assert d.of(p.BufferCommitted) == [p.BufferCommitted(None)]


def test_clear_drops_untranscribed_audio_but_keeps_committed_text() -> None:
    d = Driver(latency_chunks=2)
    d.feed(speech(list(range(1, 10))))
    committed = "".join(e.delta for e in d.of(p.TranscriptDelta))
    assert committed
    d.send({"type": "input_audio_buffer.clear"})
    assert d.of(p.BufferCleared)
    [segment] = d.of(p.TranscriptSegment)
    # The words committed before the failure survive; the rest of that utterance is reported lost.
    assert segment.text and segment.text == "".join(e.delta for e in d.of(p.TranscriptDelta)).strip()
    d.feed(silence(0.5))
    d.close()
    assert d.of(p.TranscriptDone)[0].text == committed


def test_close_finalizes_the_open_utterance() -> None:
    d = Driver(latency_chunks=50)  # nothing committed before close
    d.feed(speech([7, 8, 9]))
    d.close()
    assert d.of(p.TranscriptSegment)[0].text == spoken(7, 8, 9)
    assert d.types()[-1] == "transcript.text.done"
    assert d.closed is not None and d.closed.code == 1000


def test_manual_turns_without_vad() -> None:
    d = Driver(turn_detection=None)
    d.feed(speech([1, 2]))
    d.feed(silence(2.0))  # a pause does not end the turn without VAD
    assert not d.of(p.TranscriptSegment)
    d.send({"type": "input_audio_buffer.commit"})
    while d.inflight:
        d.tick()
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(1, 2)]


def test_long_speech_is_split_without_losing_words() -> None:
    words = list(range(1, 21))  # ~7.3 s of continuous speech, max utterance 6 s
    d = Driver()
    d.feed(speech(words))
    d.feed(silence(1.0))
    d.close()
    segments = d.of(p.TranscriptSegment)
    assert len(segments) >= 2
    assert d.of(p.TranscriptDone)[0].text.split() == spoken(*words).split()
    starts = d.of(p.SpeechStarted)
    assert len(starts) == len(segments)


def test_decoder_failure_on_a_final_keeps_committed_text_and_continues() -> None:
    d = Driver(latency_chunks=5, turn_detection=None)
    d.feed(speech(list(range(1, 12))))
    d.decoder.fail_next_final = 2
    d.send({"type": "input_audio_buffer.commit"})  # the final decode fails, and so does its retry
    for _ in range(20):
        d.tick()
    errors = d.of(p.Error)
    assert errors and errors[0].error.code == "decode_failed" and errors[0].error.type == "server_error"
    [segment] = d.of(p.TranscriptSegment)
    # The words committed before the failure survive; the rest of that utterance is reported lost.
    assert segment.text and segment.text == "".join(e.delta for e in d.of(p.TranscriptDelta)).strip()
    d.feed(speech([17, 18]))
    d.send({"type": "input_audio_buffer.commit"})
    d.close()
    assert d.of(p.TranscriptSegment)[-1].text == spoken(17, 18)


def test_a_final_that_fails_once_is_retried() -> None:
    d = Driver(latency_chunks=50, turn_detection=None)
    d.feed(speech([1, 2, 3]))
    d.decoder.fail_next_final = 1
    d.send({"type": "input_audio_buffer.commit"})
    d.close()
    finals = [r for call in d.decoder.calls for r in call if r.final]
    assert len(finals) == 2 and len(finals[0].audio) == len(finals[1].audio) > 0  # same audio, not the trimmed buffer
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3)
    assert not d.of(p.Error)  # recovered: nothing was lost, so nothing to report


def test_dropped_interim_is_retried_and_a_dropped_promoted_final_is_redecoded() -> None:
    d = Driver(latency_chunks=3)
    d.feed(speech([1, 2])[:8000])
    while not d.inflight:
        d.feed(silence(0.02))
    ticket = d.inflight[0][1]
    d.inflight.clear()
    d.session.receive_decode_failure(ticket, DecodeFailure(FailureKind.DROPPED, "shed"))
    d.drain()
    calls = len(d.decoder.calls)
    d.feed(speech([3, 4]))
    assert len(d.decoder.calls) > calls, "a new interim decode is scheduled once more audio arrived"
    d.feed(silence(1.0))
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4)
    assert not d.of(p.Error)


def test_resampled_input_gives_the_same_words() -> None:
    import soxr

    d = Driver(sample_rate=8000)
    audio = soxr.resample(np.concatenate([speech([1, 2, 3]), silence(1.0)]), 16000, 8000)
    data = to_pcm16(audio)
    for i in range(0, len(data), 320):
        d.session.receive_bytes(data[i : i + 320])
        d.drain()
        d.tick()
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3)


def test_odd_byte_counts_are_kept_for_the_next_frame() -> None:
    d = Driver()
    data = to_pcm16(np.concatenate([speech([1, 2]), silence(1.0)]))
    for i in range(0, len(data), 333):  # odd-sized frames split samples
        d.session.receive_bytes(data[i : i + 333])
        d.drain()
        d.tick()
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2)
    assert d.session.audio_seconds == pytest.approx(len(data) / 2 / 16000)


def test_base64_append_equals_binary_frames() -> None:
    d = Driver()
    data = to_pcm16(np.concatenate([speech([3, 4]), silence(1.0)]))
    for i in range(0, len(data), 640):
        d.send({"type": "input_audio_buffer.append", "audio": base64.b64encode(data[i : i + 640]).decode()})
        d.tick()
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(3, 4)


def test_float32_nan_and_inf_are_silenced_and_reported() -> None:
    d = Driver(input_audio_format="float32")
    samples = np.concatenate([speech([1, 2]), silence(1.0)]).astype("<f4")
    samples[100] = np.nan
    samples[200] = np.inf
    d.session.receive_bytes(samples[:1000].tobytes())
    d.drain()
    [error] = d.of(p.Error)
    assert error.error.code == "invalid_audio"
    raw = samples[1000:].tobytes()
    for i in range(0, len(raw), 1280):
        d.session.receive_bytes(raw[i : i + 1280])
        d.drain()
        d.tick()
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2)


def test_an_english_only_model_refuses_other_languages_however_the_pair_is_reached() -> None:
    """tiny.en would read French speech as English words: the pair is refused, whichever of the
    two fields changes, and the configuration before it is kept whole."""
    d = Driver()
    d.session.receive_text('{"type": "session.update", "session": {"model": "base", "language": "fr"}}')
    d.drain()
    assert not d.of(p.Error) and (d.session.config.model, d.session.config.language) == ("base", "fr")
    d.session.receive_text('{"type": "session.update", "session": {"model": "tiny.en", "sample_rate": 8000}}')
    d.drain()
    [error] = d.of(p.Error)
    assert (error.error.code, error.error.param) == ("unsupported_language", "session.language")
    assert "'tiny.en' transcribes English only" in error.error.message
    assert (d.session.config.model, d.session.config.language, d.session.config.sample_rate) == ("base", "fr", 16000)
    d.session.receive_text('{"type": "session.update", "session": {"model": "tiny.en", "language": "en-GB"}}')
    d.drain()
    assert len(d.of(p.Error)) == 1 and (d.session.config.model, d.session.config.language) == ("tiny.en", "en")


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("not json", "invalid_json", None),
        ("[1, 2]", "invalid_json", None),
        ('{"type": "bogus"}', "unknown_message_type", "type"),
        ('{"no_type": 1}', "unknown_message_type", "type"),
        ('{"type": "session.update", "session": {"sample_rate": 4000}}', "invalid_value", "session.sample_rate"),
        ('{"type": "session.update", "session": {"sample_rate": "16000"}}', "invalid_value", "session.sample_rate"),
        ('{"type": "session.update", "session": {"turn_detection": {"threshold": 1.5}}}', "invalid_value", "session.turn_detection.threshold"),
        ('{"type": "session.update", "session": {"turn_detection": {"silence_duration_ms": -1}}}', "invalid_value", "session.turn_detection.silence_duration_ms"),
        ('{"type": "session.update", "session": {"input_audio_format": "mp3"}}', "invalid_value", "session.input_audio_format"),
        ('{"type": "session.update", "session": {"include": ["colors"]}}', "invalid_value", "session.include"),
        ('{"type": "session.update", "session": {"interim_results": "yes"}}', "invalid_value", "session.interim_results"),
        ('{"type": "session.update", "session": {"colour": 1}}', "invalid_value", "session.colour"),
        ('{"type": "session.update", "session": "x"}', "invalid_value", "session"),
        ('{"type": "session.update", "session": {"model": "no-such-model"}}', "model_not_found", "session.model"),
        ('{"type": "session.update", "session": {"language": "fr-FR"}}', "unsupported_language", "session.language"),
        ('{"type": "input_audio_buffer.append", "audio": "%%%"}', "invalid_audio", "audio"),
    ],
)
def test_bad_messages_get_a_named_error_and_keep_the_config(message: str, code: str, param: str | None) -> None:
    d = Driver()
    before = d.session.config
    d.session.receive_text(message)
    d.drain()
    [error] = d.of(p.Error)
    assert error.error.code == code
    assert error.error.type == "invalid_request_error"
    assert error.error.param == param
    assert d.session.config == before
    d.feed(np.concatenate([speech([1]), silence(1.0)]))
    d.close()
    assert d.of(p.TranscriptDone)[0].text == "w1"


def test_update_merges_fields_and_answers_with_the_effective_config() -> None:
    d = Driver()
    d.send({"type": "session.update", "session": {"turn_detection": {"threshold": 0.7}, "language": "en-US"}})
    [updated] = d.of(p.SessionUpdated)[-1:]
    assert updated.session["turn_detection"] == {"type": "server_vad", "threshold": 0.7, "prefix_padding_ms": 300, "silence_duration_ms": 500}
    assert updated.session["language"] == "en"
    assert updated.session["id"] == "sess_test0001"


def test_logprobs_and_words_follow_include() -> None:
    d = Driver(include=["words"])
    d.feed(np.concatenate([speech([1, 2]), silence(1.0)]))
    d.close()
    assert all(e.logprobs is None for e in d.of(p.TranscriptDelta))
    [segment] = d.of(p.TranscriptSegment)
    assert segment.logprobs is None and [w.word for w in segment.words] == ["w1", "w2"]
    assert segment.words[0].start < segment.words[1].start
    assert d.of(p.TranscriptDone)[0].logprobs is None


def test_messages_after_close_are_ignored() -> None:
    d = Driver()
    d.feed(silence(0.2))
    d.close()
    n = len(d.events)
    d.session.receive_bytes(b"\x00\x00" * 100)
    d.session.receive_text('{"type": "session.close"}')
    d.drain()
    assert len(d.events) == n and not d.inflight


def test_results_of_a_cleared_utterance_are_ignored() -> None:
    d = Driver(latency_chunks=10)
    d.feed(speech([1, 2, 3]))
    stale = [t for _, t in d.inflight]
    d.send({"type": "input_audio_buffer.clear"})
    for ticket in stale:
        d.resolve(ticket)
    d.inflight = [(c, t) for c, t in d.inflight if t not in stale]
    d.feed(silence(1.0))
    d.close()
    assert d.of(p.TranscriptDone)[0].text == "".join(e.delta for e in d.of(p.TranscriptDelta))


def test_short_windows_get_no_prompt() -> None:
    d = Driver(prompt="Acme Corp")
    # The pause is longer than ``carry_gap_ms``: the short turn is not a continuation (below).
    d.feed(np.concatenate([speech(list(range(1, 12))), silence(3.0)]))
    calls_before = len(d.decoder.calls)
    d.feed(np.concatenate([speech([5]), silence(1.0)]))  # a 0.25 s word: a short window
    first = [r for call in d.decoder.calls[:calls_before] for r in call]
    second = [r for call in d.decoder.calls[calls_before:] for r in call]
    # Long windows carry earlier text (older than the forced prefix); every window the client's prompt.
    assert any(r.prompt.startswith("w1") for r in first if len(r.audio) >= 1.5 * 16000)
    assert all(r.hint == "Acme Corp" for r in first if len(r.audio) >= 1.5 * 16000)
    assert second and all(len(r.audio) < 1.5 * 16000 for r in second)
    assert all(r.prompt == "" and r.hint == "" for r in second)


def second_turn_requests(d: Driver, calls_before: int) -> list[DecodeRequest]:
    return [r for call in d.decoder.calls[calls_before:] for r in call]


def test_a_short_turn_after_a_short_pause_continues_from_the_last_turns_words() -> None:
    """Its committing decodes (the pause's, the final) start at the previous turn's last words,
    forced as the prefix; its interims stay short; no word is heard twice. (A turn of one 0.25 s
    word gets an interim only if its first one need not wait for more speech.)"""
    d = Driver(prompt="Acme Corp", first_interim_ms=0)
    d.feed(np.concatenate([speech(list(range(1, 9))), silence(1.0)]))
    calls_before = len(d.decoder.calls)
    d.feed(np.concatenate([speech([9]), silence(1.0)]))
    d.close()
    second = second_turn_requests(d, calls_before)
    limits = d.session.limits
    carried = [r for r in second if r.prefix]
    assert carried and all(r.final or len(r.audio) > 1.5 * 16000 for r in carried)
    # The last words of the first turn within carry_audio_ms (0.37 s per word) are the prefix.
    reach = int(limits.carry_audio_ms / 1000 / 0.37) + 1
    assert all(list(r.prefix) == list(range(9 - reach, 9))[-len(r.prefix) :] and len(r.prefix) >= reach - 1 for r in carried)
    assert any(not r.prefix and len(r.audio) < 1.0 * 16000 for r in second)  # its first interim
    assert d.of(p.TranscriptDone)[0].text.split() == spoken(*range(1, 10)).split()
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(*range(1, 9)), spoken(9)]


class SilentAfterCarryDecoder(BurstDecoder):
    """Says nothing for the word ``w9`` after a forced prefix of earlier words, as tiny.en did
    forced to go on from "... fell in americans" over JFK's "ask not"."""

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        if request.prefix and any(w.text.startswith(" w9") for w in result.words):
            return dataclasses.replace(result, words=())
        return result


def one_word_after_a_sentence(
    decoder: SilentAfterCarryDecoder, on_second_turn: Callable[[], None] = lambda: None
) -> tuple[Driver, list[DecodeRequest]]:
    """Eight words, a 1 s pause, then the one-word turn ``w9`` (a continuation candidate) and a
    1 s pause, through ``decoder``; ``on_second_turn`` runs between the two turns. The closed
    driver and the requests made for the second turn."""
    d = Driver(first_interim_ms=0)
    d.decoder = decoder
    d.feed(np.concatenate([speech(list(range(1, 9))), silence(1.0)]))
    calls_before = len(decoder.calls)
    on_second_turn()
    d.feed(np.concatenate([speech([9]), silence(1.0)]))
    d.close()
    return d, second_turn_requests(d, calls_before)


def assert_decoded_alone_after_the_continuation(d: Driver, second: list[DecodeRequest]) -> None:
    assert any(r.prefix for r in second), "it was tried as a continuation"
    assert second[-1].final and not second[-1].prefix, "then decoded alone"
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(*range(1, 9)), spoken(9)]


def test_a_continuation_that_hears_nothing_of_the_turn_is_decoded_again_on_its_own() -> None:
    """The turn's own interims heard a word; a continuation decode that gives it none is not its
    last word (the turn came out empty): the turn's end is decoded without the carried words."""
    d, second = one_word_after_a_sentence(SilentAfterCarryDecoder())
    assert_decoded_alone_after_the_continuation(d, second)
    assert d.of(p.TranscriptDone)[0].text.split() == spoken(*range(1, 10)).split()
    # A commit ends the short turn before its pause is decoded: its final is the continuation,
    # and is decoded again alone.
    d = Driver(first_interim_ms=0)
    d.decoder = SilentAfterCarryDecoder()
    d.feed(np.concatenate([speech(list(range(1, 9))), silence(1.0)]))
    calls_before = len(d.decoder.calls)
    d.feed(np.concatenate([speech([9]), silence(0.1)]))
    d.send({"type": "input_audio_buffer.commit"})
    d.feed(silence(1.0))
    finals = [r for r in second_turn_requests(d, calls_before) if r.final]
    assert [bool(r.prefix) for r in finals] == [True, False]
    assert [s.text for s in d.of(p.TranscriptSegment)][:2] == [spoken(*range(1, 9)), spoken(9)]


class ShedAloneSilentAfterCarryDecoder(SilentAfterCarryDecoder):
    """As under load: the short turn's own interims (no prefix, after the first turn) are shed,
    so the only decode that hears it before its end is the continuation, which says nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.shedding = False

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        if self.shedding and not request.prefix and not request.final:
            raise DecodeDropped("shed under load")
        return super().decode_one(request)


def test_a_continuation_that_hears_nothing_of_a_turn_nothing_else_heard_is_decoded_again_on_its_own() -> None:
    """24 streams lost one-word turns ("eight" after "... for your country."): their own interims
    were shed, the pause decode continued from the last turn's words and gave the turn none, and
    that emptiness was taken as the turn's text, with no final decode. A continuation that gives
    a turn the VAD heard no words is not its reading, whatever else heard it."""
    decoder = ShedAloneSilentAfterCarryDecoder()
    d, second = one_word_after_a_sentence(decoder, on_second_turn=lambda: setattr(decoder, "shedding", True))
    assert_decoded_alone_after_the_continuation(d, second)


def test_no_continuation_after_a_long_pause_or_for_a_long_turn() -> None:
    d = Driver()
    d.feed(np.concatenate([speech(list(range(1, 9))), silence(2.5)]))  # > carry_gap_ms + padding
    calls_before = len(d.decoder.calls)
    d.feed(np.concatenate([speech([9]), silence(1.0)]))
    assert not any(r.prefix for r in second_turn_requests(d, calls_before))
    calls_before = len(d.decoder.calls)
    d.feed(np.concatenate([speech(list(range(10, 17))), silence(1.0)]))  # 2.6 s: context of its own
    d.close()
    assert not any(r.final and len(r.prefix) and r.prefix[0] < 10 for r in second_turn_requests(d, calls_before))
    assert d.of(p.TranscriptDone)[0].text.split() == spoken(*range(1, 17)).split()


def test_no_continuation_when_off_or_when_the_last_turn_lost_its_end() -> None:
    d = Driver()
    d.session.limits = dataclasses.replace(d.session.limits, carry_gap_ms=0)
    d.feed(np.concatenate([speech(list(range(1, 9))), silence(1.0)]))
    calls_before = len(d.decoder.calls)
    d.feed(np.concatenate([speech([9]), silence(1.0)]))
    assert not any(r.prefix for r in second_turn_requests(d, calls_before))
    # Words after the last committed one were lost (the final failed twice): a continuation would
    # hear them again inside the next turn.
    d = Driver(latency_chunks=5, turn_detection=None)
    d.feed(speech(list(range(1, 12))))
    d.decoder.fail_next_final = 2
    d.send({"type": "input_audio_buffer.commit"})
    for _ in range(20):
        d.tick()
    assert not d.session._channels[0].carry


def test_a_decode_in_flight_when_the_turn_ends_is_promoted_not_resubmitted() -> None:
    """The pause decode already heard the turn's end: it becomes the final (the scheduler is told
    to serve it as one) instead of a second final decode being queued."""
    d = Driver(latency_chunks=30)
    d.feed(speech([1, 2, 3]))
    # The pause decode starts, then the turn ends (silence_duration_ms) while it runs.
    for _ in range(50):
        d.feed(silence(0.02))
        if d.of(p.SpeechStopped):
            break
    assert d.of(p.SpeechStopped)
    [promoted] = d.promoted
    assert promoted.final and not promoted.request.final  # submitted as interim work, now a final
    assert promoted in [t for _, t in d.inflight]
    assert not [t for _, t in d.inflight if t.request.final], "no second final decode was queued"
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3)


def early_pause_driver(latency_chunks: int, **config) -> Driver:
    """A session that decodes a pause at 100 ms and commits at 200 ms (``--pause-decode-ms 100``)."""
    session = Session(
        "sess_early001",
        config=p.SessionConfig(**{"interim_results": True, **config}),
        vad=EnergyVad(),
        limits=SessionLimits(max_utterance_s=6.0, pause_decode_ms=100, min_commit_window_ms=MECHANICS_COMMIT_WINDOW_MS),
    )
    return Driver(session=session, latency_chunks=latency_chunks)


def committed_text(d: Driver) -> str:
    return "".join(e.delta for e in d.of(p.TranscriptDelta))


def feed_pause(d: Driver, seconds: float) -> list[tuple[float, str, int]]:
    """Silence in 20 ms steps: (silence so far, committed text, decodes asked for so far) after each."""
    seen = []
    for step in range(1, round(seconds / 0.02) + 1):
        d.feed(silence(0.02))
        seen.append((step * 0.02, committed_text(d), len(d.decoder.calls)))
    return seen


def test_a_pause_is_decoded_early_and_its_words_committed_once_it_is_stable() -> None:
    """The pause decode starts at ``pause_decode_ms``; back before ``stable_silence_ms`` (a fast
    decoder), its result waits, then commits the last word without another decode; the turn's
    end needs no final decode either (the window heard the pause)."""
    d = early_pause_driver(2)  # 40 ms decodes
    limits = d.session.limits
    d.feed(speech([1, 2, 3]))
    seen = feed_pause(d, 0.45)
    committed_at = next(t for t, text, _ in seen if "w3" in text)
    # The VAD judges 32 ms frames, so the pause is seen up to two frames late.
    assert limits.stable_silence_ms / 1000 <= committed_at <= limits.stable_silence_ms / 1000 + 0.08
    decodes_at = {t: n for t, _, n in seen}
    pause_decoded_by = min(t for t, n in decodes_at.items() if n == decodes_at[committed_at])
    assert pause_decoded_by <= limits.pause_decode_ms / 1000 + 0.08, "the decode started before the commit was due"
    assert decodes_at[0.44] == decodes_at[committed_at], "more of the same silence is not decoded again"
    requests = [r for call in d.decoder.calls for r in call]
    # The scheduler serves it before other streams' re-decodes (it stands in for the final).
    assert requests[-1].commits and not any(r.commits for r in requests[:-1])
    d.feed(silence(0.5))
    assert d.of(p.SpeechStopped) and not any(r.final for call in d.decoder.calls for r in call)
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3)


def test_a_held_pause_decode_commits_nothing_new_when_the_speaker_goes_on() -> None:
    """A gap shorter than ``stable_silence_ms`` is a breath between phrases: the early decode's
    hypothesis becomes an ordinary interim, whose newest word waits for what follows."""
    d = early_pause_driver(2)
    d.feed(speech([1, 2, 3]))
    seen = feed_pause(d, 0.16)  # decoded at ~0.1 s, back at ~0.14 s, held
    assert not any("w3" in text for _, text, _ in seen)
    d.feed(speech([4, 5]))
    d.feed(silence(1.0))
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4, 5)
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(1, 2, 3, 4, 5)]


def test_a_pause_shorter_than_stable_commits_nothing_even_when_its_decode_returns_after_it() -> None:
    """A slow decoder: the early decode of a 0.16 s gap comes back once the speaker went on, and
    is an ordinary interim then (before ``pause_decode_ms`` existed, no decode heard such a gap)."""
    d = early_pause_driver(6)  # 120 ms decodes
    d.feed(speech([1, 2, 3]))
    d.feed(silence(0.16))
    [early] = [t for _, t in d.inflight if t.pause_start is not None]  # the gap, decoded early
    more = speech([4, 5])
    d.feed(more[: 16000 // 4])  # 0.25 s of the next words: the early result is back by now
    assert early not in [t for _, t in d.inflight], "its result came back"
    assert early.pause_start is None and not early.pause_stable
    assert "w3" not in committed_text(d)
    d.feed(more[16000 // 4 :])
    d.feed(silence(1.0))
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4, 5)


def test_a_turn_that_ends_while_a_pause_decode_is_held_keeps_its_words_and_the_channel_goes_on() -> None:
    """A client's ``silence_duration_ms`` shorter than ``stable_silence_ms``: the turn ends in the
    held pause, whose hypothesis is applied, and the next turn is decoded as usual."""
    d = early_pause_driver(2, turn_detection={"silence_duration_ms": 150})
    d.feed(speech([1, 2, 3]))
    d.feed(silence(0.6))
    d.feed(speech([4, 5]))
    d.feed(silence(0.6))
    d.close()
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(1, 2, 3), spoken(4, 5)]
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4, 5)


def test_a_turns_first_interim_waits_for_speech_after_the_onset() -> None:
    """Its window then holds ``first_interim_ms`` of speech past the onset besides the padding: a
    window of the padding and the VAD's first frames of speech mostly decodes to nothing."""
    first_windows = []
    for first_interim_ms in (0, 300):
        d = Driver(first_interim_ms=first_interim_ms)
        d.feed(silence(1.0))
        d.feed(np.concatenate([speech([1, 2, 3, 4]), silence(1.0)]))
        d.close()
        first = next(r for call in d.decoder.calls for r in call if not r.final and not r.commits)
        first_windows.append(len(first.audio) / 16000)
        assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4)
    padding = p.SessionConfig().turn_detection.prefix_padding_ms / 1000
    at_once, waited = first_windows
    assert at_once < padding + 0.3 <= waited < padding + 0.3 + 0.1, first_windows


def test_a_slow_decoder_gets_fewer_interim_requests_per_utterance() -> None:
    """Load paces interim work: with decodes taking 0.4 s of audio, an utterance asks for an
    interim decode every 3 round trips (interim_pace) instead of every time one returns, and its
    words still all arrive."""
    counts = []
    for pace in (0.0, 3.0):
        session = Session(
            "sess_pace", config=p.SessionConfig(interim_results=True), vad=EnergyVad(),
            limits=SessionLimits(max_utterance_s=20.0, interim_pace=pace),
        )
        d = Driver(session=session, latency_chunks=20)
        d.feed(np.concatenate([speech(list(range(1, 25))), silence(1.0)]))
        d.close()
        assert d.of(p.TranscriptDone)[0].text == spoken(*range(1, 25))
        counts.append(sum(1 for call in d.decoder.calls for r in call if not r.final))
    unpaced, paced = counts
    assert paced <= unpaced * 0.6, counts


def test_a_turn_without_text_yet_is_not_paced() -> None:
    """Pacing waits for text: while an utterance's interims come back empty (too little audio to
    say a word yet), the next one follows at the plain step, so first text is not delayed by load."""

    class SilentAtFirst(BurstDecoder):
        def decode_one(self, request: DecodeRequest) -> DecodeResult:
            result = super().decode_one(request)
            return result if len(self.calls) > 3 else dataclasses.replace(result, words=())

    d = Driver(latency_chunks=20)  # a 0.4 s round trip: paced, the next interim would wait 1.6 s (loaded pace 4)
    d.decoder = SilentAtFirst()
    # 14 words (5.1 s): long enough for two paced steps before the pause decode at its end.
    d.feed(np.concatenate([speech(list(range(1, 15))), silence(1.0)]))
    ends = [len(r.audio) / 16000 for call in d.decoder.calls for r in call if not r.final]
    assert all(b - a <= 0.45 for a, b in itertools.pairwise(ends[:4])), ends  # unpaced while empty
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(ends[3:6])), ends  # paced once there is text


class HearsTheSecondWordLate(BurstDecoder):
    """Hears the second word as "w9" until a window reaches well past it (a short window's guess)."""

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        if len(request.audio) < 1.75 * 16000 and len(result.words) >= 2:
            wrong = dataclasses.replace(result.words[1], text=" w9", tokens=(Token(9, " w9", -0.1),))
            result = dataclasses.replace(result, words=(result.words[0], wrong, *result.words[2:]))
        return result


@pytest.mark.parametrize("decoder", [BurstDecoder, HearsTheSecondWordLate])
def test_a_pause_early_in_a_turn_commits_only_the_words_the_last_hypothesis_agrees_on(decoder: type[BurstDecoder]) -> None:
    """Under ``min_commit_window_ms`` (default limits) a pause commits what two decodes agree on;
    the rest waits until the pause has lasted ``held_commit_ms``, and goes out as the pause
    decode heard it (the turn's end would make that reading final anyway)."""
    session = Session("sess_test0001", config=p.SessionConfig(interim_results=True), vad=EnergyVad(), limits=SessionLimits())
    d = Driver(session)
    d.decoder = decoder()
    d.feed(speech([1, 2, 3, 4, 5]))  # 1.7 s: under the default 3.5 s, long enough for interims to dissent
    for _ in range(13):  # 0.26 s of pause: the pause decode is back and its pause has lasted 200 ms
        d.feed(silence(0.02))
    at_pause = "".join(e.delta for e in d.of(p.TranscriptDelta)).split()
    if decoder is BurstDecoder:
        assert at_pause == ["w1", "w2", "w3", "w4", "w5"], "the pause decode agreed with the last interim"
    else:
        assert at_pause == ["w1"], "the last interim heard w9: the words from w2 on wait"
    for _ in range(7):  # 0.4 s: held words are final as heard; the turn (0.5 s) has not ended
        d.feed(silence(0.02))
    assert not d.of(p.SpeechStopped)
    assert "".join(e.delta for e in d.of(p.TranscriptDelta)).split() == ["w1", "w2", "w3", "w4", "w5"]
    d.feed(silence(0.5))
    assert d.of(p.SpeechStopped)
    assert not any(r.final for call in d.decoder.calls for r in call), "the pause decode heard the pause: no final decode"
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4, 5)


def test_a_word_committed_at_a_pause_goes_out_before_its_guessed_punctuation() -> None:
    """Whisper ends every hypothesis with a mark ("w3."); at a pause the words go out at once and
    the mark follows with what comes next: here the turn's end, so done reads "w1 w2 w3."."""

    class Punctuating(BurstDecoder):
        def decode_one(self, request: DecodeRequest) -> DecodeResult:
            result = super().decode_one(request)
            if not result.words:
                return result
            last = result.words[-1]
            marked = dataclasses.replace(last, text=last.text + ".", tokens=(*last.tokens, Token(13, ".", -0.5)))
            return dataclasses.replace(result, words=(*result.words[:-1], marked))

        def encode_text(self, text: str) -> list[int]:
            return [13 if word == "." else int(word[1:].rstrip("~.")) for word in text.replace(".", " .").split()]

    d = Driver()
    d.decoder = Punctuating()
    d.feed(speech([1, 2, 3]))
    for _ in range(50):  # up to the pause decode's result, before the turn ends
        d.feed(silence(0.02))
        if "".join(e.delta for e in d.of(p.TranscriptDelta)).strip() == spoken(1, 2, 3):
            break
    assert not d.of(p.SpeechStopped), "the words went out at the pause, before the turn ended"
    d.feed(silence(1.0))
    d.close()
    deltas = [e.delta for e in d.of(p.TranscriptDelta)]
    assert deltas[-1] == "." and d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3) + "."


# ------------------------------------------------------------------------------ channels


def two_legs() -> tuple[np.ndarray, np.ndarray]:
    """A call: the caller speaks first, the callee answers while the caller's turn is ending."""
    caller = np.concatenate([silence(0.3), speech([1, 2, 3]), silence(2.5)])
    callee = np.concatenate([silence(1.8), speech([4, 5]), silence(1.3)])
    n = max(len(caller), len(callee))
    return np.pad(caller, (0, n - len(caller))), np.pad(callee, (0, n - len(callee)))


def stereo_pcm16(left: np.ndarray, right: np.ndarray) -> bytes:
    return np.stack([to_pcm16_array(left), to_pcm16_array(right)], axis=1).tobytes()


def to_pcm16_array(samples: np.ndarray) -> np.ndarray:
    return np.frombuffer(to_pcm16(samples), "<i2")


def test_two_channels_are_segmented_and_labelled_separately() -> None:
    d = Driver(channels=2, channel_labels=["caller", "callee"])
    data = stereo_pcm16(*two_legs())
    for i in range(0, len(data), CHUNK * 4):  # 20 ms stereo frames
        d.session.receive_bytes(data[i : i + CHUNK * 4])
        d.drain()
        d.tick()
    d.close()
    segments = d.of(p.TranscriptSegment)
    assert {(s.channel, s.speaker, s.text) for s in segments} == {(0, "caller", spoken(1, 2, 3)), (1, "callee", spoken(4, 5))}
    for event in d.events:
        if isinstance(event, p.CHANNEL_EVENTS):
            assert event.speaker == ["caller", "callee"][event.channel]
    by_channel = {c: "".join(e.delta for e in d.of(p.TranscriptDelta) if e.channel == c) for c in (0, 1)}
    done = d.of(p.TranscriptDone)[0]
    assert [(c.channel, c.speaker, c.text) for c in done.channels] == [(0, "caller", by_channel[0]), (1, "callee", by_channel[1])]
    assert [(t.speaker, t.text) for t in done.turns] == [("caller", spoken(1, 2, 3)), ("callee", spoken(4, 5))]
    assert done.text == f"caller: {spoken(1, 2, 3)}\ncallee: {spoken(4, 5)}"
    assert len({e.item_id for e in d.of(p.SpeechStarted)}) == 2  # item ids are unique across channels


def caller_stops_heard_at(handover_pause_ms: int, gap_s: float) -> tuple[float, float, str]:
    """The callee starts ``gap_s`` after the caller's words end: where the caller's speech ended,
    how far into the call its ``speech_stopped`` came, and the caller's text."""
    words = speech([1, 2, 3])
    caller = np.concatenate([silence(0.3), words, silence(3.0)])
    callee = np.concatenate([silence(0.3 + len(words) / 16000 + gap_s), speech([4, 5]), silence(1.5)])
    caller, callee = np.pad(caller, (0, max(0, len(callee) - len(caller)))), np.pad(callee, (0, max(0, len(caller) - len(callee))))
    limits = SessionLimits(max_utterance_s=6.0, min_commit_window_ms=MECHANICS_COMMIT_WINDOW_MS, handover_pause_ms=handover_pause_ms)
    d = Driver(Session("sess_handover", config=p.SessionConfig(channels=2, interim_results=True), vad=EnergyVad(), limits=limits))
    data = stereo_pcm16(caller, callee)
    heard_at = None
    for i in range(0, len(data), CHUNK * 4):
        d.session.receive_bytes(data[i : i + CHUNK * 4])
        d.drain()
        d.tick()
        if heard_at is None and any(e.channel == 0 for e in d.of(p.SpeechStopped)):
            heard_at = (i + CHUNK * 4) / 4 / 16000
    d.close()
    [stopped] = [e for e in d.of(p.SpeechStopped) if e.channel == 0]
    assert heard_at is not None
    [segment] = [e for e in d.of(p.TranscriptSegment) if e.channel == 0]
    return stopped.audio_end_ms / 1000, heard_at, segment.text


def test_a_turn_ends_when_the_other_leg_starts_after_a_pause() -> None:
    """The callee answering after the caller has been silent 0.3 s ends the caller's turn then,
    not 0.5 s (``turn_detection.silence_duration_ms``) after its last word; an answer that
    starts sooner than ``handover_pause_ms`` into the caller's silence changes nothing."""
    end, heard, text = caller_stops_heard_at(200, gap_s=0.3)
    assert text == spoken(1, 2, 3)
    assert heard - end < 0.45, (end, heard)
    end_off, heard_off, text_off = caller_stops_heard_at(0, gap_s=0.3)
    assert (end_off, text_off) == (end, text) and heard_off - end_off >= 0.5, (end_off, heard_off)
    _, heard_soon, _ = caller_stops_heard_at(200, gap_s=0.05)
    _, heard_soon_off, _ = caller_stops_heard_at(0, gap_s=0.05)
    assert heard_soon == heard_soon_off, "an answer 50 ms into the pause does not end the turn"


def test_channel_addressed_audio_equals_interleaved_frames() -> None:
    left, right = two_legs()
    interleaved = Driver(channels=2)
    data = stereo_pcm16(left, right)
    for i in range(0, len(data), CHUNK * 4):
        interleaved.session.receive_bytes(data[i : i + CHUNK * 4])
        interleaved.drain()
        interleaved.tick()
    interleaved.close()
    separate = Driver(channels=2)
    a, b = to_pcm16(left), to_pcm16(right)
    for i in range(0, len(a), CHUNK * 2):
        separate.session.receive_message(p.AudioAppend(a[i : i + CHUNK * 2], channel=0))
        separate.session.receive_message(p.AudioAppend(b[i : i + CHUNK * 2], channel=1))
        separate.drain()
        separate.tick()
    separate.close()
    assert separate.of(p.TranscriptDone)[0].turns == interleaved.of(p.TranscriptDone)[0].turns


def test_bad_channel_and_late_channel_changes_are_refused() -> None:
    d = Driver(channels=2)
    d.session.receive_message(p.AudioAppend(b"\x00\x00" * 10, channel=2))
    d.drain()
    assert d.of(p.Error)[-1].error.param == "channel"
    d.feed(silence(0.1))
    d.send({"type": "session.update", "session": {"channels": 1}})
    assert d.of(p.Error)[-1].error.param == "session.channels"
    d.send({"type": "session.update", "session": {"channel_labels": ["agent", "customer"]}})
    assert d.of(p.SessionUpdated)[-1].session["channel_labels"] == ["agent", "customer"]
    fresh = Driver()
    fresh.send({"type": "session.update", "session": {"channels": 2}})  # before any audio: fine
    assert fresh.of(p.SessionUpdated)[-1].session["channels"] == 2


def test_commit_keeps_the_audio_still_inside_the_resampler() -> None:
    """At 24 kHz the resampler holds ~20 ms; a commit must not hand it to the next utterance."""
    import soxr

    d = Driver(sample_rate=24000, turn_detection=None)
    audio = soxr.resample(np.concatenate([speech([1, 2]), silence(0.1)]), 16000, 24000).astype(np.float32)
    d.session.receive_bytes(to_pcm16(audio))
    d.drain()
    before = d.session.audio_seconds
    d.send({"type": "input_audio_buffer.commit"})
    assert d.session.audio_seconds > before  # the delay line was flushed into this utterance
    assert d.session.audio_seconds == pytest.approx(len(audio) / 24000, abs=0.002)
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2)


def test_the_utterance_that_close_finalizes_is_in_the_conversation() -> None:
    d = Driver(channels=2, channel_labels=["agent", "customer"])
    left, right = two_legs()
    data = stereo_pcm16(left[: 16000], right[: 16000])  # the caller is mid-turn when the stream ends
    d.session.receive_bytes(data)
    d.drain()
    d.close()
    done = d.of(p.TranscriptDone)[0]
    assert [(t.speaker, t.text) for t in done.turns] == [("agent", d.of(p.TranscriptSegment)[-1].text)]
    assert done.turns[0].text and type(done.turns[0].start) is float


def test_a_commit_flood_queues_no_work_and_loses_nothing() -> None:
    d = Driver(latency_chunks=50)  # decodes come back slowly: the flood meets pending finals
    d.feed(speech([1, 2, 3]))
    for _ in range(1000):
        d.session.receive_text('{"type": "input_audio_buffer.commit"}')
        d.drain()
    finals = [t for _, t in d.inflight if t.request.final]
    assert len(finals) <= SessionLimits().max_pending_finals
    assert len(d.of(p.TranscriptSegment)) <= 2
    d.feed(speech([4, 5]))
    d.feed(silence(1.0))
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4, 5)


def test_an_empty_utterance_never_reaches_the_decoder() -> None:
    d = Driver(turn_detection=None)
    d.session.receive_bytes(to_pcm16(speech([1]))[:200])  # 100 samples: 6 ms
    d.send({"type": "input_audio_buffer.commit"})
    d.close()
    assert all(len(r.audio) >= 1600 for call in d.decoder.calls for r in call)
    assert d.of(p.TranscriptDone) and d.closed is not None


def test_commits_beyond_the_pending_bound_are_refused_and_the_audio_is_kept() -> None:
    d = Driver(turn_detection=None, latency_chunks=10_000)  # finals never come back during the test
    for k in range(1, 12):
        d.feed(np.concatenate([speech([k]), silence(0.1)]))
        d.send({"type": "input_audio_buffer.commit"})
    refused = [e for e in d.of(p.Error) if e.error.code == "rate_limited"]
    assert len(refused) == 11 - SessionLimits().max_pending_finals
    d.latency = 1
    for _ in range(3):
        d.tick()
    d.close()
    assert d.of(p.TranscriptDone)[0].text == spoken(*range(1, 12))  # refused commits lost no words


def test_turn_ends_beyond_the_pending_bound_are_deferred_and_lose_no_words() -> None:
    """Audio sent far faster than the decoder keeps up: at max_pending_finals a turn end lets the
    turn run on into the next speech instead of queueing another final (pending work and the
    audio it holds stay bounded), and every word still arrives."""
    d = Driver(latency_chunks=10_000)  # finals never come back while the audio arrives
    most = 0
    for k in range(1, 13):
        d.feed(np.concatenate([speech([k]), silence(0.8)]))  # 12 turns, each ended by the VAD
        most = max(most, len([t for _, t in d.inflight if t.request.final]))
    assert most == SessionLimits().max_pending_finals  # reached, never passed
    assert d.session.backlogged  # what a shell that can stop reading waits on (``ws.py``)
    d.latency = 1
    for _ in range(3):
        d.tick()
    d.close()
    assert not d.session.backlogged  # every final came back
    assert d.of(p.TranscriptDone)[0].text == spoken(*range(1, 13))
    assert len(d.of(p.TranscriptSegment)) < 12  # the later turns ran on into one another


def file_session_prompts(latency_chunks: int, lag: int) -> tuple[list[str], str, int]:
    """A file's turns (no interims) decoded with ``latency_chunks`` of decoder delay: the prompt of
    each final in turn order, the done text, and the most finals that were out at once."""
    session = Session("sess_file0001", config=p.SessionConfig(interim_results=False), vad=EnergyVad(),
                      limits=SessionLimits(interim_decoding=False, final_context_lag=lag, max_pending_finals=100))
    d = Driver(session, latency_chunks=latency_chunks)
    most = 0
    for turn in range(FILE_TURNS):
        audio = np.concatenate([speech(file_turn(turn)), silence(0.8)])  # 8 words, 2.8 s: long enough for context
        for i in range(0, len(audio), CHUNK):
            d.feed(audio[i : i + CHUNK])
            most = max(most, len(d.inflight))
    d.close()
    prompts = [r.prompt for call in d.decoder.calls for r in call]
    return prompts, d.of(p.TranscriptDone)[0].text, most


FILE_TURNS = 6


def file_turn(turn: int) -> list[int]:
    return list(range(turn + 1, turn + 9))


def test_a_files_final_context_lag_makes_its_prompts_independent_of_decode_timing() -> None:
    fast, fast_text, fast_most = file_session_prompts(latency_chunks=3, lag=2)
    slow, slow_text, slow_most = file_session_prompts(latency_chunks=400, lag=2)  # 8 s per decode
    assert fast_text == " ".join(spoken(*file_turn(t)) for t in range(FILE_TURNS))
    assert fast == slow and fast_text == slow_text, "same text and same prompts whatever the decoder's pace"
    assert slow_most == 2 and fast_most == 1, "at most `lag` finals of a channel are out at once"
    # Turn k's context is exactly the text of the turns up to k - 2.
    assert fast == [" ".join(spoken(*file_turn(t)) for t in range(k - 1)) for k in range(FILE_TURNS)]
    # Without the lag the context is whatever was final when the turn ended: timing shows.
    unlagged_fast, _, _ = file_session_prompts(latency_chunks=3, lag=0)
    unlagged_slow, _, _ = file_session_prompts(latency_chunks=400, lag=0)
    assert unlagged_fast != unlagged_slow


def test_a_files_decodes_are_background_work_and_a_live_sessions_are_not() -> None:
    """The scheduler serves a whole file after live speakers (``DecodeRequest.background``)."""
    file = Driver(Session("sess_file0002", config=p.SessionConfig(interim_results=False), vad=EnergyVad(),
                          limits=SessionLimits(interim_decoding=False, final_context_lag=2)))
    live = Driver()
    for d in (file, live):
        d.feed(np.concatenate([speech([1, 2, 3]), silence(0.8)]))
        d.close()
    file_requests = [r for call in file.decoder.calls for r in call]
    live_requests = [r for call in live.decoder.calls for r in call]
    assert file_requests and all(r.background for r in file_requests)
    assert live_requests and not any(r.background for r in live_requests)


class MishearsTheStart(BurstDecoder):
    """Hears the first word wrong when it has to decode a final window from its start."""

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        if request.final and not request.prefix and result.words:
            first = result.words[0]
            wrong = dataclasses.replace(first, text=" w9", tokens=(Token(9, " w9", -0.1),))
            result = dataclasses.replace(result, words=(wrong, *result.words[1:]))
        return result


@pytest.mark.parametrize("decoder", [BurstDecoder, MishearsTheStart])
def test_with_final_agreement_a_final_runs_unforced_and_is_forced_only_when_it_contradicts(decoder: type[BurstDecoder]) -> None:
    session = Session("sess_test0001", config=p.SessionConfig(interim_results=True), vad=EnergyVad(),
                      limits=SessionLimits(final_agreement=True, min_commit_window_ms=MECHANICS_COMMIT_WINDOW_MS))
    d = Driver(session)
    d.decoder = decoder()
    d.feed(speech([1, 2, 3, 4, 5, 6, 7, 8]))
    committed = "".join(e.delta for e in d.of(p.TranscriptDelta)).split()
    assert committed[:3] == ["w1", "w2", "w3"]
    d.close()  # mid-turn: the last words need a final decode, whose window holds committed words
    finals = [r for batch in d.decoder.calls for r in batch if r.final]
    if decoder is BurstDecoder:
        assert [bool(r.prefix) for r in finals] == [False]  # it agreed with the committed words
    else:
        assert [bool(r.prefix) for r in finals] == [False, True]  # contradicted them: forced again
    assert d.of(p.TranscriptDone)[0].text == spoken(*range(1, 9))


class UnsureOfTheFirstWordAtAPause(BurstDecoder):
    """An interim decode whose window ends in silence misreads the turn's first word as ``w0``,
    unsure (as tiny.en read JFK's first turn "And so am i fell in americans" from one window end
    and "my fellow Americans" from the turn's final window); finals hear it at ``final_logprob``."""

    def __init__(self, final_logprob: float = -0.1) -> None:
        super().__init__()
        self.final_logprob = final_logprob

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        if request.prefix or not result.words or result.words[-1].text.endswith("~"):
            return result
        first = result.words[0]
        if request.final:
            heard = dataclasses.replace(first, tokens=(Token(first.tokens[0].id, first.text, self.final_logprob),))
        else:
            heard = dataclasses.replace(first, text=" w0", tokens=(Token(0, " w0", -3.0),))
        return dataclasses.replace(result, words=(heard, *result.words[1:]))


def unsure_turn(latency_chunks: int, decoder: BurstDecoder, **limits) -> Driver:
    """One turn shorter than ``min_commit_window_ms`` (its pause commits no word the decode
    before it read differently), decoded ``latency_chunks`` frames late, and the session closed."""
    session = Session("sess_test0001", config=p.SessionConfig(interim_results=True), vad=EnergyVad(), limits=SessionLimits(**limits))
    d = Driver(session, latency_chunks=latency_chunks)
    d.decoder = decoder
    d.feed(np.concatenate([speech([1, 2, 3, 4, 5]), silence(1.5)]))
    d.close()
    return d


@pytest.mark.parametrize("latency_chunks", [3, 30])
def test_an_unsure_hypothesis_that_heard_the_pause_is_decoded_again_before_it_is_final(latency_chunks: int) -> None:
    """Latency 30: the pause decode is in flight at the turn's end and promoted; 3: it is back
    before, and the turn's last hypothesis heard the pause. Either would be final as it is; it is
    unsure (mean token logprob -0.68 < ``recheck_logprob``), so the turn's own final decodes it
    again, and the surer reading is kept."""
    off = unsure_turn(latency_chunks, UnsureOfTheFirstWordAtAPause(), recheck_logprob=float("-inf"), held_sure_logprob=float("-inf"))
    assert not any(r.final for batch in off.decoder.calls for r in batch), "final without a decode of its own"
    assert [s.text for s in off.of(p.TranscriptSegment)] == [spoken(0, 2, 3, 4, 5)]
    assert bool(off.promoted) == (latency_chunks == 30)
    d = unsure_turn(latency_chunks, UnsureOfTheFirstWordAtAPause())
    assert [r.final for batch in d.decoder.calls for r in batch].count(True) == 1
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(1, 2, 3, 4, 5)]
    assert d.of(p.TranscriptDone)[0].text == spoken(1, 2, 3, 4, 5)


def test_a_recheck_keeps_the_earlier_reading_when_it_was_surer_or_the_final_fails() -> None:
    d = unsure_turn(30, UnsureOfTheFirstWordAtAPause(final_logprob=-8.0))
    assert [r.final for batch in d.decoder.calls for r in batch].count(True) == 1
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(0, 2, 3, 4, 5)]
    failing = UnsureOfTheFirstWordAtAPause()
    failing.fail_next_final = 2  # the recheck fails, and its retry too: nothing heard is lost
    d = unsure_turn(30, failing)
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(0, 2, 3, 4, 5)]
    assert d.of(p.TranscriptDone)[0].text == spoken(0, 2, 3, 4, 5)


class UnsureWhereItHeardThePause(BurstDecoder):
    """Reads every turn right, but a pause decode (its window ends in the pause) unsure of its new
    words (log probability -3.0): its hypothesis is decoded again before it is final."""

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        if request.final or not request.commits:
            return result
        words = tuple(dataclasses.replace(w, tokens=tuple(dataclasses.replace(t, logprob=-3.0) for t in w.tokens)) for w in result.words)
        return dataclasses.replace(result, words=words)


def rechecked_turn(**limits) -> tuple[Driver, list[DecodeRequest]]:
    """A short turn (its pause decode is back before it ends, and it gets a final decode of its
    own), then a longer one whose pause decode is in flight at its end (promoted) and unsure,
    so the turn's own final decodes it again; every final request, in order."""
    session = Session("sess_test0001", config=p.SessionConfig(interim_results=True), vad=EnergyVad(),
                      limits=SessionLimits(min_commit_window_ms=MECHANICS_COMMIT_WINDOW_MS, **limits))
    d = Driver(session, latency_chunks=30)
    d.decoder = UnsureWhereItHeardThePause()
    d.feed(np.concatenate([silence(0.3), speech([9]), silence(1.5), speech(list(range(1, 9))), silence(1.5)]))
    d.close()
    return d, [r for batch in d.decoder.calls for r in batch if r.final]


def test_a_recheck_decodes_with_a_beam_and_the_rest_greedily() -> None:
    """A greedy recheck of an unsure reading mostly read the same words again; with a beam
    (``recheck_beam``) the 8-call replay read 7.38 -> 7.09% WER (offline beam 5: 7.13%)."""
    d, finals = rechecked_turn()
    assert len(d.promoted) == 1, "the second turn's pause decode was in flight at its end"
    assert [r.beam_size for r in finals] == [1, 5], "the first turn's own final, then the recheck"
    others = [r for batch in d.decoder.calls for r in batch if not r.final]
    assert others and all(r.beam_size == 1 for r in others)
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(9), spoken(*range(1, 9))]
    _, greedy = rechecked_turn(recheck_beam=1)
    assert [r.beam_size for r in greedy] == [1, 1]


class PauseDissentDecoder(BurstDecoder):
    """Reads burst 2 as ``x2`` in pause decodes (``commits``) and as ``w2`` otherwise: a pause
    decode that disagrees with the hypothesis before it about a word both heard."""

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        if not request.commits:
            return result
        words = tuple(dataclasses.replace(w, text=" x2") if w.text == " w2" else w for w in result.words)
        return dataclasses.replace(result, words=words)


class UnsurePauseDissentDecoder(PauseDissentDecoder):
    """As :class:`PauseDissentDecoder`, with every word of a pause decode at log probability -0.5:
    surer than ``recheck_logprob`` (-0.6), less sure than ``held_sure_logprob`` (-0.45), as
    tiny.en read JFK's "And so am I fellow Americans." (-0.53) where the decode before it and
    the turn's final heard "my fellow" (-0.28, -0.35)."""

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        if request.final:  # a final (its request commits too) hears the turn as spoken
            return BurstDecoder.decode_one(self, request)
        result = super().decode_one(request)
        if not request.commits:
            return result
        words = tuple(dataclasses.replace(w, tokens=tuple(dataclasses.replace(t, logprob=-0.5) for t in w.tokens)) for w in result.words)
        return dataclasses.replace(result, words=words)


def held_words_driver(held_commit_ms: int, decoder: BurstDecoder | None = None) -> Driver:
    """A short turn (under ``min_commit_window_ms``) whose pause decode dissents on its second word."""
    session = Session(
        "sess_held0001",
        config=p.SessionConfig(interim_results=True),
        vad=EnergyVad(),
        limits=SessionLimits(max_utterance_s=6.0, pause_decode_ms=100, held_commit_ms=held_commit_ms),
    )
    d = Driver(session=session, latency_chunks=2)
    d.decoder = decoder or PauseDissentDecoder()
    return d


def test_held_words_the_decoder_was_not_sure_of_are_decoded_again_at_the_turns_end() -> None:
    """A dissent the pause decode read at -0.5: at 300 ms of pause nothing more is committed; the
    turn's end decodes it again as a final and keeps the surer reading ("w2" at -0.1)."""
    d = held_words_driver(300, UnsurePauseDissentDecoder())
    d.feed(silence(0.3))
    d.feed(speech([1, 2, 3, 4]))
    seen = feed_pause(d, 0.9)
    assert d.of(p.SpeechStopped), "the turn ended in the pause"
    assert all("x2" not in text for _, text, _ in seen)
    d.close()
    assert [r.final for batch in d.decoder.calls for r in batch].count(True) == 1
    assert d.of(p.TranscriptDone)[0].text == "w1 w2 w3 w4"


@pytest.mark.parametrize("held_commit_ms", [0, 300])
def test_words_a_pause_decode_held_back_are_final_once_the_pause_lasts(held_commit_ms: int) -> None:
    """A short turn's pause decode reads a word otherwise than the hypothesis before it: at
    200 ms of silence only the words before it are committed (the dissent rule); the rest is
    committed as the pause decode heard it once the pause lasts ``held_commit_ms``, or, with 0, at
    the turn's end. The text is the same either way."""
    d = held_words_driver(held_commit_ms)
    d.feed(silence(0.3))
    d.feed(speech([1, 2, 3, 4]))
    seen = feed_pause(d, 0.9)
    assert d.of(p.SpeechStopped), "the turn ended in the pause"
    committed_at_200 = next(text for t, text, _ in seen if t >= 0.26)
    assert committed_at_200.strip() == "w1", committed_at_200
    held_at = next(t for t, text, _ in seen if "x2" in text)
    if held_commit_ms:
        assert held_commit_ms / 1000 <= held_at <= held_commit_ms / 1000 + 0.08
    else:
        assert held_at >= d.session.config.turn_detection.silence_duration_ms / 1000  # with the turn's end
    d.close()
    assert d.of(p.TranscriptDone)[0].text == "w1 x2 w3 w4"


def test_held_words_wait_for_agreement_when_the_speaker_goes_on_first() -> None:
    d = held_words_driver(300)
    d.feed(silence(0.3))
    d.feed(speech([1, 2, 3, 4]))
    seen = feed_pause(d, 0.26)
    assert seen[-1][1].strip() == "w1"
    d.feed(speech([5]))  # back before 300 ms: nothing held is committed at the pause
    assert "x2" not in committed_text(d)
    d.feed(silence(1.0))
    d.close()
    # The turn's real end is decided by its own pause decode, which reads "x2" again.
    assert d.of(p.TranscriptDone)[0].text == "w1 x2 w3 w4 w5"


class StopsEarlyWhereItHeardThePause(BurstDecoder):
    """Reads every word while the speaker talks, but a greedy decode whose window ends in the
    pause stops after its first new word, sure of it (tiny.en, given "4539 1488" read digit by
    digit, wrote " four," and stopped); a beam reads on."""

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        heard_pause = bool(result.words) and len(request.audio) / 16000 - result.words[-1].end >= 0.3
        if request.beam_size > 1 or not heard_pause or len(result.words) < 2:
            return result
        return dataclasses.replace(result, words=result.words[:1])


def stopped_turn(latency_chunks: int, **limits) -> Driver:
    session = Session("sess_test0001", config=p.SessionConfig(interim_results=True), vad=EnergyVad(),
                      limits=SessionLimits(**limits))
    d = Driver(session, latency_chunks=latency_chunks)
    d.decoder = StopsEarlyWhereItHeardThePause()
    d.feed(np.concatenate([silence(0.3), speech(list(range(1, 9))), silence(1.5)]))  # 2.8 s: nothing commits before its pause
    d.close()
    return d


@pytest.mark.parametrize("latency_chunks", [3, 30])
def test_a_reading_that_stops_well_before_the_turns_speech_is_decoded_again_and_the_further_one_kept(latency_chunks: int) -> None:
    """Latency 30: the pause decode is in flight at the turn's end and promoted; 3: it is back
    before and its words are the turn's last hypothesis. Either way its reading stops seconds
    before the turn's speech (``unread_speech_ms``): the turn's final decodes it again with a
    beam, and the reading that reads the speech is kept."""
    if latency_chunks == 30:  # (at 3, the turn's final decode heard no pause: it read on anyway)
        [lost] = stopped_turn(latency_chunks, unread_speech_ms=0).of(p.TranscriptSegment)
        assert lost.text == "w1"
    d = stopped_turn(latency_chunks)
    assert [s.text for s in d.of(p.TranscriptSegment)] == [spoken(*range(1, 9))]
    assert d.of(p.TranscriptDone)[0].text == spoken(*range(1, 9))
    assert any(r.final and r.beam_size == 5 for batch in d.decoder.calls for r in batch) == (latency_chunks == 30)


class ReadsNothingForced(BurstDecoder):
    """tiny.en on a card read as "7300 0000 0016" in a long turn: forced on from "0, 0, 0," its
    finals read nothing more (a zero loop, cut), where the unforced final read the words after
    the zeros but not the zeros (here: the window's first word misheard, so it contradicts the
    committed words)."""

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        if not request.final:
            return result
        if request.prefix:
            return dataclasses.replace(result, words=())
        first, *rest = result.words
        return dataclasses.replace(result, words=(dataclasses.replace(first, text=first.text.replace("w", "x")), *rest))


def test_a_final_whose_forced_readings_stop_early_keeps_the_unforced_readings_words_past_the_committed_ones() -> None:
    session = Session("sess_test0001", config=p.SessionConfig(interim_results=True), vad=EnergyVad())
    d = Driver(session, latency_chunks=10)
    d.decoder = ReadsNothingForced()
    d.feed(np.concatenate([silence(0.3), speech(list(range(1, 17)))]))
    d.close()  # mid-speech: the turn's last words come from its final decode
    [segment] = d.of(p.TranscriptSegment)
    assert segment.text == spoken(*range(1, 17))
    # Decoded forced, then with a beam (both read nothing); the reading kept is the unforced one's.
    assert [(bool(r.prefix), r.beam_size) for batch in d.decoder.calls for r in batch if r.final] == [(False, 1), (True, 1), (True, 5)]
