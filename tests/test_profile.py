"""Where the server's CPU goes: the stage counters (profiling.py), their /metrics exposure, the
bench's parsing and its ``--profile`` table, and what the counters cost."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

from stream_server.bench import server_metrics as sm
from stream_server.bench.__main__ import build_parser
from stream_server.bench.report import PROFILE_STAGES, markdown, profile_figures
from stream_server.decoding import DecodeRequest, WhisperDecoder
from stream_server.metrics import ServerMetrics
from stream_server.models import tiny_en_path
from stream_server.profiling import STAGES, StageProfile
from stream_server.vad import FRAME, SileroVad
from tests.support import load_clip, require_speech


def burn(seconds: float) -> None:
    """Keep one core busy for ``seconds`` of this thread's CPU time."""
    end = time.thread_time() + seconds
    x = 0
    while time.thread_time() < end:
        x += 1


def in_thread(target: Callable[[], None]) -> None:
    thread = threading.Thread(target=target)
    thread.start()
    thread.join()


def test_a_native_stage_counts_the_cpu_of_the_threads_it_waits_on() -> None:
    """The caller of a CTranslate2 call does no work itself (its thread CPU stays at 0): the
    stage's CPU is what the threads it waited on burned."""
    profile = StageProfile()
    caller0 = time.thread_time()
    with profile.native("encode"):
        in_thread(lambda: burn(0.2))
    cpu, wall, calls, on_loop = profile.totals()["encode"]
    assert time.thread_time() - caller0 < 0.05, "the waiting thread itself hardly ran"
    assert cpu == pytest.approx(0.2, abs=0.06) and wall >= 0.19 and calls == 1 and on_loop == 0.0


def test_a_native_stage_in_a_worker_leaves_the_event_loops_cpu_out() -> None:
    """A decode worker's stage while the main thread (the event loop) is busy: the loop's CPU is
    not the stage's."""
    profile = StageProfile()
    started = threading.Event()

    def worker() -> None:
        started.set()
        with profile.native("generate"):
            time.sleep(0.3)  # waits, like a worker on CTranslate2, while the loop works

    thread = threading.Thread(target=worker)
    thread.start()
    started.wait()
    burn(0.25)  # the main thread's own work
    thread.join()
    cpu, wall, _, _ = profile.totals()["generate"]
    assert wall >= 0.29
    assert cpu < 0.08, "the main thread's 0.25 s were subtracted"


def test_an_inline_stage_is_its_threads_cpu_and_knows_the_event_loop() -> None:
    profile = StageProfile()
    started = profile.inline_start()
    burn(0.05)
    profile.inline_stop("vad", started)

    def worker() -> None:
        begun = profile.inline_start()
        burn(0.05)
        profile.inline_stop("vad", begun)

    in_thread(worker)
    cpu, _, calls, on_loop = profile.totals()["vad"]
    assert calls == 2 and cpu == pytest.approx(0.1, abs=0.03)
    assert on_loop == pytest.approx(0.05, abs=0.02), "only the main thread's call is the event loop's"


def test_metrics_expose_stages_process_and_event_loop_cpu() -> None:
    metrics = ServerMetrics()
    metrics.stages.record("vad", 0.5, 0.6, on_loop=True)
    metrics.stages.record("encode", 1.25, 0.75)
    snapshot = sm.parse(metrics.render()[0].decode())
    cpu = snapshot.stages["stream_stage_cpu_seconds"]
    assert cpu[("vad", "event_loop")] == 0.5 and cpu[("vad", "worker")] == 0.0
    assert cpu[("encode", "worker")] == 1.25
    assert snapshot.stages["stream_stage_wall_seconds"][("encode", "")] == 0.75
    assert {stage for stage, _ in cpu} == set(STAGES)
    assert snapshot.counters["stream_process_cpu_seconds"] > 0
    assert snapshot.counters["stream_event_loop_cpu_seconds"] > 0


def test_the_real_decoder_and_vad_fill_every_stage_they_run() -> None:
    require_speech()
    profile = StageProfile()
    decoder = WhisperDecoder(str(tiny_en_path()), compute_type="int8", profile=profile)
    audio = load_clip("leopard_en_test")
    [result] = decoder.decode_batch([DecodeRequest(audio)])
    assert "quilter" in result.text.lower()
    vad = SileroVad(profile=profile)
    n = len(audio) // FRAME
    vad.probabilities(audio[: n * FRAME].reshape(n, FRAME), vad.new_state())
    totals = profile.totals()
    for stage in ("features", "encode", "generate", "align", "words", "vad"):
        _, wall, calls, _ = totals[stage]
        assert calls == 1 and wall > 0, stage
    assert totals["encode"][0] > 0 and totals["generate"][0] > 0, "CTranslate2's threads' CPU is counted"
    assert totals["detect_language"][2] == 0, "an English-only model detects nothing"
    assert totals["vad"][3] == totals["vad"][0] > 0, "the VAD ran on this (main) thread"


def test_the_counters_cost_microseconds() -> None:
    """Always on in the server: one inline record must stay far below a VAD call (~100-300 µs of
    onnxruntime per 32 ms frame), one native stage far below a model call (milliseconds)."""
    profile = StageProfile()
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        profile.inline_stop("vad", profile.inline_start())
    inline_us = (time.perf_counter() - t0) / n * 1e6
    t0 = time.perf_counter()
    for _ in range(n):
        with profile.native("encode"):
            pass
    native_us = (time.perf_counter() - t0) / n * 1e6
    assert inline_us < 15, inline_us
    assert native_us < 30, native_us


# --------------------------------------------------------------------------------------------
# The bench side: /metrics diff → --profile table
# --------------------------------------------------------------------------------------------


def _run_with_profile() -> dict[str, Any]:
    """A run's JSON as the bench writes it, from two real /metrics renders of a server whose
    stages recorded known amounts."""
    metrics = ServerMetrics()
    before = sm.parse(metrics.render()[0].decode())
    metrics.stages.record("vad", 0.4, 0.4, on_loop=True)
    metrics.stages.record("features", 0.2, 0.15)
    metrics.stages.record("encode", 1.0, 0.6)
    metrics.stages.record("generate", 2.0, 1.2)
    metrics.stages.record("align", 0.5, 0.3)
    metrics.stages.record("words", 0.1, 0.1)
    burn(0.05)  # the process and event-loop counters move on their own
    figures = sm.diff(before, sm.parse(metrics.render()[0].decode()))
    return {"metrics": {"n_streams": 1.0, "audio_s_total": 60.0}, "server_metrics": figures}


def test_profile_figures_split_the_servers_cpu_per_audio_second() -> None:
    run = _run_with_profile()
    rows = profile_figures(run)
    assert rows["encode"]["cpu_s_per_audio_s"] == pytest.approx(1.0 / 60)
    assert rows["vad"]["calls"] == 1 and rows["generate"]["wall_s_per_audio_s"] == pytest.approx(1.2 / 60)
    total = run["server_metrics"]["stream_process_cpu_seconds_increase"]
    assert rows["total"]["cpu_s"] == total
    parts = [rows[s]["cpu_s"] for s, _, _ in PROFILE_STAGES] + [rows["event_loop"]["cpu_s"], rows["other"]["cpu_s"]]
    assert sum(parts) == pytest.approx(total)
    assert sum(rows[s]["share"] for s in (*(s for s, _, _ in PROFILE_STAGES), "event_loop", "other")) == pytest.approx(1.0)
    # The event loop row is the main thread's CPU less the VAD that ran on it.
    loop = run["server_metrics"]["stream_event_loop_cpu_seconds_increase"] - 0.4
    assert rows["event_loop"]["cpu_s"] == pytest.approx(max(0.0, loop))


def test_profile_table_in_the_summary_only_with_profile() -> None:
    run = _run_with_profile()
    results = {"config": {"profile": True}, "runs": [run], "offline": {}, "environment": {}}
    run["metrics"].update(wer=0.05, utterances=3.0)
    text = markdown(results)
    assert "Where the server's CPU went (N=1, 60 s of audio)" in text
    for _, label, _ in PROFILE_STAGES:
        assert f"| {label} |" in text, label
    assert "| **server total** |" in text
    results["config"]["profile"] = False
    assert "Where the server's CPU went" not in markdown(results)


def test_profile_of_a_server_without_stage_counters_says_so() -> None:
    run = {"metrics": {"n_streams": 1.0, "audio_s_total": 10.0}, "server_metrics": {}}
    assert profile_figures(run) == {}
    text = markdown({"config": {"profile": True}, "runs": [run], "offline": {}, "environment": {}})
    assert "not measured" in text


def test_bench_has_a_profile_flag() -> None:
    assert build_parser().parse_args(["--profile"]).profile is True
    assert build_parser().parse_args([]).profile is False


def test_stage_names_match_the_report() -> None:
    assert [s for s, _, _ in PROFILE_STAGES] == list(STAGES)
    assert np.isfinite(StageProfile().main_thread_cpu())
