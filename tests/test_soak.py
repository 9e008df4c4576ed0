"""Soak mode (``stream-server bench --soak``): the pure figures on hand-made inputs, and a short real
soak end to end whose report must hold real measurements (sessions that opened and closed, server
samples, zero lost finals), not placeholders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stream_server.bench.client import StreamRecord
from stream_server.bench.corpus import Stream, Utterance
from stream_server.bench.metrics import WerCounts
from stream_server.bench.soak import (
    SessionOutcome,
    SoakSample,
    is_refusal,
    parse_duration,
    resource_figures,
    score_session,
    slope_per_hour,
    summarize_run,
)

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "speech"


def test_durations_take_seconds_minutes_hours() -> None:
    assert parse_duration("40s") == 40
    assert parse_duration("30m") == 1800
    assert parse_duration("2h") == 7200
    assert parse_duration("90") == 90
    assert parse_duration("1.5m") == 90
    for bad in ("", "m", "10x", "-5m", "0s", "ten minutes"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_slope_is_least_squares_per_hour() -> None:
    # By hand: mean t 90, mean v 101.5; sum dt*dv = 240, sum dt^2 = 18000 -> 1/75 MB/s = 48 MB/h.
    points = [(0.0, 100.0), (60.0, 102.0), (120.0, 101.0), (180.0, 103.0)]
    assert slope_per_hour(points) == pytest.approx(48.0)
    exact = [(t * 60.0, 200.0 + t) for t in range(5)]
    assert slope_per_hour(exact) == pytest.approx(60.0)
    assert slope_per_hour([(0.0, 1.0), (10.0, 2.0)]) is None  # too few points for a trend


def sample(t: float, rss: float, fds: int = 20, threads: int = 8) -> SoakSample:
    return SoakSample(t=t, rss_mb=rss, fds=fds, threads=threads, cpu_s=t / 2, active_sessions=2.0, load1=1.0)


def test_warm_up_is_left_out_of_the_rss_slope() -> None:
    # Fast growth in the first 100 s (caches), flat afterwards: the slope must be ~0, not the warm-up's.
    samples = [sample(0, 200), sample(50, 300), sample(100, 350)] + [sample(100 + 10 * k, 350.0) for k in range(1, 10)]
    figures = resource_figures(samples, warmup_s=100)
    assert figures["rss_slope_mb_per_h"] == 0
    assert figures["rss_mb"] == {"start": 200, "after_warmup": 350, "end": 350, "max": 350}
    assert figures["server_cpu_cores_mean"] == 0.5
    leaky = resource_figures([sample(10 * k, 300 + 0.1 * k, fds=20 + k) for k in range(20)], warmup_s=0)
    assert leaky["rss_slope_mb_per_h"] == pytest.approx(36.0)  # 0.1 MB per 10 s
    assert leaky["fds_slope_per_h"] == pytest.approx(360.0) and leaky["fds"]["end"] == 39


def outcome(ended: float, wer: WerCounts, lost: list[str] | None = None, done: bool = True, unfinalized: int = 0) -> SessionOutcome:
    return SessionOutcome(
        number=int(ended), client=0, plan=0, started_s=ended - 20, ended_s=ended, audio_s=20.0, utterances=3,
        clips=["a", "b", "c"], unfinalized_items=unfinalized, got_done=done, lost_clips=lost or [], lost_clips_unheard=0,
        wer=wer, finalization_latencies=[0.5, 0.7],
        close_code=1000 if done else None, error=None if done else "no transcript.text.done within 60 s of close",
        problems=[] if done else ["no transcript.text.done received"], frames_sent=1000, frames_late=0, send_lag_max_s=0.01,
    )


def test_lost_finals_and_wer_drift_by_thirds() -> None:
    outcomes = [
        outcome(10, WerCounts(1, 0, 0, 20)),  # first third: 1 error in 20 words
        outcome(50, WerCounts(0, 0, 0, 20), lost=["b"]),  # the decoder left a clip out: accuracy, not a lost final
        outcome(80, WerCounts(2, 1, 0, 10)),  # last third: 3 in 10 (and one session without done)
        outcome(85, WerCounts(0, 0, 0, 10), done=False, unfinalized=1),
    ]
    s = summarize_run(outcomes, [sample(10 * k, 300.0) for k in range(10)], wall_s=90, warmup_s=0)
    assert s["sessions"] == 4 and s["sessions_with_done"] == 3
    assert s["lost_finals"] == 2 and s["utterances_unfinalized"] == 1 and s["sessions_without_done"] == 1
    assert s["clips_without_text"] == 1 and s["clips_without_text_by_clip"] == {"b": {"lost": 1, "played": 4}}
    assert s["wer_first_third"] == 0.05 and s["wer_last_third"] == 0.15
    assert s["wer_drift_points"] == 10.0
    assert s["errors"] == 1 and sum(w["sessions"] for w in s["windows"]) == 4
    busy = summarize_run(outcomes, [], wall_s=90, warmup_s=0, refusals=[5.0, 70.0, 71.0])
    assert (busy["sessions_refused"], busy["sessions_refused_first_third"], busy["sessions_refused_last_third"]) == (3, 1, 2)


def test_server_busy_before_any_speech_is_a_refusal_not_a_lost_session() -> None:
    busy = {"type": "error", "error": {"type": "server_error", "code": "server_busy", "message": "at capacity"}}
    refused = StreamRecord(index=0, raw_events=[(0.0, json.dumps(busy))], close_code=1013)
    assert is_refusal(refused)
    mid_session = StreamRecord(index=0, raw_events=[(0.0, json.dumps({"type": "input_audio_buffer.speech_started", "item_id": "i1"})),
                                                    (1.0, json.dumps(busy))], close_code=1013)
    assert not is_refusal(mid_session), "a session cut off after speech is scored (and its finals counted)"
    assert not is_refusal(StreamRecord(index=0, raw_events=[(0.0, json.dumps({"type": "session.created"}))], close_code=1000))


def test_a_session_is_scored_for_lost_finals_and_clips_without_text() -> None:
    utterances = [Utterance("a", "Hello world", 1.0, 2.0, 0.9, 2.1), Utterance("b", "eight", 3.0, 3.5, 2.9, 3.6),
                  Utterance("c", "yes", 5.0, 5.4, 4.9, 5.5), Utterance("d", "Good morning", 6.0, 7.0, 5.9, 7.1)]
    events = [
        {"type": "input_audio_buffer.speech_started", "item_id": "i1"},
        {"type": "transcript.text.delta", "item_id": "i1", "delta": "Hello world"},
        {"type": "transcript.segment", "item_id": "i1", "start": 0.9, "end": 2.1, "text": "Hello world"},
        {"type": "input_audio_buffer.speech_started", "item_id": "i2"},  # "eight" heard, decoded to nothing
        {"type": "transcript.segment", "item_id": "i2", "start": 2.9, "end": 3.7, "text": ""},
        # "yes" fell in no utterance; "Good morning" was announced and then never finalized: lost.
        {"type": "input_audio_buffer.speech_started", "item_id": "i4"},
        {"type": "transcript.text.done", "text": "Hello world"},
    ]
    record = StreamRecord(index=0, raw_events=[(1.0 + k, json.dumps(e)) for k, e in enumerate(events)], audio_s=8.0,
                          close_code=1000, frames_sent=400)
    stream = Stream(index=0, sample_rate=16000, samples=np.zeros(8 * 16000, np.int16), utterances=utterances)
    o = score_session(7, 1, 3, stream, record, origin=100.0, started=90.0)
    assert o.lost_clips == ["b", "c", "d"] and o.lost_clips_unheard == 2
    assert o.unfinalized_items == 1 and o.got_done and o.lost_finals == 1
    assert o.wer.reference_words == 6 and o.wer.deletions == 4
    assert o.started_s == -10.0 and o.problems == ["1 utterance(s) announced by speech_started never got their transcript.segment"]


@pytest.mark.skipif(not (CORPUS / "manifest.jsonl").exists(), reason=f"real-speech corpus not found at {CORPUS}")
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_soak_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "soak"
    # Admission control off: on a busy CI machine it may turn sessions away, and this test is about
    # the soak's measurements, not capacity (refusals are counted apart and unit-tested above).
    cmd = [sys.executable, "-m", "stream_server.bench", "--soak", "40s", "--clients", "2", "--soak-session-s", "12",
           "--soak-sample-s", "5", "--server-arg=--admission-max-turn-end-s 0", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    s = results["summary"]
    r = s["resources"]
    assert s["sessions"] > 2, "two clients over 40 s run several 12 s sessions back to back"
    assert {row["client"] for row in results["sessions"]} == {0, 1}
    assert s["sessions_with_done"] == s["sessions"] == s["sessions_closed_1000"] and s["sessions_refused"] == 0
    assert s["lost_finals"] == 0, (s["utterances_unfinalized"], s["sessions_without_done"])
    assert s["utterances"] >= s["sessions"] and 0 <= s["wer"] < 0.5
    assert r["samples"] > 2 and len(results["samples"]) == r["samples"]
    assert isinstance(r["rss_slope_mb_per_h"], float)
    assert 100 < r["rss_mb"]["max"] < 4000, "a real server's RSS, in MB"
    assert r["fds"]["start"] > 3 and r["threads"]["start"] > 1
    assert r["active_sessions_at_end"] == 0, "the server let go of every session"
    assert len((out / "sessions.jsonl").read_text().splitlines()) == s["sessions"]
    assert results["server"]["exit_code"] in (0, -15) and results["server"]["log_tracebacks"] == 0
    assert "lost finals" in (out / "summary.md").read_text()
