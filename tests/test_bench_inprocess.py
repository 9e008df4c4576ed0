"""The in-process load generator runs end to end on the CPU with tiny.en and real speech."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from stream_server.bench import inprocess
from tests.support import SPEECH_DIR


def _clips() -> list[Path]:
    return sorted((SPEECH_DIR / "audio").glob("ljspeech_*.wav"))[:3]


@pytest.mark.skipif(not _clips(), reason="speech corpus ../shared/speech is absent")
def test_one_stream_reports_numbers(tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    clips = [str(p) for p in _clips()[1:3]]  # 1.9 s and 9.7 s clips: two utterances in 14 s
    assert inprocess.main([
        "--streams", "1", "--duration-s", "14", "--ramp-s", "0", "--drain-s", "20",
        "--audio", *clips, "--json-out", str(out),
    ]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["fixed_decode_tokens"] is None
    (level,) = result["levels"]
    assert level["streams"] == 1 and level["aborted_streams"] == 0
    assert level["utterances"] >= 1
    lat = level["latency_s"]
    assert 0 < lat["p50"] <= lat["p95"] < 10
    assert level["batch_size"]["mean"] >= 1 and level["decodes"] >= level["utterances"]
    assert level["loop_lag_s"]["n"] > 100 and level["vad_ms_per_frame"] > 0
    assert level["session_errors"] == {}
