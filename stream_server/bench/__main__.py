"""``python -m stream_server.bench`` / ``stream-server bench``: accuracy, latency and capacity.

Builds long-form streams from real speech, streams them over the real WebSocket protocol with N
concurrent paced clients, and writes results.json, summary.md and plots to ``--out``. Either
targets a running server (``--url``) or starts ``python -m stream_server`` itself (passing
``--model``, ``--device``, ``--compute-type`` and any ``--server-arg``) so it can also measure the
server's CPU and memory.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import ab as ab_mod
from . import offline as offline_mod
from .client import ClientConfig
from .corpus import DEFAULT_PAUSE_FILL, DEFAULT_PAUSE_RANGE_S, LEAD_IN_S, NOISE_DBFS, SPEECH_MARGIN_S, TRAIL_S, build_streams
from .diagnostics import write_level_per_utterance
from .report import SYNTHETIC_NOTE, markdown, plots, profile_figures, write_json
from .runner import LevelResult, run_level, run_with_server, target_for_url
from .server_proc import ServerOptions
from .sweep import parse_levels, run_sweep

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CORPUS = REPO.parent / "shared" / "speech"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stream-server bench",
        description="Benchmark a streaming STT server on long-form real speech: WER vs offline, "
        "finalization and first-text latency, flicker, CPU/RSS, capacity.",
    )
    tgt = p.add_argument_group("server")
    tgt.add_argument("--url", help="target a running server, e.g. ws://127.0.0.1:8000/v1/stream "
                     "(default: start one as a subprocess)")
    tgt.add_argument("--server-pid", type=int, help="with --url: pid of a local server, to measure its CPU/RSS")
    tgt.add_argument("--model", help="passed to the server (and used for the offline baseline)")
    tgt.add_argument("--device", help="passed to the server: cpu, cuda or auto")
    tgt.add_argument("--compute-type", help="passed to the server (default: int8 on CPU, float16 on CUDA)")
    tgt.add_argument("--server-arg", action="append", default=[], metavar="ARGS",
                     help="extra server flags, shell-quoted, repeatable (e.g. --server-arg='--max-batch-size 16')")
    tgt.add_argument("--synthetic", metavar="SHAPE",
                     help="serve a random-weight CTranslate2 Whisper of this shape (e.g. large-v3-turbo): "
                     "throughput only, accuracy figures are meaningless")
    st = p.add_argument_group("streams")
    st.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS,
                    help=f"folder with manifest.jsonl and audio (default {DEFAULT_CORPUS})")
    st.add_argument("--streams", type=int, default=1, help="concurrent clients (default 1)")
    st.add_argument("--speed", type=float, default=1.0, help="1.0 = real time; 2.0 = twice as fast")
    st.add_argument("--duration-s", type=float, help="cap each stream's length (default: all eligible clips)")
    st.add_argument("--seed", type=int, default=0, help="clip order and pause lengths (default 0)")
    st.add_argument("--telephone", action="store_true",
                    help="stream the 8 kHz clips (orig8k/) at sample_rate 8000")
    st.add_argument("--pause-min-s", type=float, default=DEFAULT_PAUSE_RANGE_S[0])
    st.add_argument("--pause-max-s", type=float, default=DEFAULT_PAUSE_RANGE_S[1])
    st.add_argument("--pause-fill", choices=("noise", "silence"), default=DEFAULT_PAUSE_FILL,
                    help=f"pauses as low-level white noise ({NOISE_DBFS:.0f} dBFS RMS) or digital zeros")
    st.add_argument("--frame-ms", type=int, default=20, help="audio per binary frame, 20-100 (default 20)")
    st.add_argument("--stagger-s", type=float, default=5.0,
                    help="client start times are spread evenly over this window (default 5)")
    st.add_argument("--language", default="en", help="session language (default en; 'auto' = null)")
    st.add_argument("--silence-ms", type=int,
                    help="turn_detection.silence_duration_ms, 0-5000 (default: the server's; with --replay, "
                    "also --calls, the replayed sessions')")
    run = p.add_argument_group("run")
    run.add_argument("--capacity-sweep", metavar="N,N,...",
                     help="run each N (N=1 always added) and report the largest N meeting the criteria")
    run.add_argument("--p95-limit-s", type=float, default=1.5, help="capacity criterion (default 1.5)")
    run.add_argument("--offline", action=argparse.BooleanOptionalAction, default=None,
                     help="compute the offline WER baseline (default on, off with --synthetic)")
    run.add_argument("--idle-s", type=float, default=2.0, help="idle measurement before each run")
    run.add_argument("--profile", action="store_true",
                     help="add where the server's CPU went per audio second: VAD, features, encoder, decoder steps, "
                     "alignment, event loop (from its /metrics stage counters)")
    run.add_argument("--per-utterance", action="store_true",
                     help="also score every utterance alone, streaming vs offline (beam 1), and write per_utterance.md "
                     "(per level in a live run, whose clients then ask for word timings) with the utterances where "
                     "they differ, worst streaming first")
    run.add_argument("--out", type=Path, help="output folder (default bench-out/<UTC timestamp>)")
    ab = p.add_argument_group("A/B (two servers in alternated runs, see bench/ab.py)")
    ab.add_argument("--ab-pairs", type=int, metavar="K",
                    help="run K pairs: the server as the other flags describe it (A) and the same with the --b-* "
                    "changes (B), alternated AB, BA, ...; writes ab.md (medians, pairs won)")
    ab.add_argument("--b-server-arg", action="append", default=[], metavar="ARGS",
                    help="extra server flags of arm B, shell-quoted, repeatable")
    ab.add_argument("--b-pythonpath", type=Path, metavar="DIR",
                    help="arm B runs the code of this checkout (e.g. a git worktree of the commit before)")
    calls = p.add_argument_group("calls (call-center mode, see bench/calls.py)")
    calls.add_argument("--calls", metavar="N[,N...]",
                       help="replay N concurrent two-leg μ-law calls over /v1/twilio instead of --streams "
                       "(a list sweeps, e.g. 1,2,4); reports per-leg WER vs offline and finalization latency at an SSE subscriber")
    calls.add_argument("--call-s", type=float, default=45.0, help="length of each call in seconds (default 45)")
    calls.add_argument("--call-echo-db", type=float, metavar="DB",
                       help="with --calls: each leg also carries the other leg DB dB down (e.g. -45), 40 ms late: "
                       "line echo, as an imperfect echo canceller leaves it")
    calls.add_argument("--call-param", action="append", metavar="NAME=VALUE",
                       help="with --calls: an extra Twilio customParameter for every call, repeatable "
                       "(e.g. silence_duration_ms=300)")
    fz = p.add_argument_group("fuzzing (no server, no corpus; see bench/fuzz.py)")
    fz.add_argument("--fuzz", type=int, metavar="N",
                    help="instead of streaming: run N generated inputs (Hypothesis) through every dialect and the "
                    "session core, count crashes and outcome classes (uses --seed and --out)")
    fz.add_argument("--fuzz-max-s", type=float, metavar="S", help="with --fuzz: stop after S seconds (default: run all N)")
    sk = p.add_argument_group("soak (sessions back to back for hours, see bench/soak.py)")
    sk.add_argument("--soak", metavar="DURATION",
                    help="instead of one run: --clients clients stream real speech in sessions back to back for DURATION "
                    "(40s, 30m, 2h); reports RSS slope, open fds, threads, lost finals and WER drift")
    sk.add_argument("--clients", type=int, default=8, help="with --soak: concurrent clients (default 8)")
    sk.add_argument("--soak-session-s", type=float, default=20.0, help="with --soak: audio per session, a few clips (default 20)")
    sk.add_argument("--soak-sample-s", type=float, default=10.0, help="with --soak: server sampling interval (default 10)")
    sk.add_argument("--soak-warmup-s", type=float,
                    help="with --soak: samples before this are left out of the RSS slope (default 20%% of the run, at most 300)")
    rp = p.add_argument_group("replay (deterministic decode work and WER, no server; see bench/replay.py)")
    rp.add_argument("--replay", action="store_true",
                    help="instead of streaming: run --streams streams through a real session and decoder on the audio "
                    "clock; reports decoder work per audio second (machine-independent counts and CPU) and WER; with --calls N, "
                    "N two-leg μ-law calls through one two-channel session each, every leg scored vs offline")
    rp.add_argument("--replay-lag-ms", type=int, default=200,
                    help="with --replay: audio time from a decode's submission to its result (default 200)")
    rp.add_argument("--replay-jitter-ms", type=int, default=0,
                    help="with --replay: draw each decode's lag from --replay-lag-ms ± this (seeded, so runs still "
                    "repeat; default 0)")
    rp.add_argument("--replay-repeats", type=int, default=1,
                    help="with --replay and a jitter: run the same streams this many times, each with its own lag "
                    "draws; WER pooled and per run (one run's WER is one draw: see bench/replay.py)")
    rp.add_argument("--replay-timestamp-tokens", choices=("on", "off"), default="on",
                    help="with --replay: decode with Whisper timestamp tokens (the server's --timestamp-tokens; off "
                    "measures the guards that must stand in for them on a GPU)")
    rp.add_argument("--numbers", type=int, metavar="N",
                    help="with --replay: N spoken numbers (cards, phone numbers, SSNs read digit by digit by the corpus's "
                    "FSDD voices, between two sentences): digit error rate, and the digits redaction leaves shown (see bench/replay_numbers.py)")
    rp.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                    help="with --replay: a session limit (planner.SessionLimits field), repeatable, "
                    "e.g. --limit prefix_words=4")
    rp.add_argument("--trace", action="append", default=[], metavar="CLIP",
                    help="with --replay: write trace.txt with every decode (window, prompt, forced prefix, words "
                    "and times) and event around this clip id, repeatable")
    return p


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _synthetic_model(shape: str, seed: int) -> str:
    """Build (once, cached) the random-weight model; building large-v3-turbo takes a while."""
    from .synthetic_model import build_synthetic_whisper, write_loader_files

    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "stream-server-bench"
    target = base / f"synthetic-{shape}-seed{seed}"
    if (target / "model.bin").exists():
        if not (target / "tokenizer.json").exists():  # cached before the server could load it offline
            write_loader_files(target, shape)
        return str(target)
    _log(f"[bench] building synthetic {shape} model in {target} ...")
    tmp = base / f".synthetic-{shape}-seed{seed}.{os.getpid()}"
    build_synthetic_whisper(str(tmp), shape=shape, seed=seed)
    write_loader_files(tmp, shape)
    tmp.rename(target)
    return str(target)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if not 20 <= args.frame_ms <= 100:
        _log("[bench] warning: --frame-ms outside 20-100 ms; results are not comparable")
    stamp = _dt.datetime.now(_dt.UTC)
    out: Path = args.out or Path("bench-out") / stamp.strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    if args.fuzz is not None:
        from . import fuzz

        return fuzz.main(args.fuzz, out=out, seed=args.seed, max_seconds=args.fuzz_max_s)
    if args.soak is not None:
        from .soak import main_soak

        return main_soak(args, out, stamp, list(sys.argv[1:] if argv is None else argv))
    if args.replay and args.numbers:
        from .replay_numbers import main_number_replay

        return main_number_replay(args, out)
    if args.replay and args.calls:
        from .replay_calls import main_call_replay

        return main_call_replay(args, out)
    if args.replay:
        from .replay import main_replay

        return main_replay(args, out)
    notes: list[str] = []
    if args.calls:
        from .calls import main_calls

        return main_calls(args, out, stamp, list(sys.argv[1:] if argv is None else argv))

    if not (args.corpus / "manifest.jsonl").exists():
        _log(f"[bench] corpus not found: {args.corpus}/manifest.jsonl")
        return 2
    if args.ab_pairs is not None and (args.ab_pairs < 1 or args.url or args.capacity_sweep):
        _log("[bench] --ab-pairs needs K >= 1 and a server the bench starts (no --url, no --capacity-sweep)")
        return 2
    if args.ab_pairs is None and (args.b_server_arg or args.b_pythonpath):
        _log("[bench] --b-server-arg and --b-pythonpath describe arm B of --ab-pairs")
        return 2
    levels = parse_levels(args.capacity_sweep) if args.capacity_sweep else [args.streams]
    max_n = max(levels)
    _log(f"[bench] building {max_n} stream(s) from {args.corpus} ...")
    streams, pool = build_streams(
        args.corpus,
        max_n,
        seed=args.seed,
        duration_s=args.duration_s,
        telephone=args.telephone,
        pause_range_s=(args.pause_min_s, args.pause_max_s),
        fill=args.pause_fill,
    )
    s0 = streams[0]
    _log(f"[bench] each stream: {s0.duration_s:.1f} s audio, {len(s0.utterances)} utterances "
         f"({len(pool)} clips, {s0.speech_s:.1f} s of speech)")

    model = args.model
    if args.synthetic:
        model = _synthetic_model(args.synthetic, args.seed)
        notes.append(SYNTHETIC_NOTE.format(shape=args.synthetic))
    device = args.device or "cpu"
    compute_type = args.compute_type or ("float16" if device == "cuda" else "int8")
    language = None if args.language in ("auto", "null", "") else args.language

    offline_block: dict[str, Any] = {}
    do_offline = (not args.synthetic) if args.offline is None else args.offline
    if args.per_utterance and not do_offline:
        notes.append("--per-utterance needs the offline baseline: no per_utterance.md was written")
    if do_offline and args.url and not args.model:
        notes.append("offline baseline uses tiny.en (the server's default); pass --model if the server runs another model")
    if do_offline:
        model_path = offline_mod.resolve_model_path(model)
        _log(f"[bench] offline baseline with {model_path} ({device}, {compute_type}) ...")
        try:
            texts, info = offline_mod.transcribe_pool(
                pool, model_path, device=device, compute_type=compute_type, language=language
            )
            offline_block = {
                "metrics": {},
                "info": info,
                "penalty_against": f"beam{offline_mod.PENALTY_BEAM}",
                "by_clip": {f"beam{b}": t for b, t in texts.items()},
            }
            # Scored on each level's own streams (same clips in every stream, so identical
            # across levels up to normalisation at boundaries); the block holds stream 0..max.
            offline_block["metrics"] = offline_mod.offline_figures(streams, texts)
            if "offline_rtf" in info:
                offline_block["metrics"]["offline_rtf"] = info["offline_rtf"]
        except Exception as exc:  # noqa: BLE001 - the report says why the baseline is missing
            notes.append(f"offline baseline failed: {type(exc).__name__}: {exc}")
            offline_block = {}
            texts = {}
    else:
        texts = {}

    options = ServerOptions(
        model=model,
        device=args.device,
        compute_type=args.compute_type,
        extra_args=[a for chunk in args.server_arg for a in shlex.split(chunk)],
    )
    if not args.url and max_n > 60 and "--max-sessions" not in options.extra_args:
        options.extra_args += ["--max-sessions", str(max_n + 8)]

    def run_one(n: int, server: ServerOptions = options, label: str | None = None) -> LevelResult:
        cfg = ClientConfig(
            url=args.url or "",
            speed=args.speed,
            frame_ms=args.frame_ms,
            language=language,
            silence_duration_ms=args.silence_ms,
            close_timeout_s=max(60.0, 0.5 * s0.duration_s),
            session_extra={"include": ["logprobs", "words"]} if args.per_utterance else {},
        )
        label = label or f"N{n:03d}"
        if args.url:
            lv = run_level(streams[:n], cfg, target_for_url(args.url, args.server_pid), out,
                           label, args.stagger_s, args.idle_s if args.server_pid else 0.0)
        else:
            lv, _ = run_with_server(server, streams[:n], cfg, out, label, args.stagger_s, args.idle_s)
        if texts:
            level_off = offline_mod.offline_figures(streams[:n], texts)
            for k, v in level_off.items():
                lv.metrics[k] = v
                lv.metrics["wer_minus_" + k] = lv.metrics["wer"] - v
            if args.per_utterance:
                _log(f"[bench] per-utterance diff vs offline beam 1: {write_level_per_utterance(out / label, streams[:n], texts[1])}")
        return lv

    sweep_block: dict[str, Any] | None = None
    ab_block: dict[str, Any] | None = None
    if args.ab_pairs:
        b_options = ab_mod.arm_b(options, [a for chunk in args.b_server_arg for a in shlex.split(chunk)], args.b_pythonpath)
        arms = (ab_mod.Arm("A", options), ab_mod.Arm("B", b_options))
        pairs = ab_mod.run_pairs(args.ab_pairs, arms, lambda arm, label: run_one(max_n, arm.options, label), log=_log)
        runs = [lv for pair in pairs for lv in pair]
        ab_block = {"a": ab_mod.describe(options), "b": ab_mod.describe(b_options), **ab_mod.summarize(pairs)}
    elif args.capacity_sweep:
        sw = run_sweep(levels, run_one, p95_limit_s=args.p95_limit_s, log=_log)
        runs = sw.levels
        sweep_block = {
            "levels": levels,
            "criteria": {"p95_finalization_s": args.p95_limit_s, "lost": 0, "wer_margin_points": 1.0},
            "reasons": sw.reasons,
        }
        if sw.capacity is not None:
            sweep_block["capacity"] = sw.capacity
        else:
            notes.append("capacity: no tested N met the criteria")
        if sw.rss_per_extra_stream_mb is not None:
            sweep_block["rss_per_extra_stream_mb"] = sw.rss_per_extra_stream_mb
    else:
        _log(f"[bench] streaming {max_n} client(s) ...")
        runs = [run_one(max_n)]

    if args.speed != 1.0:
        notes.append(f"audio was sent at {args.speed}x real time: latencies are wall seconds at that pace")
    notes.append(
        f"pauses between utterances: {args.pause_min_s}-{args.pause_max_s} s speech-to-speech, filled "
        + (f"with white noise at {NOISE_DBFS:.0f} dBFS RMS" if args.pause_fill == "noise" else "with digital silence")
        + f"; clips trimmed to detected speech ± {SPEECH_MARGIN_S} s; utterance onset/end = the earlier of "
        "an energy detector and offline Silero VAD on the clean clip; "
        f"{LEAD_IN_S} s lead-in, {TRAIL_S} s tail"
    )
    results: dict[str, Any] = {
        "schema": 1,
        "tool": "stream_server.bench",
        "created_utc": stamp.isoformat(timespec="seconds"),
        "synthetic": bool(args.synthetic),
        "notes": notes,
        "config": {
            "url": args.url,
            "model": model or "tiny.en (server default)",
            "device": device,
            "compute_type": compute_type,
            "server_args": options.extra_args,
            "corpus": str(args.corpus),
            "telephone": args.telephone,
            "streams": args.streams,
            "capacity_sweep": levels if args.capacity_sweep else None,
            "speed": args.speed,
            "duration_s": args.duration_s,
            "seed": args.seed,
            "frame_ms": args.frame_ms,
            "stagger_s": args.stagger_s,
            "language": language,
            "silence_ms": args.silence_ms,
            "profile": args.profile,
            "pause_range_s": [args.pause_min_s, args.pause_max_s],
            "pause_fill": args.pause_fill,
            "argv": list(sys.argv[1:] if argv is None else argv),
        },
        "environment": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "streams": [
            {
                "index": s.index,
                "duration_s": s.duration_s,
                "sample_rate": s.sample_rate,
                "utterances": [vars(u) for u in s.utterances],
            }
            for s in streams
        ],
        "offline": offline_block,
        "runs": [lv.to_json() for lv in runs],
    }
    if sweep_block is not None:
        results["sweep"] = sweep_block
    if ab_block is not None:
        results["ab"] = ab_block
    if args.profile:
        results["profile"] = [profile_figures(lv) for lv in results["runs"]]
    write_json(out / "results.json", results)
    md = markdown(results)
    if ab_block is not None:
        ab_md = ab_mod.markdown(ab_block)
        (out / "ab.md").write_text(ab_md)
        md = ab_md + "\n" + md
    (out / "summary.md").write_text(md)
    written = plots(out, runs, sweep=bool(args.capacity_sweep))
    _log(f"[bench] wrote {out}/results.json, summary.md, {', '.join(written)}")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
