"""In-process load generator: N real-time streams through the real streaming stack, no sockets.

Each stream is a real :class:`~stream_server.session.Session` made by ``Engine.new_session`` (real
Silero VAD, real commit policy), fed real speech at real-time pace in 40 ms frames from its own
asyncio task (starts staggered over ``--ramp-s``). It is pumped by the server's own
:class:`~stream_server.runner.SessionRunner` on the shared
:class:`~stream_server.scheduler.DecodeScheduler`, exactly as a WebSocket connection is; the bench
only observes: events through the runner's ``emit`` callback (stamped with ``time.monotonic()``
when the session produces them), decode round trips through :class:`TimedScheduler`, the
scheduler as that stream's runner sees it.

Finalization latency of an utterance = arrival of its ``transcript.segment`` (or its last delta
if it has no segment) minus the wall time at which the audio of its speech end was due from a
real-time client (the ``speech_stopped`` event's ``audio_end_ms`` mapped through the stream's feed
schedule). It therefore includes the VAD's end-of-speech wait (``silence_duration_ms``, 500 ms by
default), queueing and decoding. ``from_stopped`` is the server's own metric: segment arrival
minus ``speech_stopped`` arrival.

Synthetic (random-weight) models produce noise, and WhisperDecoder's guards (timestamps past the
audio, squeezed tails, echo and loop filters) cut noise to arbitrary lengths. With
``--fixed-decode-tokens N`` the models are loaded as
:class:`~stream_server.bench.synthetic_model.FixedLengthDecoder`: every decode generates exactly
N text tokens (+4 steps for timestamps; end-of-text suppressed), so the decode work is a realistic
constant; the result JSON says so.

Usage::

    python -m stream_server.bench.inprocess --streams 1,2 --duration-s 20 --json-out r.json
    python -m stream_server.bench.inprocess --build-synthetic /tmp/turbo --shape large-v3-turbo \\
        --device cuda --streams 25,50,100,200,400 --max-batch-size 64 --fixed-decode-tokens 24
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
from prometheus_client import Histogram

from stream_server import protocol as p
from stream_server.bench.corpus import load_wav
from stream_server.bench.synthetic_model import FixedLengthDecoder
from stream_server.decoding import Decoder, DecodeRequest, DecodeResult, WhisperDecoder
from stream_server.engine import Engine
from stream_server.runner import SessionRunner
from stream_server.scheduler import DecodeScheduler, Job
from stream_server.session import Session
from stream_server.settings import Settings
from stream_server.vad import SileroVad, VadModel

FRAME_S = 0.04
RATE = 16000
FRAME_SAMPLES = int(RATE * FRAME_S)

P = ParamSpec("P")
R = TypeVar("R")


# ------------------------------------------------------------------------------------ audio


def default_audio_files() -> list[Path]:
    root = Path(os.environ.get("STREAM_SERVER_SPEECH_DIR", Path(__file__).resolve().parents[3] / "shared" / "speech"))
    return sorted((root / "audio").glob("ljspeech_*.wav"))[:12]


def stream_audio(clips: list[np.ndarray], index: int, duration_s: float, gap_s: float) -> np.ndarray:
    """Speech for stream ``index``: the clips in a rotated order, ``gap_s`` of silence between
    (longer than the VAD's end-of-speech wait, so every clip ends an utterance), repeated to
    ``duration_s``. Rotation and a per-stream lead-in spread utterance ends across streams."""
    rng = np.random.default_rng(index)
    parts = [np.zeros(int(RATE * rng.uniform(0.2, 1.5)), np.float32)]
    total = len(parts[0])
    k = index
    while total < duration_s * RATE:
        clip = clips[k % len(clips)]
        parts += [clip, np.zeros(int(RATE * gap_s), np.float32)]
        total += len(clip) + int(RATE * gap_s)
        k += 1
    audio = np.concatenate(parts)[: int(duration_s * RATE)]
    pcm: np.ndarray = np.clip(audio * 32768.0, -32768, 32767).astype("<i2")
    return pcm


# ------------------------------------------------------------------------------------ synthetic model


def build_synthetic(out_dir: str, shape: str, tokenizer_from: str | None = None) -> str:
    """A random-weight model of ``shape`` in ``out_dir`` (kept if already built), loadable by
    faster-whisper offline."""
    from stream_server.bench.synthetic_model import build_synthetic_whisper, write_loader_files

    if not (Path(out_dir) / "model.bin").exists():
        build_synthetic_whisper(out_dir, shape)
    write_loader_files(out_dir, shape, tokenizer_from)
    return out_dir


# ------------------------------------------------------------------------------------ instrumentation


def _stats(values: npt.ArrayLike, scale: float = 1.0) -> dict[str, float]:
    v = np.asarray(values, dtype=np.float64) * scale
    if not len(v):
        return {"n": 0}
    return {
        "n": len(v),
        "mean": round(float(v.mean()), 4),
        "p50": round(float(np.percentile(v, 50)), 4),
        "p95": round(float(np.percentile(v, 95)), 4),
        "p99": round(float(np.percentile(v, 99)), 4),
        "max": round(float(v.max()), 4),
    }


class RecordingDecoder:
    """Wraps a decoder: per batch its size, model seconds, audio seconds, finals, words returned."""

    def __init__(self, inner: Decoder, timer: StageTimer | None = None) -> None:
        self.inner = inner
        self.timer = timer
        self.multilingual = inner.multilingual
        # start, size, secs, audio, finals, words, longest forced prefix, mean prefix, longest window (s)
        self.batches: list[tuple[float, int, float, float, int, int, int, float, float]] = []
        self._lock = threading.Lock()

    def encode_text(self, text: str) -> list[int]:
        return self.inner.encode_text(text)

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]:
        started = time.monotonic()
        results = self.inner.decode_batch(requests)
        elapsed = time.monotonic() - started
        if self.timer is not None:
            self.timer.seconds["total"] += elapsed  # one worker at a time writes "total" per batch
        with self._lock:
            self.batches.append((
                started, len(requests), elapsed, sum(len(r.audio) for r in requests) / RATE,
                sum(1 for r in requests if r.final), sum(len(r.words) for r in results),
                max(len(r.prefix) for r in requests), sum(len(r.prefix) for r in requests) / len(requests),
                max(len(r.audio) for r in requests) / RATE,
            ))
        return results


class StageTimer:
    """Seconds spent in each stage of WhisperDecoder's batch (features, encode, generate, align,
    word building), by wrapping the decoder's pieces; measured in the decode worker threads."""

    STAGES = ("features", "encode", "detect_language", "generate", "align", "align_and_build", "total")

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(self.STAGES, 0.0)
        self._lock = threading.Lock()

    def wrap(self, stage: str, fn: Callable[P, R]) -> Callable[P, R]:
        def timed(*a: P.args, **kw: P.kwargs) -> R:
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                with self._lock:
                    self.seconds[stage] += time.perf_counter() - t

        return timed

    def instrument(self, decoder: WhisperDecoder) -> None:
        timer = self

        class ModelProxy:
            """The CTranslate2 model (untyped), its stage methods timed."""

            def __init__(self, inner: Any) -> None:
                self._inner = inner

            def __getattr__(self, name: str) -> Any:
                attr = getattr(self._inner, name)
                return timer.wrap(name, attr) if name in timer.STAGES else attr

        decoder._model.model = ModelProxy(decoder._model.model)
        # The decoder's own stages are replaced on this instance only (the class is untouched).
        for method, stage in (("_features", "features"), ("_align_and_build", "align_and_build")):
            setattr(decoder, method, self.wrap(stage, getattr(decoder, method)))

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self.seconds)


class TimingVad:
    """Wraps the shared VAD to time its inference (it runs inline on the event loop)."""

    def __init__(self, inner: VadModel) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0
        self.frames = 0

    def new_state(self) -> object:
        return self.inner.new_state()

    def probabilities(self, frames: np.ndarray, state: object) -> tuple[np.ndarray, object]:
        t = time.perf_counter()
        out = self.inner.probabilities(frames, state)
        self.seconds += time.perf_counter() - t
        self.calls += 1
        self.frames += len(frames)
        return out


class GpuSampler:
    """GPU utilization / memory every 0.25 s through NVML, if available."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any  # the pynvml module, or None without NVML
        self._handle: Any
        self.name: str | None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.name = pynvml.nvmlDeviceGetName(self._handle)
            if isinstance(self.name, bytes):
                self.name = self.name.decode()
        except Exception:  # noqa: BLE001 - no NVML: GPU figures are left out
            self._nvml = None
            self.name = None

    def start(self) -> None:
        if self._nvml is None:
            return
        self.samples = []
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(self._handle)
                mem = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
                self.samples.append((time.monotonic(), float(util.gpu), mem.used / 2**20))
            except Exception:  # noqa: BLE001 - sampling stops; the run goes on
                return

    def stop(self) -> dict[str, Any] | None:
        if self._thread is None:
            return None
        self._stop.set()
        self._thread.join()
        self._thread = None
        if not self.samples:
            return None
        util = [s[1] for s in self.samples]
        return {"util_pct": _stats(util), "mem_used_mib_max": round(max(s[2] for s in self.samples), 1)}


def _hist(metric: Histogram) -> dict[str, Any]:
    """Sum, count and cumulative bucket counts of a prometheus Histogram."""
    buckets: dict[str, float] = {}
    out: dict[str, Any] = {"sum": 0.0, "count": 0.0, "buckets": buckets}
    for sample in next(iter(metric.collect())).samples:  # a Histogram collects one metric family
        if sample.name.endswith("_sum"):
            out["sum"] = sample.value
        elif sample.name.endswith("_count"):
            out["count"] = sample.value
        elif sample.name.endswith("_bucket"):
            buckets[sample.labels["le"]] = sample.value
    return out


def _hist_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    count = after["count"] - before["count"]
    buckets = {k: after["buckets"][k] - before["buckets"].get(k, 0.0) for k in after["buckets"]}
    p95 = None
    for le, c in buckets.items():  # upper bound of the bucket holding the 95th percentile
        if count and c >= 0.95 * count:
            p95 = le
            break
    return {"count": int(count), "mean": round((after["sum"] - before["sum"]) / count, 4) if count else None, "p95_le": p95}


# ------------------------------------------------------------------------------------ streams


class TimedScheduler:
    """The shared scheduler as one stream's runner sees it, timing each decode's round trip.

    Same ``submit``/``promote``/``cancel`` as :class:`~stream_server.scheduler.DecodeScheduler`;
    a round trip is submission to outcome (queueing included; a shed interim counts, a cancelled
    decode does not), classed final if it was submitted as one or promoted while it waited, as the
    scheduler itself treats it.
    """

    def __init__(self, inner: DecodeScheduler) -> None:
        self._inner = inner
        self._promoted: set[int] = set()
        self.roundtrips: list[tuple[bool, float]] = []  # (final, seconds)

    def submit(self, job: Job) -> asyncio.Future[DecodeResult]:
        started = time.monotonic()
        future = self._inner.submit(job)
        future.add_done_callback(lambda done: self._record(job, started, done))
        return future

    def promote(self, jobs: list[Job]) -> None:
        self._promoted.update(id(job) for job in jobs)
        self._inner.promote(jobs)

    def cancel(self, jobs: list[Job]) -> None:
        self._inner.cancel(jobs)

    def _record(self, job: Job, started: float, future: asyncio.Future[DecodeResult]) -> None:
        if not future.cancelled():
            final = job.request.final or id(job) in self._promoted
            self.roundtrips.append((final, time.monotonic() - started))
        self._promoted.discard(id(job))


class StreamRun:
    """One stream: feeds audio at real-time pace into a :class:`SessionRunner` and records when
    each event came out."""

    def __init__(self, engine: Engine, session: Session, pcm: np.ndarray, start_at: float, abort_lag_s: float) -> None:
        self.scheduler = TimedScheduler(engine.scheduler)
        self.runner = SessionRunner(session, self.scheduler, emit=self._observe, metrics=engine.metrics)  # type: ignore[arg-type]
        self.pcm = pcm
        self.start_at = start_at
        self.n_frames = len(pcm) // FRAME_SAMPLES
        self.fed_at = np.zeros(self.n_frames)  # actual wall time each frame went in
        self.stopped: dict[str, tuple[int, float]] = {}  # item -> (audio_end_ms, arrival)
        self.segment_at: dict[str, float] = {}
        self.last_delta_at: dict[str, float] = {}
        self.closed_at: float | None = None
        self.errors: list[str] = []
        self.receive_s = 0.0
        self.abort_lag_s = abort_lag_s
        self.aborted = False

    @property
    def decode_rtt(self) -> list[tuple[bool, float]]:
        return self.scheduler.roundtrips

    def due(self, k: int) -> float:
        """Wall time at which frame ``k`` (audio [k*40, (k+1)*40) ms) exists at a real-time client."""
        return self.start_at + (k + 1) * FRAME_S

    def _observe(self, event: p.ServerEvent) -> None:
        now = time.monotonic()
        if isinstance(event, p.SpeechStopped):
            self.stopped[event.item_id] = (event.audio_end_ms, now)
        elif isinstance(event, p.TranscriptSegment):
            self.segment_at[event.item_id] = now
        elif isinstance(event, p.TranscriptDelta):
            self.last_delta_at[event.item_id] = now
        elif isinstance(event, p.Error):
            self.errors.append(event.error.code)

    async def run(self, drain_s: float) -> None:
        """Feed every frame when it is due, then flush and wait at most ``drain_s`` for the
        session's close."""
        self.runner.start()
        try:
            await self._feed()
            self.closed_at = time.monotonic()
            self.runner.close()
            if not await self.runner.wait_closed(drain_s):
                self.errors.append("drain_timeout")
        finally:
            self.runner.cancel()

    async def _feed(self) -> None:
        step = FRAME_SAMPLES
        for k in range(self.n_frames):
            delay = self.due(k) - time.monotonic()
            # A real client's frames queue up while the server is slow; they are sent as soon as
            # possible (no skipping), so an overloaded loop shows up as feed lag and latency.
            await asyncio.sleep(max(0.0, delay))
            if -delay > self.abort_lag_s:  # hopelessly behind real time: stop this stream
                self.aborted = True
                self.n_frames = k
                self.fed_at = self.fed_at[:k]
                return
            t = time.perf_counter()
            self.runner.feed_audio(self.pcm[k * step : (k + 1) * step].tobytes())
            self.receive_s += time.perf_counter() - t
            self.fed_at[k] = time.monotonic()

    def latencies(self) -> tuple[list[float], list[float], list[float], int]:
        """(from speech end due, from speech end actually fed, from speech_stopped arrival,
        utterances without any text event) for utterances that ended before close."""
        due, fed, stopped, missing = [], [], [], 0
        for item, (end_ms, stopped_at) in self.stopped.items():
            if self.closed_at is not None and stopped_at >= self.closed_at:
                continue  # ended by session.close, not by the speaker
            arrival = self.segment_at.get(item, self.last_delta_at.get(item))
            if arrival is None:
                missing += 1
                continue
            k = min(self.n_frames - 1, max(0, math.ceil(end_ms / (FRAME_S * 1000)) - 1))
            due.append(arrival - self.due(k))
            fed.append(arrival - self.fed_at[k])
            stopped.append(arrival - stopped_at)
        return due, fed, stopped, missing


async def _loop_lag(stop: asyncio.Event, out: list[float], period: float = 0.01) -> None:
    while not stop.is_set():
        t = time.monotonic()
        await asyncio.sleep(period)
        out.append(time.monotonic() - t - period)


async def run_level(
    engine: Engine, recorder: RecordingDecoder, vad: TimingVad, gpu: GpuSampler, n: int, args: argparse.Namespace, clips: list[np.ndarray]
) -> dict[str, Any]:
    import psutil

    proc = psutil.Process()
    config = p.SessionConfig(model=args.model, language=args.language, interim_results=args.interim_results)
    t0 = time.monotonic() + 0.5
    runs = []
    for i in range(n):
        pcm = stream_audio(clips, i, args.duration_s, args.gap_s)
        start = t0 + (args.ramp_s * i / n if n > 1 else 0.0)
        runs.append(StreamRun(engine, engine.new_session(config), pcm, start, args.abort_lag_s))
    metrics = engine.metrics
    qw0 = _hist(metrics.queue_wait)
    dropped0, errors0 = metrics.dropped_interim._value.get(), metrics.decode_errors._value.get()
    n_batches0 = len(recorder.batches)
    vad_s0, vad_frames0 = vad.seconds, vad.frames
    timer = recorder.timer
    stages0 = timer.snapshot() if timer is not None else None
    cpu0 = proc.cpu_times()
    thread_cpu0 = time.thread_time()
    lag: list[float] = []
    stop = asyncio.Event()
    lag_task = asyncio.create_task(_loop_lag(stop, lag))
    gpu.start()
    wall0 = time.monotonic()
    await asyncio.gather(*(r.run(args.drain_s) for r in runs))
    wall = time.monotonic() - wall0
    stop.set()
    await lag_task
    gpu_stats = gpu.stop()
    cpu1 = proc.cpu_times()
    thread_cpu = time.thread_time() - thread_cpu0

    due: list[float] = []
    fed: list[float] = []
    stopped: list[float] = []
    missing = 0
    rtt_final: list[float] = []
    rtt_interim: list[float] = []
    errors: dict[str, int] = {}
    feed_lag: list[float] = []
    for r in runs:
        a, b, c, m = r.latencies()
        due += a
        fed += b
        stopped += c
        missing += m
        rtt_final += [t for f, t in r.decode_rtt if f]
        rtt_interim += [t for f, t in r.decode_rtt if not f]
        feed_lag += list(r.fed_at - (r.start_at + (np.arange(r.n_frames) + 1) * FRAME_S))
        for e in r.errors:
            errors[e] = errors.get(e, 0) + 1
    batches = recorder.batches[n_batches0:]
    sizes = [b[1] for b in batches]
    busy = sum(b[2] for b in batches)
    audio_fed_s = sum(r.n_frames for r in runs) * FRAME_S
    level: dict[str, Any] = {
        "streams": n,
        "wall_s": round(wall, 2),
        "aborted_streams": sum(r.aborted for r in runs),
        "abort_lag_s": args.abort_lag_s,
        "audio_s_per_stream": args.duration_s,
        "utterances": len(due),
        "utterances_without_text": missing,
        "latency_s": _stats(due),
        "latency_from_fed_s": _stats(fed),
        "latency_from_speech_stopped_s": _stats(stopped),
        "decode_roundtrip_final_s": _stats(rtt_final),
        "decode_roundtrip_interim_s": _stats(rtt_interim),
        "queue_wait_s": _hist_delta(qw0, _hist(metrics.queue_wait)),
        "batch_size": _stats(sizes),
        "batch_size_hist": {str(k): int(v) for k, v in zip(*np.unique(sizes, return_counts=True))} if sizes else {},
        "batch_seconds": _stats([b[2] for b in batches]),
        "batches": len(batches),
        "decodes": int(sum(sizes)),
        "finals_decoded": int(sum(b[4] for b in batches)),
        "words_per_request": round(sum(b[5] for b in batches) / max(1, sum(sizes)), 2),
        # Committed tokens are forced one decoder step each, and a batch runs as many steps as
        # its longest prefix needs: these drive generate time.
        "prefix_tokens_per_request": round(sum(b[7] * b[1] for b in batches) / max(1, sum(sizes)), 1),
        "batch_longest_prefix_tokens": _stats([b[6] for b in batches]),
        "batch_longest_window_s": _stats([b[8] for b in batches]),
        "decode_busy_fraction": round(busy / wall / max(1, engine.settings.resolved_decode_workers()), 3),
        "dropped_interim": int(metrics.dropped_interim._value.get() - dropped0),
        "decode_errors": int(metrics.decode_errors._value.get() - errors0),
        "session_errors": errors,
        "loop_lag_s": _stats(lag),
        "feed_lag_s": _stats(feed_lag),
        "vad_s_per_audio_s": round((vad.seconds - vad_s0) / max(1e-9, audio_fed_s), 5),
        "vad_ms_per_frame": round(1000 * (vad.seconds - vad_s0) / max(1, vad.frames - vad_frames0), 4),
        "vad_loop_fraction": round((vad.seconds - vad_s0) / wall, 3),
        "receive_bytes_loop_fraction": round(sum(r.receive_s for r in runs) / wall, 3),
        "loop_thread_cpu_fraction": round(thread_cpu / wall, 3),
        "process_cpu_cores": round(((cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)) / wall, 2),
        "gpu": gpu_stats,
    }
    if timer is not None and stages0 is not None:
        stages1 = timer.snapshot()
        stage_s = {k: stages1[k] - stages0[k] for k in stages1}
        stage_s["post_align"] = stage_s["align_and_build"] - stage_s["align"]
        level["decode_stage_s"] = {k: round(v, 3) for k, v in stage_s.items()}
        level["decode_stage_ms_per_request"] = {k: round(1000 * v / max(1, sum(sizes)), 2) for k, v in stage_s.items()}
    # Let queued work finish before the next level.
    while engine.scheduler.queue_depth():
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.5)
    return level


def _format_row(level: dict[str, Any]) -> str:
    lat = level["latency_s"]
    bs = level["batch_size"]
    gpu = (level.get("gpu") or {}).get("util_pct", {}).get("mean")
    return (
        f"{level['streams']:>6} {lat.get('n', 0):>6} {lat.get('p50', float('nan')):>7.3f} {lat.get('p95', float('nan')):>7.3f} "
        f"{level['latency_from_speech_stopped_s'].get('p95', float('nan')):>7.3f} "
        f"{bs.get('mean', 0):>6.1f} {bs.get('max', 0):>4} {level['decode_busy_fraction']:>5.2f} "
        f"{(gpu if gpu is not None else float('nan')):>5.0f} {level['loop_lag_s'].get('p95', float('nan')):>7.3f} "
        f"{level['vad_loop_fraction']:>5.2f} {level['loop_thread_cpu_fraction']:>5.2f} {level['dropped_interim']:>6}"
        f"{'  OVERLOADED (%d streams fell %gs behind)' % (level['aborted_streams'], level['abort_lag_s']) if level['aborted_streams'] else ''}"
    )


HEADER = (
    f"{'N':>6} {'utts':>6} {'p50':>7} {'p95':>7} {'p95stp':>7} {'batch':>6} {'bmax':>4} {'busy':>5} "
    f"{'gpu%':>5} {'lag95':>7} {'vad':>5} {'loop':>5} {'drop':>6}"
)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m stream_server.bench.inprocess", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny.en", help="tiny.en, base or a CTranslate2 model directory")
    ap.add_argument("--build-synthetic", metavar="DIR", help="build a random-weight model of --shape in DIR and use it")
    ap.add_argument("--shape", default="large-v3-turbo", help="synthetic model shape (see synthetic_model.SHAPES)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--compute-type", default="default")
    ap.add_argument("--cpu-threads", type=int, default=0)
    ap.add_argument("--streams", default="1", help="stream count or comma-separated sweep, e.g. 25,50,100")
    ap.add_argument("--duration-s", type=float, default=30.0, help="audio per stream")
    ap.add_argument("--ramp-s", type=float, default=5.0, help="stream starts are spread over this")
    ap.add_argument("--drain-s", type=float, default=30.0, help="wait at most this for the last text after close")
    ap.add_argument("--abort-lag-s", type=float, default=10.0,
                    help="a stream whose feeding falls this far behind real time stops (level marked overloaded)")
    ap.add_argument("--tokenizer-from", help="tokenizer.json whose BPE text tokens the synthetic model uses (default: tiny.en's)")
    ap.add_argument("--gap-s", type=float, default=0.8, help="silence between clips")
    ap.add_argument("--audio", nargs="*", help="16-bit wav files (default: 12 LJ Speech clips of ../shared/speech)")
    ap.add_argument("--language", default="en")
    ap.add_argument("--interim-results", action="store_true")
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--decode-workers", type=int, default=0, help="0 = the server's default (see Settings.resolved_decode_workers)")
    ap.add_argument("--interim-max-wait-s", type=float, default=1.0)
    ap.add_argument("--fixed-decode-tokens", type=int, default=None,
                    help="synthetic models only: every decode generates exactly N text tokens")
    ap.add_argument("--timestamp-tokens", choices=("on", "off"), default="on",
                    help="decode with Whisper timestamp tokens (see the server's --timestamp-tokens)")
    ap.add_argument("--profile", action="store_true", help="time the decoder's stages (features, encode, generate, align)")
    ap.add_argument("--json-out")
    return ap.parse_args(argv)


def load_decoder(path: str, settings: Settings, fixed_decode_tokens: int | None) -> WhisperDecoder:
    """The server's decoder, or the bench's fixed-length one for synthetic models."""
    if fixed_decode_tokens:
        return FixedLengthDecoder(path, new_tokens=fixed_decode_tokens, **settings.decoder_options())
    return WhisperDecoder(path, **settings.decoder_options())


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    if args.build_synthetic:
        t = time.monotonic()
        args.model = build_synthetic(args.build_synthetic, args.shape, args.tokenizer_from)
        print(f"built synthetic {args.shape} in {time.monotonic() - t:.1f}s at {args.model}", flush=True)
    files = args.audio or default_audio_files()
    if not files:
        raise SystemExit("no audio: pass --audio FILE... or set STREAM_SERVER_SPEECH_DIR")
    clips = [load_wav(f) for f in files]
    settings = Settings(
        model=args.model, device=args.device, compute_type=args.compute_type, cpu_threads=args.cpu_threads,
        decode_workers=args.decode_workers, max_batch_size=args.max_batch_size,
        interim_max_wait_s=args.interim_max_wait_s, timestamp_tokens=args.timestamp_tokens,
    )
    recorders: list[RecordingDecoder] = []

    def factory(path: str) -> RecordingDecoder:
        inner = load_decoder(path, settings, args.fixed_decode_tokens)
        timer: StageTimer | None = None
        if args.profile:
            timer = StageTimer()
            timer.instrument(inner)
        dec = RecordingDecoder(inner, timer)
        recorders.append(dec)
        return dec

    vad = TimingVad(SileroVad())
    engine = Engine(settings, vad=vad, decoder_factory=factory)
    t = time.monotonic()
    await asyncio.to_thread(engine.load_default_model)
    load_s = time.monotonic() - t
    recorder = recorders[0]
    gpu = GpuSampler()
    synthetic = Path(args.model, "synthetic.json")
    result: dict[str, Any] = {
        "tool": "stream_server.bench.inprocess",
        "model": args.model,
        "synthetic": json.loads(synthetic.read_text()) if synthetic.is_file() else None,
        "device": args.device,
        "gpu_name": gpu.name,
        "compute_type": settings.resolved_compute_type(),
        "max_batch_size": args.max_batch_size,
        "decode_workers": args.decode_workers,
        "fixed_decode_tokens": args.fixed_decode_tokens,
        "note": (
            f"decode length forced to {args.fixed_decode_tokens} text tokens per request (+4 steps): "
            "random weights, text is noise, decode work is what is measured"
            if args.fixed_decode_tokens else "normal decoding"
        ),
        "audio_files": [str(f) for f in files],
        "duration_s": args.duration_s,
        "ramp_s": args.ramp_s,
        "gap_s": args.gap_s,
        "interim_results": args.interim_results,
        "model_load_s": round(load_s, 2),
        "cpu_count": os.cpu_count(),
        "thread_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS") if k in os.environ},
        "latency_definition": "transcript.segment arrival - wall time the speech end's audio was due from a real-time client",
        "levels": [],
    }
    print(HEADER, flush=True)
    try:
        for n in [int(x) for x in str(args.streams).split(",") if x.strip()]:
            level = await run_level(engine, recorder, vad, gpu, n, args, clips)
            result["levels"].append(level)
            print(_format_row(level), flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps(result, indent=1))
    finally:
        engine.close()
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
