"""Where a run's errors come from: per-utterance diffs against offline, and decode traces.

A run's WER says *how much* streaming loses against the same model on each clip whole; these
two views say *where*, which is what choosing the next decoder guard or commit rule needs:

- :func:`utterance_rows` maps each final word to the utterance its audio lies in and scores
  every utterance twice (streaming, offline), so the worst streaming-only losses sort to the
  top (``stream-server bench --per-utterance``, live or with ``--replay``; live clients then ask
  for word timings);
- :class:`TracingDecoder` wraps the real decoder and records every decode whose audio time lies
  near chosen clips: window length, prompt tail, forced prefix, and the words it returned with
  their times (``--replay --trace CLIP``, repeatable). With the events around those clips it shows which
  decode produced a wrong word and what it was given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from stream_server.audio import MODEL_RATE
from stream_server.decoding import DecodeRequest, DecodeResult, WhisperDecoder
from stream_server.policy import mean_logprob

from .corpus import Stream, Utterance
from .metrics import TimedEvent, pooled_wer, wer_counts
from .runner import events_path, read_events

#: Trace decodes and events from this long before a traced clip's audio to this long after it.
TRACE_BEFORE_S = 0.5
TRACE_AFTER_S = 1.5
#: Events shown in a trace.
TRACED_EVENTS = (
    "input_audio_buffer.speech_started",
    "input_audio_buffer.speech_stopped",
    "transcript.text.delta",
    "transcript.segment",
)


@dataclasses.dataclass(frozen=True)
class UtteranceRow:
    """One utterance's streaming and offline text and their errors against the reference."""

    clip_id: str
    reference: str
    streaming: str
    offline: str
    streaming_errors: int
    offline_errors: int
    reference_words: int
    occurrences: int = 1  # times the clip was heard (streams, repeats); errors and words are summed

    @property
    def excess(self) -> int:
        """Errors streaming makes beyond offline (negative: streaming did better)."""
        return self.streaming_errors - self.offline_errors


def merge_rows(rows: Sequence[UtteranceRow]) -> list[UtteranceRow]:
    """One row per clip, in first-heard order: a clip heard in several streams or repeats sums its
    errors, and its streaming cell lists each distinct reading with how often it came out, so a
    loss that happens in every run stands apart from one that happens in one draw of several."""
    by_clip: dict[str, list[UtteranceRow]] = {}
    for row in rows:
        by_clip.setdefault(row.clip_id, []).append(row)
    merged = []
    for same in by_clip.values():
        readings: dict[str, int] = {}
        for row in same:
            readings[row.streaming] = readings.get(row.streaming, 0) + 1
        streaming = same[0].streaming if len(readings) == 1 else " ‖ ".join(f"{text or '∅'} (×{n})" for text, n in readings.items())
        merged.append(UtteranceRow(
            same[0].clip_id, same[0].reference, streaming, same[0].offline,
            sum(r.streaming_errors for r in same), sum(r.offline_errors for r in same),
            sum(r.reference_words for r in same), sum(r.occurrences for r in same),
        ))
    return merged


def per_utterance_wer(runs: Iterable[tuple[Stream, Sequence[TimedEvent]]], offline: Mapping[str, Mapping[str, str]]) -> dict[str, float]:
    """Streaming WER, and each offline baseline's (``offline``: a name, e.g. ``beam5``, to its
    text per clip), with every utterance normalised and scored alone, then pooled.

    The headline WER normalises a stream's whole text at once. Whisper's normaliser then reads
    numbers across utterance boundaries: "Four. One." becomes "41", "Two. Zero." "20", and the
    reference "4 1" "4 one", so a stream of short digit clips loses words no transcript got
    wrong (and streaming, whose prompts carry the digits, more than offline). Scoring each
    utterance alone, as a test set is scored, does not; a final word belongs to the utterance
    its audio lies in (:func:`owning_utterance`), so words hallucinated in a pause still count."""
    runs = list(runs)
    rows = [row for stream, events in runs for row in utterance_rows(stream, events, {})]
    words = sum(row.reference_words for row in rows)
    figures = {"wer_per_utterance": sum(row.streaming_errors for row in rows) / words if words else 0.0}
    for name, texts in offline.items():
        counts = pooled_wer((u.text, texts.get(u.clip_id, "")) for stream, _ in runs for u in stream.utterances)
        figures[f"offline_wer_per_utterance_{name}"] = counts.wer
    return figures


def owning_utterance(utterances: Sequence[Utterance], t: float) -> int:
    """Index of the utterance whose audio holds time ``t``, else the nearest one by its edges."""

    def distance(u: Utterance) -> float:
        if u.audio_start_s <= t <= u.audio_end_s:
            return 0.0
        return min(abs(t - u.audio_start_s), abs(t - u.audio_end_s))

    return min(range(len(utterances)), key=lambda i: distance(utterances[i]))


def final_words_by_utterance(events: Sequence[TimedEvent], utterances: Sequence[Utterance]) -> list[list[str]]:
    """Each utterance's final words, from the word timings of ``transcript.segment`` events."""
    words: list[list[str]] = [[] for _ in utterances]
    for _, event in events:
        if event.get("type") != "transcript.segment":
            continue
        for word in event.get("words") or []:
            words[owning_utterance(utterances, (word["start"] + word["end"]) / 2)].append(word["word"])
    return words


def join_words(words: Sequence[str]) -> str:
    """Wire words back into text: a piece Whisper split off a word ("cold" "-hearted") joins it."""
    text = ""
    for word in words:
        text += word if text and word.startswith(("-", "'")) else f" {word}"
    return text.strip()


def utterance_rows(stream: Stream, events: Sequence[TimedEvent], offline: dict[str, str]) -> list[UtteranceRow]:
    """Every utterance of ``stream`` scored on its own, streaming (from ``events``) vs offline."""
    rows = []
    for utterance, words in zip(stream.utterances, final_words_by_utterance(events, stream.utterances), strict=True):
        streaming = join_words(words)
        off = offline.get(utterance.clip_id, "")
        s, o = wer_counts(utterance.text, streaming), wer_counts(utterance.text, off)
        rows.append(UtteranceRow(utterance.clip_id, utterance.text, streaming, off, s.errors, o.errors, s.reference_words))
    return rows


def write_per_utterance(folder: Path, runs: Iterable[tuple[Stream, Sequence[TimedEvent]]], offline: dict[str, str]) -> Path:
    """``folder/per_utterance.md`` for streams and the events each of them got."""
    rows = [row for stream, events in runs for row in utterance_rows(stream, events, offline)]
    path = folder / "per_utterance.md"
    path.write_text(per_utterance_markdown(rows))
    return path


def write_level_per_utterance(folder: Path, streams: Sequence[Stream], offline: dict[str, str]) -> Path:
    """``per_utterance.md`` of one live level, from the events its clients wrote to ``folder``."""
    return write_per_utterance(folder, ((s, read_events(events_path(folder, s.index))) for s in streams), offline)


def per_utterance_markdown(rows: Sequence[UtteranceRow]) -> str:
    """Totals, then every clip where streaming and offline differ, worst streaming first (a clip
    heard more than once is one row: :func:`merge_rows`)."""
    words = sum(r.reference_words for r in rows) or 1
    streaming, offline = sum(r.streaming_errors for r in rows), sum(r.offline_errors for r in rows)
    lines = [
        f"Per-utterance WER (each utterance scored alone): streaming {100 * streaming / words:.2f}%, "
        f"offline {100 * offline / words:.2f}% over {words} words, {len(rows)} utterances.",
        "",
        "| excess | heard | clip | reference | streaming | offline |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted((r for r in merge_rows(rows) if r.excess), key=lambda r: (-r.excess, r.clip_id)):
        lines.append(f"| {r.excess:+d} | {r.occurrences} | {r.clip_id} | {_cell(r.reference)} | {_cell(r.streaming)} | {_cell(r.offline)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "∅"


@dataclasses.dataclass(frozen=True)
class TracedDecode:
    """One decode near a traced clip, at the audio time it was submitted."""

    at: float
    final: bool
    window_s: float
    prompt_tail: str
    prefix: str
    words: tuple[tuple[str, float, float], ...]
    prefix_end: float
    logprob: float = 0.0  # the mean token log probability of the spoken words (policy.mean_logprob)

    def line(self) -> str:
        said = ", ".join(f"{w!r} {a:.2f}-{b:.2f}" for w, a, b in self.words) or "nothing"
        kind = "FINAL " if self.final else "interim"
        return (
            f"{self.at:8.2f} decode {kind} window {self.window_s:.2f} s, prompt …{self.prompt_tail!r}, "
            f"prefix {self.prefix!r} (ends {self.prefix_end:.2f} s) -> {said} (mean logprob {self.logprob:.2f})"
        )


class TracingDecoder:
    """A :class:`WhisperDecoder` that records the decodes submitted near chosen utterances.

    ``now`` tells the audio time of a submission (the session's ``audio_seconds``)."""

    def __init__(self, decoder: WhisperDecoder, spans: Sequence[tuple[float, float]], now: Callable[[], float]) -> None:
        self._decoder = decoder
        self._spans = spans
        self._now = now
        self.decodes: list[TracedDecode] = []

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]:
        results = self._decoder.decode_batch(requests)
        at = self._now()
        if in_spans(self._spans, at):
            for request, result in zip(requests, results, strict=True):
                self.decodes.append(self._traced(at, request, result))
        return results

    def _traced(self, at: float, request: DecodeRequest, result: DecodeResult) -> TracedDecode:
        return TracedDecode(
            at=at,
            final=request.final,
            window_s=len(request.audio) / MODEL_RATE,
            prompt_tail=request.prompt[-40:],
            prefix=self._decoder.decode_tokens(request.prefix),
            words=tuple((w.text, round(w.start, 2), round(w.end, 2)) for w in result.words),
            prefix_end=result.prefix_end,
            logprob=round(mean_logprob(result.words), 2),
        )


def trace_spans(stream: Stream, clip_ids: Sequence[str]) -> list[tuple[float, float]]:
    """Audio spans to trace: each named clip's audio, widened by the trace margins."""
    return [
        (u.audio_start_s - TRACE_BEFORE_S, u.audio_end_s + TRACE_AFTER_S) for u in stream.utterances if u.clip_id in clip_ids
    ]


def in_spans(spans: Sequence[tuple[float, float]], t: float) -> bool:
    return any(a <= t <= b for a, b in spans)


def trace_text(stream: Stream, clip_ids: Sequence[str], decodes: Sequence[TracedDecode], events: Sequence[TimedEvent]) -> str:
    """The traced clips (reference, audio and speech times), then decodes and events in time order."""
    spans = trace_spans(stream, clip_ids)
    head = [
        f"clip {u.clip_id}: audio {u.audio_start_s:.2f}-{u.audio_end_s:.2f} s, "
        f"speech {u.speech_start_s:.2f}-{u.speech_end_s:.2f} s: {u.text}"
        for u in stream.utterances
        if u.clip_id in clip_ids
    ]
    timeline: list[tuple[float, int, str]] = [(d.at, 0, d.line()) for d in decodes]
    for at, event in events:
        if event.get("type") in TRACED_EVENTS and in_spans(spans, at):
            timeline.append((at, 1, f"{at:8.2f} {_event_line(event)}"))
    return "\n".join([*head, "", *(line for _, _, line in sorted(timeline, key=lambda x: (x[0], x[1])))]) + "\n"


def _event_line(event: dict[str, Any]) -> str:
    shown = {k: event[k] for k in ("item_id", "delta", "text", "start", "end") if k in event}
    return f"{event['type']} {shown}"


__all__ = [
    "TracedDecode",
    "TracingDecoder",
    "UtteranceRow",
    "final_words_by_utterance",
    "merge_rows",
    "owning_utterance",
    "per_utterance_markdown",
    "per_utterance_wer",
    "trace_spans",
    "trace_text",
    "utterance_rows",
    "write_level_per_utterance",
    "write_per_utterance",
]
