"""Whole-file transcription through the session core (the path the HTTP API uses)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from stream_server import protocol as p
from stream_server.engine import Engine
from stream_server.settings import Settings
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
