"""``stream-server bench --ab-pairs K``: two servers compared in alternated runs of one invocation.

Why: the machines this server is measured on are shared, and their speed moves by a factor of two
from one hour to the next. Two runs of the same code minutes apart differ by more than most
levers move, so a lever is judged only against the code before it run in the same minutes, in
pairs, and by how many pairs it wins, not by one run each. Arm A is the server as the other flags
describe it; arm B adds ``--b-server-arg`` flags and, with ``--b-pythonpath``, runs the code of
another checkout (a ``git worktree`` of the commit before, say). Each pair runs both arms on the
same streams; the order alternates (AB, BA, AB, ...) so that a machine slowing down through the
runs does not favour one arm.

The B server's working directory is its checkout: ``python -m`` puts the working directory
ahead of ``PYTHONPATH``, so run from inside this checkout, a ``PYTHONPATH`` alone would silently
start this checkout's code in both arms.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .runner import LevelResult
from .server_proc import ServerOptions

#: (metric, label, percent?): what a pair is compared on; lower is better for every one.
AB_METRICS: tuple[tuple[str, str, bool], ...] = (
    ("finalization_latency_s_p50", "final p50 s", False),
    ("finalization_latency_s_p95", "final p95 s", False),
    ("first_text_latency_s_p50", "first text p50 s", False),
    ("first_text_latency_s_p95", "first text p95 s", False),
    ("wer", "WER", True),
    ("utterances_lost", "lost", False),
    ("flicker_per_final_word", "flicker per word", False),
    ("caption_delay_s_p50", "caption delay p50 s", False),
    ("caption_delay_s_p95", "caption delay p95 s", False),
    ("server_cpu_s_per_audio_s", "server CPU s per audio s", False),
)


@dataclasses.dataclass(frozen=True)
class Arm:
    name: str  # "A" or "B"
    options: ServerOptions


def arm_b(a: ServerOptions, extra_args: list[str], pythonpath: Path | None) -> ServerOptions:
    """Arm B's server: arm A's, plus ``extra_args``, and with ``pythonpath`` the code of that
    checkout (imported first, and its working directory, see the module notes)."""
    env = dict(a.env)
    cwd = a.cwd
    if pythonpath is not None:
        env["PYTHONPATH"] = str(pythonpath.resolve())
        cwd = pythonpath.resolve()
    return dataclasses.replace(a, extra_args=[*a.extra_args, *extra_args], env=env, cwd=cwd)


def run_pairs(
    pairs: int, arms: tuple[Arm, Arm], run_arm: Callable[[Arm, str], LevelResult], log: Callable[[str], None] = print
) -> list[tuple[LevelResult, LevelResult]]:
    """``pairs`` runs of each arm, alternated AB, BA, AB, ...: ``run_arm(arm, label)`` runs one.
    Returns (A's run, B's run) per pair."""
    done: list[tuple[LevelResult, LevelResult]] = []
    for i in range(1, pairs + 1):
        order = arms if i % 2 else arms[::-1]
        runs: dict[str, LevelResult] = {}
        for arm in order:
            log(f"[bench] pair {i} of {pairs}: arm {arm.name} ...")
            runs[arm.name] = run_arm(arm, f"{arm.name}{i}")
        done.append((runs[arms[0].name], runs[arms[1].name]))
    return done


def summarize(pairs: list[tuple[LevelResult, LevelResult]]) -> dict[str, Any]:
    """Per metric: each arm's runs and median, and in how many pairs B was lower (better) than A,
    higher, or the same."""
    summary: dict[str, Any] = {"pairs": len(pairs), "metrics": {}}
    for key, _, _ in AB_METRICS:
        values = [(a.metrics.get(key), b.metrics.get(key)) for a, b in pairs]
        both = [(x, y) for x, y in values if x is not None and y is not None]
        if not both:
            continue
        summary["metrics"][key] = {
            "a": [x for x, _ in both],
            "b": [y for _, y in both],
            "a_median": statistics.median(x for x, _ in both),
            "b_median": statistics.median(y for _, y in both),
            "b_lower": sum(y < x for x, y in both),
            "b_higher": sum(y > x for x, y in both),
        }
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The pairs as a table: each metric's runs for A and B, medians, and the pairs B won;
    ``summary`` is :func:`summarize`'s, with each arm in words (:func:`describe`) as ``a``, ``b``."""
    n = summary["pairs"]
    lines = [
        "# A/B: alternated pairs",
        "",
        f"- A: {summary['a']}",
        f"- B: {summary['b']}",
        f"- {n} pair(s), run AB, BA, AB, ...; lower is better for every figure. "
        "Judge by the pairs won and the medians, not by one run: this machine's speed moves between runs.",
        "",
        "| figure | A, by pair | B, by pair | median A | median B | pairs B lower / higher |",
        "|---|---|---|---|---|---|",
    ]
    for key, label, pct in AB_METRICS:
        row = summary["metrics"].get(key)
        if row is None:
            continue
        a, b = (" / ".join(_figure(v, pct) for v in row[arm]) for arm in ("a", "b"))
        lines.append(
            f"| {label} | {a} | {b} | {_figure(row['a_median'], pct)} | {_figure(row['b_median'], pct)} | "
            f"{row['b_lower']} / {row['b_higher']} of {n} |"
        )
    return "\n".join(lines) + "\n"


def _figure(value: float, pct: bool) -> str:
    return f"{100 * value:.2f}%" if pct else f"{value:.3g}"


def describe(options: ServerOptions) -> str:
    """An arm in words: its server flags and, if not this checkout's, the code it runs."""
    flags = " ".join(options.args()) or "(the defaults)"
    code = options.env.get("PYTHONPATH")
    return f"`{flags}`" + (f", code from `{code}`" if code else ", this checkout's code")
