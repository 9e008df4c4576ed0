"""Scrape the server's Prometheus ``/metrics`` before and after a run and diff them.

The client sees latency from outside; the server's own histograms say *where* time goes (queue
wait versus decode) and how well batching works. Metric names are matched by substring so the
bench keeps working as the server's metric set evolves, and a server without ``/metrics`` simply
yields no server-side figures (noted in the report) instead of failing the run.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

from .metrics import histogram_quantile


@dataclass
class Snapshot:
    """Label-aggregated values: histogram buckets/sum/count, counters and gauges by family."""

    buckets: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    # Counters with a ``stage`` label (``stream_stage_*``), kept per stage and thread as well:
    # family -> (stage, thread) -> value. They are what ``bench --profile`` reports.
    stages: dict[str, dict[tuple[str, str], float]] = field(default_factory=lambda: defaultdict(dict))


def parse(text: str) -> Snapshot:
    """Parse Prometheus text exposition, summing every family over its label sets."""
    snap = Snapshot()
    for fam in text_string_to_metric_families(text):
        if fam.type == "histogram":
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    le = float(s.labels.get("le", "inf"))
                    snap.buckets[fam.name][le] = snap.buckets[fam.name].get(le, 0.0) + s.value
                elif s.name.endswith("_sum"):
                    snap.sums[fam.name] = snap.sums.get(fam.name, 0.0) + s.value
                elif s.name.endswith("_count"):
                    snap.counts[fam.name] = snap.counts.get(fam.name, 0.0) + s.value
        elif fam.type == "counter":
            for s in fam.samples:
                if s.name.endswith("_total") or s.name == fam.name:
                    snap.counters[fam.name] = snap.counters.get(fam.name, 0.0) + s.value
                    if "stage" in s.labels:
                        key = (s.labels["stage"], s.labels.get("thread", ""))
                        snap.stages[fam.name][key] = snap.stages[fam.name].get(key, 0.0) + s.value
        elif fam.type == "gauge":
            for s in fam.samples:
                snap.gauges[fam.name] = snap.gauges.get(fam.name, 0.0) + s.value
    return snap


def fetch(base_url: str, timeout_s: float = 5.0) -> str | None:
    """GET ``{base_url}/metrics``; None when the server has no such endpoint."""
    try:
        with urllib.request.urlopen(base_url.rstrip("/") + "/metrics", timeout=timeout_s) as r:
            body: bytes = r.read()
            return body.decode("utf-8", errors="replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def diff(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Figures for what happened between two snapshots (histograms and counters as deltas).

    Every histogram gives ``<name>_count``, ``_mean``, ``_p50``, ``_p95``; counters give their
    increase; gauges their value at the end. Well-known families also get stable aliases
    (``decode_queue_wait_s_*``, ``batch_size_*``) so reports need not know the exact names.
    """
    out: dict[str, float] = {}
    for name, bk in after.buckets.items():
        prev = before.buckets.get(name, {})
        delta = sorted((le, c - prev.get(le, 0.0)) for le, c in bk.items())
        count = after.counts.get(name, 0.0) - before.counts.get(name, 0.0)
        total = after.sums.get(name, 0.0) - before.sums.get(name, 0.0)
        out[f"{name}_count"] = count
        if count > 0:
            out[f"{name}_mean"] = total / count
            for q in (50, 95):
                v = histogram_quantile(delta, q / 100)
                if v is not None and math.isfinite(v):
                    out[f"{name}_p{q}"] = v
    for name, v in after.counters.items():
        out[f"{name}_increase"] = v - before.counters.get(name, 0.0)
    for name, v in after.gauges.items():
        if math.isfinite(v):
            out[f"{name}_end"] = v
    out.update(_stage_diff(before, after))
    return out


def _stage_diff(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """Per-stage increases as ``<family>.<stage>`` (summed over threads) and, for a ``thread``
    label, ``<family>.<stage>.<thread>`` (e.g. ``stream_stage_cpu_seconds.vad.event_loop``)."""
    out: dict[str, float] = {}
    for name, values in after.stages.items():
        prev = before.stages.get(name, {})
        for (stage, thread), v in values.items():
            delta = v - prev.get((stage, thread), 0.0)
            out[f"{name}.{stage}"] = out.get(f"{name}.{stage}", 0.0) + delta
            if thread:
                out[f"{name}.{stage}.{thread}"] = delta
    return out


ALIASES = {
    "queue_wait": "decode_queue_wait_s",
    "batch_size": "batch_size",
    "decode_seconds": "decode_time_s",
    "decode_time": "decode_time_s",
    "finalization_latency": "server_finalization_latency_s",
    "real_time_factor": "real_time_factor",
}


def headline(figures: dict[str, float]) -> dict[str, float]:
    """Stable-named copies of the figures the report tables show."""
    out: dict[str, float] = {}
    for key, value in figures.items():
        for needle, alias in ALIASES.items():
            if needle in key:
                for stat in ("_mean", "_p50", "_p95", "_count"):
                    if key.endswith(stat):
                        out.setdefault(alias + stat, value)
    return out
