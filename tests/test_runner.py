"""The one runner: a real scheduler and worker thread, the deterministic fake decoder and VAD."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Literal

import numpy as np

from stream_server import protocol as p
from stream_server.runner import SessionRunner
from stream_server.scheduler import DecodeScheduler
from stream_server.session import CloseConnection, Session, SessionLimits
from tests.fakes import BurstDecoder, EnergyVad, silence, speech, to_pcm16


def make_session() -> Session:
    return Session("sess_runner", config=p.SessionConfig(interim_results=True), vad=EnergyVad(), limits=SessionLimits())


def spoken(*words: int) -> str:
    return " ".join(f"w{k}" for k in words)


async def run_stream(
    decoder: BurstDecoder, audio: bytes, *, chunk: int = 640, pace: Literal["sleep", "flow", "none"] = "sleep"
) -> tuple[list[p.ServerEvent], list[CloseConnection], float]:
    """Feed ``audio`` in chunks: ``sleep``, a short sleep after each (decode results come back
    while audio flows); ``flow``, as fast as possible, as a shell reads a file sent at full speed,
    each chunk read only once ``wait_caught_up`` lets it through; ``none``, every chunk at once.
    Returns the events, the close requests and the seconds waited."""
    scheduler = DecodeScheduler(lambda name: decoder)
    events: list[p.ServerEvent] = []
    closes: list[CloseConnection] = []
    runner = SessionRunner(make_session(), scheduler, emit=events.append, on_close=closes.append)
    waited = 0.0
    try:
        runner.start()
        for i in range(0, len(audio), chunk):
            if pace == "flow":
                waited += await runner.wait_caught_up(2.0)
            runner.feed_audio(audio[i : i + chunk])
            if pace == "sleep":
                await asyncio.sleep(0.001)
        runner.close()
        assert await runner.wait_closed(timeout=10)
    finally:
        runner.cancel()
        scheduler.stop()
    return events, closes, waited


async def test_events_flow_in_order_and_the_session_closes_once() -> None:
    audio = to_pcm16(np.concatenate([speech([1, 2, 3]), silence(1.0), speech([4, 5]), silence(0.8)]))
    events, closes, _ = await run_stream(BurstDecoder(), audio)
    assert closes == [CloseConnection(1000, "session closed")]
    types = [e.type for e in events]
    assert types[0] == "session.created" and types[-1] == "transcript.text.done"
    assert types.count("transcript.segment") == 2
    done = events[-1]
    assert isinstance(done, p.TranscriptDone) and done.text == spoken(1, 2, 3, 4, 5)
    assert "".join(e.delta for e in events if isinstance(e, p.TranscriptDelta)) == done.text
    # Utterances never interleave: each segment precedes the next speech_started.
    starts = [i for i, t in enumerate(types) if t == "input_audio_buffer.speech_started"]
    segments = [i for i, t in enumerate(types) if t == "transcript.segment"]
    assert segments[0] < starts[1]


async def test_a_failing_final_is_retried_by_the_runner_and_nothing_is_lost() -> None:
    decoder = BurstDecoder()
    decoder.fail_next_final = 1
    # The stream ends mid-turn, so the close needs a final decode of the open utterance.
    events, closes, _ = await run_stream(decoder, to_pcm16(speech([1, 2])))
    done = [e for e in events if isinstance(e, p.TranscriptDone)]
    assert done and done[0].text == spoken(1, 2)
    assert not [e for e in events if isinstance(e, p.Error)], "a failure retried successfully is not reported"
    assert sum(1 for call in decoder.calls for r in call if r.final) >= 2, "the failed final was decoded again"
    assert closes


async def test_cancel_forgets_queued_decodes() -> None:
    decoder = BurstDecoder()
    scheduler = DecodeScheduler(lambda name: decoder)
    events: list[p.ServerEvent] = []
    runner = SessionRunner(make_session(), scheduler, emit=events.append)
    try:
        runner.start()
        runner.feed_audio(to_pcm16(np.concatenate([speech([1, 2, 3, 4]), silence(1.0)])))
        runner.close()
        runner.cancel()  # the client went away at once
        await asyncio.sleep(0.2)
        assert scheduler.queue_depth() == 0
        assert not runner.closed.is_set()
        assert events[0].type == "session.created"
    finally:
        scheduler.stop()


class SlowDecoder(BurstDecoder):
    """Takes 20 ms of a worker thread per batch: a decoder the client can outrun."""

    def decode_batch(self, requests):  # type: ignore[no-untyped-def]
        time.sleep(0.02)
        return super().decode_batch(requests)


async def send_as_fast_as_possible(*, flow_control: bool) -> tuple[list[p.ServerEvent], float]:
    """Twelve turns fed with no pause between chunks to a decoder they outrun."""
    audio = to_pcm16(np.concatenate([np.concatenate([speech([k]), silence(0.8)]) for k in range(1, 13)]))
    events, _, waited = await run_stream(SlowDecoder(), audio, chunk=3200, pace="flow" if flow_control else "none")
    return events, waited


async def test_a_client_that_outruns_the_decoder_is_read_only_as_fast_as_turns_are_finalized() -> None:
    events, waited = await send_as_fast_as_possible(flow_control=True)
    segments = [e for e in events if isinstance(e, p.TranscriptSegment)]
    assert [s.text for s in segments] == [spoken(k) for k in range(1, 13)]  # every turn its own
    assert waited > 0
    # Read on regardless, the turns past the pending bound run into one another (no words lost).
    events, waited = await send_as_fast_as_possible(flow_control=False)
    segments = [e for e in events if isinstance(e, p.TranscriptSegment)]
    assert len(segments) < 12 and waited == 0
    assert " ".join(s.text for s in segments) == spoken(*range(1, 13))


async def test_the_wait_for_the_decoder_is_bounded() -> None:
    """A decoder that does not answer holds a backlogged session's next message at most ``timeout``."""
    release = threading.Event()

    class StuckDecoder(BurstDecoder):
        def decode_batch(self, requests):  # type: ignore[no-untyped-def]
            release.wait(10)
            return super().decode_batch(requests)

    scheduler = DecodeScheduler(lambda name: StuckDecoder())
    session = Session("sess_runner", config=p.SessionConfig(interim_results=False), vad=EnergyVad(),
                      limits=SessionLimits(max_pending_finals=1))
    runner = SessionRunner(session, scheduler, emit=lambda event: None)
    try:
        runner.start()
        runner.feed_audio(to_pcm16(np.concatenate([speech([1]), silence(0.8)])))
        assert session.backlogged
        assert 0.1 <= await runner.wait_caught_up(0.1) < 1.0
        # A client that has sent no more audio than the time it has been connected is live: its
        # next message is read at once, however far behind the decoder is.
        assert await runner.wait_caught_up(5.0, elapsed_s=session.audio_seconds) == 0.0
        assert 0.1 <= await runner.wait_caught_up(0.1, elapsed_s=session.audio_seconds - 2.5) < 1.0
        release.set()
        assert await runner.wait_caught_up(5.0) < 1.0  # the final came back: reading goes on
        assert not session.backlogged
    finally:
        release.set()
        runner.cancel()
        scheduler.stop()
