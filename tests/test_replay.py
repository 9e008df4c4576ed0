"""The deterministic replay (``stream-server bench --replay``): same stream, same events and work."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream_server.bench.metrics import normalize_text
from stream_server.bench.replay import ReplayOptions, limits_with, replay_streams, run_replay
from stream_server.models import tiny_en_path
from stream_server.planner import SessionLimits

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "speech"

needs_corpus = pytest.mark.skipif(
    not (CORPUS / "manifest.jsonl").exists(),
    reason=f"real-speech corpus not found at {CORPUS} (shared test data, not in the repo)",
)


def test_limit_overrides_are_typed_and_checked() -> None:
    limits = limits_with(["prefix_words=4", "interim_pace=1.5", "interim_decoding=false"])
    assert (limits.prefix_words, limits.interim_pace, limits.interim_decoding) == (4, 1.5, False)
    assert dataclasses.replace(limits, prefix_words=8, interim_pace=3.0, interim_decoding=True) == SessionLimits()
    with pytest.raises(ValueError, match="unknown limit"):
        limits_with(["no_such_limit=1"])


@needs_corpus
@pytest.mark.timeout(300)
def test_a_replay_is_repeatable_and_counts_the_decoders_work() -> None:
    options = ReplayOptions(corpus=CORPUS, model_path=str(tiny_en_path()), duration_s=25.0)
    first, second = run_replay(options), run_replay(options)
    assert first["hypotheses"] == second["hypotheses"], "the audio clock makes a replay deterministic"
    for name in ("decodes", "encoder_s_per_audio_s", "forced_steps_per_audio_s", "generated_steps_per_audio_s"):
        assert first["work"][name] == second["work"][name], name
    work, figures = first["work"], first["figures"]
    assert work["decodes"] > 10 and work["generated_steps_per_audio_s"] > 1
    # Every decode forces at least its mode token and encodes at least a 5 s window.
    assert work["forced_steps_per_audio_s"] >= work["decodes_per_audio_s"]
    assert work["encoder_s_per_audio_s"] >= 5 * work["decodes_per_audio_s"]
    assert figures["utterances"] >= 3 and figures["wer"] < 0.3
    assert figures["finalization_latency_s_p50"] >= options.lag_ms / 1000  # audio time includes the lag
    # A longer lag (a busier server) paces interim decodes: fewer of them for the same audio.
    slower = run_replay(dataclasses.replace(options, lag_ms=600))
    assert slower["work"]["decodes"] < work["decodes"]


@needs_corpus
@pytest.mark.timeout(300)
def test_bench_replay_command_writes_its_report(tmp_path: Path) -> None:
    streams, _ = replay_streams(ReplayOptions(corpus=CORPUS, model_path="", duration_s=15.0))
    traced = streams[0].utterances[1]
    cmd = [sys.executable, "-m", "stream_server.bench", "--replay", "--duration-s", "15", "--no-offline",
           "--limit", "interim_step_ms=500", "--per-utterance", "--trace", traced.clip_id, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "replay.json").read_text())
    assert result["options"]["limits"]["interim_step_ms"] == 500
    assert "| WER |" in (tmp_path / "replay.md").read_text()
    # --per-utterance needs the offline texts even with --no-offline.
    assert result["offline"]["offline_wer_beam1"] < 0.5
    per_utterance = (tmp_path / "per_utterance.md").read_text()
    assert f"over {sum(len(normalize_text(u.text).split()) for u in streams[0].utterances)} words" in per_utterance
    trace = (tmp_path / "trace.txt").read_text()
    assert trace.startswith(f"clip {traced.clip_id}: audio {traced.audio_start_s:.2f}")
    assert " decode " in trace and "transcript.segment" in trace
