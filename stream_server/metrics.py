"""Prometheus metrics, one registry per server instance (no process-global state).

These are the in-server halves of the benchmark's figures, so an operator can watch the same
quantities live: load (sessions, queue), latency (finalization, queue wait), throughput (batch
size, decode time, real-time factor) and shedding (dropped interim decodes); and where the CPU
goes (``stream_stage_*``: per-stage CPU and wall seconds of the VAD and the decoder, with the
process's and the event loop's CPU to compare against; ``stream-server bench --profile`` reads them).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from stream_server.profiling import StageProfile

_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class ServerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.active_sessions = Gauge("stream_active_sessions", "Open WebSocket sessions", registry=r)
        self.sessions_total = Counter("stream_sessions_total", "Sessions accepted", registry=r)
        self.sessions_rejected = Counter("stream_sessions_rejected_total", "Sessions refused (server busy)", registry=r)
        self.finalization_latency = Histogram(
            "stream_finalization_latency_seconds",
            "Wall time from speech_stopped to the utterance's transcript.segment",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "stream_decode_queue_wait_seconds", "Time a decode request waited for a worker", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.turn_end_decode = Histogram(
            "stream_turn_end_decode_seconds",
            "Request to result of the slowest turn-ending decode (final or pause decode) per batch: what admission control watches",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.loop_lag = Gauge(
            "stream_event_loop_lag_seconds",
            "How late the event loop ran a timer, worst of the last 2 s: the load of client audio intake (parse, resample, VAD)",
            registry=r,
        )
        self.queue_depth = Gauge("stream_decode_queue_depth", "Decode requests waiting", registry=r)
        self.batch_seconds = Histogram(
            "stream_decode_batch_seconds", "Model time per decode batch", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "stream_decode_batch_size", "Requests per decode batch", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r
        )
        self.realtime_factor = Histogram(
            "stream_decode_realtime_factor",
            "Audio seconds decoded per second of model time, per batch",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
            registry=r,
        )
        self.dropped_interim = Counter("stream_dropped_interim_decodes_total", "Interim decodes shed under load", registry=r)
        self.audio_seconds = Counter("stream_audio_seconds_total", "Audio seconds received", registry=r)
        self.read_paused_seconds = Counter(
            "stream_read_paused_seconds_total",
            "Seconds sessions' next client message was left unread while their decoder caught up (flow control)",
            registry=r,
        )
        self.decode_errors = Counter("stream_decode_errors_total", "Decodes that raised", registry=r)
        self.stages = StageProfile()
        r.register(_StageCollector(self.stages))

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _StageCollector(Collector):
    """Exposes a :class:`StageProfile`'s totals at scrape time (the hot paths only add floats)."""

    def __init__(self, profile: StageProfile) -> None:
        self._profile = profile

    def collect(self) -> Iterator[CounterMetricFamily]:
        cpu = CounterMetricFamily(
            "stream_stage_cpu_seconds",
            "CPU seconds per pipeline stage (thread CPU for VAD; process minus event-loop CPU for decoder stages)",
            labels=["stage", "thread"],
        )
        wall = CounterMetricFamily("stream_stage_wall_seconds", "Wall seconds per pipeline stage", labels=["stage"])
        calls = CounterMetricFamily("stream_stage_calls", "Calls per pipeline stage", labels=["stage"])
        for stage, (cpu_s, wall_s, n, loop_s) in self._profile.totals().items():
            cpu.add_metric([stage, "event_loop"], loop_s)
            cpu.add_metric([stage, "worker"], cpu_s - loop_s)
            wall.add_metric([stage], wall_s)
            calls.add_metric([stage], n)
        yield cpu
        yield wall
        yield calls
        yield CounterMetricFamily(
            "stream_process_cpu_seconds", "CPU seconds of the server process, every thread", value=self._profile.process_cpu()
        )
        yield CounterMetricFamily(
            "stream_event_loop_cpu_seconds", "CPU seconds of the event-loop (main) thread", value=self._profile.main_thread_cpu()
        )
