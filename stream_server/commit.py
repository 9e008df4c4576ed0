"""Word-level stability rules used by the session's commit policy.

Words are compared after light normalisation (case and edge punctuation), because Whisper often
flips "modern." to "modern," when more audio arrives while the word itself is settled; comparing
raw strings would hold back correct words for another decode.
"""

from __future__ import annotations

from collections.abc import Sequence

from stream_server.decoding import Word

_EDGE = ".,!?;:\"'()[]-…。、，！？"


def comparable(word: Word) -> str:
    return word.text.strip().strip(_EDGE).lower()


def agreed_prefix_length(previous: Sequence[Word], current: Sequence[Word]) -> int:
    """How many leading words of ``current`` the previous hypothesis also had (LocalAgreement-2)."""
    n = 0
    for old, new in zip(previous, current):
        if comparable(old) != comparable(new):
            break
        n += 1
    return n


def words_before(words: Sequence[Word], pause_start: float, tolerance: float = 0.12) -> int:
    """How many leading words end before a pause that began at ``pause_start`` (seconds).

    Alignment times are ±1-2 encoder frames (20-40 ms); the tolerance absorbs that plus the
    VAD's frame granularity.
    """
    n = 0
    for word in words:
        if word.end > pause_start + tolerance:
            break
        n += 1
    return n
