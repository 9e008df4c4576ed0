"""Capacity sweep: the same streams at increasing concurrency, and the largest N that holds up.

Stream ``i`` is identical at every level (see :mod:`.corpus`), so a change in WER between levels is
caused by load, not by different audio. With a bench-started server every level gets a fresh
server process, so peak RSS at level N is that level's own high-water mark.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .metrics import capacity, least_squares_slope
from .runner import LevelResult


def parse_levels(spec: str) -> list[int]:
    """``"1,2,4,8"`` → ``[1, 2, 4, 8]``; N=1 is always included (it is the WER reference)."""
    levels = sorted({int(x) for x in spec.replace(" ", "").split(",") if x})
    if any(n < 1 for n in levels):
        raise ValueError("capacity levels must be positive integers")
    if 1 not in levels:
        levels.insert(0, 1)
    return levels


@dataclass
class SweepResult:
    levels: list[LevelResult]
    capacity: int | None
    reasons: list[str]
    rss_per_extra_stream_mb: float | None


def rss_slope(levels: list[LevelResult]) -> float | None:
    """Least-squares slope of peak server RSS against N: memory per additional stream."""
    pts = [
        (lv.n_streams, lv.metrics["server_rss_peak_mb"])
        for lv in levels
        if "server_rss_peak_mb" in lv.metrics
    ]
    return least_squares_slope(pts)


def run_sweep(
    levels: list[int],
    run_one: Callable[[int], LevelResult],
    p95_limit_s: float = 1.5,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Run every level with ``run_one(n)`` and judge capacity (criteria in metrics.capacity)."""
    results: list[LevelResult] = []
    for n in levels:
        log(f"[bench] sweep level N={n} ...")
        lv = run_one(n)
        m = lv.metrics
        log(
            f"[bench]   N={n}: WER {100 * m.get('wer', 0):.2f}%  final p50/p95 "
            f"{m.get('finalization_latency_s_p50', float('nan')):.2f}/"
            f"{m.get('finalization_latency_s_p95', float('nan')):.2f} s  lost "
            f"{int(m.get('utterances_lost', 0))}  cpu {m.get('server_cpu_cores_mean', float('nan')):.2f} cores"
        )
        results.append(lv)
    cap, reasons = capacity([lv.metrics for lv in results], p95_limit_s=p95_limit_s)
    return SweepResult(results, cap, reasons, rss_slope(results))
