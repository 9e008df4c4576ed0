"""Deterministic replay of two-leg phone calls: conversational accuracy on the audio clock.

The call benchmark (:mod:`.calls`) replays calls into a live server at real time, so its figures
move with the machine, and a run of eight calls takes as long as the calls. Choosing a commit
rule for turns that abut and overlap needs the figure the live run cannot give cheaply: the WER of
each leg against offline faster-whisper on the same μ-law, identical on every machine and run.

Here each call of :func:`.calls.build_calls` runs through one real two-channel
:class:`~stream_server.session.Session` (μ-law at 8 kHz, the channels labelled as the Twilio
dialect labels them) with the replay loop of :mod:`.replay`: both legs' 20 ms frames go in at
their audio times, every decode runs at once and comes back ``lag_ms`` later (± the jitter, over
``--replay-repeats`` runs: see :mod:`.replay` for why one run is one draw). Each leg is scored
as a stream of its own (its channel's events against its turns); the offline baseline decodes
each turn whole (beam 5), as the live call benchmark does.

Usage::

    stream-server bench --replay --calls 8 [--call-s 45] [--per-utterance] [--limit NAME=VALUE]
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stream_server import protocol as p
from stream_server.decoding import WhisperDecoder
from stream_server.session import Session

from .calls import CHANNEL, FRAME, LABELS, RATE, TRACKS, Call, build_calls, offline_texts, turn_utterances
from .corpus import Stream
from .diagnostics import TracingDecoder, per_utterance_wer, trace_spans, trace_text, write_per_utterance
from .metrics import TimedEvent, evaluate_stream, pooled_wer
from .replay import (
    DecodeLag,
    ReplayDecoders,
    ReplayOptions,
    StreamReplay,
    markdown_summary,
    repeat_figures,
    replay_args_problem,
    replay_feed,
    replay_options,
    run_decoded,
)


def call_config(options: ReplayOptions) -> p.SessionConfig:
    """The session the Twilio dialect opens for a two-track stream (μ-law, 8 kHz, one channel per
    track, labelled), with the events the scorer reads (and the turn silence under test)."""
    return options.session_config(
        input_audio_format="g711_ulaw",
        sample_rate=RATE,
        language="en",
        interim_results=True,
        include=["logprobs", "words"],
        channels=len(TRACKS),
        channel_labels=[LABELS[track] for track in TRACKS],
    )


def replay_call(call: Call, session: Session, decoder: WhisperDecoder | TracingDecoder, lag: DecodeLag) -> StreamReplay:
    """Both legs of ``call`` into ``session``, a 20 ms frame of each at a time, as Twilio sends them."""
    legs = [(CHANNEL[track], call.legs[track]) for track in TRACKS]
    length = len(legs[0][1])

    def frames() -> Iterator[tuple[float, Callable[[], None]]]:
        for start in range(0, length, FRAME):
            yield (start + FRAME) / RATE, functools.partial(_feed_frame, session, legs, start)

    return replay_feed(session, frames(), length / RATE, decoder, lag)


def _feed_frame(session: Session, legs: list[tuple[int, bytes]], start: int) -> None:
    for channel, leg in legs:
        session.receive_message(p.AudioAppend(leg[start : start + FRAME], channel=channel))


def channel_events(events: list[TimedEvent], channel: int) -> list[TimedEvent]:
    """The events of one leg, with the session's ``transcript.text.done`` as this leg's (its text
    per channel), so the scorer checks the leg's deltas against it; other session-wide events
    carry no channel and are left out."""
    leg: list[TimedEvent] = []
    for t, e in events:
        if e.get("channel") == channel:
            leg.append((t, e))
        elif e.get("type") == "transcript.text.done":
            texts = [c.get("text") for c in e.get("channels") or [] if c.get("channel") == channel]
            leg.extend((t, {"type": e["type"], "text": text}) for text in texts[:1])
    return leg


def leg_stream(call: Call, index: int, track: str) -> Stream:
    """One leg as a scoring stream: its turns are its utterances (no samples: scoring only)."""
    return Stream(index, RATE, np.zeros(0, dtype=np.int16), turn_utterances(call.leg_turns(track)))


def run_call_replay(options: ReplayOptions, calls: list[Call]) -> tuple[dict[str, Any], list[tuple[Stream, list[TimedEvent]]], str]:
    """Replay ``calls`` (``options.repeats`` times); the figures (each leg pooled as a stream,
    over every run), each leg's events in each run, and the first run's trace of
    ``options.trace_clips`` (empty when none is in these calls)."""
    legs: list[list[tuple[Stream, list[TimedEvent]]]] = [[] for _ in range(options.repeats)]
    traces: list[str] = []

    def one(decoders: ReplayDecoders, index: int, repeat: int) -> StreamReplay:
        call = calls[index]
        session = Session(f"replay_call_{index}", config=call_config(options), vad=decoders.vad, limits=options.limits)
        streams = [leg_stream(call, 2 * index + CHANNEL[track], track) for track in TRACKS]
        leg_spans = [trace_spans(stream, options.traced_in(repeat)) for stream in streams]
        spans = [span for each in leg_spans for span in each]
        tracing = TracingDecoder(decoders.whisper, spans, now=lambda: session.audio_seconds) if spans else None
        replayed = replay_call(call, session, tracing or decoders.whisper, options.lag(repeat, index))
        for track, stream, traced in zip(TRACKS, streams, leg_spans, strict=True):
            events = channel_events(replayed.events, CHANNEL[track])
            legs[repeat].append((stream, events))
            if tracing is not None and traced:
                # The decodes are both legs' (a decode does not say its channel); the events this leg's.
                traces.append(f"call {index}, {track} ({LABELS[track]})\n" + trace_text(stream, options.trace_clips, tracing.decodes, events))
        return replayed

    result = run_decoded(options, len(calls), one)
    result.update(repeat_figures([[evaluate_stream(s.index, events, s.utterances) for s, events in run] for run in legs]))
    result["options"]["calls"] = len(calls)
    return result, [leg for run in legs for leg in run], "\n".join(traces)


def offline_leg_figures(calls: list[Call], texts: list[dict[str, list[str]]]) -> dict[str, float]:
    """Offline beam 5 WER pooled over every leg (each turn decoded whole)."""
    pairs = (
        (" ".join(call.references(track)), " ".join(leg_texts.get(track, [])))
        for call, leg_texts in zip(calls, texts, strict=True)
        for track in TRACKS
    )
    return {"offline_wer_b5": pooled_wer(pairs).wer}


def offline_by_clip(calls: list[Call], texts: list[dict[str, list[str]]]) -> dict[str, str]:
    """Offline text per turn clip, for the per-utterance diff."""
    return {
        turn.clip_id: text
        for call, leg_texts in zip(calls, texts, strict=True)
        for track in TRACKS
        for turn, text in zip(call.leg_turns(track), leg_texts.get(track, []), strict=False)
    }


def main_call_replay(args: argparse.Namespace, out: Path) -> int:
    """``stream-server bench --replay --calls N``: writes ``replay.json`` and ``replay.md``."""
    problem = replay_args_problem(args)
    if problem:
        print(f"[bench] {problem}", file=sys.stderr)
        return 2
    count = max(int(n) for n in str(args.calls).split(","))
    calls, notes = build_calls(count, args.call_s, args.corpus, echo_db=args.call_echo_db)
    for note in notes:
        print(f"[bench] {note}", file=sys.stderr)
    options = replay_options(args)
    result, legs, trace = run_call_replay(options, calls)
    texts = [offline_texts(call, model=args.model or "tiny.en", tag="replay-calls") for call in calls]
    result["offline"] = offline_leg_figures(calls, texts)
    by_clip = offline_by_clip(calls, texts)
    result["per_utterance"] = per_utterance_wer(legs, {"b5": by_clip})
    (out / "replay.json").write_text(json.dumps(result, indent=2))
    md = markdown_summary(result)
    (out / "replay.md").write_text(md)
    print(md)
    if args.per_utterance:
        path = write_per_utterance(out, legs, by_clip)
        print(f"[bench] per-turn diff vs offline beam 5: {path}", file=sys.stderr)
    if options.trace_clips:
        (out / "trace.txt").write_text(trace or "none of the traced clips is in these calls\n")
        print(f"[bench] decode trace of {', '.join(options.trace_clips)}: {out / 'trace.txt'}", file=sys.stderr)
    return 0


__all__ = ["call_config", "main_call_replay", "replay_call", "run_call_replay"]
