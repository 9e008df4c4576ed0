"""The spoken-numbers replay (``stream-server bench --replay --numbers N``): the numbers it reads
out, how it scores digits, and its report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from stream_server.bench.replay_numbers import KINDS, build_numbers, digit_error, digits_of, words_of
from tests.support import REPO, SPEECH_DIR, require_speech


def test_digits_are_read_from_numerals_and_words_and_not_from_placeholders() -> None:
    assert digits_of("My card is 5, 2, oh four. Six zero.") == "520460"
    assert digits_of("It is [CREDIT_CARD_1], thanks, 4") == "4"
    assert words_of("Will we ever forget it? 5, two. [CVV_1] Has never") == "will we ever forget it has never"


def test_digit_error_counts_edits_digit_by_digit() -> None:
    assert digit_error([("5204", "5204")]) == 0.0
    assert digit_error([("5204", "524")]) == 0.25  # one deleted
    assert digit_error([("5204", ""), ("12", "12")]) == pytest.approx(4 / 6)  # nothing read: every digit lost


def test_each_number_is_read_by_the_corpus_voices_between_two_sentences() -> None:
    require_speech()
    numbers = build_numbers(6, SPEECH_DIR, seed=3)
    assert [n.kind for n in numbers] == [*KINDS, *KINDS]
    for number in numbers:
        assert len(number.digits) == sum(KINDS[number.kind]) and number.grouped.replace(" ", "") == number.digits
        assert not digits_of(number.sentences), "no number in the sentences around it"
        assert 4.0 < len(number.audio) / 16000 < 25.0
    assert [n.digits for n in build_numbers(6, SPEECH_DIR, seed=3)] == [n.digits for n in numbers], "seeded"


@pytest.mark.timeout(300)
def test_bench_replay_numbers_writes_its_report(tmp_path: Path) -> None:
    """One card through the real models, read and redacted: the report's rows, and the
    redacted run showing no more of the card than the plain run read."""
    require_speech()
    cmd = [sys.executable, "-m", "stream_server.bench", "--replay", "--numbers", "1", "--corpus", str(SPEECH_DIR), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "numbers.json").read_text())
    assert result["options"]["numbers"] == 1
    assert 0.0 <= result["plain"]["digit_error_card"] <= 1.0
    assert result["redacted"]["shown_max_card"] <= 16
    report = (tmp_path / "numbers.md").read_text()
    assert "| digit error, card |" in report and "card digits shown" in report
    [line, read, redacted] = (tmp_path / "numbers.txt").read_text().splitlines()[:3]
    assert line.startswith("card ") and read.strip().startswith("read:") and redacted.strip().startswith("redacted:")
    assert len(digits_of(redacted)) <= len(digits_of(read)) + 2  # redaction never adds digits (a draw may differ by a word)
