"""Deterministic replay: the decode work per audio second and the accuracy it buys, free of load.

The live benchmark measures what a client sees, which on a shared machine moves with whatever
else runs there. Choosing a policy lever (how many committed words to force, when an interim
decode is worth running, which decodes need an alignment pass) needs a figure that does not: the
*work* the session asks of the decoder, and the WER that work gives, for the same audio.

Here a stream runs through a real :class:`~stream_server.session.Session` (real Silero VAD, the
real commit policy) and a real :class:`~stream_server.decoding.WhisperDecoder`, but on an audio
clock: frames go in at audio times, each decode runs at once (batch of one, synchronously), and
its result is handed back ``lag_ms`` of audio later, as if the server had taken that long. The
same stream, options and model give the same events on any machine, however loaded; what
varies with the machine is only the CPU time, which is reported next to machine-independent
counts (decodes, encoder seconds, forced and generated decoder steps, aligned tokens).

Latencies here are audio time: finalization = segment time - speech end (includes ``lag_ms``
and the VAD's end-of-speech wait), first text = first delta or interim - speech start.

One replay's WER is one draw, not a property of the policy: tiny.en's reading of a window turns
on where the window ends and on the last bits of its features (the whole corpus reads 9.28% with
one BLAS thread and 8.39% with two, same code). ``--replay-jitter-ms`` draws each decode's lag
from ``lag_ms`` ± the jitter (seeded: every draw repeats) and ``--replay-repeats`` pools several
draws, reporting each run's WER: a lever has to beat that spread, not one run.

Usage::

    stream-server bench --replay --duration-s 180 --replay-lag-ms 200
    stream-server bench --replay --telephone --limit prefix_words=4  # a lever, A/B
    stream-server bench --replay --replay-jitter-ms 50 --replay-repeats 3  # three draws, pooled
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import heapq
import itertools
import json
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from stream_server import protocol as p
from stream_server.decoding import WhisperDecoder
from stream_server.planner import SessionLimits
from stream_server.profiling import StageProfile
from stream_server.session import DecodeTicket, Session
from stream_server.vad import SileroVad

from .corpus import DEFAULT_PAUSE_FILL, DEFAULT_PAUSE_RANGE_S, NOISE_DBFS, PreparedClip, Stream, build_streams
from .diagnostics import TracingDecoder, per_utterance_wer, trace_spans, trace_text, write_per_utterance
from .metrics import StreamEvaluation, TimedEvent, evaluate_stream, run_figures
from .offline import offline_figures, resolve_model_path, transcribe_pool

FRAME_MS = 20


@dataclasses.dataclass(frozen=True)
class ReplayOptions:
    """What one replay run decodes and how."""

    corpus: Path
    model_path: str
    limits: SessionLimits = dataclasses.field(default_factory=SessionLimits)
    lag_ms: int = 200  # audio time from a decode's submission to its result
    duration_s: float | None = 180.0
    streams: int = 1
    seed: int = 0
    telephone: bool = False
    pause_range_s: tuple[float, float] = DEFAULT_PAUSE_RANGE_S  # speech-to-speech pauses between clips
    pause_fill: str = DEFAULT_PAUSE_FILL  # "noise" (-66 dBFS) or "silence" (digital zeros)
    compute_type: str = "int8"
    cpu_threads: int = 0
    trace_clips: tuple[str, ...] = ()  # clips whose decodes are traced (diagnostics.TracingDecoder)
    jitter_ms: int = 0  # each decode's lag is drawn from lag_ms ± jitter_ms (seeded)
    repeats: int = 1  # runs of the same streams, each with its own lag draws (needs jitter_ms)
    silence_ms: int | None = None  # turn_detection.silence_duration_ms (None: the core's default)
    timestamp_tokens: bool = True  # the server's --timestamp-tokens

    def session_config(self, **fields: Any) -> p.SessionConfig:
        """A replayed session's config: ``fields``, with the turn silence under test when one is set."""
        if self.silence_ms is not None:
            fields["turn_detection"] = p.TurnDetection(silence_duration_ms=self.silence_ms)
        return p.SessionConfig(**fields)

    def lag(self, repeat: int, index: int) -> DecodeLag:
        """The lags of stream (or call) ``index`` in run ``repeat``: the same draws every time."""
        return DecodeLag(self.lag_ms, self.jitter_ms, seed=f"{self.seed}:{repeat}:{index}")

    def traced_in(self, repeat: int) -> tuple[str, ...]:
        """The clips traced in run ``repeat``: the first run's only (the others read the same audio)."""
        return self.trace_clips if repeat == 0 else ()


@dataclasses.dataclass
class DecodeLag:
    """When a decode's result comes back: ``lag_ms`` of audio after its submission, ± up to
    ``jitter_ms`` drawn from ``seed``, and never before the previous result (one decode queue
    keeps a session's results in submission order)."""

    lag_ms: int
    jitter_ms: int = 0
    seed: str = ""
    _last: float = dataclasses.field(default=0.0, init=False)

    def __post_init__(self) -> None:
        if not 0 <= self.jitter_ms <= self.lag_ms:
            raise ValueError(f"jitter {self.jitter_ms} ms must be between 0 and the lag ({self.lag_ms} ms)")
        self._rng = random.Random(self.seed)

    def due(self, now: float) -> float:
        """The audio time the result of a decode submitted at ``now`` is handed back."""
        lag = self.lag_ms + (self._rng.uniform(-self.jitter_ms, self.jitter_ms) if self.jitter_ms else 0.0)
        self._last = max(self._last, now + lag / 1000)
        return self._last


@dataclasses.dataclass
class StreamReplay:
    """One stream's events on the audio clock and what its decodes cost."""

    events: list[TimedEvent]
    decodes: int = 0
    finals: int = 0
    audio_s: float = 0.0
    trace: str = ""  # the decodes and events near ``ReplayOptions.trace_clips`` (empty: none traced)


def replay_stream(
    stream: Stream,
    session: Session,
    decoder: WhisperDecoder | TracingDecoder,
    lag: DecodeLag,
) -> StreamReplay:
    """Feed ``stream`` to ``session`` frame by frame on the audio clock; decode each ticket at
    once and hand its result back when ``lag`` says (in submission order)."""
    rate = stream.sample_rate
    frame = rate * FRAME_MS // 1000
    samples = stream.samples

    def frames() -> Iterator[tuple[float, Callable[[], None]]]:
        for i in range(0, len(samples), frame):
            chunk = samples[i : i + frame].astype("<i2").tobytes()
            yield (i + frame) / rate, functools.partial(session.receive_bytes, chunk)

    return replay_feed(session, frames(), len(samples) / rate, decoder, lag)


def replay_feed(
    session: Session,
    frames: Iterable[tuple[float, Callable[[], None]]],
    end_s: float,
    decoder: WhisperDecoder | TracingDecoder,
    lag: DecodeLag,
) -> StreamReplay:
    """The replay loop: each ``(audio time, feed)`` of ``frames`` hands the session the audio
    that ends at that time, after the decode results due by then; the session is closed at
    ``end_s`` and every decode still out is handed back."""
    out = StreamReplay(events=[], audio_s=end_s)
    due: list[tuple[float, int, DecodeTicket, Any]] = []  # (audio time, order, ticket, result)
    order = itertools.count()

    def drain(now: float) -> None:
        for ticket in session.decodes_to_submit():
            out.decodes += 1
            out.finals += ticket.final
            result = decoder.decode_batch([ticket.request])[0]
            heapq.heappush(due, (lag.due(now), next(order), ticket, result))
        # Nothing is queued, so a promotion changes no order here; it does make the decode a final.
        out.finals += len(session.decodes_to_promote())
        for event in session.events_to_send():
            out.events.append((now, p.event_to_dict(event)))

    session.start()
    drain(0.0)
    for now, feed in frames:
        while due and due[0][0] <= now:
            at, _, ticket, result = heapq.heappop(due)
            session.receive_decode_result(ticket, result)
            drain(at)
        feed()
        drain(now)
    session.close()
    drain(end_s)
    while due:
        at, _, ticket, result = heapq.heappop(due)
        session.receive_decode_result(ticket, result)
        drain(max(end_s, at))
    return out


def _replay_one(stream: Stream, session: Session, decoder: WhisperDecoder, lag: DecodeLag, trace_clips: Sequence[str]) -> StreamReplay:
    """One stream's replay, with its trace when it holds any of ``trace_clips``."""
    spans = trace_spans(stream, trace_clips)
    if not spans:
        return replay_stream(stream, session, decoder, lag)
    tracing = TracingDecoder(decoder, spans, now=lambda: session.audio_seconds)
    replayed = replay_stream(stream, session, tracing, lag)
    replayed.trace = trace_text(stream, trace_clips, tracing.decodes, replayed.events)
    return replayed


def replay_streams(options: ReplayOptions) -> tuple[list[Stream], list[PreparedClip]]:
    """The corpus streams ``options`` describes, and their clip pool (for the offline baseline)."""
    return build_streams(
        options.corpus,
        options.streams,
        seed=options.seed,
        duration_s=options.duration_s,
        telephone=options.telephone,
        pause_range_s=options.pause_range_s,
        fill=options.pause_fill,
    )


@dataclasses.dataclass(frozen=True)
class ReplayDecoders:
    """The real models a replay runs on, shared by its streams, and the profile of their work."""

    whisper: WhisperDecoder
    vad: SileroVad
    profile: StageProfile


def run_decoded(options: ReplayOptions, count: int, one: Callable[[ReplayDecoders, int, int], StreamReplay]) -> dict[str, Any]:
    """Run ``one(decoders, index, repeat)`` for each of ``count`` streams (or calls), in each of
    ``options.repeats`` runs, on shared models; the options and the decode work per audio second
    (``figures`` are the caller's: it knows what a stream is)."""
    profile = StageProfile()
    whisper = WhisperDecoder(options.model_path, compute_type=options.compute_type, cpu_threads=options.cpu_threads,
                             timestamp_tokens=options.timestamp_tokens, profile=profile)
    decoders = ReplayDecoders(whisper, SileroVad(profile=profile), profile)
    decodes = finals = 0
    audio_s = 0.0
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for repeat, index in itertools.product(range(options.repeats), range(count)):
        replayed = one(decoders, index, repeat)
        decodes += replayed.decodes
        finals += replayed.finals
        audio_s += replayed.audio_s
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    counts = profile.counts()
    work = {
        "audio_s": audio_s,
        "decodes": decodes,
        "final_decodes": finals,
        "decodes_per_audio_s": decodes / audio_s,
        "cpu_s_per_audio_s": cpu / audio_s,
        "wall_s": wall,
        **{f"{name}_per_audio_s": value / audio_s for name, value in sorted(counts.items())},
        **{f"cpu_{stage}_per_audio_s": cpu_s / audio_s for stage, (cpu_s, _, calls, _) in profile.totals().items() if calls},
    }
    return {
        "options": {
            "lag_ms": options.lag_ms,
            "duration_s": options.duration_s,
            "streams": options.streams,
            "seed": options.seed,
            "telephone": options.telephone,
            "pause_range_s": list(options.pause_range_s),
            "pause_fill": options.pause_fill,
            "jitter_ms": options.jitter_ms,
            "repeats": options.repeats,
            "timestamp_tokens": options.timestamp_tokens,
            "limits": dataclasses.asdict(options.limits),
        },
        "work": work,
    }


def run_replay(
    options: ReplayOptions,
    streams: list[Stream] | None = None,
    on_stream: Callable[[Stream, StreamReplay], None] | None = None,
) -> dict[str, Any]:
    """Replay ``options.streams`` corpus streams (or ``streams``, already built from ``options``);
    the figures (pooled over repeats) and the per-stage work. ``on_stream`` sees each stream's
    replay (its events), once per repeat; only the first repeat is traced."""
    if streams is None:
        streams, _ = replay_streams(options)
    chosen = streams
    evaluations: list[list[StreamEvaluation]] = [[] for _ in range(options.repeats)]

    def one(decoders: ReplayDecoders, index: int, repeat: int) -> StreamReplay:
        stream = chosen[index]
        config = options.session_config(sample_rate=stream.sample_rate, language="en", interim_results=True, include=["logprobs", "words"])
        session = Session(f"replay_{stream.index}", config=config, vad=decoders.vad, limits=options.limits)
        replayed = _replay_one(stream, session, decoders.whisper, options.lag(repeat, index), options.traced_in(repeat))
        if on_stream is not None:
            on_stream(stream, replayed)
        evaluations[repeat].append(evaluate_stream(stream.index, replayed.events, stream.utterances))
        return replayed

    result = run_decoded(options, len(chosen), one)
    return {
        "options": result["options"],
        **repeat_figures(evaluations),
        "work": result["work"],
        "hypotheses": [e.hypothesis for run in evaluations for e in run],
    }


def repeat_figures(evaluations: Sequence[Sequence[StreamEvaluation]]) -> dict[str, Any]:
    """``figures`` pooled over every run's streams, and ``wer_by_repeat``: each run's own WER."""
    return {
        "figures": run_figures([e for run in evaluations for e in run]),
        "wer_by_repeat": [run_figures(run)["wer"] for run in evaluations],
    }


def markdown_summary(result: dict[str, Any]) -> str:
    """The replay's headline figures as a short table."""
    f, w = result["figures"], result["work"]
    rows: Sequence[tuple[str, str]] = [
        ("audio", f"{w['audio_s']:.1f} s, {f['utterances']:.0f} utterances"),
        ("WER", f"{f['wer'] * 100:.2f}% ({f['wer_substitutions']:.0f} sub, {f['wer_deletions']:.0f} del, "
                f"{f['wer_insertions']:.0f} ins of {f['reference_words']:.0f})"),
        ("lost utterances", f"{f['utterances_lost']:.0f}"),
        ("finalization p50 / p95 (audio s)", _pair(f, "finalization_latency_s")),
        ("turn's segment p50 / p95 (audio s)", _pair(f, "segment_latency_s")),
        ("first text p50 / p95 (audio s)", _pair(f, "first_text_latency_s")),
        ("decodes per audio s", f"{w['decodes_per_audio_s']:.2f} ({w['final_decodes']} finals of {w['decodes']})"),
        ("CPU s per audio s", f"{w['cpu_s_per_audio_s']:.3f}"),
    ]
    offline = result.get("offline") or {}
    if offline:
        shown = " / ".join(f"{k.removeprefix('offline_wer_')} {v * 100:.2f}%" for k, v in sorted(offline.items()))
        rows = [*rows[:2], ("offline WER", shown), *rows[2:]]
    alone = result.get("per_utterance") or {}
    if alone:
        shown = f"{alone['wer_per_utterance'] * 100:.2f}% (offline " + " / ".join(
            f"{k.removeprefix('offline_wer_per_utterance_')} {v * 100:.2f}%" for k, v in sorted(alone.items()) if k.startswith("offline_")
        ) + ")"
        at = next(i for i, (name, _) in enumerate(rows) if name == "WER") + 1 + bool(offline)
        rows = [*rows[:at], ("WER, each utterance scored alone", shown), *rows[at:]]
    runs = result.get("wer_by_repeat") or []
    if len(runs) > 1:
        o = result["options"]
        spread = f"mean {statistics.mean(runs) * 100:.2f}%, sd {statistics.stdev(runs) * 100:.2f}"
        rows = [*rows[:1], ("WER by run", " / ".join(f"{r * 100:.2f}%" for r in runs) + f" ({spread}; lag {o['lag_ms']} ± {o['jitter_ms']} ms)"), *rows[1:]]
    rows = [*rows, *((k, f"{v:.2f}") for k, v in w.items() if k.endswith("_per_audio_s") and k.startswith(("forced", "generated", "encoder", "aligned")))]
    options = result.get("options", {})
    if not options.get("timestamp_tokens", True):
        rows = [*rows, ("timestamp tokens", "off (--replay-timestamp-tokens off)")]
    pauses, fill = options.get("pause_range_s"), options.get("pause_fill")
    if pauses and (tuple(pauses) != DEFAULT_PAUSE_RANGE_S or fill != DEFAULT_PAUSE_FILL):
        filled = f"{NOISE_DBFS:.0f} dBFS noise" if fill == "noise" else "digital silence"
        rows = [*rows, ("pauses between clips", f"{pauses[0]}-{pauses[1]} s of {filled}")]
    return "\n".join(["| figure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)]) + "\n"


def _pair(figures: dict[str, float], prefix: str) -> str:
    p50, p95 = figures.get(f"{prefix}_p50"), figures.get(f"{prefix}_p95")
    return "-" if p50 is None or p95 is None else f"{p50:.2f} / {p95:.2f}"


def replay_args_problem(args: argparse.Namespace) -> str | None:
    """Why the replay flags cannot run as given (``None``: they can)."""
    if not (args.corpus / "manifest.jsonl").exists():
        return f"corpus not found: {args.corpus}/manifest.jsonl"
    if not 0 <= args.replay_jitter_ms <= args.replay_lag_ms:
        return f"--replay-jitter-ms must be between 0 and --replay-lag-ms ({args.replay_lag_ms})"
    if args.replay_repeats < 1:
        return "--replay-repeats must be at least 1"
    if args.silence_ms is not None:
        try:  # the protocol's own bound, as a client's session.update meets it
            p.TurnDetection(silence_duration_ms=args.silence_ms)
        except ValueError:  # pydantic's ValidationError is one
            return "--silence-ms must be between 0 and 5000 (turn_detection.silence_duration_ms)"
    if args.replay_repeats > 1 and not args.replay_jitter_ms:
        return "--replay-repeats needs --replay-jitter-ms above 0: without jitter every run is the same run"
    return None


def replay_options(args: argparse.Namespace, **fields: Any) -> ReplayOptions:
    """The replay flags every replay takes (streams and calls alike), with ``fields`` of its own."""
    return ReplayOptions(
        corpus=args.corpus,
        model_path=resolve_model_path(args.model),
        limits=limits_with(args.limit),
        lag_ms=args.replay_lag_ms,
        compute_type=args.compute_type or "int8",
        trace_clips=tuple(args.trace),
        jitter_ms=args.replay_jitter_ms,
        repeats=args.replay_repeats,
        silence_ms=args.silence_ms,
        timestamp_tokens=args.replay_timestamp_tokens == "on",
        **fields,
    )


def main_replay(args: argparse.Namespace, out: Path) -> int:
    """``stream-server bench --replay``: writes ``replay.json`` and ``replay.md`` to ``out``."""
    problem = replay_args_problem(args)
    if problem:
        print(f"[bench] {problem}", file=sys.stderr)
        return 2
    options = replay_options(
        args,
        duration_s=args.duration_s,
        streams=args.streams,
        seed=args.seed,
        telephone=args.telephone,
        pause_range_s=(args.pause_min_s, args.pause_max_s),
        pause_fill=args.pause_fill,
    )
    streams, pool = replay_streams(options)
    replays: list[tuple[Stream, StreamReplay]] = []
    result = run_replay(options, streams, on_stream=lambda stream, replayed: replays.append((stream, replayed)))
    texts: dict[int, dict[str, str]] = {}
    if args.offline is not False or args.per_utterance:
        texts, _ = transcribe_pool(pool, options.model_path, device="cpu", compute_type=options.compute_type, language="en")
        result["offline"] = offline_figures(streams, texts)
        result["per_utterance"] = per_utterance_wer(((stream, replayed.events) for stream, replayed in replays),
                                                    {f"beam{beam}": by_clip for beam, by_clip in texts.items()})
    (out / "replay.json").write_text(json.dumps(result, indent=2))
    md = markdown_summary(result)
    (out / "replay.md").write_text(md)
    print(md)
    if args.per_utterance:
        path = write_per_utterance(out, ((stream, replayed.events) for stream, replayed in replays), texts[1])
        print(f"[bench] per-utterance diff vs offline beam 1: {path}", file=sys.stderr)
    traces = [replayed.trace for _, replayed in replays if replayed.trace]
    if options.trace_clips:
        (out / "trace.txt").write_text("\n".join(traces) or "none of the traced clips is in these streams\n")
        print(f"[bench] decode trace of {', '.join(options.trace_clips)}: {out / 'trace.txt'}", file=sys.stderr)
    return 0


def limits_with(overrides: Sequence[str]) -> SessionLimits:
    """``SessionLimits`` with ``name=value`` overrides (ints, floats, booleans)."""
    changes: dict[str, Any] = {}
    fields = {f.name: f for f in dataclasses.fields(SessionLimits)}
    for item in overrides:
        name, _, raw = item.partition("=")
        if name not in fields:
            raise ValueError(f"unknown limit {name!r}; one of {', '.join(fields)}")
        current = getattr(SessionLimits(), name)
        changes[name] = raw.lower() in ("1", "true", "yes") if isinstance(current, bool) else type(current)(raw)
    return dataclasses.replace(SessionLimits(), **changes)


__all__ = ["DecodeLag", "ReplayDecoders", "ReplayOptions", "limits_with", "markdown_summary", "repeat_figures", "replay_args_problem", "replay_feed", "replay_stream", "run_decoded", "run_replay"]
