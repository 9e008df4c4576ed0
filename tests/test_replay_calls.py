"""The deterministic call replay (``stream-server bench --replay --calls N``): both legs of a
μ-law call through one two-channel session, each leg scored against its own turns."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream_server.bench.calls import CHANNEL, LABELS, TRACKS, build_calls
from stream_server.bench.metrics import normalize_text
from stream_server.bench.replay import ReplayOptions
from stream_server.bench.replay_calls import run_call_replay
from stream_server.models import tiny_en_path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO.parent / "shared" / "speech"

needs_corpus = pytest.mark.skipif(
    not (CORPUS / "manifest.jsonl").exists(),
    reason=f"real-speech corpus not found at {CORPUS} (shared test data, not in the repo)",
)


@needs_corpus
@pytest.mark.timeout(300)
def test_each_leg_of_a_replayed_call_is_transcribed_on_its_own_channel() -> None:
    calls, _ = build_calls(1, 20.0, CORPUS)
    call = calls[0]
    options = ReplayOptions(corpus=CORPUS, model_path=str(tiny_en_path()))
    first, legs, trace = run_call_replay(options, calls)
    assert [stream.index for stream, _ in legs] == [CHANNEL[t] for t in TRACKS]
    for track, (stream, events) in zip(TRACKS, legs, strict=True):
        assert [u.clip_id for u in stream.utterances] == [t.clip_id for t in call.leg_turns(track)]
        segments = [e for _, e in events if e["type"] == "transcript.segment"]
        assert segments and {e["channel"] for e in segments} == {CHANNEL[track]}
        assert {e["speaker"] for e in segments} == {LABELS[track]}
        # The leg's words are its own speaker's: most reference words of its turns are heard.
        heard = set(normalize_text(" ".join(e["text"] for e in segments)).split())
        said = normalize_text(" ".join(call.references(track))).split()
        assert sum(w in heard for w in said) >= 0.7 * len(said), (track, heard, said)
        # The session's one done gives each leg its text: the leg's deltas spell it.
        [done] = [e for _, e in events if e["type"] == "transcript.text.done"]
        assert done["text"] == "".join(e["delta"] for _, e in events if e["type"] == "transcript.text.delta")
    figures = first["figures"]
    assert figures["utterances"] == len(call.turns) and figures["utterances_lost"] == 0
    assert figures["protocol_problems"] == 0
    assert figures["wer"] < 0.3
    assert first["work"]["audio_s"] == pytest.approx(call.seconds)
    assert trace == "", "no clip was asked to be traced"
    again, _, _ = run_call_replay(options, calls)
    assert again["figures"]["wer"] == figures["wer"] and again["work"]["decodes"] == first["work"]["decodes"]
    # Two runs with jittered lags: both legs in each run, figures pooled, each run's WER kept.
    jittered, runs, _ = run_call_replay(dataclasses.replace(options, jitter_ms=80, repeats=2), calls)
    assert [stream.index for stream, _ in runs] == [CHANNEL[t] for t in TRACKS] * 2
    assert len(jittered["wer_by_repeat"]) == 2 and jittered["figures"]["utterances"] == 2 * len(call.turns)
    assert jittered["work"]["audio_s"] == pytest.approx(2 * call.seconds)


@needs_corpus
@pytest.mark.timeout(300)
def test_bench_call_replay_command_writes_its_report(tmp_path: Path) -> None:
    calls, _ = build_calls(1, 20.0, CORPUS)
    traced = calls[0].turns[1]
    cmd = [sys.executable, "-m", "stream_server.bench", "--replay", "--calls", "1", "--call-s", "20",
           "--per-utterance", "--trace", traced.clip_id, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "replay.json").read_text())
    assert result["options"]["calls"] == 1
    assert result["offline"]["offline_wer_b5"] < 0.3
    assert "| offline WER | b5 " in (tmp_path / "replay.md").read_text()
    assert set(result["per_utterance"]) == {"wer_per_utterance", "offline_wer_per_utterance_b5"}
    # A call's turns are whole sentences, scored alone or as a leg the same but for the joins.
    assert abs(result["per_utterance"]["offline_wer_per_utterance_b5"] - result["offline"]["offline_wer_b5"]) < 0.05
    words = sum(len(normalize_text(t.reference).split()) for t in calls[0].turns)
    assert f"over {words} words, {len(calls[0].turns)} utterances" in (tmp_path / "per_utterance.md").read_text()
    trace = (tmp_path / "trace.txt").read_text()
    assert trace.startswith(f"call 0, {traced.track} ({LABELS[traced.track]})\nclip {traced.clip_id}: audio ")
    assert " decode " in trace and "transcript.segment" in trace
