"""``--output`` writers: JSON Lines (every event, for analysis) and SRT (subtitles from finals).

Both write and flush as events arrive rather than at the end, so a session that is killed or loses
its connection still leaves everything received so far on disk.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, TextIO

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


class SrtWriter:
    """One cue per ``transcript.segment``, timed in audio time; other events are ignored.

    Segments with empty text (the server finalized an utterance that held no words) get no cue:
    an empty cue is invalid in many players. Cue numbers stay consecutive.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.cues = 0

    @classmethod
    def open(cls, path: str | Path) -> SrtWriter:
        return cls(open(path, "w", encoding="utf-8"))

    def write(self, event: Mapping[str, Any], received_at: float) -> None:
        if event.get("type") != "transcript.segment":
            return
        text = str(event.get("text") or "").strip()
        if not text:
            return
        self.cues += 1
        start = float(event.get("start") or 0.0)
        end = float(event.get("end") or start)
        self._stream.write(srt_cue(self.cues, start, end, text))
        self._stream.flush()

    def close(self) -> None:
        self._stream.close()


def open_writer(path: str | Path, fmt: str | None = None) -> EventWriter:
    """Open ``path`` for writing in ``fmt`` (or the format its extension implies)."""
    kind = infer_format(path, fmt)
    if kind == "srt":
        return SrtWriter.open(path)
    return JsonlWriter.open(path)
