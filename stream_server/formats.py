"""Rendering a file's transcript in the HTTP API's response formats.

``json`` / ``verbose_json`` follow OpenAI's transcription objects (plus the ``success``, ``error``
and ``confidence`` fields AI Refinery's clients read); ``text``, ``srt`` and ``vtt`` are plain text.
Segments with no text (an utterance the decoder judged to hold no words) are left out everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

from stream_server import protocol as p

# Language names as OpenAI's ``verbose_json`` writes them ("english"); other codes pass through.
_LANGUAGE_NAMES = {
    "en": "english", "de": "german", "es": "spanish", "fr": "french", "it": "italian", "pt": "portuguese",
    "nl": "dutch", "ru": "russian", "zh": "chinese", "ja": "japanese", "ko": "korean", "ar": "arabic",
    "hi": "hindi", "pl": "polish", "tr": "turkish", "sv": "swedish", "uk": "ukrainian", "ca": "catalan",
    "cs": "czech", "da": "danish", "fi": "finnish", "el": "greek", "he": "hebrew", "no": "norwegian",
}


def language_name(code: str) -> str:
    return _LANGUAGE_NAMES.get(code, code)


def spoken(segments: list[p.TranscriptSegment]) -> list[p.TranscriptSegment]:
    return [s for s in segments if s.text.strip()]


def confidence(logprobs: list[p.TokenLogprob] | None) -> float | None:
    """Mean token probability (``exp`` of each token's log probability); None without tokens."""
    if not logprobs:
        return None
    return round(sum(math.exp(t.logprob) for t in logprobs) / len(logprobs), 4)


def logprobs_json(logprobs: list[p.TokenLogprob] | None) -> list[dict[str, Any]] | None:
    return None if logprobs is None else [dataclasses.asdict(t) for t in logprobs]


def usage_json(done: p.TranscriptDone) -> dict[str, Any]:
    return {"type": "duration", "seconds": done.usage.seconds}


def compression_ratio(text: str) -> float:
    data = text.encode("utf-8")
    return round(len(data) / len(zlib.compress(data)), 4) if data else 1.0


def _timestamp(seconds: float, separator: str) -> str:
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def to_text(text: str) -> str:
    return text + "\n"


def to_srt(segments: list[p.TranscriptSegment]) -> str:
    blocks = []
    for i, seg in enumerate(spoken(segments), 1):
        blocks.append(f"{i}\n{_timestamp(seg.start, ',')} --> {_timestamp(seg.end, ',')}\n{seg.text.strip()}\n")
    return "\n".join(blocks)


def to_vtt(segments: list[p.TranscriptSegment]) -> str:
    blocks = ["WEBVTT\n"]
    for seg in spoken(segments):
        blocks.append(f"{_timestamp(seg.start, '.')} --> {_timestamp(seg.end, '.')}\n{seg.text.strip()}\n")
    return "\n".join(blocks)


def words_json(segments: list[p.TranscriptSegment]) -> list[dict[str, Any]]:
    """OpenAI's ``words`` (word, start, end) plus AI Refinery's ``confidence`` and ``segment``."""
    out = []
    for index, seg in enumerate(spoken(segments)):
        for word in seg.words or []:
            out.append(
                {
                    "word": word.word,
                    "start": word.start,
                    "end": max(word.end, word.start),
                    "confidence": min(1.0, max(0.0, word.probability)),
                    "segment": index,
                }
            )
    return out


def segments_json(segments: list[p.TranscriptSegment]) -> list[dict[str, Any]]:
    out = []
    for index, seg in enumerate(spoken(segments)):
        out.append(
            {
                "id": index,
                "seek": int(seg.start * 100),  # Whisper counts seek in 10 ms mel frames
                "start": seg.start,
                "end": seg.end,
                "text": " " + seg.text.strip(),
                "tokens": [],  # token ids are not part of the engine's events
                "temperature": 0.0,
                "avg_logprob": min(0.0, seg.avg_logprob),
                "compression_ratio": compression_ratio(seg.text),
                "no_speech_prob": seg.no_speech_prob,
            }
        )
    return out
