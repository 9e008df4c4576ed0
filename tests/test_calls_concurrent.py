"""End to end: two phone calls (four legs) at once, replayed at real time as Twilio sends them.

The calls are the call-center benchmark's (``stream_server.bench.calls``): real speech cut to
telephone band, an LJ Speech caller on each call's inbound track and a different callee voice on
each call's outbound track (ARCTIC slt on the first, a LibriVox reader on the second), turns that
overlap, abut and pause, each call with its own sentences and its own ``callSid``. Both are
streamed over ``/v1/twilio`` at the same time (the second starts a second later), each read by its
own subscriber of ``/v1/sessions/{callSid}/events``, and each call's stored transcript is fetched
after.

What a contact center needs from two calls at once: every turn of every leg arrives, on its own
call, under its own speaker; each leg is about as accurate as offline decoding; nothing of one call
shows up in the other. The second call's legs each carry the other 35 dB down and 40 ms late
(``calls.with_echo``: line echo an echo canceller left): its words still arrive on their own leg
only, as accurate as offline decoding of the clean turns.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from stream_server.bench import calls
from stream_server.bench.calls import CHANNEL, LABELS, TRACKS, Call, CallRun, LegScore
from stream_server.bench.metrics import wer_counts
from tests.support import require_speech, start_server, wer

pytestmark = pytest.mark.slow

CALL_S = 28.0  # two calls of four turns each: the whole test stays under two minutes
STAGGER_S = 2.0  # spread over two calls: the second starts 1 s after the first
#: Per-leg bound: streaming makes at most two word errors more than offline decoding on the leg.
#: Each leg has only two turns (16-45 words), so a point bound is the wrong unit: on the 16-word
#: ARCTIC leg one word is 6 points, and streaming there hears "apologize with more" where
#: offline hears "apologized with more" (the window that commits the word ends before its "d";
#: the replay, ``stream-server bench --replay``, gives the same text at any decode lag), which with
#: "Stills" for "Steels" is 5 errors to offline's 3. A leg that loses a turn or takes another
#: call's text is far outside it (a lost 10-word turn alone is 10 errors).
EXTRA_WORD_ERRORS = 2
#: Over the four legs (115 words) streaming stays within this many points of offline (measured
#: +1.7: 8 errors to 6); the single-call Twilio test holds one point on its 12-turn call.
POOLED_MARGIN = 0.03
#: A leg's text scored against the *other* call's references on the same track: unrelated
#: sentences score near or above 100%; anything under this would mean the calls' texts mixed.
CROSS_WER_FLOOR = 0.7
#: The second call's echo of each leg on the other (without the crosstalk gate every word of
#: it came out on both legs: docs/benchmarks.md, "Echo between the legs").
ECHO_DB = -35.0


@dataclasses.dataclass
class Outcome:
    runs: list[CallRun]
    offline: list[dict[str, list[str]]]
    transcripts: dict[str, dict[str, Any]]

    def legs(self) -> Iterator[tuple[CallRun, str, LegScore]]:
        for run, offline in zip(self.runs, self.offline):
            for track in TRACKS:
                yield run, track, calls.score_leg(run, track, offline)


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outcome]:
    built, _notes = calls.build_calls(2, CALL_S, require_speech())
    built[1] = calls.with_echo(built[1], ECHO_DB)
    offline = [calls.offline_texts(call, tag="calls") for call in built]
    server = start_server(tmp_path_factory.mktemp("calls"), "--log-level", "info")
    try:
        ws_url = f"ws://127.0.0.1:{server.port}/v1/twilio"
        runs = asyncio.run(calls.run_calls(ws_url, server.http_url, built, stagger_s=STAGGER_S))
        with httpx.Client(base_url=server.http_url, timeout=10) as client:
            sids = [run.call.call_sid for run in runs]  # each replay runs under a fresh Call SID
            transcripts = {sid: client.get(f"/v1/sessions/{sid}/transcript").json() for sid in sids}
        yield Outcome(runs, offline, transcripts)
    finally:
        server.stop()


def test_both_calls_ran_at_real_time_and_closed_after_their_finals(outcome: Outcome) -> None:
    assert len({run.call.call_sid for run in outcome.runs}) == 2
    assert abs(outcome.runs[1].replay.t0 - outcome.runs[0].replay.t0 - 1.0) < 0.5, "the calls overlapped in time"
    for run in outcome.runs:
        print(f"{run.call.call_sid}: {run.replay.elapsed_s:.1f} s for {run.call.seconds:.1f} s of call, "
              f"{run.replay.late_frames} frames >100 ms late, flush {run.replay.flush_s:.2f} s")
        assert run.replay.close_code == 1000 and run.replay.received == []
        assert run.replay.elapsed_s < run.call.seconds * 1.25, "the replay kept (about) real time"
        assert run.replay.flush_s < 10
        kinds = [e.kind for e in run.events]
        assert kinds[0] == "session.created" and kinds[-1] == "transcript.text.done"


def test_every_turn_arrives_on_its_call_with_its_speaker(outcome: Outcome) -> None:
    for run, track, leg in outcome.legs():
        print(f"{run.call.call_sid} {track}: {leg.segments} segments, finalization "
              + ", ".join("lost" if x is None else f"{x:.2f}" for x in leg.finalization_s) + " s")
        assert leg.lost_turns == [], f"{run.call.call_sid} {track}: turns {leg.lost_turns} lost; heard {leg.hypothesis!r}"
        assert leg.wrong_speaker == 0
        assert all(x is not None and x > 0 for x in leg.finalization_s), "each turn's segment came after its speech ended"
        assert calls.foreign_segments(run.events) == []
    for run in outcome.runs:
        transcript = outcome.transcripts[run.call.call_sid]
        assert transcript["id"] == run.call.call_sid and transcript["status"] == "completed"
        assert transcript["duration"] == pytest.approx(run.call.seconds, abs=0.1), "the stored call is this call's audio"
        assert [(c["channel"], c["speaker"]) for c in transcript["channels"]] == [(CHANNEL[t], LABELS[t]) for t in TRACKS]
        # Each spoken turn is in the stored conversation, on its leg, at its time (±1 s).
        for spoken in run.call.turns:
            near = [t for t in transcript["turns"] if t["channel"] == CHANNEL[spoken.track] and t["start"] < spoken.end and t["end"] > spoken.start - 1.0]
            assert near and abs(min(t["start"] for t in near) - spoken.start) < 1.0, (run.call.call_sid, spoken.clip_id, transcript["turns"])


def leg_errors(references: list[str], hypothesis: str) -> tuple[int, int]:
    """(word errors, reference words) of one leg, normalised as the benchmark scores."""
    counts = wer_counts(" ".join(references), hypothesis)
    return counts.errors, counts.reference_words


@pytest.mark.parametrize("index", [0, 1])
@pytest.mark.parametrize("track", TRACKS)
def test_each_leg_within_two_words_of_offline(outcome: Outcome, index: int, track: str) -> None:
    run, offline = outcome.runs[index], outcome.offline[index]
    references = run.call.references(track)
    heard = calls.leg_text(run.events, CHANNEL[track])
    (streaming, words), (baseline, _) = leg_errors(references, heard), leg_errors(references, " ".join(offline[track]))
    print(f"{run.call.call_sid} {track}: streaming {streaming} errors, offline beam-5 {baseline} of {words} words\n"
          f"  streaming: {heard}\n  offline:   {' '.join(offline[track])}")
    assert streaming <= baseline + EXTRA_WORD_ERRORS, (track, streaming, baseline, heard)
    stored = next(c["text"] for c in outcome.transcripts[run.call.call_sid]["channels"] if c["channel"] == CHANNEL[track])
    assert leg_errors(references, stored)[0] <= baseline + EXTRA_WORD_ERRORS, "the stored transcript is the live one"


def test_the_legs_together_within_three_points_of_offline(outcome: Outcome) -> None:
    streaming = offline_errors = words = 0
    for run, offline in zip(outcome.runs, outcome.offline):
        for track in TRACKS:
            references = run.call.references(track)
            errors, n = leg_errors(references, calls.leg_text(run.events, CHANNEL[track]))
            streaming, words = streaming + errors, words + n
            offline_errors += leg_errors(references, " ".join(offline[track]))[0]
    print(f"four legs: streaming {streaming / words:.3f}, offline {offline_errors / words:.3f} ({words} words)")
    assert streaming / words <= offline_errors / words + POOLED_MARGIN


def test_the_two_calls_do_not_mix(outcome: Outcome) -> None:
    first, second = outcome.runs
    for track in TRACKS:
        for this, other in ((first, second), (second, first)):
            heard = calls.leg_text(this.events, CHANNEL[track])
            cross = wer(other.call.references(track), [heard])
            assert cross > CROSS_WER_FLOOR, f"{this.call.call_sid} {track} reads like the other call: {heard!r}"
    # Nothing of one call's audio is in the other's stored transcript: its clips are its own.
    clips = [{t.clip_id for t in run.call.turns} for run in outcome.runs]
    assert not clips[0] & clips[1], "the two calls are made of different sentences"


def test_calls_are_what_the_benchmark_describes() -> None:
    """Call ``i`` does not depend on how many calls are built, legs are whole frames of one length,
    and the inbound and outbound tracks carry different voices."""
    corpus = require_speech()
    one, _ = calls.build_calls(1, CALL_S, corpus)
    two, _ = calls.build_calls(2, CALL_S, corpus)
    assert one[0] == two[0]
    for call in two:
        assert isinstance(call, Call)
        assert len(call.legs["inbound"]) == len(call.legs["outbound"]) and len(call.legs["inbound"]) % 160 == 0
        assert {t.clip_id.split("_")[0] for t in call.leg_turns("inbound")} == {"ljspeech"}
        assert not any(t.clip_id.startswith("ljspeech") for t in call.leg_turns("outbound"))
        gaps = [b.start - a.end for a, b in zip(call.turns, call.turns[1:])]
        assert min(gaps) < 0 and any(g == 0 for g in gaps), "turns overlap and abut"
        assert all(t.start <= t.speech_start_s < t.speech_end_s <= t.end for t in call.turns)
        assert call.seconds <= CALL_S + 0.1
