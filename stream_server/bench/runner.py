"""One benchmark run: N concurrent clients against one server, scored and measured.

Owns the order of operations that keeps figures honest: the idle measurement happens before any
client connects, the server's ``/metrics`` are scraped just before and after the clients (so the
diff is this run's traffic only), and CPU is integrated over exactly the window in which audio was
streaming.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

from . import server_metrics
from .client import ClientConfig, StreamRecord, is_refusal, run_clients
from .corpus import Stream
from .metrics import StreamEvaluation, evaluate_stream, run_figures
from .server_proc import ResourceMonitor, ServerOptions, ServerProcess, measure_idle


@dataclass
class Target:
    """Where the clients connect, and what the bench may observe of the server."""

    url: str
    http_base: str | None
    pid: int | None  # for CPU/RSS; None when the server is remote or its pid unknown


@dataclass
class LevelResult:
    """Everything one run produced; ``metrics`` holds only plain numbers."""

    label: str
    n_streams: int
    metrics: dict[str, float]
    server_metrics: dict[str, float] = field(default_factory=dict)
    per_stream: list[dict[str, Any]] = field(default_factory=list)
    utterances: list[dict[str, Any]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    finalization_latencies: list[float] = field(default_factory=list)
    first_text_latencies: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ws_to_http(url: str) -> str:
    base = url.split("/v1/")[0]
    return base.replace("ws://", "http://", 1).replace("wss://", "https://", 1)


def target_for_url(url: str, pid: int | None) -> Target:
    return Target(url=url, http_base=_ws_to_http(url), pid=pid)


def run_level(
    streams: list[Stream],
    client_cfg: ClientConfig,
    target: Target,
    out_dir: Path,
    label: str,
    stagger_s: float,
    idle_s: float = 2.0,
) -> LevelResult:
    """Stream ``streams`` concurrently to ``target`` and score the run."""
    n = len(streams)
    figures: dict[str, float] = {"n_streams": n, "speed": client_cfg.speed}
    problems: list[str] = []
    if target.pid is not None and idle_s > 0:
        figures.update(measure_idle(target.pid, idle_s))
    before = None
    if target.http_base:
        text = server_metrics.fetch(target.http_base)
        before = server_metrics.parse(text) if text is not None else None
    monitor = ResourceMonitor(target.pid) if target.pid is not None else None
    me = psutil.Process()
    my_cpu0 = sum(me.cpu_times()[:2])
    wall0 = time.monotonic()
    if monitor:
        monitor.start()
    records = asyncio.run(run_clients(streams, client_cfg, stagger_s))
    if monitor:
        monitor.stop()
    wall1 = time.monotonic()
    my_cpu1 = sum(me.cpu_times()[:2])
    server_figs: dict[str, float] = {}
    if before is not None and target.http_base:
        text = server_metrics.fetch(target.http_base)
        if text is not None:
            server_figs = server_metrics.diff(before, server_metrics.parse(text))
    elif target.http_base:
        problems.append("server has no GET /metrics: decode queue wait and batch sizes not measured")

    evaluations: list[StreamEvaluation] = []
    per_stream: list[dict[str, Any]] = []
    events_dir = out_dir / label
    events_dir.mkdir(parents=True, exist_ok=True)
    refused = 0
    for stream, rec in zip(streams, records):
        events = rec.events()
        _write_events(events_path(events_dir, stream.index), events)
        ev = evaluate_stream(stream.index, events, stream.utterances, client_cfg.speed)
        if is_refusal(rec):
            # Admission control turned it away before it spoke: it is counted apart, and its
            # utterances are not scored as lost (the level's figures are the admitted streams').
            refused += 1
            per_stream.append({**_stream_summary(stream, rec, ev), "refused": True})
            continue
        evaluations.append(ev)
        if rec.error:
            ev.problems.append(f"client: {rec.error}")
        if rec.close_code != 1000:
            ev.problems.append(f"close code {rec.close_code} (expected 1000)")
        per_stream.append(_stream_summary(stream, rec, ev))
        problems.extend(f"stream {stream.index}: {p}" for p in ev.problems)

    figures.update(run_figures(evaluations))
    audio_s = sum(r.audio_s for r in records)
    figures["audio_s_total"] = audio_s
    figures["wall_s"] = wall1 - wall0
    figures["client_send_lag_max_s"] = max((r.send_lag_max_s for r in records), default=0.0)
    frames = sum(r.frames_sent for r in records)
    if frames:
        figures["client_frames_late_50ms_fraction"] = sum(r.frames_late for r in records) / frames
    figures["client_errors"] = sum(1 for r in records if r.error)
    figures["streams_refused"] = refused
    figures["bench_client_cpu_cores"] = (my_cpu1 - my_cpu0) / max(1e-9, wall1 - wall0)
    if monitor is not None:
        figures.update(_resource_figures(monitor, records, audio_s, figures.get("idle_rss_mb"), n))
    figures.update(server_metrics.headline(server_figs))

    fin = [u.finalization_latency_s for e in evaluations for u in e.utterances]
    first = [u.first_text_latency_s for e in evaluations for u in e.utterances]
    utterances = [
        {"stream": e.index, **asdict(u), "lost": u.lost} for e in evaluations for u in e.utterances
    ]
    return LevelResult(
        label=label,
        n_streams=n,
        metrics={k: float(v) for k, v in figures.items()},
        server_metrics={k: float(v) for k, v in server_figs.items()},
        per_stream=per_stream,
        utterances=utterances,
        problems=problems,
        finalization_latencies=[x for x in fin if x is not None],
        first_text_latencies=[x for x in first if x is not None],
    )


def events_path(folder: Path, stream_index: int) -> Path:
    """Where a level's folder keeps one stream's events."""
    return folder / f"stream-{stream_index:03d}.events.jsonl"


def _write_events(path: Path, events: list[tuple[float, dict[str, Any]]]) -> None:
    with path.open("w", encoding="utf-8") as fh:
        for t, ev in events:
            fh.write(json.dumps({"t": round(t, 4), "event": ev}) + "\n")


def read_events(path: Path) -> list[tuple[float, dict[str, Any]]]:
    """A stream's events as written by a run: (arrival time, event)."""
    with path.open(encoding="utf-8") as fh:
        return [(row["t"], row["event"]) for row in map(json.loads, fh)]


def _stream_summary(stream: Stream, rec: StreamRecord, ev: StreamEvaluation) -> dict[str, Any]:
    return {
        "index": stream.index,
        "audio_s": rec.audio_s,
        "utterances": len(stream.utterances),
        "wer": ev.wer.wer,
        "lost": sum(1 for u in ev.utterances if u.lost),
        "close_code": rec.close_code,
        "send_lag_max_s": rec.send_lag_max_s,
        "error": rec.error,
        "problems": ev.problems,
        "reference": ev.reference,
        "hypothesis": ev.hypothesis,
    }


def _resource_figures(
    monitor: ResourceMonitor,
    records: list[StreamRecord],
    audio_s: float,
    idle_rss_mb: float | None,
    n: int,
) -> dict[str, float]:
    """Server CPU per audio second over the streaming window, peak RSS, RSS per stream."""
    starts = [r.started_wall for r in records if r.started_wall]
    ends = [r.finished_wall for r in records if r.finished_wall]
    if not starts or not ends or not monitor.samples:
        return {}
    window = [s for s in monitor.samples if min(starts) - 0.5 <= s.t <= max(ends) + 0.5]
    if len(window) < 2:
        window = monitor.samples
    first, last = window[0], window[-1]
    out: dict[str, float] = {}
    cpu = last.cpu_s - first.cpu_s
    span = last.t - first.t
    if audio_s > 0:
        out["server_cpu_s_per_audio_s"] = cpu / audio_s
    if span > 0:
        out["server_cpu_cores_mean"] = cpu / span
    peak = max(s.rss_bytes for s in monitor.samples) / 2**20
    out["server_rss_peak_mb"] = peak
    if idle_rss_mb is not None:
        # Growth over idle includes one-off decode buffers; memory per *additional* stream is
        # the slope across a capacity sweep (sweep.rss_slope).
        out["server_rss_growth_mb"] = peak - idle_rss_mb
    return out


def run_with_server(
    options: ServerOptions,
    streams: list[Stream],
    client_cfg: ClientConfig,
    out_dir: Path,
    label: str,
    stagger_s: float,
    idle_s: float,
) -> tuple[LevelResult, dict[str, float]]:
    """Start a fresh server, run one level against it, stop it; returns the result and
    server lifecycle figures (startup time, exit code)."""
    server = ServerProcess(options.args(), out_dir / f"server-{label}.log", env=options.env, cwd=options.cwd,
                           startup_timeout_s=options.startup_timeout_s)
    server.start()
    try:
        client_cfg.url = server.ws_url
        pid = server.process.pid if server.process else None
        target = Target(url=server.ws_url, http_base=server.http_url, pid=pid)
        result = run_level(streams, client_cfg, target, out_dir, label, stagger_s, idle_s)
    finally:
        code = server.stop()
    extra = {"server_startup_s": server.startup_s}
    if code not in (0, None, -15):
        result.problems.append(f"server exited with code {code} on SIGTERM; see server-{label}.log")
    result.metrics.update(extra)
    return result, extra
