"""Rendering core events from committed words: deltas, interims, segments and done.

The session decides *which* words are final (``policy.py``); this module decides how they read on
the wire: the text of each delta, its token log probabilities, word timings, and the totals that
``transcript.text.done`` repeats. :class:`Transcript` is the one piece of state: the session's
committed text so far, so that the deltas spell exactly the final text.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stream_server import protocol as p
from stream_server.audio import MODEL_RATE
from stream_server.decoding import Word


class Transcript:
    """Everything the deltas have spelled so far, and their token log probabilities."""

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._logprobs: list[p.TokenLogprob] = []

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def delta(
        self, item_id: str, words: Sequence[Word], *, logprobs: bool, timings: bool, language: str | None = None
    ) -> p.TranscriptDelta | None:
        """The delta that commits ``words`` (decoded in ``language``), or None when they add no text.

        The session's text never starts with a space (Whisper's words carry a leading one), so the
        first delta, and its first token, are left-stripped: the deltas concatenate to ``done``.
        """
        text = "".join(w.text for w in words)
        if not self._parts:
            text = text.lstrip()
        if not text:
            return None
        self._parts.append(text)
        tokens = [p.TokenLogprob.of(t.text, t.logprob) for w in words for t in w.tokens]
        if tokens and not "".join(self._parts[:-1]):
            tokens[0] = p.TokenLogprob.of(tokens[0].token.lstrip(), tokens[0].logprob)
        self._logprobs.extend(tokens)
        return p.TranscriptDelta(
            item_id, text, tokens if logprobs else None, word_timings(words) if timings else None, language=language
        )

    @property
    def logprobs(self) -> list[p.TokenLogprob]:
        return self._logprobs


def done(
    transcripts: Sequence[Transcript],
    segments: Sequence[p.TranscriptSegment],
    speakers: Sequence[str | None],
    audio_seconds: float,
    *,
    logprobs: bool,
) -> p.TranscriptDone:
    """The session's last event: the text (per channel and as one conversation), every token's
    logprob and the audio heard.

    With one channel, ``text`` is that channel's text (the concatenation of its deltas). With
    several, it is the conversation: each turn on its own line as ``speaker: text``, in time
    order, and ``logprobs`` follow the turns.
    """
    turns = [
        p.Turn(s.channel, s.speaker, s.start, s.end, s.text)
        for s in sorted(segments, key=lambda s: (s.start, s.channel))
        if s.text
    ]
    channels = [p.ChannelText(c, speakers[c], t.text) for c, t in enumerate(transcripts)]
    if len(transcripts) == 1:
        text, tokens = transcripts[0].text, transcripts[0].logprobs
    else:
        text = "\n".join(f"{t.speaker or f'channel {t.channel}'}: {t.text}" for t in turns)
        ordered = sorted(segments, key=lambda s: (s.start, s.channel))
        tokens = [lp for s in ordered if s.text for lp in (s.logprobs or [])]
    usage = p.Usage(round(audio_seconds, 3))
    return p.TranscriptDone(text, tokens if logprobs else None, usage, channels=channels, turns=turns)


def interim(item_id: str, words: Sequence[Word], *, timings: bool) -> p.TranscriptInterim:
    """The caption of an utterance's uncommitted words (empty: the caption is cleared)."""
    return p.TranscriptInterim(item_id, "".join(w.text for w in words), word_timings(words) if timings else None)


def segment(
    item_id: str,
    words: Sequence[Word],
    *,
    onset: int,
    end: int | None,
    no_speech_prob: float,
    logprobs: bool,
    timings: bool,
    language: str | None = None,
) -> p.TranscriptSegment:
    """One finished utterance: its committed ``words`` (absolute times) and audio span.

    ``onset`` and ``end`` are the VAD's speech start and end in samples; the segment starts at its
    first word when it has one (the utterance's audio includes prefix padding). ``language`` is
    the language its last decode ran in (None when it had none).
    """
    tokens = [t for w in words for t in w.tokens]
    values = [t.logprob for t in tokens]
    start_s = words[0].start if words else onset / MODEL_RATE
    end_s = (end or onset) / MODEL_RATE
    return p.TranscriptSegment(
        item_id=item_id,
        start=round(float(min(start_s, end_s)), 3),
        end=round(float(end_s), 3),
        text="".join(w.text for w in words).strip(),
        logprobs=[p.TokenLogprob.of(t.text, t.logprob) for t in tokens] if logprobs else None,
        words=word_timings(words) if timings else None,
        avg_logprob=round(float(np.mean(values)), 4) if values else 0.0,
        no_speech_prob=round(no_speech_prob, 4),
        language=language,
    )


def word_timings(words: Sequence[Word]) -> list[p.WordTiming]:
    """Words for the client; punctuation committed on its own joins the word before it."""
    merged: list[Word] = []
    for word in words:
        text = word.text
        if merged and not text.startswith(" ") and text.strip() and not any(c.isalnum() for c in text):
            last = merged[-1]
            merged[-1] = Word(last.text + text, last.start, max(last.end, word.end), last.tokens + word.tokens)
        else:
            merged.append(word)
    return [p.WordTiming(w.text.strip(), round(w.start, 3), round(w.end, 3), round(w.probability, 4)) for w in merged]
