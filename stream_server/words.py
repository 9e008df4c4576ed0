"""The one word normaliser: how two spellings of a word are judged the same.

Whisper flips punctuation and case around a settled word as more audio arrives ("modern." →
"modern," → "Modern"), so every place that compares words — the agreement policy, the decoder's
repeat filters, Deepgram's unpunctuated ``word`` — compares them bare: lower-case, without
leading or trailing punctuation. Marks inside a word ("don't", "3.5") and marks a reader says
aloud ("5%", "AT&T", "#1") are kept, because they change what was said.

(WER scoring uses Whisper's English text normaliser instead — ``bench/metrics.normalize_text``
— which also expands numbers and spellings; that is for comparing against references, not for
deciding whether two hypotheses agree.)
"""

from __future__ import annotations

import unicodedata

#: Punctuation that carries meaning a reader would say aloud: never stripped.
SPOKEN_MARKS = frozenset("%&#@")


def _is_edge_mark(char: str) -> bool:
    return unicodedata.category(char).startswith("P") and char not in SPOKEN_MARKS


def bare_word(word: str) -> str:
    """``word`` lower-cased and without leading/trailing punctuation or spaces ("Hello," → "hello")."""
    word = word.strip()
    start, end = 0, len(word)
    while start < end and _is_edge_mark(word[start]):
        start += 1
    while end > start and _is_edge_mark(word[end - 1]):
        end -= 1
    return word[start:end].lower()
