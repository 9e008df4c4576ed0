"""The crosstalk gate: which frames of a channel are another channel's speech heard faintly."""

from __future__ import annotations

import numpy as np
import pytest

from stream_server import protocol as p
from stream_server.crosstalk import FLOOR_DB, KEPT_FRAMES, CrosstalkGate, frame_levels
from stream_server.session import Session, SessionLimits
from stream_server.vad import FRAME, SileroVad, VadModel
from tests.fakes import BurstDecoder, EnergyVad, silence, speech, to_pcm16
from tests.support import load_clip, require_speech


def test_frame_levels_are_dbfs_with_a_floor_for_digital_silence() -> None:
    t = np.arange(FRAME) / 16000
    full_scale_sine = np.sin(2 * np.pi * 500 * t)
    frames = np.stack([full_scale_sine, full_scale_sine * 0.01, np.zeros(FRAME)])
    assert frame_levels(frames) == pytest.approx([-3.01, -43.01, FLOOR_DB], abs=0.05)


def test_a_frame_far_under_another_channels_recent_speech_is_that_channels() -> None:
    gate = CrosstalkGate(2, margin_db=20.0)
    gate.record(0, np.array([-20.0] * 5 + [-90.0] * 12))  # speaks for 5 frames, then silent
    gate.record(1, np.array([-45.0] * 5 + [-25.0] + [-45.0] * 11))  # its echo, and a word of its own
    assert [gate.heard_from_elsewhere(1, i) for i in range(6)] == [True] * 5 + [False]  # 25 dB under; its own word is loud
    # The echo of the last loud frame is still recognised 9 frames (288 ms) later, not 10.
    assert gate.heard_from_elsewhere(1, 13) and not gate.heard_from_elsewhere(1, 14)
    assert not any(gate.heard_from_elsewhere(0, i) for i in range(5))  # the speaker's own frames are its own


def test_two_people_talking_at_once_keep_their_frames() -> None:
    gate = CrosstalkGate(2, margin_db=20.0)
    gate.record(0, np.array([-18.0] * 10))
    gate.record(1, np.array([-30.0] * 10))  # 12 dB quieter: a softer voice, not an echo
    assert not any(gate.heard_from_elsewhere(c, i) for c in (0, 1) for i in range(10))


def test_off_for_one_channel_or_a_zero_margin_and_blind_to_frames_not_yet_recorded() -> None:
    loud, faint = np.array([-20.0] * 3), np.array([-60.0] * 3)
    one = CrosstalkGate(1, margin_db=20.0)
    one.record(0, faint)
    off = CrosstalkGate(2, margin_db=0.0)
    off.record(0, loud)
    off.record(1, faint)
    assert not one.active and not off.active
    assert not any(g.heard_from_elsewhere(c, i) for g in (one, off) for c in range(1) for i in range(3))
    ahead = CrosstalkGate(2, margin_db=20.0)
    ahead.record(1, faint)  # channel 1's audio arrived first: channel 0 has nothing to compare yet
    assert not ahead.heard_from_elsewhere(1, 0)
    ahead.record(0, loud)
    assert ahead.heard_from_elsewhere(1, 0)


def test_levels_are_kept_for_a_bounded_span() -> None:
    gate = CrosstalkGate(2, margin_db=20.0)
    for _ in range(10):
        gate.record(0, np.full(KEPT_FRAMES, -20.0))
        gate.record(1, np.full(KEPT_FRAMES, -60.0))
    assert gate.recorded(0) == gate.recorded(1) == 10 * KEPT_FRAMES
    assert all(len(kept) <= 2 * KEPT_FRAMES for kept in gate._levels)
    assert gate.heard_from_elsewhere(1, 10 * KEPT_FRAMES - 1)


# --------------------------------------------------------------------------------------------
# In a session: the real VAD on real speech, and the fakes through the whole pipeline
# --------------------------------------------------------------------------------------------


def with_echo(source: np.ndarray, own: np.ndarray, db: float, delay_s: float = 0.04) -> np.ndarray:
    """``own`` plus ``source`` ``db`` dB down and ``delay_s`` late (line echo)."""
    delay = int(delay_s * 16000)
    echo = np.concatenate([np.zeros(delay, np.float32), source[: len(source) - delay]]) * np.float32(10 ** (db / 20))
    return (own + echo).astype(np.float32)


def channel_starts(limits: SessionLimits, left: np.ndarray, right: np.ndarray, vad: VadModel) -> dict[int, int]:
    """How many turns each channel of a stereo session opens (interleaved 20 ms PCM frames)."""
    session = Session("sess_crosstalk", config=p.SessionConfig(channels=2, interim_results=False), vad=vad, limits=limits)
    session.start()
    data = np.stack([np.frombuffer(to_pcm16(left), "<i2"), np.frombuffer(to_pcm16(right), "<i2")], axis=1).tobytes()
    decoder = BurstDecoder()  # what the words are does not matter here, only that turns end
    for i in range(0, len(data), 320 * 4):
        session.receive_bytes(data[i : i + 320 * 4])
        for ticket in session.decodes_to_submit():
            session.receive_decode_result(ticket, decoder.decode_one(ticket.request))
    starts = [e for e in session.events_to_send() if isinstance(e, p.SpeechStarted)]
    return {c: sum(1 for e in starts if e.channel == c) for c in (0, 1)}


def test_a_leg_that_hears_the_other_leg_faintly_opens_no_turn_of_its_own() -> None:
    """Real speech on the left; on the right its echo 35 dB down, then a turn of the right's
    own, partly over the left's next words. Silero hears the echo as speech (a turn on both
    legs, the words transcribed twice); with the gate the right opens only its own turn."""
    require_speech()
    left_words, right_words = load_clip("ljspeech_LJ001-0002"), load_clip("arctic_slt_arctic_a0004")
    pause = np.zeros(16000, np.float32)
    left = np.concatenate([pause, left_words, pause, np.zeros(len(right_words) // 2, np.float32), left_words, pause])
    right_own = np.concatenate([pause, np.zeros(len(left_words), np.float32), pause, right_words, pause])
    n = max(len(left), len(right_own))
    left, right_own = np.pad(left, (0, n - len(left))), np.pad(right_own, (0, n - len(right_own)))
    right = with_echo(left, right_own, -35.0)
    vad = SileroVad()
    assert channel_starts(SessionLimits(crosstalk_margin_db=0.0), left, right, vad)[1] >= 2  # the echo opened turns
    gated = channel_starts(SessionLimits(), left, right, vad)
    assert gated == {0: 2, 1: 1}, gated  # the left's two turns; the right's own, over the left's words


def test_the_gate_runs_the_same_for_interleaved_and_channel_addressed_audio() -> None:
    """A tone 'call' with a 14 dB echo (the fake VAD hears it): turns and words per channel with
    the gate on, fed as stereo frames and as Twilio-style per-channel messages, are the same,
    and the echo's words are on no channel."""
    left = np.concatenate([silence(0.3), speech([1, 2, 3]), silence(1.5), speech([6]), silence(1.0)])
    own = np.concatenate([silence(2.0), speech([4, 5])])
    right = with_echo(left, np.pad(own, (0, len(left) - len(own))), -14.0)
    limits = SessionLimits(crosstalk_margin_db=10.0, min_commit_window_ms=1000)
    results = []
    for addressed in (False, True):
        session = Session("sess_tone", config=p.SessionConfig(channels=2), vad=EnergyVad(), limits=limits)
        session.start()
        a, b = to_pcm16(left), to_pcm16(right)
        for i in range(0, len(a), 640):
            if addressed:
                session.receive_message(p.AudioAppend(a[i : i + 640], channel=0))
                session.receive_message(p.AudioAppend(b[i : i + 640], channel=1))
            else:
                stereo = np.stack([np.frombuffer(a[i : i + 640], "<i2"), np.frombuffer(b[i : i + 640], "<i2")], axis=1)
                session.receive_bytes(stereo.tobytes())
            for ticket in session.decodes_to_submit():
                session.receive_decode_result(ticket, BurstDecoder().decode_one(ticket.request))
        session.close()
        while tickets := session.decodes_to_submit():
            for ticket in tickets:
                session.receive_decode_result(ticket, BurstDecoder().decode_one(ticket.request))
        [done] = [e for e in session.events_to_send() if isinstance(e, p.TranscriptDone)]
        results.append([(t.channel, t.text) for t in done.turns])
    assert results[0] == results[1] == [(0, "w1 w2 w3"), (1, "w4 w5"), (0, "w6")], results
