"""Write the bench's outputs: results.json (all figures), summary.md (the tables) and PNG plots.

The JSON keeps every number plus the per-utterance rows so anyone can recompute or re-plot; the
markdown is what goes into a PR or release note; the plots show distributions, which a p95 alone
hides (a bimodal latency looks fine at p50 and awful at p95).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .runner import LevelResult

SYNTHETIC_NOTE = (
    "SYNTHETIC MODEL: random weights with the shape of {shape}. The text is meaningless, so WER, "
    "lost utterances and first-text/finalization attribution are NOT valid; only throughput, CPU/GPU "
    "load and memory figures are."
)


def write_json(path: Path, results: dict[str, Any]) -> None:
    path.write_text(json.dumps(results, indent=2, default=_jsonable, allow_nan=False) + "\n")


def _jsonable(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _fmt(v: float | None, unit: str = "", pct: bool = False, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if pct:
        return f"{100 * v:.{digits}f}%"
    return f"{v:.{digits}f}{unit}"


def markdown(results: dict[str, Any]) -> str:
    """The summary tables as markdown."""
    cfg = results["config"]
    lines = ["# Streaming benchmark", ""]
    for note in results.get("notes", []):
        lines.append(f"> **{note}**" if "SYNTHETIC" in note else f"- {note}")
    lines.append("")
    lines.append(
        f"Model `{cfg.get('model')}` ({cfg.get('device')}, {cfg.get('compute_type')}), "
        f"corpus `{cfg.get('corpus')}`{' (8 kHz telephone clips)' if cfg.get('telephone') else ''}, "
        f"speed {cfg.get('speed')}, {cfg.get('frame_ms')} ms frames, seed {cfg.get('seed')}, "
        f"pauses {cfg.get('pause_range_s')} s filled with {cfg.get('pause_fill')}."
    )
    env = results.get("environment", {})
    lines.append(f"Machine: {env.get('cpu_count')} CPUs, {env.get('platform')}; started {results.get('created_utc')}.")
    lines.append("")
    off = results.get("offline", {}).get("metrics", {})
    lines.append("| N | audio s | WER | offline WER b1 / b5 | penalty vs b5 | final p50 / p90 / p95 s | turn's segment p50 / p95 s | first text p50 / p95 s | caption delay p50 / p95 s | lost | flicker /word | server CPU s per audio s | RSS peak MB | RSS growth MB | queue wait p95 s | batch mean |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for lv in results["runs"]:
        m = lv["metrics"]
        b1 = off.get("offline_wer_beam1")
        b5 = off.get("offline_wer_beam5")
        penalty = None if b5 is None else m.get("wer", 0.0) - b5
        lines.append(
            "| {n} | {a:.0f} | {wer} | {b1} / {b5} | {pen} | {f50} / {f90} / {f95} | {s50} / {s95} | {t50} / {t95} | {c50} / {c95} | {lost}/{utt} | {fl} | {cpu} | {rss} | {rps} | {qw} | {bs} |".format(
                n=int(m["n_streams"]),
                a=m.get("audio_s_total", 0.0),
                wer=_fmt(m.get("wer"), pct=True),
                b1=_fmt(b1, pct=True),
                b5=_fmt(b5, pct=True),
                pen=_fmt(penalty, pct=True),
                f50=_fmt(m.get("finalization_latency_s_p50")),
                f90=_fmt(m.get("finalization_latency_s_p90")),
                f95=_fmt(m.get("finalization_latency_s_p95")),
                s50=_fmt(m.get("segment_latency_s_p50")),
                s95=_fmt(m.get("segment_latency_s_p95")),
                t50=_fmt(m.get("first_text_latency_s_p50")),
                t95=_fmt(m.get("first_text_latency_s_p95")),
                c50=_fmt(m.get("caption_delay_s_p50")),
                c95=_fmt(m.get("caption_delay_s_p95")),
                lost=int(m.get("utterances_lost", 0)),
                utt=int(m.get("utterances", 0)) if not m.get("streams_refused") else f"{int(m.get('utterances', 0))} ({int(m['streams_refused'])} streams refused)",
                fl=_fmt(m.get("flicker_per_final_word"), digits=3),
                cpu=_fmt(m.get("server_cpu_s_per_audio_s"), digits=3),
                rss=_fmt(m.get("server_rss_peak_mb"), digits=0),
                rps=_fmt(m.get("server_rss_growth_mb"), digits=1),
                qw=_fmt(m.get("decode_queue_wait_s_p95"), digits=3),
                bs=_fmt(m.get("batch_size_mean"), digits=2),
            )
        )
    lines.append("")
    if results["runs"]:
        m = results["runs"][0]["metrics"]
        lines.append(
            f"Idle server: {_fmt(m.get('idle_cpu_cores'), digits=3)} cores, "
            f"{_fmt(m.get('idle_rss_mb'), ' MB', digits=0)} RSS. Bench client used "
            f"{_fmt(m.get('bench_client_cpu_cores'), digits=2)} cores; its worst send lag was "
            f"{_fmt(m.get('client_send_lag_max_s'), ' s', digits=3)}."
        )
        lines.append("")
    sweep = results.get("sweep")
    if sweep:
        cap = sweep.get("capacity")
        lines.append(
            f"**Capacity: {cap if cap is not None else 'none of the tested N'}** concurrent streams "
            f"(p95 finalization ≤ {sweep['criteria']['p95_finalization_s']} s, no utterance lost, "
            "WER within 1 point of N=1)."
        )
        for r in sweep.get("reasons", []):
            lines.append(f"- {r}")
        if "rss_per_extra_stream_mb" in sweep:
            lines.append(
                f"- Server memory per additional stream (slope of peak RSS vs N): "
                f"{sweep['rss_per_extra_stream_mb']:.1f} MB"
            )
        lines.append("")
    if cfg.get("profile"):
        lines += profile_markdown(results["runs"])
    lines.append("Definitions")
    lines.append("- WER: Whisper EnglishTextNormalizer on both sides, jiwer, pooled over all streams (corpus WER).")
    lines.append("- Offline: faster-whisper `transcribe` of each clip alone, same model and compute type; b1 greedy, b5 default beam 5. The streaming penalty is taken against beam 5.")
    lines.append("- Finalization latency: arrival of the delta that made an utterance's last word final (its letters: a punctuation mark sent after the word does not count) − the utterance's end of speech (earlier of energy detector and offline Silero VAD on the clean clip), wall seconds.")
    lines.append("- First text: speech onset → first delta with a word attributed to the utterance or first interim showing a correct word of it.")
    lines.append("- Caption delay: every 0.25 s while an utterance is spoken, the speech time elapsed less the speech time the words on screen (committed + interim, misheard ones too) stand for, its words taken as evenly spread (pauses inside an utterance read as delay); how far live captions trail the speaker. Compare runs on the same audio.")
    lines.append("- Flicker: displayed words (committed + interim) later erased or changed, per final word; case and punctuation ignored.")
    lines.append("- Lost: an utterance with no final word aligned to it.")
    problems = [p for lv in results["runs"] for p in lv.get("problems", [])]
    if problems:
        lines.append("")
        lines.append("Problems seen")
        seen: set[str] = set()
        for p in problems:
            if p not in seen:
                seen.add(p)
                lines.append(f"- {p}")
            if len(seen) >= 40:
                lines.append(f"- ... ({len(problems)} in all, see results.json)")
                break
    return "\n".join(lines) + "\n"


# ``bench --profile``: the server's stage counters (``stream_stage_*`` in its /metrics, see
# stream_server/profiling.py) as CPU seconds per audio second. Stage, label, how it is measured.
PROFILE_STAGES = (
    ("vad", "VAD (Silero)", "thread CPU of the thread that runs it"),
    ("features", "features (log-mel)", "process CPU − event-loop CPU"),
    ("encode", "encoder", "process CPU − event-loop CPU"),
    ("detect_language", "language detection", "process CPU − event-loop CPU"),
    ("generate", "decoder steps (generate)", "process CPU − event-loop CPU"),
    ("align", "alignment (align)", "process CPU − event-loop CPU"),
    ("words", "words and guards (Python)", "process CPU − event-loop CPU"),
)


def profile_figures(run: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Where one run's server CPU went: per stage CPU and wall seconds per audio second, calls and
    share of the server's CPU; plus the event loop's own work, the rest, and the total. Empty
    when the server exposed no stage counters (an older server, or one without /metrics)."""
    sm: dict[str, float] = run.get("server_metrics", {})
    audio = run["metrics"].get("audio_s_total", 0.0)
    total = sm.get("stream_process_cpu_seconds_increase")
    if total is None or audio <= 0 or not any(k.startswith("stream_stage_cpu_seconds.") for k in sm):
        return {}
    rows: dict[str, dict[str, float]] = {}
    staged = on_loop = 0.0
    for stage, _, _ in PROFILE_STAGES:
        cpu = sm.get(f"stream_stage_cpu_seconds.{stage}", 0.0)
        staged += cpu
        on_loop += sm.get(f"stream_stage_cpu_seconds.{stage}.event_loop", 0.0)
        rows[stage] = {
            "cpu_s": cpu,
            "cpu_s_per_audio_s": cpu / audio,
            "wall_s_per_audio_s": sm.get(f"stream_stage_wall_seconds.{stage}", 0.0) / audio,
            "calls": sm.get(f"stream_stage_calls.{stage}", 0.0),
        }
    loop = max(0.0, sm.get("stream_event_loop_cpu_seconds_increase", 0.0) - on_loop)
    rows["event_loop"] = {"cpu_s": loop, "cpu_s_per_audio_s": loop / audio}
    other = total - staged - loop
    rows["other"] = {"cpu_s": other, "cpu_s_per_audio_s": other / audio}
    rows["total"] = {"cpu_s": total, "cpu_s_per_audio_s": total / audio, "audio_s": audio}
    for row in rows.values():
        row["share"] = row["cpu_s"] / total if total > 0 else 0.0
    return rows


def profile_markdown(runs: Sequence[dict[str, Any]]) -> list[str]:
    """The ``--profile`` section: one table per run."""
    lines: list[str] = []
    for run in runs:
        rows = profile_figures(run)
        lines.append(f"Where the server's CPU went (N={int(run['metrics']['n_streams'])}, "
                     f"{run['metrics'].get('audio_s_total', 0.0):.0f} s of audio)")
        lines.append("")
        if not rows:
            lines.append("- not measured: the server exposed no `stream_stage_*` counters at /metrics")
            lines.append("")
            continue
        lines.append("| stage | CPU s per audio s | share | wall s per audio s | calls | measured as |")
        lines.append("|---|---|---|---|---|---|")
        for stage, label, how in PROFILE_STAGES:
            r = rows[stage]
            lines.append(f"| {label} | {r['cpu_s_per_audio_s']:.4f} | {_fmt(r['share'], pct=True, digits=1)} | "
                         f"{r['wall_s_per_audio_s']:.4f} | {int(r['calls'])} | {how} |")
        for key, label, how in (
            ("event_loop", "event loop (WebSocket, JSON, session core), less VAD", "event-loop thread CPU − its stages"),
            ("other", "other (decode glue, scheduler, other threads)", "total − the rows above"),
            ("total", "**server total**", "process CPU over the run (`time.process_time`)"),
        ):
            r = rows[key]
            lines.append(f"| {label} | {r['cpu_s_per_audio_s']:.4f} | {_fmt(r['share'], pct=True, digits=1)} | | | {how} |")
        lines.append("")
    lines.append("- Profile: the server's /metrics before and after the run. Decoder stages run in a decode worker that "
                 "waits on CTranslate2's own threads (its thread CPU stays at 0), so their CPU is the process's CPU "
                 "during the stage minus the event loop's: exact with one decode worker, an upper bound with several.")
    lines.append("")
    return lines


def plots(out_dir: Path, runs: Sequence[LevelResult], sweep: bool) -> list[str]:
    """Latency CDFs per run, and (for a sweep) latency and CPU against N."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[str] = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for lv in runs:
        for ax, xs in ((axes[0], lv.finalization_latencies), (axes[1], lv.first_text_latencies)):
            if xs:
                s = sorted(xs)
                ys = [(i + 1) / len(s) for i in range(len(s))]
                ax.step(s, ys, where="post", label=f"N={lv.n_streams}{_refused_note(lv.metrics)}")
    axes[0].set_title("Finalization latency (end of speech → final)")
    axes[1].set_title("First-text latency (speech onset → first text)")
    for ax in axes:
        ax.set_xlabel("seconds")
        ax.set_ylabel("fraction of utterances")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].axvline(1.5, color="grey", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(out_dir / "latency_cdf.png", dpi=110)
    plt.close(fig)
    written.append("latency_cdf.png")

    if sweep and runs:
        ns = [lv.n_streams for lv in runs]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for key, label in (
            ("finalization_latency_s_p50", "final p50"),
            ("finalization_latency_s_p95", "final p95"),
            ("first_text_latency_s_p50", "first text p50"),
        ):
            ax.plot(ns, [lv.metrics.get(key, float("nan")) for lv in runs], marker="o", label=label)
        for n, lv in zip(ns, runs):
            if lv.metrics.get("streams_refused"):  # the level's figures are its admitted streams'
                p95 = lv.metrics.get("finalization_latency_s_p95", float("nan"))
                ax.annotate(_refused_note(lv.metrics).strip(" ()"), (n, p95), textcoords="offset points", xytext=(0, 8),
                            ha="center", fontsize=7)
        ax.axhline(1.5, color="grey", ls=":", lw=1)
        ax.set_xlabel("streams started N (figures of the admitted ones)")
        ax.set_ylabel("latency (s)")
        ax2 = ax.twinx()
        ax2.plot(
            ns,
            [lv.metrics.get("server_cpu_cores_mean", float("nan")) for lv in runs],
            color="black",
            ls="--",
            marker="s",
            label="server CPU (cores)",
        )
        ax2.set_ylabel("server CPU (cores)")
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
        ax.set_title("Capacity: latency and CPU vs N")
        fig.tight_layout()
        fig.savefig(out_dir / "capacity.png", dpi=110)
        plt.close(fig)
        written.append("capacity.png")
    return written


def _refused_note(metrics: dict[str, float]) -> str:
    """" (k refused)" for a level where admission control turned streams away, else ""."""
    return refused_note(int(metrics.get("streams_refused", 0)))


def refused_note(refused: int) -> str:
    """" (k refused)" after a level's size where admission control turned k away (streams or calls), else ""."""
    return f" ({refused} refused)" if refused else ""
