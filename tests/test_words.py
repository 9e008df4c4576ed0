"""The one word normaliser used wherever hypotheses are compared word by word."""

from __future__ import annotations

import pytest

from stream_server.words import bare_word


@pytest.mark.parametrize(
    "raw,bare",
    [(" Modern.", "modern"), ("modern,", "modern"), ('"Hello!"', "hello"), ("don't", "don't"), ("3.5", "3.5"),
     ("5%", "5%"), ("#1", "#1"), ("AT&T.", "at&t"), ("…well", "well"), ("¿Qué?", "qué"), ("。", ""), ("", "")],
)
def test_case_and_edge_punctuation_go_inner_and_spoken_marks_stay(raw: str, bare: str) -> None:
    assert bare_word(raw) == bare
