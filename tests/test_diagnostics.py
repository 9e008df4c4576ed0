"""Per-utterance diffs and decode traces of a replay (``--per-utterance``, ``--trace``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from stream_server.bench.corpus import Stream, Utterance
from stream_server.bench.diagnostics import (
    TracingDecoder,
    final_words_by_utterance,
    join_words,
    merge_rows,
    owning_utterance,
    per_utterance_markdown,
    per_utterance_wer,
    trace_spans,
    trace_text,
    utterance_rows,
    write_level_per_utterance,
)
from stream_server.bench.metrics import wer_counts
from stream_server.bench.runner import _write_events, events_path
from stream_server.decoding import DecodeRequest, DecodeResult, Token, Word

UTTERANCES = [
    Utterance("clip_a", "the cat sat", 1.0, 2.0, 0.9, 2.1),
    Utterance("clip_b", "on the mat", 3.0, 4.0, 2.9, 4.1),
]
STREAM = Stream(index=0, sample_rate=16000, samples=np.zeros(16000 * 5, dtype=np.int16), utterances=list(UTTERANCES))


def segment(*words: tuple[str, float, float]) -> dict[str, object]:
    return {"type": "transcript.segment", "words": [{"word": w, "start": a, "end": b} for w, a, b in words]}


def test_a_word_belongs_to_the_utterance_holding_its_middle_else_the_nearest() -> None:
    assert owning_utterance(UTTERANCES, 1.5) == 0
    assert owning_utterance(UTTERANCES, 3.5) == 1
    assert owning_utterance(UTTERANCES, 2.3) == 0  # in the pause, nearer the first
    assert owning_utterance(UTTERANCES, 2.8) == 1
    assert owning_utterance(UTTERANCES, 9.0) == 1


def test_final_words_are_split_across_utterances_by_time_even_inside_one_segment() -> None:
    events = [
        (2.5, segment(("The", 1.0, 1.2), ("cat", 1.3, 1.5), ("sat.", 1.6, 1.9), ("On", 2.95, 3.1))),
        (4.5, {"type": "transcript.text.delta", "delta": " ignored"}),
        (4.6, segment(("the", 3.2, 3.4), ("mat.", 3.5, 3.9))),
    ]
    assert final_words_by_utterance(events, UTTERANCES) == [["The", "cat", "sat."], ["On", "the", "mat."]]


def test_pieces_whisper_split_off_a_word_join_it_again() -> None:
    assert join_words(["rather", "cold", "-hearted", "and", "don", "'t"]) == "rather cold-hearted and don't"
    assert join_words(["-x"]) == "-x"
    assert join_words([]) == ""


def test_rows_score_each_utterance_alone_and_the_report_puts_the_worst_streaming_first() -> None:
    events = [(2.5, segment(("The", 1.0, 1.2), ("cat", 1.3, 1.5), ("cat", 1.5, 1.5), ("sat.", 1.6, 1.9))),
              (4.6, segment(("On", 3.0, 3.2), ("a", 3.2, 3.4), ("mat.", 3.5, 3.9)))]
    offline = {"clip_a": "The cat sat.", "clip_b": "On the hat."}
    rows = utterance_rows(STREAM, events, offline)
    assert [(r.clip_id, r.streaming_errors, r.offline_errors, r.excess) for r in rows] == [
        ("clip_a", 1, 0, 1),  # the inserted "cat"
        ("clip_b", 1, 1, 0),
    ]
    report = per_utterance_markdown(rows)
    assert "streaming 33.33%, offline 16.67% over 6 words, 2 utterances" in report
    assert "| +1 | 1 | clip_a | the cat sat | The cat cat sat. | The cat sat. |" in report
    assert "clip_b" not in report  # equal errors: not listed


def test_a_clip_heard_in_several_runs_is_one_row_with_each_reading_counted() -> None:
    """Repeats (and streams sharing clips) hear a clip more than once: a loss every run makes
    must stand apart from one draw's."""
    heard = [
        [(2.5, segment(("The", 1.0, 1.2), ("cat", 1.3, 1.5), ("cat", 1.5, 1.5), ("sat.", 1.6, 1.9)))],
        [(2.5, segment(("The", 1.0, 1.2), ("cat", 1.3, 1.5), ("sat.", 1.6, 1.9)))],
        [(2.5, segment(("The", 1.0, 1.2), ("cat", 1.3, 1.5), ("cat", 1.5, 1.5), ("sat.", 1.6, 1.9)))],
    ]
    rows = [row for events in heard for row in utterance_rows(STREAM, events, {"clip_a": "The cat sat.", "clip_b": ""})]
    merged = merge_rows(rows)
    assert [(r.clip_id, r.occurrences, r.streaming_errors, r.reference_words) for r in merged] == [("clip_a", 3, 2, 9), ("clip_b", 3, 9, 9)]
    assert merged[0].streaming == "The cat cat sat. (×2) ‖ The cat sat. (×1)"
    assert merged[1].streaming == ""  # one reading (lost every time): shown as it is
    report = per_utterance_markdown(rows)
    assert "over 18 words, 6 utterances" in report
    assert "| +2 | 3 | clip_a | the cat sat | The cat cat sat. (×2) ‖ The cat sat. (×1) | The cat sat. |" in report


def test_each_utterance_scored_alone_reads_no_number_across_a_boundary() -> None:
    """Normalised as one text, "Four. One." is "41" and the reference "4 1" is "4 one": two
    errors where the transcript has none. Scored alone, each utterance is right."""
    digits = Stream(0, 16000, np.zeros(16000 * 5, dtype=np.int16), [
        Utterance("four", "4", 1.0, 1.5, 0.9, 1.6), Utterance("one", "1", 3.0, 3.5, 2.9, 3.6)])
    events = [(2.0, segment(("Four.", 1.1, 1.4))), (4.0, segment(("One.", 3.1, 3.4)))]
    assert wer_counts("4 1", "Four. One.").errors == 2
    figures = per_utterance_wer([(digits, events), (digits, events[:1])], {"beam1": {"four": "for", "one": "1"}})
    # Two runs: the second lost "one"; offline misread "four" in both.
    assert figures == {"wer_per_utterance": pytest.approx(1 / 4), "offline_wer_per_utterance_beam1": pytest.approx(2 / 4)}


def test_an_utterance_streaming_lost_shows_as_empty() -> None:
    rows = utterance_rows(STREAM, [(2.5, segment(("The", 1.0, 1.2), ("cat", 1.3, 1.5), ("sat.", 1.6, 1.9)))], {"clip_b": "on the mat"})
    assert rows[1].streaming == "" and rows[1].excess == 3
    assert "| +3 | 1 | clip_b | on the mat | ∅ | on the mat |" in per_utterance_markdown(rows)


def test_a_live_levels_report_is_read_from_the_events_its_clients_wrote(tmp_path: Path) -> None:
    events = [(2.5, segment(("The", 1.0, 1.2), ("cat", 1.3, 1.5), ("sat.", 1.6, 1.9))), (4.6, segment(("On", 3.0, 3.2), ("the", 3.2, 3.4), ("mat.", 3.5, 3.9)))]
    _write_events(events_path(tmp_path, STREAM.index), events)
    path = write_level_per_utterance(tmp_path, [STREAM], {"clip_a": "the cat", "clip_b": "on the mat"})
    assert path == tmp_path / "per_utterance.md"
    assert path.read_text().startswith("Per-utterance WER (each utterance scored alone): streaming 0.00%, offline 16.67% over 6 words")
    assert "| -1 | 1 | clip_a |" in path.read_text()


class Recorded:
    """Stands in for the Whisper decoder: a trace's subject is what the session asks for."""

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]:
        word = Word(" mat.", 0.5, 0.9, (Token(1, " mat", -0.2), Token(2, ".", -0.3)))
        return [DecodeResult(words=(word,), language="en", no_speech_prob=0.0, avg_logprob=-0.25) for _ in requests]

    def decode_tokens(self, ids: Sequence[int]) -> str:
        return " ".join(f"<{i}>" for i in ids)


def test_the_trace_keeps_decodes_and_events_near_the_chosen_clips_only() -> None:
    spans = trace_spans(STREAM, ["clip_b"])
    assert spans == [(2.4, 5.6)]
    now = [1.0]
    tracing = TracingDecoder(Recorded(), spans, now=lambda: now[0])  # type: ignore[arg-type]
    request = DecodeRequest(audio=np.zeros(8000, dtype=np.float32), prefix=(7, 8), prompt="the cat sat.", final=True)
    tracing.decode_batch([request])  # at 1.0 s: before the span
    now[0] = 3.3
    tracing.decode_batch([request])
    assert len(tracing.decodes) == 1
    events = [(1.2, {"type": "transcript.text.delta", "item_id": "i1", "delta": " cat"}),
              (3.4, {"type": "transcript.segment", "item_id": "i2", "text": "on the mat."})]
    text = trace_text(STREAM, ["clip_b"], tracing.decodes, events)
    assert text.startswith("clip clip_b: audio 2.90-4.10 s, speech 3.00-4.00 s: on the mat\n")
    assert "3.30 decode FINAL  window 0.50 s, prompt …'the cat sat.', prefix '<7> <8>' (ends 0.00 s) -> ' mat.' 0.50-0.90 (mean logprob -0.25)" in text
    assert "3.40 transcript.segment {'item_id': 'i2', 'text': 'on the mat.'}" in text
    assert "1.20" not in text and "1.00 decode" not in text  # outside the span
