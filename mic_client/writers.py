"""``--output`` writers: JSON Lines (every event, for analysis) and SRT (subtitles from finals).

SRT cues follow subtitle norms (at most two lines of about 42 characters, about 7 s each; the
rules are the server's, ``stream_server.formats.cue_split``): a long utterance becomes several
cues, cut at its word timings when the events carry them, else at times spread over its words.

Both write and flush as events arrive rather than at the end, so a session that is killed or loses
its connection still leaves everything received so far on disk.

With several channels the JSON Lines keep each event's ``channel`` and ``speaker`` as the server
sent them, and every SRT cue starts with its speaker (``agent: text``). The channels' segments
arrive in the order their decodes finish, which is not always the order they were spoken in, so
the SRT file is rewritten in start-time order when it is closed (players expect cues in order);
with one channel it is also rewritten when a cue turned out to reach into the next one.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

from mic_client.captions import speaker_name
from stream_server.formats import segment_cues

FORMATS = ("jsonl", "srt")

_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".srt": "srt"}


class EventWriter(Protocol):
    """Something that records received events; ``received_at`` is wall-clock Unix seconds."""

    def write(self, event: Mapping[str, Any], received_at: float) -> None: ...

    def close(self) -> None: ...


def infer_format(path: str | Path, explicit: str | None = None) -> str:
    """The output format: ``explicit`` if given, else from the file extension.

    Raises ValueError with a message for the user when neither says.
    """
    if explicit is not None:
        if explicit not in FORMATS:
            raise ValueError(f"unknown output format {explicit!r}; use one of {', '.join(FORMATS)}")
        return explicit
    suffix = Path(path).suffix.lower()
    try:
        return _EXTENSIONS[suffix]
    except KeyError:
        raise ValueError(
            f"cannot tell the output format from {str(path)!r}; "
            f"name it *.jsonl or *.srt, or pass --format {'|'.join(FORMATS)}"
        ) from None


class JsonlWriter:
    """One JSON object per line: the event exactly as received, plus ``received_at``.

    ``received_at`` is wall-clock time (Unix seconds, float) so that latency can be measured
    afterwards against the audio-time fields (``audio_start_ms``, ``start``/``end``) of the events
    themselves, e.g. by the benchmark.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    @classmethod
    def open(cls, path: str | Path) -> JsonlWriter:
        return cls(open(path, "w", encoding="utf-8"))

    def write(self, event: Mapping[str, Any], received_at: float) -> None:
        record = {**event, "received_at": received_at}
        self._stream.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()


def format_srt_time(seconds: float) -> str:
    """``HH:MM:SS,mmm`` as SRT wants it (comma before the milliseconds), rounded to the ms."""
    if not math.isfinite(seconds) or seconds < 0:
        seconds = 0.0
    total_ms = round(seconds * 1000)
    hours, rest = divmod(total_ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs, millis = divmod(rest, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d},{millis:03d}"


def srt_cue(index: int, start: float, end: float, text: str) -> str:
    """One SRT cue, with its trailing blank line. ``end`` is never before ``start``."""
    end = max(end, start)
    return f"{index}\n{format_srt_time(start)} --> {format_srt_time(end)}\n{text.strip()}\n\n"


@dataclasses.dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str


class SrtWriter:
    """Cues from each ``transcript.segment`` (cut to subtitle norms), in audio time; other events
    are ignored.

    Segments with empty text (the server finalized an utterance that held no words) get no cue:
    an empty cue is invalid in many players. Cue numbers stay consecutive. With ``channels`` > 1
    each cue names its speaker, and :meth:`close` puts cues that arrived out of time order back in
    order (see the module docstring).
    """

    def __init__(self, stream: TextIO, *, channels: int = 1, labels: list[str] | None = None) -> None:
        self._stream = stream
        self.channels = channels
        self.labels = labels
        self.cues = 0
        self._written: list[Cue] = []

    @classmethod
    def open(cls, path: str | Path, *, channels: int = 1, labels: list[str] | None = None) -> SrtWriter:
        return cls(open(path, "w", encoding="utf-8"), channels=channels, labels=labels)

    def write(self, event: Mapping[str, Any], received_at: float) -> None:
        if event.get("type") != "transcript.segment":
            return
        text = str(event.get("text") or "").strip()
        if not text:
            return
        prefix = ""
        if self.channels > 1:
            channel = event.get("channel")
            index = channel if isinstance(channel, int) and not isinstance(channel, bool) else 0
            prefix = f"{speaker_name(index, event.get('speaker'), self.labels)}:"
        start = float(event.get("start") or 0.0)
        end = max(float(event.get("end") or start), start)
        words = event.get("words")
        for piece in segment_cues(text, start, end, words if isinstance(words, list) else None, prefix=prefix):
            cue = Cue(piece.start, piece.end, piece.text)
            self._written.append(cue)
            self.cues += 1
            self._stream.write(srt_cue(self.cues, cue.start, cue.end, cue.text))
        self._stream.flush()

    def close(self) -> None:
        ordered = sorted(self._written, key=lambda c: (c.start, c.end))
        if self.channels == 1:
            # One voice: a cue ends where the next starts (an utterance's padded end can reach
            # into the next one, which was not known when the cue was written).
            ordered = [dataclasses.replace(c, end=max(c.start, min(c.end, n.start))) for c, n in itertools.pairwise(ordered)] + ordered[-1:]
        if ordered != self._written and self._stream.seekable():
            self._stream.seek(0)
            self._stream.truncate()
            for index, cue in enumerate(ordered, start=1):
                self._stream.write(srt_cue(index, cue.start, cue.end, cue.text))
        self._stream.close()


def open_writer(
    path: str | Path, fmt: str | None = None, *, channels: int = 1, labels: list[str] | None = None
) -> EventWriter:
    """Open ``path`` for writing in ``fmt`` (or the format its extension implies); ``channels``
    and ``labels`` describe the stream (SRT cues then name their speakers)."""
    kind = infer_format(path, fmt)
    if kind == "srt":
        return SrtWriter.open(path, channels=channels, labels=labels)
    return JsonlWriter.open(path)
