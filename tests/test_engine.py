"""Whole-file transcription through the session core (the path the HTTP API uses)."""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import pytest

from stream_server import protocol as p
from stream_server.engine import Engine, session_limits
from stream_server.planner import SessionLimits
from stream_server.settings import Settings, add_arguments, from_sources
from tests.support import load_clip, manifest, require_speech, wer


@pytest.fixture(scope="module")
def engine():
    engine = Engine(Settings())
    yield engine
    engine.close()


def test_a_file_of_several_utterances_gives_ordered_segments(engine: Engine) -> None:
    require_speech()
    clips = ["ljspeech_LJ001-0001", "ljspeech_LJ001-0002", "leopard_en_test"]
    gap = np.zeros(16000, np.float32)
    audio = np.concatenate([part for c in clips for part in (load_clip(c), gap)])
    result = asyncio.run(engine.transcribe(audio, p.SessionConfig(include=["logprobs", "words"])))
    assert len(result.segments) == 3
    assert [s.start for s in result.segments] == sorted(s.start for s in result.segments)
    assert wer([manifest()[c]["text"] for c in clips], [result.text]) < 0.1
    assert result.done.usage.seconds == pytest.approx(len(audio) / 16000, abs=0.01)
    assert all(s.words for s in result.segments)


def test_silence_transcribes_to_empty_text(engine: Engine) -> None:
    result = asyncio.run(engine.transcribe(np.zeros(16000 * 5, np.float32), p.SessionConfig()))
    assert result.text == "" and result.segments == []


def test_the_commit_policy_settings_reach_every_session() -> None:
    """Flags and environment variables set the live sessions' limits; the rest keep the defaults."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    settings = from_sources(
        parser.parse_args(["--stable-silence-ms", "120", "--carry-gap-ms", "0", "--min-commit-window-ms", "2000",
                           "--first-interim-ms", "200", "--interim-pace-loaded", "5", "--loaded-round-trip-ms", "400",
                           "--handover-pause-ms", "0", "--narrowband-intake-step-ms", "60"]),
        {"STREAM_SERVER_INTERIM_STEP_MS": "400", "STREAM_SERVER_PAUSE_DECODE_MS": "80"},
    )
    limits = session_limits(settings)
    assert (limits.stable_silence_ms, limits.carry_gap_ms, limits.interim_step_ms, limits.pause_decode_ms) == (120, 0, 400, 80)
    assert limits.min_commit_window_ms == 2000
    assert (limits.first_interim_ms, limits.interim_pace_loaded, limits.loaded_round_trip_ms) == (200, 5.0, 400)
    assert (limits.handover_pause_ms, limits.narrowband_intake_step_ms) == (0, 60)
    assert limits.trailing_audio_ms == SessionLimits().trailing_audio_ms
    assert session_limits(Settings()) == SessionLimits()
