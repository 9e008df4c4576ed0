"""Turn segmentation on scripted probabilities, and Silero itself on real speech."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from stream_server import protocol as p
from stream_server import vad
from stream_server.audio import encode_g711
from stream_server.bench.calls import telephone_samples
from stream_server.planner import SessionLimits
from stream_server.session import Session
from stream_server.vad import (
    FRAME,
    WARMUP_FRAMES,
    SileroVad,
    SpeechEnd,
    SpeechStart,
    TurnSegmenter,
    VadParams,
    level_onset,
    noise_floor,
    quiet_lead,
    sound_bursts,
)
from tests.fakes import BurstDecoder
from tests.support import load_clip, require_speech


def run(probs: list[float], params: VadParams) -> list[SpeechStart | SpeechEnd]:
    seg = TurnSegmenter(params)
    out = []
    for i, prob in enumerate(probs):
        decision = seg.push(prob, i * FRAME)
        if decision:
            out.append(decision)
    return out


def test_start_needs_consecutive_speech_frames_and_includes_padding() -> None:
    params = VadParams(threshold=0.5, prefix_padding_ms=64, silence_duration_ms=320)
    probs = [0.0] * 10 + [0.9, 0.0] + [0.0] * 5 + [0.9] * 3 + [0.0] * 20
    decisions = run(probs, params)
    assert decisions[0] == SpeechStart(sample=17 * FRAME - 64 * 16, onset=17 * FRAME)
    assert decisions[1] == SpeechEnd(sample=20 * FRAME)


def test_a_quiet_short_word_starts_a_turn_held_above_the_off_threshold() -> None:
    """Silero's probabilities on an isolated spoken "one" in the benchmark's streams (a digit the
    three-frame rule lost): one frame reaches 0.5, the word holds above the 0.35 off threshold."""
    word = [0.01, 0.30, 0.40, 0.33, 0.25, 0.41, 0.51, 0.49, 0.39, 0.41, 0.42, 0.37, 0.29, 0.19, 0.09]
    quiet = [0.0] * 30
    [start, end] = run(word + quiet, VadParams(prefix_padding_ms=0))
    assert isinstance(start, SpeechStart) and start.onset == 5 * FRAME, "the onset is where the held run began"
    assert isinstance(end, SpeechEnd) and end.sample == 12 * FRAME
    assert run(word + quiet, VadParams(min_soft_speech_frames=0)) == [], "off: the three-frame rule alone"
    # Held moderate probabilities without a frame at the threshold, and a short peak, start nothing.
    assert run([0.45] * 20 + quiet, VadParams()) == []
    assert run([0.2, 0.6, 0.4, 0.38, 0.1] + quiet, VadParams()) == []


def test_hysteresis_keeps_soft_syllables_inside_the_turn() -> None:
    params = VadParams(threshold=0.5, silence_duration_ms=96)
    probs = [0.9] * 5 + [0.4] * 10 + [0.9] * 3 + [0.0] * 5
    decisions = run(probs, params)
    assert [type(d) for d in decisions] == [SpeechStart, SpeechEnd]
    assert decisions[1].sample == 18 * FRAME


def test_silence_duration_decides_where_turns_end() -> None:
    probs = [0.9] * 10 + [0.0] * 12 + [0.9] * 10 + [0.0] * 30
    assert len([d for d in run(probs, VadParams(silence_duration_ms=300)) if isinstance(d, SpeechEnd)]) == 2
    assert len([d for d in run(probs, VadParams(silence_duration_ms=500)) if isinstance(d, SpeechEnd)]) == 1


def test_padding_never_reaches_into_the_previous_turn() -> None:
    probs = [0.9] * 5 + [0.0] * 4 + [0.9] * 5 + [0.0] * 10
    decisions = run(probs, VadParams(prefix_padding_ms=2000, silence_duration_ms=100))
    starts = [d for d in decisions if isinstance(d, SpeechStart)]
    ends = [d for d in decisions if isinstance(d, SpeechEnd)]
    assert starts[1].sample >= ends[0].sample


def test_the_silence_that_ends_a_turn_began_where_the_level_fell_to_the_noise() -> None:
    """Counted back from Silero's first silent frame: the frames already at the noise (under the
    floor + 15 dB), at most ``most``; none when that frame is loud, a loud frame ends the count."""
    word, noise = -20.0, -64.0
    levels = [word] * 10 + [noise] * 4  # Silero's first silent frame: 12 (its tail held 10 and 11)
    assert quiet_lead(levels, 12, floor=-66.0, most=4) == 2
    assert quiet_lead(levels, 13, floor=-66.0, most=4) == 3
    assert quiet_lead(levels, 13, floor=-66.0, most=2) == 2
    assert quiet_lead([word] * 10 + [noise, word, noise, noise], 13, floor=-66.0, most=4) == 1
    assert quiet_lead(levels, 9, floor=-66.0, most=4) == 0, "the first silent frame is still loud"
    fricative = [word] * 10 + [-48.0, -48.0, noise, noise]  # a soft "s" 18 dB over the noise
    assert quiet_lead(fricative, 13, floor=-66.0, most=4) == 1
    assert quiet_lead(fricative, 13, floor=-60.0, most=4) == 3, "over a louder floor it is noise"
    assert quiet_lead(fricative, 13, floor=-120.0, most=4) == 1, "-55 dBFS is quiet over digital silence"



def test_the_noise_floor_is_measured_on_frames_silero_heard_no_speech_in() -> None:
    """A stream that starts with speech has no floor (its words would make one 40 dB too high,
    and every comma's pause a turn's end); half a second of non-speech frames makes one."""
    words, noise = [-24.0 + (k % 5) for k in range(20)], [-66.0 + (k % 3) for k in range(20)]
    assert noise_floor(words, [0.9] * 20, 20, below=0.35) is None
    assert noise_floor(noise[:15], [0.05] * 15, 15, below=0.35) is None, "15 frames are too few"
    assert noise_floor(noise + words, [0.05] * 20 + [0.9] * 20, 40, below=0.35) == pytest.approx(-66.0)
    assert noise_floor(words + noise, [0.9] * 20 + [0.05] * 20, 40, below=0.35) == pytest.approx(-66.0)


def test_silence_before_silero_heard_it_ends_the_turn_sooner_and_moves_nothing_else() -> None:
    params = VadParams(prefix_padding_ms=0, silence_duration_ms=320)  # 10 frames
    probs = [0.0] * 5 + [0.9] * 20 + [0.0] * 30  # Silero's first silent frame: 25

    def pushed(lead: int) -> tuple[list[tuple[int, SpeechStart | SpeechEnd]], list[tuple[int | None, int]]]:
        seg = TurnSegmenter(params)
        out, pauses = [], []
        for i, prob in enumerate(probs):
            decision = seg.push(prob, i * FRAME, lead if seg.pause_begins(prob) else 0)
            if decision:
                out.append((i, decision))
            pauses.append((seg.pause_start, seg.silence_samples))
        return out, pauses

    plain, plain_pauses = pushed(0)
    early, early_pauses = pushed(3)
    assert plain == [(7, SpeechStart(5 * FRAME, 5 * FRAME)), (34, SpeechEnd(25 * FRAME))]
    assert early == [(7, SpeechStart(5 * FRAME, 5 * FRAME)), (31, SpeechEnd(25 * FRAME))], "three frames sooner, same end"
    assert early_pauses[:31] == plain_pauses[:31], "the pause the commit policy sees is Silero's"
    # A speaker who goes on starts the count afresh: the next pause has its own lead.
    seg = TurnSegmenter(params)
    decisions = []
    for i, prob in enumerate([0.9] * 5 + [0.0] * 5 + [0.9] * 5 + [0.0] * 10):
        decision = seg.push(prob, i * FRAME, (3 if i == 5 else 0) if seg.pause_begins(prob) else 0)
        if decision:
            decisions.append((i, decision))
    assert decisions[-1] == (24, SpeechEnd(15 * FRAME))


def test_a_turn_ends_its_silence_after_the_level_fell_not_after_silero_did() -> None:
    """A read sentence, then noise at -66 dBFS: ``speech_stopped`` comes sooner with the
    silence counted from where the level fell (``SessionLimits.level_end_reach_ms``), at most
    128 ms sooner, and reports the same end."""
    clip = load_clip("arctic_slt_arctic_a0001").astype(np.float32)
    rng = np.random.default_rng(3)
    quiet = (rng.standard_normal(16000) * 10 ** (-66 / 20)).astype(np.float32)
    audio = np.concatenate([quiet[:8000], clip / 32768 if np.abs(clip).max() > 2 else clip, quiet])
    data = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()

    def stopped(reach_ms: int) -> tuple[float, int]:
        session = Session("sess_end", config=p.SessionConfig(interim_results=False), vad=SileroVad(), limits=SessionLimits(level_end_reach_ms=reach_ms))
        session.start()
        decoder = BurstDecoder()
        for i in range(0, len(data), 640):  # 20 ms
            session.receive_bytes(data[i : i + 640])
            for ticket in session.decodes_to_submit():
                session.receive_decode_result(ticket, decoder.decode_one(ticket.request))
            ends = [e for e in session.events_to_send() if isinstance(e, p.SpeechStopped)]
            if ends:
                return (i + 640) / 32000, ends[0].audio_end_ms
        raise AssertionError("the turn did not end")

    (plain_at, plain_end), (early_at, early_end) = stopped(0), stopped(128)
    assert early_end == plain_end
    assert 0.03 <= plain_at - early_at <= 0.13, (plain_at, early_at)


@pytest.fixture(scope="module")
def silero() -> SileroVad:
    return SileroVad()


def test_silero_hears_real_speech_and_not_silence_or_noise(silero: SileroVad) -> None:
    require_speech()
    audio = np.concatenate([np.zeros(16000, np.float32), load_clip("leopard_en_test"), np.zeros(16000, np.float32)])
    frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)
    probs, _ = silero.probabilities(frames, silero.new_state())
    seconds = np.arange(len(probs)) * FRAME / 16000
    assert probs[seconds < 0.9].max() < 0.3
    speech = (seconds > 1.8) & (seconds < 6.0)
    assert np.mean(probs[speech] > 0.5) > 0.8
    noise = (np.random.default_rng(0).normal(0, 0.01, 16000 * 2)).astype(np.float32)
    noise_probs, _ = silero.probabilities(noise[: len(noise) // FRAME * FRAME].reshape(-1, FRAME), silero.new_state())
    assert noise_probs.max() < 0.5


@pytest.mark.parametrize("cuts", [(7, 20), tuple(range(1, 40))], ids=["three chunks", "frame by frame"])
def test_silero_state_makes_chunking_irrelevant(silero: SileroVad, cuts: tuple[int, ...]) -> None:
    """A chunk of frames goes through the model in one call (its LSTM walks the sequence), so the
    probabilities must not depend on how the audio arrived: whole, in chunks, or a frame at a time
    (a 20 ms Twilio frame is under one VAD frame)."""
    require_speech()
    audio = load_clip("leopard_en_test")[: 40 * FRAME].reshape(-1, FRAME)
    whole, _ = silero.probabilities(audio, silero.new_state())
    assert whole.max() > 0.5 and whole.min() < 0.5, "speech and non-speech both in the excerpt"
    state = silero.new_state()
    parts = []
    for lo, hi in zip((0, *cuts), (*cuts, len(audio)), strict=True):
        probs, state = silero.probabilities(audio[lo:hi], state)
        parts.append(probs)
    empty, state_after_empty = silero.probabilities(audio[:0], state)
    assert len(empty) == 0 and state_after_empty is state
    np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)


def onset_s(silero: SileroVad, lead: np.ndarray, clip: np.ndarray) -> float:
    """Seconds into ``clip`` of its first frame at 0.5, after ``lead`` (frame-aligned)."""
    audio = np.concatenate([lead, clip])
    probs, _ = silero.probabilities(audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME), silero.new_state())
    probs = probs[len(lead) // FRAME :]
    assert (probs >= 0.5).any()
    return float(np.argmax(probs >= 0.5) * FRAME / 16000)


@pytest.mark.parametrize("kind", ["zeros", "noise at -66 dBFS"])
def test_a_long_silence_does_not_make_silero_hear_speech_late(silero: SileroVad, kind: str) -> None:
    """Silero's LSTM state drifts through a long silence and then hears speech late (without the
    reset, after 30 s of zeros, the first frame at 0.5 came 0.21 s into these clips at the median
    and up to 0.8 s, against 0.03 s after 0.3 s of silence): the first words of a turn after a hold
    were lost. The state now starts afresh in long quiet runs."""
    require_speech()
    clips = ["ljspeech_LJ001-0025", "ljspeech_LJ001-0016", "arctic_aew_arctic_a0001", "leopard_en_test"]
    rng = np.random.default_rng(0)

    def lead(seconds: float) -> np.ndarray:
        n = int(seconds * 16000) // FRAME * FRAME
        if kind == "zeros":
            return np.zeros(n, np.float32)
        return (rng.standard_normal(n) * 10 ** (-66 / 20)).astype(np.float32)

    for clip_id in clips:
        clip = load_clip(clip_id)
        short, long = onset_s(silero, lead(0.3), clip), onset_s(silero, lead(30.0), clip)
        assert long <= short + 2 * FRAME / 16000, (clip_id, short, long)


def test_resets_fall_on_the_same_frames_however_the_audio_is_chunked(silero: SileroVad) -> None:
    """A reset inside a chunk reruns the rest of it from a fresh state, so a file sent whole, a
    browser's 100 ms chunks and Twilio's 20 ms frames get the same probabilities."""
    require_speech()
    clip = load_clip("leopard_en_test")
    audio = np.concatenate([np.zeros(16000 * 5, np.float32), clip, np.zeros(16000 * 3, np.float32), clip])
    frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)
    whole, _ = silero.probabilities(frames, silero.new_state())
    for size in (1, 3, 64):
        state, parts = silero.new_state(), []
        for lo in range(0, len(frames), size):
            probs, state = silero.probabilities(frames[lo : lo + size], state)
            parts.append(probs)
        np.testing.assert_allclose(np.concatenate(parts), whole, atol=1e-5)


def noise(kind: str, db: float, rng: np.random.Generator, seconds: float = 60.0) -> np.ndarray:
    """``seconds`` of white, pink or brown noise, or 5 ms click bursts, at ``db`` dBFS (for clicks,
    the level of each burst)."""
    n = int(seconds * 16000)
    if kind == "clicks":
        x = np.zeros(n)
        for i in rng.integers(0, n - 80, int(200 * seconds / 60)):
            x[i : i + 80] = rng.standard_normal(80)
    else:
        spectrum = np.fft.rfft(rng.standard_normal(n))
        spectrum /= {"white": 1.0, "pink": np.sqrt(np.arange(len(spectrum)) + 1.0), "brown": np.arange(len(spectrum)) + 1.0}[kind]
        x = np.fft.irfft(spectrum, n)
    level = np.sqrt(np.mean(x[x != 0] ** 2))
    return np.asarray(x / level * 10 ** (db / 20), np.float32)


@pytest.mark.parametrize("kind", ["white", "pink", "brown", "clicks"])
def test_loud_noise_opens_no_turn(silero: SileroVad, kind: str) -> None:
    """A fresh state is keener than a drifted one, so the reset must not let noise in: 60 s each
    at -20 and -10 dBFS open no turn; nor in a session, whose fresh listener
    (``vad.FreshListener``) judges every frame the channel's state puts at 0.2 or more again."""
    rng = np.random.default_rng(1)
    for db in (-20, -10):
        audio = noise(kind, db, rng)
        probs, _ = silero.probabilities(audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME), silero.new_state())
        assert not [d for d in run(list(map(float, probs)), VadParams()) if isinstance(d, SpeechStart)], (kind, db)
        assert not turn_starts(audio, SessionLimits(), chunk_s=1.0), (kind, db)


def turn_starts(audio: np.ndarray, limits: SessionLimits, *, chunk_s: float) -> list[float]:
    """Where a session's turns start (s) in 16 kHz ``audio`` sent in chunks of ``chunk_s``."""
    session = Session("sess_starts", config=p.SessionConfig(interim_results=False), vad=SileroVad(), limits=limits)
    session.start()
    data = (np.clip(audio, -1, 1) * 32767).astype("<i2").tobytes()
    step = max(2, int(chunk_s * 16000) * 2)
    decoder = BurstDecoder()
    for i in range(0, len(data), step):
        session.receive_bytes(data[i : i + step])
        for ticket in session.decodes_to_submit():
            session.receive_decode_result(ticket, decoder.decode_one(ticket.request))
    return [e.audio_start_ms / 1000 for e in session.events_to_send() if isinstance(e, p.SpeechStarted)]


def test_a_fresh_state_hears_a_short_word_that_the_channels_state_hears_faintly() -> None:
    """The whole-corpus replay stream from 410 s: the end of JFK's speech, "three", then 0.83 s
    later "four" (fsdd_4_theo_0, speech at 414.79-414.95 s). The channel's Silero state, after
    the speech before, gives the "four" one frame at 0.53 and opens no turn: the word was lost in
    every replay. A fresh state that heard the 0.26 s before it gives 0.8 and the turn opens; the
    same whichever way the audio is chunked."""
    from stream_server.bench.replay import ReplayOptions, replay_streams

    [stream], _ = replay_streams(ReplayOptions(corpus=require_speech(), model_path="", duration_s=100000))
    offset = 410.0
    audio = stream.samples[int(offset * 16000) : 416 * 16000].astype(np.float32) / 32768
    [four] = [u for u in stream.utterances if u.clip_id == "fsdd_4_theo_0"]

    def near_four(starts: list[float]) -> list[float]:
        return [t for t in starts if four.speech_start_s - 1.0 <= t + offset <= four.speech_end_s]

    assert not near_four(turn_starts(audio, SessionLimits(fresh_listen_prob=0.0), chunk_s=0.02))
    by_frame = turn_starts(audio, SessionLimits(), chunk_s=0.02)
    assert len(near_four(by_frame)) == 1
    assert turn_starts(audio, SessionLimits(), chunk_s=6.0) == by_frame


def test_a_long_silence_sent_whole_is_run_through_the_model_about_once(silero: SileroVad, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reset reruns only the rest of its block, never the whole remainder of the chunk: an hour
    of silence uploaded as one file resets 1800 times, and rerunning the remainder each time was
    quadratic (the model would have run ~10^8 frames for 10^5)."""
    session = silero._session
    frames_run = []

    class Counting:
        def run(self, names: Any, inputs: dict[str, np.ndarray]) -> Any:
            frames_run.append(len(inputs["input"]))
            return session.run(names, inputs)

    monkeypatch.setattr(silero, "_session", Counting())
    n = 10 * 60 * 16000 // FRAME
    hiss = np.random.default_rng(3).standard_normal((n, FRAME)).astype(np.float32) * 10 ** (-50 / 20)  # above the skip level
    probs, _ = silero.probabilities(hiss, silero.new_state())
    assert len(probs) == n and probs.max() < 0.5
    assert sum(frames_run) <= 1.1 * n, sum(frames_run)  # a reset wastes at most the rest of its block


@pytest.mark.parametrize("lead_s", [0.5, 3.0, 10.0])
def test_silence_under_the_skip_level_runs_no_model_and_speech_after_it_is_heard_as_before(
    silero: SileroVad, monkeypatch: pytest.MonkeyPatch, lead_s: float
) -> None:
    """A fresh state is not run on silence (a muted microphone, a call leg on hold): those frames
    are 0 and cost no model run, and the speech after them is heard as when every frame was run
    (the same onset frame, probabilities within a few hundredths), since the state first hears
    the last ``WARMUP_FRAMES`` of the silence."""
    require_speech()
    clip = load_clip("leopard_en_test")
    audio = np.concatenate([np.zeros(int(16000 * lead_s), np.float32), clip])
    frames = audio[: len(audio) // FRAME * FRAME].reshape(-1, FRAME)
    lead = int(lead_s * 16000) // FRAME
    session = silero._session
    frames_run: list[int] = []

    class Counting:
        def run(self, names: Any, inputs: dict[str, np.ndarray]) -> Any:
            frames_run.append(len(inputs["input"]))
            return session.run(names, inputs)

    monkeypatch.setattr(silero, "_session", Counting())
    skipped, _ = silero.probabilities(frames, silero.new_state())
    assert not skipped[:lead].any(), "silence is 0"
    assert sum(frames_run) <= len(frames) - lead + WARMUP_FRAMES, (sum(frames_run), len(frames) - lead)
    monkeypatch.setattr(vad, "SKIP_LEVEL_DB", -math.inf)  # every frame run, as before the skip
    every, _ = silero.probabilities(frames, silero.new_state())
    assert np.argmax(skipped >= 0.5) == np.argmax(every >= 0.5)
    assert np.abs(skipped[lead:] - every[lead:]).max() < 0.1


def test_level_onset_finds_where_the_level_rose_before_a_late_onset() -> None:
    """Digital silence, then a word Silero hears late: the loud run before its onset (with short
    stops between syllables) is the turn's start; a quiet stretch ends the run."""
    quiet, syllable, stop = -120.0, -20.0, -60.0
    levels = [quiet] * 20 + [syllable] * 5 + [stop] * 2 + [syllable] * 6  # Silero's onset: frame 30
    assert level_onset(levels, 30, reach=31) == 20
    assert level_onset(levels, 30, reach=6) == 24  # no further back than ``reach``
    gap = [quiet] * 20 + [syllable] * 5 + [stop] * 3 + [syllable] * 5  # three quiet frames: another sound
    assert level_onset(gap, 30, reach=31) == 28


def test_level_onset_rises_from_the_noise_floor_and_needs_one() -> None:
    noise = [-45.0 + (k % 3) for k in range(30)]  # a noisy line at -45 dBFS
    breathing = noise[:22] + [-38.0] * 3 + [-20.0] * 5  # louder than the noise, under the rise
    assert level_onset(breathing, 27, reach=31) == 25
    assert level_onset([-20.0] * 4 + [-10.0] * 2, 4, reach=31) == 4  # four frames are no floor
    assert level_onset([-120.0] * 10 + [-58.0] * 5 + [-20.0], 15, reach=31) == 15  # under -55 dBFS is not speech


def test_a_turn_silero_hears_late_starts_where_its_level_rose() -> None:
    """LJ001-0025 begins "imitates" softly; on 8 kHz μ-law after 0.6 s of silence Silero's onset
    comes ~0.8 s into the word, past the phone padding (500 ms), and the first words were lost
    ("Taze the much freer hand"). The turn's audio now starts before the word."""
    clip = telephone_samples(require_speech(), "ljspeech_LJ001-0025")
    lead = 0.6
    audio = np.concatenate([np.zeros(int(lead * 8000), np.float32), clip, np.zeros(8000, np.float32)])
    data = encode_g711(audio, "ulaw")
    word_start = lead + 0.16  # the first loud syllable (-18 dBFS; a faint "i" at -40 before it)

    def first_turn_start(reach_ms: int) -> float:
        config = p.SessionConfig(input_audio_format="g711_ulaw", sample_rate=8000, interim_results=False)
        session = Session("sess_onset", config=config, vad=SileroVad(), limits=SessionLimits(level_onset_reach_ms=reach_ms))
        session.start()
        for i in range(0, len(data), 160):  # 20 ms frames, as a phone line sends them
            session.receive_bytes(data[i : i + 160])
            for ticket in session.decodes_to_submit():
                session.receive_decode_result(ticket, BurstDecoder().decode_one(ticket.request))
        starts = [e for e in session.events_to_send() if isinstance(e, p.SpeechStarted)]
        return starts[0].audio_start_ms / 1000

    assert first_turn_start(0) > word_start + 0.1  # the padding alone starts inside the word
    assert first_turn_start(1000) <= word_start


def test_a_turn_after_noise_starts_just_before_its_sound_not_a_padding_earlier() -> None:
    """FSDD's "eight" (george) after 2 s of white noise at -66 dBFS: tiny.en read the turn's
    window, which began with the 300 ms padding of noise, as "A.", and from 0.07 s before the
    word as "eight." (docs/benchmarks.md, "Where the sound began"). The turn now starts 100 ms before the
    sound (``SessionLimits.padding_from_level_ms``); 0 keeps the padding as asked."""
    require_speech()
    rng = np.random.default_rng(1)
    clip = load_clip("fsdd_8_george_0")  # its sound starts in its first 32 ms frame (-43 dBFS)
    audio = np.concatenate([noise("white", -66, rng, 2.0), clip + noise("white", -66, rng, 1.0)[: len(clip)], noise("white", -66, rng, 1.0)])
    [trimmed] = turn_starts(audio, SessionLimits(), chunk_s=0.1)
    [padded] = turn_starts(audio, SessionLimits(padding_from_level_ms=0), chunk_s=0.1)
    assert 2.0 - 0.1 - 0.05 <= trimmed <= 2.0 - 0.05, trimmed
    assert padded <= 2.0 - 0.25, padded
    # A stream that opens with the word (0.2 s of noise first) has no noise floor yet (0.5 s of
    # non-speech frames): its padding stands, here to the stream's start.
    opening = np.concatenate([noise("white", -66, rng, 0.2), clip, noise("white", -66, rng, 1.0)])
    assert turn_starts(opening, SessionLimits(), chunk_s=0.1) == [0.0]


def test_sound_bursts_counts_words_apart_not_syllables_clicks_or_noise() -> None:
    """pocketsphinx "five five" by its levels: two bursts with a 35 dB dip between them."""
    five_five = [-54, -53, -49, -49, -39, -40, -42, -34, -29, -17, -26, -10, -8, -9, -9, -10, -11, -13, -18, -31, -35, -36,
                 -41, -45, -45, -44, -38, -37, -32, -21, -12, -10, -11, -13, -16, -19, -23, -34, -39, -38, -46, -45, -49, -51]
    assert sound_bursts(np.array(five_five, float)) == 2
    word, noise = -20.0, -66.0
    one = np.array([noise] * 9 + [word] * 8 + [noise] * 12)
    assert sound_bursts(one) == 1
    assert sound_bursts(np.array([noise] * 9 + [word] * 3 + [noise] * 2 + [word] * 3 + [noise] * 12)) == 1, "a stop inside a word"
    assert sound_bursts(np.array([noise] * 9 + [word] * 4 + [noise] * 3 + [word] * 4 + [noise] * 12)) == 2
    assert sound_bursts(np.array([noise] * 9 + [word] * 8 + [noise] * 5 + [word] + [noise] * 9)) == 1, "a click is no word"
    assert sound_bursts(np.array([noise] * 9 + [word] * 8 + [noise] * 5 + [word - 30] * 5 + [noise] * 9)) == 1, "a breath 30 dB down"
    assert sound_bursts(np.full(20, word)) == 0, "all sound: its noise is its speech"
    assert sound_bursts(np.zeros(0)) == 0


#: What ONNX Runtime takes for a CI machine or its own tests, where it keeps no telemetry (names
#: from the runtime's binary): a production server has none of them, so neither do these runs.
ORT_QUIET_MARKERS = (
    "ORT_DISABLE_TELEMETRY", "ORT_RUNNING_UNIT_TESTS", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TRAVIS",
    "JENKINS_URL", "BUILDKITE", "TEAMCITY_VERSION", "TF_BUILD", "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI",
    "CODEBUILD_BUILD_ID", "APPVEYOR", "BITBUCKET_BUILD_NUMBER",
)


def _telemetry_files_left_by(code: str, home: Path) -> list[str]:
    """Run ``code`` in a fresh interpreter whose environment looks like a production machine's
    (no opt-out, no CI) and whose home is ``home``; the files the runtime's telemetry left there."""
    env = {k: v for k, v in os.environ.items() if k not in ORT_QUIET_MARKERS}
    env["HOME"] = str(home)
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=120, cwd=Path(__file__).parent.parent)
    return sorted(str(f.relative_to(home)) for f in (home / ".cache" / "Microsoft").rglob("*") if f.is_file())


def test_silero_leaves_no_onnx_runtime_telemetry_behind(tmp_path: Path) -> None:
    """ONNX Runtime's official Linux builds (1.29 on) write a device id and an event cache under
    ~/.cache/Microsoft and upload usage events to Microsoft from their first session. This server
    runs offline and hears phone calls: the package opts out before the runtime starts."""
    plain = _telemetry_files_left_by(
        "import onnxruntime as o; from stream_server.vad import bundled_silero_path as b\n"
        "import os; os.environ.pop('ORT_DISABLE_TELEMETRY', None)\n"  # the package set it: undo, as a plain user of the runtime
        "o.InferenceSession(b(), providers=['CPUExecutionProvider'])",
        tmp_path / "plain",
    )
    if not plain:
        pytest.skip("this onnxruntime build keeps no telemetry: nothing to opt out of")
    ours = _telemetry_files_left_by(
        "import numpy as np\nfrom stream_server.vad import SileroVad\n"
        "vad = SileroVad(); vad.probabilities(np.zeros((2, 512), np.float32), vad.new_state())",
        tmp_path / "ours",
    )
    assert ours == [], ours
