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

import re
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


# Numbers as spoken and as Whisper writes them (redaction's runs, the loop guard's digits).
#: The one-digit number words, and the digit each says.
SPOKEN_DIGITS = {"zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                 "six": "6", "seven": "7", "eight": "8", "nine": "9"}
UNITS = dict.fromkeys(SPOKEN_DIGITS, 1)
TEENS = {"ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"}
TENS = {"twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"}
#: "double five" is two digits, "triple oh" three: the word adds what the next one repeats.
REPEATS = {"double": 1, "triple": 2}
#: "five hundred" is three digits, "two thousand" four.
SCALES = {"hundred": 2, "thousand": 3}

#: A numeral as Whisper writes one: digits with separators inside ("4111-1111", "12/25", "1,000").
NUMERAL = re.compile(r"^[$£€#]?\d[\d,./:-]*%?$")


def digits_in(word: str) -> int:
    """How many digits ``word`` (bare, as :func:`bare_word` writes it) stands for as spoken, or 0
    when it is not a number."""
    if NUMERAL.match(word):
        return sum(c.isdigit() for c in word)
    if word in UNITS:
        return 1
    if word in TEENS or word in TENS:
        return 2
    return REPEATS.get(word, 0) + SCALES.get(word, 0)
