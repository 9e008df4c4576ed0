"""Deepgram's pre-recorded response as ``http/deepgram_api.py`` builds it, without a server:
``paragraphs`` (``paragraphs=true``). The route itself is tested through the real SDK in
``test_deepgram_e2e.py`` (and with URLs and callbacks in ``test_deepgram_callbacks.py``)."""

from __future__ import annotations

from deepgram.types.listen_v1response_results_channels_item_alternatives_item_paragraphs import (
    ListenV1ResponseResultsChannelsItemAlternativesItemParagraphs,
)

from stream_server import protocol as p
from stream_server.http.deepgram_api import PARAGRAPH_GAP_S, paragraphs_of


def turn(start: float, *words: str, step: float = 0.3) -> p.TranscriptSegment:
    timings = [p.WordTiming(w, round(start + i * step, 3), round(start + i * step + 0.25, 3), 0.9) for i, w in enumerate(words)]
    return p.TranscriptSegment(
        item_id=f"item_{start}", start=start, end=timings[-1].end, text="".join(words), logprobs=None, words=timings,
        avg_logprob=-0.1, no_speech_prob=0.0,
    )


def test_turns_become_paragraphs_of_sentences_as_deepgram_writes_them() -> None:
    first = turn(0.5, " Hello", " there.", " How", " are", " you", "?")  # a mark sent as a word of its own
    second = turn(first.end + 0.6, " I'm", " fine,", " thanks.")  # a short pause: the same paragraph
    third = turn(second.end + PARAGRAPH_GAP_S + 0.1, " Goodbye")  # a long one: a new paragraph; no closing mark
    body = paragraphs_of([first, second, third])
    assert body["transcript"] == "\nHello there. How are you? I'm fine, thanks.\n\nGoodbye"
    one, two = body["paragraphs"]
    assert [s["text"] for s in one["sentences"]] == ["Hello there.", "How are you?", "I'm fine, thanks."]
    assert one["num_words"] == 8 and two["num_words"] == 1
    assert (one["start"], one["end"]) == (0.5, second.end) and (two["start"], two["end"]) == (third.start, third.end)
    assert one["sentences"][1] == {"text": "How are you?", "start": 1.1, "end": 1.95}
    parsed = ListenV1ResponseResultsChannelsItemAlternativesItemParagraphs.model_validate(body)
    assert parsed.paragraphs and parsed.paragraphs[0].sentences and parsed.paragraphs[0].sentences[0].text == "Hello there."
    assert paragraphs_of([]) == {"transcript": "", "paragraphs": []}


def test_a_long_paragraph_is_closed_at_the_next_turn() -> None:
    many = [turn(i * 3.0, *[" word"] * 29, " end.", step=0.05) for i in range(3)]  # 30 words each, 1.5 s apart
    assert [p["num_words"] for p in paragraphs_of(many)["paragraphs"]] == [60, 30]
