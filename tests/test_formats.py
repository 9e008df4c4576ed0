"""Subtitle cues cut to norms (``stream_server.formats.cue_split``): at most two lines of 42
characters, at most 7 s each, every word kept in order, cues in time order and never overlapping.
The same rules in the browser (``web/static/cues.js``) are checked against these in
``tests/test_web_app.py``."""

from __future__ import annotations

import io
import itertools
import re

import pytest

from mic_client.writers import SrtWriter
from stream_server import formats
from stream_server import protocol as p
from stream_server.formats import MAX_CUE_S, MAX_LINE_CHARS, MAX_LINES, TimedWord, cue_split, segment_cues, timed_words, wrap_lines

# A 30 s phone-call turn of ~80 words: the kind of utterance that used to become a single cue.
LONG = (
    "Thanks for calling, this is Dana from the billing team. I can see your account here, and it looks "
    "like the last payment went through on the fourth, but the refund for the duplicate charge has not "
    "been issued yet. What I'll do is open a ticket with our payments group, they usually take two to "
    "three business days, and you will get an email as soon as it is processed. Is there anything else "
    "I can help you with today?"
)


def even_words(text: str, start: float = 0.0, per_word: float = 0.37) -> list[TimedWord]:
    return [TimedWord(w, start + i * per_word, start + i * per_word + per_word * 0.8) for i, w in enumerate(text.split())]


def check_norms(cues: list[formats.Cue], words: list[str]) -> None:
    assert [w for c in cues for line in c.lines for w in line.split()] == words, "words lost, added or reordered"
    for cue in cues:
        assert 1 <= len(cue.lines) <= MAX_LINES, cue
        assert all(len(line) <= MAX_LINE_CHARS for line in cue.lines), cue
        assert cue.start <= cue.end and cue.end - cue.start <= MAX_CUE_S + 1e-9, cue
    for a, b in itertools.pairwise(cues):
        assert a.end <= b.start + 1e-9, ("overlap", a, b)


def test_a_long_turn_becomes_many_short_cues() -> None:
    words = even_words(LONG)
    cues = cue_split(words)
    check_norms(cues, LONG.split())
    assert len(cues) >= 6, [c.text for c in cues]
    # Cues prefer to end at punctuation when one is in their second half.
    ends = [c.lines[-1].split()[-1] for c in cues[:-1]]
    assert sum(bool(re.search(r"[.,?!]$", w)) for w in ends) >= len(ends) // 2, ends


def test_time_limit_cuts_slow_speech() -> None:
    slow = even_words("one two three four five six seven eight nine ten", per_word=1.5)
    cues = cue_split(slow)
    check_norms(cues, [w.text for w in slow])
    assert len(cues) >= 3  # 15 s of words: far under 84 characters, but over 7 s


def test_short_text_is_one_line_and_long_text_two_balanced_lines() -> None:
    assert wrap_lines(["Hello", "world."]) == ["Hello world."]
    lines = wrap_lines("For the twentieth time that evening the two men shook hands.".split())
    assert len(lines) == 2 and all(len(line) <= MAX_LINE_CHARS for line in lines)
    assert abs(len(lines[0]) - len(lines[1])) <= 8
    assert wrap_lines(["x" * 60]) == ["x" * 60]  # one over-long word cannot be broken


def test_a_short_cue_stays_up_a_second_but_never_overlaps_the_next() -> None:
    [cue] = cue_split([TimedWord("Yes.", 2.0, 2.2)], until=5.0)
    assert (cue.start, cue.end) == (2.0, 3.0)
    [cue] = cue_split([TimedWord("Yes.", 2.0, 2.2)], until=2.5)
    assert cue.end == 2.5
    cues = cue_split([TimedWord("a" * 40, 0.0, 0.1), TimedWord("b" * 40, 0.2, 0.3), TimedWord("c" * 40, 0.4, 0.5)])
    assert len(cues) == 2 and cues[0].end == cues[1].start == 0.4


def test_speaker_prefix_starts_every_cue_and_counts_towards_the_length() -> None:
    cues = segment_cues(LONG, 0.0, 30.0, prefix="agent:")
    assert len(cues) >= 6
    assert all(c.lines[0].startswith("agent: ") for c in cues)
    check_norms(cues, [w for c in cues for w in " ".join(c.lines).split()])


def test_words_come_from_the_decoder_when_they_spell_the_text_else_are_spread_over_the_turn() -> None:
    words = [{"word": " Hello", "start": 0.5, "end": 0.9, "probability": 0.9}, {"word": " there.", "start": 1.0, "end": 1.4, "probability": 0.9}]
    assert timed_words("Hello there.", 0.0, 2.0, words) == [TimedWord("Hello", 0.5, 0.9), TimedWord("there.", 1.0, 1.4)]
    spread = timed_words("Hello there!", 0.0, 2.4, words)  # words disagree with the text: spread
    assert [w.text for w in spread] == ["Hello", "there!"]
    assert spread[0].start == 0.0 and spread[-1].end == pytest.approx(2.4)
    assert timed_words("", 0.0, 1.0) == []


def seg(text: str, start: float, end: float, words: list[p.WordTiming] | None = None) -> p.TranscriptSegment:
    return p.TranscriptSegment("item", start, end, text, None, words, 0.0, 0.0)


def test_srt_and_vtt_from_segments() -> None:
    timings = [p.WordTiming(w.text, w.start, w.end, 0.9) for w in even_words(LONG, start=3.0)]
    segments = [seg(LONG, 3.0, 33.0, timings), seg("  ", 34.0, 35.0), seg("Goodbye.", 36.0, 36.5)]
    srt = formats.to_srt(segments)
    blocks = srt.strip().split("\n\n")
    assert [b.splitlines()[0] for b in blocks] == [str(i) for i in range(1, len(blocks) + 1)]
    assert blocks[0].splitlines()[1].startswith("00:00:03,000 --> ")
    assert blocks[-1].splitlines()[1:] == ["00:00:36,000 --> 00:00:36,500", "Goodbye."]
    assert all(2 <= len(b.splitlines()) - 1 <= 3 for b in blocks)
    vtt = formats.to_vtt(segments)
    assert vtt.startswith("WEBVTT\n\n00:00:03.000 --> ") and vtt.count(" --> ") == len(blocks)


def test_a_recording_split_by_channel() -> None:
    """Finals of two channels come in decode order: the JSON numbers them in time order (and each
    word names its own segment), cues say who speaks and may overlap, and the done event's text
    per channel and conversation come out as the transcript API shows a call's."""
    agent = p.TranscriptSegment("a", 0.0, 2.0, "Hello, billing.", None, [p.WordTiming(" Hello,", 0.1, 0.5, 0.9), p.WordTiming(" billing.", 0.6, 1.9, 0.8)], -0.2, 0.0, channel=0, speaker="agent")
    caller = p.TranscriptSegment("b", 1.5, 3.0, "Hi.", None, [p.WordTiming(" Hi.", 1.6, 2.9, 0.7)], -0.3, 0.0, channel=1, speaker=None)
    segments = [caller, agent]  # the caller's short turn was final first
    as_json = formats.segments_json(segments, channels=True)
    assert [(s["id"], s["channel"], s["speaker"], s["text"]) for s in as_json] == [(0, 0, "agent", " Hello, billing."), (1, 1, None, " Hi.")]
    assert [(w["word"], w["segment"], w["channel"]) for w in formats.words_json(segments, channels=True)] == [
        (" Hello,", 0, 0), (" billing.", 0, 0), (" Hi.", 1, 1)
    ]
    assert "channel" not in formats.segments_json(segments)[0], "one voice: OpenAI's fields only"
    cues = formats.conversation_cues(segments)
    assert [(c.start, c.text) for c in cues] == [(0.1, "agent: Hello, billing."), (1.6, "channel 1: Hi.")]
    assert cues[0].end > cues[1].start, "two voices may overlap"
    done = p.TranscriptDone("agent: Hello, billing.\nchannel 1: Hi.", None, p.Usage(3.0), channels=[p.ChannelText(0, "agent", "Hello, billing."), p.ChannelText(1, None, "Hi.")],
                            turns=[p.Turn(0, "agent", 0.0, 2.0, "Hello, billing."), p.Turn(1, None, 1.5, 3.0, " Hi.")])
    assert formats.channels_json(done) == {
        "channels": [{"channel": 0, "speaker": "agent", "text": "Hello, billing."}, {"channel": 1, "speaker": None, "text": "Hi."}],
        "turns": [{"channel": 0, "speaker": "agent", "start": 0.0, "end": 2.0, "text": "Hello, billing."}, {"channel": 1, "speaker": None, "start": 1.5, "end": 3.0, "text": "Hi."}],
    }


def test_mic_client_srt_writer_uses_the_same_cues() -> None:
    buffer = io.StringIO()
    writer = SrtWriter(buffer, channels=2, labels=["agent", "customer"])
    writer.write({"type": "transcript.segment", "text": LONG, "start": 0.0, "end": 30.0, "channel": 0, "speaker": "agent"}, 0.0)
    writer.write({"type": "transcript.segment", "text": "Thanks.", "start": 30.5, "end": 31.0, "channel": 1, "speaker": "customer"}, 0.0)
    expected = segment_cues(LONG, 0.0, 30.0, prefix="agent:")
    assert writer.cues == len(expected) + 1
    blocks = buffer.getvalue().strip().split("\n\n")
    assert ["\n".join(b.splitlines()[2:]) for b in blocks] == [c.text for c in expected] + ["customer: Thanks."]
