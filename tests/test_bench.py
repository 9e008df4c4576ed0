"""Benchmark suite: pure metric functions on hand-made event sequences, plus one end-to-end run.

The metric tests pin the definitions (what counts as final, lost, flicker, first text) with
sequences small enough to check by hand; the end-to-end test only checks that a real run against
a real server produces complete, numeric output (no timing thresholds: CI machines vary).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stream_server.bench import ab
from stream_server.bench import metrics as m
from stream_server.bench.corpus import Utterance, build_streams, speech_bounds
from stream_server.bench.runner import LevelResult
from stream_server.bench.server_proc import ServerOptions
from stream_server.bench.sweep import parse_levels, rss_slope

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "speech"


def utt(clip: str, text: str, start: float, end: float) -> Utterance:
    return Utterance(clip, text, start, end, start - 0.1, end + 0.1)


def delta(item: str, text: str) -> dict:
    return {"type": "transcript.text.delta", "item_id": item, "delta": text, "logprobs": None}


def interim(item: str, text: str) -> dict:
    return {"type": "transcript.text.interim", "item_id": item, "text": text}


def segment(item: str, text: str) -> dict:
    return {"type": "transcript.segment", "item_id": item, "text": text}


def done(text: str) -> dict:
    return {"type": "transcript.text.done", "text": text, "logprobs": None, "usage": {}}


UTTS = [utt("a", "Hello there world.", 1.0, 2.0), utt("b", "Good morning", 3.0, 4.0)]


def two_utterance_events() -> list[tuple[float, dict]]:
    return [
        (1.30, interim("i1", "hello")),
        (1.60, interim("i1", "hello the")),  # "the" later becomes "there": 1 changed word
        (1.90, delta("i1", "Hello")),
        (1.95, interim("i1", "there word")),
        (2.40, delta("i1", " there world.")),
        (2.41, segment("i1", "Hello there world.")),
        (3.50, interim("i2", "good")),
        (4.30, delta("i2", " Good morning")),
        (4.31, segment("i2", "Good morning")),
        (4.50, done("Hello there world. Good morning")),
    ]


def test_final_words_join_split_deltas_and_keep_completion_time() -> None:
    events = [(1.0, delta("x", "Hel")), (1.5, delta("x", "lo")), (2.0, delta("x", " big world"))]
    words = m.final_words(events)
    assert [w.raw for w in words] == ["Hello", "big", "world"]
    assert (words[0].t_first, words[0].t_final) == (1.0, 1.5)
    assert words[2].t_final == 2.0


def test_a_mark_sent_after_a_word_does_not_make_the_word_later() -> None:
    """A word committed at a pause goes out without its guessed punctuation; the mark follows when
    the turn ends or the speaker goes on. The word was final when its letters were."""
    events = [(1.0, delta("x", " Strasburg")), (1.8, delta("x", ",")), (2.0, delta("x", " Basil")), (3.0, delta("x", "."))]
    words = m.final_words(events)
    assert [(w.raw, w.t_final) for w in words] == [("Strasburg,", 1.0), ("Basil.", 2.0)]


def test_final_words_trailing_space_starts_new_word() -> None:
    events = [(1.0, delta("x", "one ")), (2.0, delta("x", "two"))]
    assert [w.raw for w in m.final_words(events)] == ["one", "two"]


def test_latencies_from_hand_made_events() -> None:
    results, attribution = m.utterance_results(two_utterance_events(), UTTS)
    a, b = results
    assert a.finalization_latency_s == pytest.approx(0.40)  # 2.40 - 2.0
    assert a.first_text_latency_s == pytest.approx(0.30)  # interim "hello" at 1.30 - 1.0
    assert b.finalization_latency_s == pytest.approx(0.30)
    assert b.first_text_latency_s == pytest.approx(0.50)
    assert not a.lost and not b.lost
    assert attribution.inserted_tokens == 0


def test_segment_latency_is_the_segment_of_the_last_words_item() -> None:
    """A turn's words are final at its pause; its segment only when the turn's silence has run out.
    Screens that show only segments see the later time."""
    events = [
        (2.20, delta("i1", "Hello there")),
        (2.30, delta("i1", " world.")),
        (2.55, segment("i1", "Hello there world.")),
        (4.30, delta("i2", " Good")),  # "morning" never came: latency of the last attributed word
        (4.70, segment("i2", "Good")),
        (4.70, segment("i2", "Good")),  # a repeat of the item's segment does not move it
    ]
    a, b = m.utterance_results(events, UTTS)[0]
    assert (a.finalization_latency_s, a.segment_latency_s) == (pytest.approx(0.30), pytest.approx(0.55))
    assert (b.finalization_latency_s, b.segment_latency_s) == (pytest.approx(0.30), pytest.approx(0.70))
    figures = m.run_figures([m.evaluate_stream(0, events, UTTS)])
    assert figures["segment_latency_s_p50"] == pytest.approx(0.625)  # interpolated between the two
    assert figures["segment_latency_s_max"] == pytest.approx(0.70)
    (unsegmented,), _ = m.utterance_results(events[:2], [UTTS[0]])
    assert unsegmented.finalization_latency_s == pytest.approx(0.30) and unsegmented.segment_latency_s is None


def test_speed_converts_audio_time_to_wall_time() -> None:
    events = [(1.2, delta("i", "Good morning"))]
    (r,), _ = m.utterance_results(events, [utt("b", "good morning", 1.0, 2.0)], speed=2.0)
    assert r.finalization_latency_s == pytest.approx(0.2)  # end of speech at wall 1.0 s


def test_wrong_interim_word_does_not_count_as_first_text() -> None:
    events = [
        (1.1, interim("i", "yellow")),  # wrong word: not text of the utterance
        (1.4, interim("i", "hello")),
        (2.2, delta("i", "Hello world")),
    ]
    (r,), _ = m.utterance_results(events, [utt("a", "hello world", 1.0, 2.0)])
    assert r.first_text_latency_s == pytest.approx(0.4)


def test_text_before_onset_is_not_first_text() -> None:
    # "good" repeated at 2.5 s (before utterance b's onset at 3.0 s) aligns to b but cannot be it.
    events = [
        (2.3, delta("i1", "Hello there world")),
        (2.5, interim("i1", "good")),
        (2.6, delta("i1", " good")),
        (3.4, interim("i2", "morning")),
        (4.3, delta("i2", " morning")),
    ]
    results, _ = m.utterance_results(events, UTTS)
    assert results[1].first_text_latency_s == pytest.approx(0.4)


def test_lost_utterance_and_insertions() -> None:
    events = [
        (2.3, delta("i1", "Hello there world")),
        (3.0, delta("i2", " thank you")),  # hallucination in the pause, nothing of "good morning"
    ]
    results, _attribution = m.utterance_results(events, UTTS)
    assert not results[0].lost
    # "thank you" aligns as substitutions of "good morning" (same length) - that is attribution
    # by alignment, the honest outcome when text appears where the utterance should be.
    assert results[1].matched_tokens == 2


def test_utterance_lost_when_nothing_aligns() -> None:
    events = [(2.3, delta("i1", "Hello there world"))]
    results, _ = m.utterance_results(events, UTTS)
    assert results[1].lost
    assert results[1].finalization_latency_s is None
    figures = m.run_figures([m.evaluate_stream(0, events, UTTS)])
    assert figures["utterances_lost"] == 1


def test_substitution_still_attributes_the_word() -> None:
    events = [(2.5, delta("i", "Hello there word"))]
    (r,), _ = m.utterance_results(events, [UTTS[0]])
    assert r.finalization_latency_s == pytest.approx(0.5)
    assert r.matched_tokens == 3


def test_missing_last_word_is_flagged() -> None:
    events = [(1.8, delta("i", "Hello there"))]
    (r,), _ = m.utterance_results(events, [UTTS[0]])
    assert not r.last_word_transcribed and not r.lost
    assert m.run_figures([m.evaluate_stream(0, events, [UTTS[0]])])["utterances_last_word_missing"] == 1


def test_caption_delay_is_how_far_the_screen_trails_the_speaker() -> None:
    """Four words over 2 s (0.5 s each as the metric spreads them), sampled every 0.25 s while
    spoken: a caption that grows a word every half second trails by 0.25-0.5 s; one that stands
    still until the speaker is nearly done trails by up to 1.75 s. A misheard word on screen is
    the caption keeping up (WER counts it, not this)."""
    spoken = [utt("a", "one two three four", 1.0, 3.0)]
    steady = [
        (1.45, interim("i", "won")),  # misheard: the first word is on screen all the same
        (1.7, interim("i", "one")),
        (2.1, interim("i", "one two")),
        (2.6, delta("i", "one two three")),
        (2.61, interim("i", "")),
        (3.3, delta("i", " four")),
        (3.3, segment("i", "one two three four")),
    ]
    delays = m.evaluate_stream(0, steady, spoken).caption_delays
    assert delays == pytest.approx([0.0, 0.25, 0.0, 0.25, 0.5, 0.25, 0.5, 0.25, 0.5])
    paced = [(2.9, interim("i", "one two three")), (3.3, delta("i", "one two three four")), (3.3, segment("i", "one two three four"))]
    figures = m.run_figures([m.evaluate_stream(0, paced, spoken)])
    assert figures["caption_delay_s_max"] == pytest.approx(1.75) and figures["caption_delay_s_p50"] == pytest.approx(0.75)


def test_flicker_counts_erased_and_changed_words() -> None:
    f = m.flicker(two_utterance_events())
    # "hello the" -> "Hello there word": "the" changed (1);
    # "Hello there word" -> final "Hello there world.": "word" changed (1); "good" kept.
    assert f.changed_words == 2
    assert f.final_words == 5
    assert f.per_final_word == pytest.approx(0.4)
    assert f.interim_events == 4


def test_flicker_ignores_case_and_punctuation() -> None:
    events = [
        (1.0, interim("i", "hello")),
        (1.5, delta("i", "Hello,")),
        (1.6, segment("i", "Hello,")),
    ]
    assert m.flicker(events).changed_words == 0


def test_wer_uses_whisper_normaliser() -> None:
    counts = m.wer_counts("Mr. Quilter is here, in fourteen sixty-five.", "mister quilter is here in 1465")
    assert counts.errors == 0
    assert m.wer_counts("a b c d", "a x c").wer == pytest.approx(0.5)
    assert m.wer_counts("a b", "").deletions == 2


def test_protocol_violations_detected() -> None:
    events = two_utterance_events()
    assert m.protocol_violations(events) == []
    bad = events[:-1] + [(5.0, done("something else"))]
    assert any("differ" in p for p in m.protocol_violations(bad))
    assert any("no transcript.text.done" in p for p in m.protocol_violations(events[:-1]))


def test_percentiles_and_summary() -> None:
    assert m.percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert m.percentile([], 50) is None
    s = m.summarize([0.1, 0.2, 0.3], "x")
    assert s["x_p50"] == pytest.approx(0.2) and s["x_max"] == pytest.approx(0.3)
    assert m.summarize([], "x") == {}


def test_capacity_rule() -> None:
    levels = [
        {"n_streams": 1, "wer": 0.10, "finalization_latency_s_p95": 0.8, "utterances_lost": 0},
        {"n_streams": 4, "wer": 0.105, "finalization_latency_s_p95": 1.2, "utterances_lost": 0},
        {"n_streams": 8, "wer": 0.13, "finalization_latency_s_p95": 1.4, "utterances_lost": 0},
        {"n_streams": 12, "wer": 0.10, "finalization_latency_s_p95": 2.0, "utterances_lost": 1},
    ]
    cap, reasons = m.capacity(levels)
    assert cap == 4
    assert "WER" in reasons[2] and "lost" in reasons[3] and "p95" in reasons[3]


def test_histogram_quantile() -> None:
    buckets = [(0.1, 0.0), (0.5, 5.0), (1.0, 10.0), (float("inf"), 10.0)]
    assert m.histogram_quantile(buckets, 0.5) == pytest.approx(0.5)
    assert m.histogram_quantile(buckets, 0.75) == pytest.approx(1.0)
    assert m.histogram_quantile([(1.0, 3.0), (2.0, 3.0), (float("inf"), 3.0)], 0.5) == 1.0
    assert m.histogram_quantile([], 0.5) is None


def test_prometheus_diff() -> None:
    from stream_server.bench import server_metrics as sm

    def text(count: int, total: float) -> str:
        return (
            "# TYPE stream_decode_queue_wait_seconds histogram\n"
            f'stream_decode_queue_wait_seconds_bucket{{le="0.1"}} {count}\n'
            f'stream_decode_queue_wait_seconds_bucket{{le="+Inf"}} {count}\n'
            f"stream_decode_queue_wait_seconds_sum {total}\n"
            f"stream_decode_queue_wait_seconds_count {count}\n"
        )

    figs = sm.diff(sm.parse(text(2, 0.1)), sm.parse(text(6, 0.3)))
    assert figs["stream_decode_queue_wait_seconds_count"] == 4
    assert figs["stream_decode_queue_wait_seconds_mean"] == pytest.approx(0.05)
    assert sm.headline(figs)["decode_queue_wait_s_mean"] == pytest.approx(0.05)


def test_sweep_helpers() -> None:
    assert parse_levels("4,2,8") == [1, 2, 4, 8]
    from stream_server.bench.runner import LevelResult

    lvs = [LevelResult("a", n, {"server_rss_peak_mb": 100.0 + 3 * n}) for n in (1, 2, 4)]
    assert rss_slope(lvs) == pytest.approx(3.0)


def test_speech_bounds_finds_tone_in_noise() -> None:
    sr = 16000
    rng = np.random.default_rng(0)
    audio = (rng.standard_normal(sr) * 1e-3).astype(np.float32)
    audio[4000:12000] += 0.3 * np.sin(np.arange(8000) * 0.2).astype(np.float32)
    lo, hi = speech_bounds(audio, sr)
    assert abs(lo - 4000) <= 160 and abs(hi - 12000) <= 160


needs_corpus = pytest.mark.skipif(
    not (CORPUS / "manifest.jsonl").exists(),
    reason=f"real-speech corpus not found at {CORPUS} (shared test data, not in the repo)",
)


@needs_corpus
def test_streams_have_known_pauses_and_shared_clips() -> None:
    streams, _pool = build_streams(CORPUS, 2, seed=3, duration_s=40)
    assert {u.clip_id for u in streams[0].utterances} == {u.clip_id for u in streams[1].utterances}
    for s in streams:
        gaps = [b.speech_start_s - a.speech_end_s for a, b in zip(s.utterances, s.utterances[1:])]
        assert all(0.6 - 0.01 <= g <= 1.5 + 0.01 for g in gaps)
        assert s.duration_s <= 40 + 1e-6
    again, _ = build_streams(CORPUS, 1, seed=3, duration_s=40)
    assert np.array_equal(again[0].samples, streams[0].samples)


def _all_numbers(obj: object, path: str = "") -> list[str]:
    """Paths of leaves that are not finite numbers."""
    bad: list[str] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            bad += _all_numbers(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            bad += _all_numbers(v, f"{path}[{i}]")
    elif isinstance(obj, bool) or not isinstance(obj, (int, float)) or not math.isfinite(obj):
        bad.append(f"{path}={obj!r}")
    return bad


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    """``python -m stream_server.bench ARGS`` from the checkout, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "stream_server.bench", *args], cwd=REPO, capture_output=True, text=True, timeout=280)


@needs_corpus
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    proc = _bench("--streams", "2", "--duration-s", "20", "--speed", "2", "--stagger-s", "1",
                  "--idle-s", "0.5", "--profile", "--per-utterance", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("results.json", "summary.md", "latency_cdf.png"):
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    (run,) = results["runs"]
    assert run["n_streams"] == 2
    for key in ("wer", "utterances", "finalization_latency_s_p50", "finalization_latency_s_p95",
                "first_text_latency_s_p50", "flicker_per_final_word", "server_cpu_s_per_audio_s",
                "server_rss_peak_mb", "offline_wer_beam1", "offline_wer_beam5"):
        assert key in run["metrics"], key
    assert _all_numbers(run["metrics"]) == []
    assert _all_numbers(results["offline"]["metrics"]) == []
    assert _all_numbers(run["finalization_latencies"]) == []
    # --profile: the server's stage counters as CPU per audio second, adding up to its CPU.
    (profile,) = results["profile"]
    assert profile["encode"]["cpu_s_per_audio_s"] > 0 and profile["generate"]["calls"] > 0 and profile["vad"]["calls"] > 0
    parts = sum(row["cpu_s"] for stage, row in profile.items() if stage != "total")
    assert parts == pytest.approx(profile["total"]["cpu_s"])
    assert "Where the server's CPU went (N=2" in (out / "summary.md").read_text()
    # --per-utterance: the clients asked for word timings, and every utterance of both streams was scored.
    per_utterance = (out / "N002" / "per_utterance.md").read_text()
    assert f"{run['metrics']['utterances']:.0f} utterances." in per_utterance


def test_a_calls_turn_never_takes_its_last_word_from_an_utterance_that_began_after_it() -> None:
    """The alignment may pair the next turn's misheard first word with this turn's last one
    ("14 62 | imitates" against "1462 | imitate the"): without the utterances' starts the turn
    seemed final with the next turn's segment."""
    from stream_server.bench.calls import Turn, _turn_finals
    from stream_server.bench.metrics import FinalWord

    turns = [
        Turn("inbound", "a", 0.0, 2.2, b"", "in the year fourteen sixty-two", 0.2, 2.0),
        Turn("inbound", "b", 3.0, 5.0, b"", "It imitates a much freer hand", 3.2, 4.5),
    ]
    words = [FinalWord(raw, "item_a", 2.6, 2.6) for raw in "In the year 1462.".split()]
    words += [FinalWord(raw, "item_b", 5.1, 5.1) for raw in "Imitate the much freer hand.".split()]
    misread, _, _ = _turn_finals(words, turns)
    assert misread[0] == pytest.approx(5.1 - 2.0)  # the artifact this guards against
    latencies, items, lost = _turn_finals(words, turns, {"item_a": 0.0, "item_b": 2.9})
    assert latencies == [pytest.approx(0.6), pytest.approx(0.6)]
    assert items == ["item_a", "item_b"] and lost == []


def test_a_call_with_echo_carries_each_leg_faintly_and_late_on_the_other() -> None:
    from stream_server.audio import decode_samples, encode_g711
    from stream_server.bench.calls import ECHO_DELAY_S, RATE, Call, with_echo

    t = np.arange(RATE) / RATE
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    quiet = np.zeros(RATE, np.float32)
    call = Call(turns=[], legs={"inbound": encode_g711(np.concatenate([tone, quiet]), "ulaw"),
                                "outbound": encode_g711(np.concatenate([quiet, tone]), "ulaw")})
    echoed = with_echo(call, -30.0)
    legs = {k: decode_samples(v, "g711_ulaw")[0] for k, v in echoed.legs.items()}

    def db(x: np.ndarray) -> float:
        return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64))))

    lag = int(ECHO_DELAY_S * RATE)
    only_inbound, only_outbound = slice(lag, RATE), slice(RATE + lag, 2 * RATE)  # where one leg speaks alone
    assert db(legs["outbound"][only_inbound]) == pytest.approx(db(legs["inbound"][only_inbound]) - 30.0, abs=0.5)
    assert db(legs["inbound"][only_outbound]) == pytest.approx(db(legs["outbound"][only_outbound]) - 30.0, abs=0.5)
    assert not legs["outbound"][:lag].any() and legs["outbound"][lag : 2 * lag].any()  # the echo comes late
    assert echoed.turns == call.turns and len(echoed.legs["inbound"]) == len(call.legs["inbound"])


def test_the_calls_bench_counts_a_refused_call_and_scores_the_admitted_ones(tmp_path: Path) -> None:
    """A call that admission control turns away (``server_busy``, close 1013) is a refused call,
    not a crash or a call of lost turns: the real server here holds one session
    (``--max-sessions 1``), two calls overlap, and the second is refused; the level then reads
    '2 (1 refused)' and does not count as held."""
    import asyncio

    from stream_server.audio import encode_g711
    from stream_server.bench import calls
    from tests.support import start_server

    quiet = encode_g711(np.zeros(calls.RATE * 3, np.float32), "ulaw")
    call = calls.Call(turns=[], legs={"inbound": quiet, "outbound": quiet})
    server = start_server(tmp_path, "--max-sessions", "1")
    try:
        runs = asyncio.run(calls.run_calls(f"ws://127.0.0.1:{server.port}/v1/twilio", f"http://127.0.0.1:{server.port}", [call, call], stagger_s=1.0))
    finally:
        server.stop()
    assert [run.refused for run in runs] == [False, True]
    assert runs[0].replay.close_code == 1000 and runs[0].events and runs[1].events == []
    figures = {"finalization_s_p50": 0.5, "finalization_s_p95": 1.0, "lost_turns": 0, "bad_close": 0}
    assert calls.meets_target(figures) and not calls.meets_target({**figures, "refused_calls": 1})
    level = {"n_calls": 2, "meets_target": False, "legs": [], "metrics": {
        **figures, "refused_calls": 1, "turns": 0, "wer": 0.0, "offline_wer": 0.0, "wer_minus_offline": 0.0, "client_late_frames": 0}}
    results = {"config": {"model": "tiny.en", "device": "cpu", "compute_type": "int8", "call_s": 3, "stagger_s": 1.0},
               "environment": {"cpu_count": 2, "platform": "linux"}, "created_utc": "now", "notes": [], "levels": [level]}
    assert "| 2 (1 refused) | 0 |" in calls.markdown(results)


def _level(label: str, **figures: float) -> LevelResult:
    return LevelResult(label, 1, dict(figures))


def test_ab_pairs_alternate_their_order_and_are_judged_by_pairs_won() -> None:
    a, b = ab.Arm("A", ServerOptions()), ab.Arm("B", ServerOptions(extra_args=["--x"]))
    ran: list[str] = []
    p95 = {"A1": 2.0, "B1": 1.5, "A2": 1.6, "B2": 1.8, "A3": 2.4, "B3": 2.2}

    def run_arm(arm: ab.Arm, label: str) -> LevelResult:
        ran.append(label)
        return _level(label, finalization_latency_s_p95=p95[label], wer=0.08)

    pairs = ab.run_pairs(3, (a, b), run_arm, log=lambda _: None)
    assert ran == ["A1", "B1", "B2", "A2", "A3", "B3"], "AB, BA, AB: a machine slowing down favours neither arm"
    assert [(x.label, y.label) for x, y in pairs] == [("A1", "B1"), ("A2", "B2"), ("A3", "B3")]
    summary = ab.summarize(pairs)
    row = summary["metrics"]["finalization_latency_s_p95"]
    assert (row["a_median"], row["b_median"], row["b_lower"], row["b_higher"]) == (2.0, 1.8, 2, 1)
    assert summary["metrics"]["wer"]["b_lower"] == summary["metrics"]["wer"]["b_higher"] == 0
    assert "first_text_latency_s_p50" not in summary["metrics"], "a figure no run has is left out"
    md = ab.markdown({**summary, "a": "`A`", "b": "`B`"})
    assert "| final p95 s | 2 / 1.6 / 2.4 | 1.5 / 1.8 / 2.2 | 2 | 1.8 | 2 / 1 of 3 |" in md
    assert "| WER | 8.00% / 8.00% / 8.00% |" in md


def test_ab_arm_b_runs_another_checkout_from_its_own_directory(tmp_path: Path) -> None:
    """``python -m`` puts the working directory ahead of ``PYTHONPATH``: arm B's server must start
    in its checkout, or a run from inside this one would start this checkout's code twice."""
    a = ServerOptions(model="tiny.en", extra_args=["--max-batch-size", "8"])
    b = ab.arm_b(a, ["--max-batch-size", "4"], tmp_path)
    assert b.args() == ["--model", "tiny.en", "--max-batch-size", "8", "--max-batch-size", "4"], "B's flags come last and win"
    assert b.env["PYTHONPATH"] == str(tmp_path.resolve()) and b.cwd == tmp_path.resolve()
    assert a.env == {} and a.cwd is None, "arm A is left as it was"
    assert ab.arm_b(a, [], None) == a
    assert "code from" in ab.describe(b) and "this checkout's code" in ab.describe(a)


@needs_corpus
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_bench_ab_runs_both_arms_alternated_and_writes_the_pairs(tmp_path: Path) -> None:
    out = tmp_path / "ab"
    proc = _bench("--streams", "1", "--duration-s", "12", "--speed", "3", "--stagger-s", "0", "--idle-s", "0", "--no-offline",
                  "--ab-pairs", "1", "--b-server-arg", "--max-batch-size 4", "--b-pythonpath", str(REPO), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert [run["label"] for run in results["runs"]] == ["A1", "B1"]
    assert results["ab"]["pairs"] == 1 and "final p95 s" in (out / "ab.md").read_text()
    assert "--max-batch-size 4" not in (out / "server-A1.log").read_text().splitlines()[0]
    assert "--max-batch-size 4" in (out / "server-B1.log").read_text().splitlines()[0]
    bad = _bench("--b-server-arg=--x", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and "describe arm B" in bad.stderr
