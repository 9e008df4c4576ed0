"""Rendering a file's transcript in the HTTP API's response formats.

``json`` / ``verbose_json`` follow OpenAI's transcription objects (plus the ``success``, ``error``
and ``confidence`` fields AI Refinery's clients read); ``text``, ``srt`` and ``vtt`` are plain text.
Subtitles (``srt``, ``vtt``; also the sessions API's and ``mic-client --output x.srt``) are cut into
cues to subtitle norms from the word timings (:func:`cue_split`), not one cue per utterance.
Segments with no text (an utterance the decoder judged to hold no words) are left out everywhere.
"""

from __future__ import annotations

import dataclasses
import math
import re
import zlib
from collections.abc import Mapping, Sequence
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


def file_language(segments: Sequence[p.TranscriptSegment]) -> str | None:
    """The file's language for ``verbose_json`` and Deepgram's ``detected_language``, which have
    one: each utterance is detected on its own, and the language spoken longest wins (None
    without speech)."""
    spoken: dict[str, float] = {}
    for seg in segments:
        if seg.text and seg.language:
            spoken[seg.language] = spoken.get(seg.language, 0.0) + max(0.0, seg.end - seg.start)
    return max(spoken, key=lambda code: spoken[code]) if spoken else None


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


# ------------------------------------------------------------------------------ subtitle cues
#
# Captions are cut to subtitle norms rather than one cue per utterance: at most ``MAX_LINES`` lines
# of at most ``MAX_LINE_CHARS`` characters, on screen for at most ``MAX_CUE_S`` seconds. The same
# rules are implemented once more, line for line, in the browser app (``web/static/cues.js``);
# ``tests/test_web_app.py`` checks that both cut the same words into the same cues.

MAX_LINE_CHARS = 42
MAX_LINES = 2
MAX_CUE_S = 7.0
MIN_CUE_S = 1.0  # a short cue stays up this long, unless the next cue (or its utterance's end) comes first
_BREAK_AFTER = re.compile(r"[.,!?;:\u2026\u2014][\"')\]\u201d\u2019]*$")  # punctuation that makes a good cue end


@dataclasses.dataclass(frozen=True)
class TimedWord:
    text: str
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Cue:
    start: float
    end: float
    lines: tuple[str, ...]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def wrap_lines(tokens: Sequence[str]) -> list[str]:
    """The tokens as one line, or as the two lines whose longer one is shortest (ties: the shorter
    line on top). Only word boundaries are used, so an over-long single word stays one long line."""
    text = " ".join(tokens)
    if len(text) <= MAX_LINE_CHARS or len(tokens) < 2:
        return [text]
    best: list[str] = []
    best_key: tuple[int, int] | None = None
    for i in range(1, len(tokens)):
        top, bottom = " ".join(tokens[:i]), " ".join(tokens[i:])
        key = (max(len(top), len(bottom)), len(top))
        if best_key is None or key < best_key:
            best, best_key = [top, bottom], key
    return best


def _fits(tokens: Sequence[str]) -> bool:
    lines = wrap_lines(tokens)
    return len(lines) <= MAX_LINES and all(len(line) <= MAX_LINE_CHARS for line in lines)


def cue_split(words: Sequence[TimedWord], *, prefix: str = "", until: float | None = None) -> list[Cue]:
    """Cut one utterance's timed words into cues.

    Words are added to a cue while its text still wraps into ``MAX_LINES`` lines of
    ``MAX_LINE_CHARS`` and it lasts at most ``MAX_CUE_S``. When a word no longer fits, the cue
    ends after the last punctuation in its second half if there is one (so that cues end at
    clause ends), else before the word. ``prefix`` (a speaker label such as ``"agent:"``) starts
    every cue and counts towards its length. ``until`` (the utterance's end) bounds how far a
    short last cue is stretched towards ``MIN_CUE_S``.
    """
    head = [prefix.strip()] if prefix.strip() else []
    groups: list[list[TimedWord]] = []
    current: list[TimedWord] = []

    def fits(group: list[TimedWord]) -> bool:
        if not group:
            return True
        return _fits(head + [w.text for w in group]) and group[-1].end - group[0].start <= MAX_CUE_S

    for word in words:
        if current and not fits([*current, word]):
            cut = next(
                (i + 1 for i in range(len(current) - 2, -1, -1) if 2 * (i + 1) >= len(current) and _BREAK_AFTER.search(current[i].text)),
                len(current),
            )
            groups.append(current[:cut])
            current = current[cut:]
            if current and not fits([*current, word]):
                groups.append(current)
                current = []
        current.append(word)
    if current:
        groups.append(current)

    cues: list[Cue] = []
    for index, group in enumerate(groups):
        start = group[0].start
        end = max(group[-1].end, start)
        limit = groups[index + 1][0].start if index + 1 < len(groups) else max(until if until is not None else end, end)
        end = max(min(max(end, start + MIN_CUE_S), limit), start)
        cues.append(Cue(round(start, 3), round(end, 3), tuple(wrap_lines(head + [w.text for w in group]))))
    return cues


def _word_fields(word: Any) -> tuple[str, float, float]:
    if isinstance(word, Mapping):
        return str(word.get("word", "")), float(word.get("start") or 0.0), float(word.get("end") or 0.0)
    return str(word.word), float(word.start), float(word.end)


def timed_words(text: str, start: float, end: float, words: Sequence[Any] | None = None) -> list[TimedWord]:
    """An utterance's words with times: the decoder's word timings (``WordTiming`` objects or
    their wire dicts) when they spell the utterance's text, else the text's words with times
    spread over ``[start, end]`` in proportion to their characters."""
    tokens = text.split()
    if words:
        timed: list[TimedWord] = []
        for word in words:
            spelled, w_start, w_end = _word_fields(word)
            timed.extend(TimedWord(part, w_start, max(w_end, w_start)) for part in spelled.split())
        if [w.text for w in timed] == tokens:
            return timed
    total = len(" ".join(tokens))
    span = max(end - start, 0.0)
    out, offset = [], 0
    for token in tokens:
        out.append(TimedWord(token, start + span * offset / total, start + span * (offset + len(token)) / total))
        offset += len(token) + 1
    return out


def segment_cues(text: str, start: float, end: float, words: Sequence[Any] | None = None, *, prefix: str = "") -> list[Cue]:
    """One utterance (a final segment) as subtitle cues."""
    return cue_split(timed_words(text.strip(), start, end, words), prefix=prefix, until=end)


def without_overlaps(cues: Sequence[Cue]) -> list[Cue]:
    """One voice's cues with each ending no later than the next one starts (utterances' padded
    ends can reach into the next utterance; a player would show both cues at once)."""
    out = list(cues)
    for i in range(len(out) - 1):
        if out[i + 1].start < out[i].end:
            out[i] = dataclasses.replace(out[i], end=max(out[i].start, out[i + 1].start))
    return out


def cues_of(segments: Sequence[p.TranscriptSegment]) -> list[Cue]:
    """A single voice's segments (a file, one channel) as cues in time order."""
    ordered = sorted(spoken(list(segments)), key=lambda seg: seg.start)
    return without_overlaps([cue for seg in ordered for cue in segment_cues(seg.text, seg.start, seg.end, seg.words)])


def speaker_name(speaker: str | None, channel: int) -> str:
    """How a transcript names a voice: its label, else its channel."""
    return speaker or f"channel {channel}"


def conversation_cues(segments: Sequence[p.TranscriptSegment]) -> list[Cue]:
    """Several voices' segments (a call's channels) as cues in time order, each starting with its
    speaker; unlike one voice's, their cues may overlap (people talk over each other)."""
    ordered = sorted(spoken(list(segments)), key=lambda seg: (seg.start, seg.channel))
    cues = [
        cue
        for seg in ordered
        for cue in segment_cues(seg.text, seg.start, seg.end, seg.words, prefix=f"{speaker_name(seg.speaker, seg.channel)}:")
    ]
    return sorted(cues, key=lambda cue: cue.start)


def render_srt(cues: Sequence[Cue]) -> str:
    return "\n".join(f"{i}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{c.text}\n" for i, c in enumerate(cues, 1))


def render_vtt(cues: Sequence[Cue]) -> str:
    return "\n".join(["WEBVTT\n", *(f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{c.text}\n" for c in cues)])


def to_srt(segments: Sequence[p.TranscriptSegment]) -> str:
    return render_srt(cues_of(segments))


def to_vtt(segments: Sequence[p.TranscriptSegment]) -> str:
    return render_vtt(cues_of(segments))


def _in_order(segments: list[p.TranscriptSegment], channels: bool) -> list[p.TranscriptSegment]:
    """The spoken segments as ``segments_json`` numbers them: a split recording's channels
    interleaved in time order (their finals come in decode order)."""
    ordered = spoken(segments)
    return sorted(ordered, key=lambda seg: (seg.start, seg.channel)) if channels else ordered


def _voice(seg: p.TranscriptSegment, channels: bool) -> dict[str, Any]:
    """A segment's ``channel`` and ``speaker`` fields where the file was split by channel."""
    return {"channel": seg.channel, "speaker": seg.speaker} if channels else {}


def words_json(segments: list[p.TranscriptSegment], *, channels: bool = False) -> list[dict[str, Any]]:
    """OpenAI's ``words`` (word, start, end) plus AI Refinery's ``confidence`` and ``segment``;
    with ``channels``, each word's channel and speaker (a split recording's words interleave)."""
    out = []
    for index, seg in enumerate(_in_order(segments, channels)):
        for word in seg.words or []:
            out.append(
                {
                    "word": word.word,
                    "start": word.start,
                    "end": max(word.end, word.start),
                    "confidence": min(1.0, max(0.0, word.probability)),
                    "segment": index,
                    **_voice(seg, channels),
                }
            )
    return out


def segments_json(segments: list[p.TranscriptSegment], *, channels: bool = False) -> list[dict[str, Any]]:
    """Whisper's segment objects in time order; with ``channels``, each segment's channel and speaker."""
    out = []
    for index, seg in enumerate(_in_order(segments, channels)):
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
                **_voice(seg, channels),
            }
        )
    return out


def channels_json(done: p.TranscriptDone) -> dict[str, Any]:
    """A split recording's text per channel and its conversation (``transcript.text.done``'s
    ``channels`` and ``turns``), as the session transcript API shows a call's."""
    return {
        "channels": [{"channel": c.channel, "speaker": c.speaker, "text": c.text} for c in done.channels],
        "turns": [{"channel": t.channel, "speaker": t.speaker, "start": t.start, "end": t.end, "text": t.text.strip()} for t in done.turns],
    }
