"""Rendering committed words: delta text and logprobs, segments, interims, done, word timings."""

from __future__ import annotations

from stream_server import protocol as p
from stream_server.decoding import Token, Word
from stream_server.transcript import Transcript, done, interim, segment, word_timings

RATE = 16000


def w(text: str, start: float, end: float, logprob: float = -0.1) -> Word:
    return Word(text, start, end, (Token(1, text, logprob),))


def test_the_first_delta_and_its_first_token_lose_the_leading_space() -> None:
    t = Transcript()
    first = t.delta("item_1", [w(" Hello", 0.0, 0.4), w(" there", 0.5, 0.8)], logprobs=True, timings=False)
    assert first is not None and first.delta == "Hello there" and first.words is None
    assert first.logprobs is not None and [lp.token for lp in first.logprobs] == ["Hello", " there"]
    second = t.delta("item_2", [w(" again", 1.0, 1.3)], logprobs=False, timings=True)
    assert second is not None and second.delta == " again" and second.logprobs is None
    assert second.words == [p.WordTiming("again", 1.0, 1.3, 0.9048)]
    finished = done([t], [], [None], 2.34567, logprobs=True)
    assert finished.text == "Hello there again" == first.delta + second.delta
    assert finished.logprobs is not None and [lp.token for lp in finished.logprobs] == ["Hello", " there", " again"]
    assert finished.usage == p.Usage(2.346)
    assert finished.channels == [p.ChannelText(0, None, "Hello there again")]
    assert done([t], [], [None], 1.0, logprobs=False).logprobs is None


def test_done_of_two_channels_is_a_time_ordered_conversation() -> None:
    def seg(channel: int, speaker: str, start: float, text: str) -> p.TranscriptSegment:
        logprobs = [p.TokenLogprob.of(" " + text, -0.1)]
        return p.TranscriptSegment(f"item_{channel}_{start}", start, start + 1, text, logprobs, None, -0.1, 0.0, channel, speaker)

    agent, customer = Transcript(), Transcript()
    agent.delta("a1", [w(" Hello, how can I help?", 0.2, 1.5)], logprobs=True, timings=False)
    customer.delta("c1", [w(" My card is blocked.", 1.4, 2.8)], logprobs=True, timings=False)
    segments = [seg(1, "customer", 1.4, "My card is blocked."), seg(0, "agent", 0.2, "Hello, how can I help?"), seg(1, "customer", 5.0, "")]
    finished = done([agent, customer], segments, ["agent", "customer"], 6.0, logprobs=True)
    assert finished.text == "agent: Hello, how can I help?\ncustomer: My card is blocked."
    assert [(t.speaker, t.start) for t in finished.turns] == [("agent", 0.2), ("customer", 1.4)]  # empty turns left out
    assert [c.text for c in finished.channels] == ["Hello, how can I help?", "My card is blocked."]
    assert finished.logprobs is not None and [lp.token for lp in finished.logprobs] == [" Hello, how can I help?", " My card is blocked."]


def test_words_that_add_no_text_send_no_delta() -> None:
    t = Transcript()
    assert t.delta("item_1", [w(" ", 0.0, 0.1)], logprobs=True, timings=True) is None
    assert t.delta("item_1", [], logprobs=True, timings=True) is None
    assert t.text == ""


def test_segment_spans_its_words_and_averages_logprobs() -> None:
    seg = segment("item_1", [w(" a", 1.0, 1.2, -0.2), w(" b", 1.3, 1.5, -0.4)], onset=14400, end=25000, no_speech_prob=0.012345, logprobs=True, timings=True)
    assert (seg.start, seg.end, seg.text) == (1.0, 1.562, "a b")
    assert seg.avg_logprob == -0.3 and seg.no_speech_prob == 0.0123
    assert seg.words is not None and [x.word for x in seg.words] == ["a", "b"]
    empty = segment("item_2", [], onset=RATE, end=None, no_speech_prob=0.0, logprobs=False, timings=False)
    assert (empty.start, empty.end, empty.text, empty.avg_logprob, empty.logprobs, empty.words) == (1.0, 1.0, "", 0.0, None, None)


def test_interim_clears_with_no_words() -> None:
    assert interim("item_1", [], timings=True) == p.TranscriptInterim("item_1", "", [])
    assert interim("item_1", [w(" a", 0.0, 0.2)], timings=False) == p.TranscriptInterim("item_1", " a", None)


def test_punctuation_committed_alone_joins_the_word_before() -> None:
    timings = word_timings([w(" Hello", 0.0, 0.4), w(",", 0.4, 0.45), w(" world", 0.5, 0.9), w(" 42", 1.0, 1.2)])
    assert [(x.word, x.start, x.end) for x in timings] == [("Hello,", 0.0, 0.45), ("world", 0.5, 0.9), ("42", 1.0, 1.2)]
