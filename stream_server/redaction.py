"""Redaction: card numbers, card security codes and expiry dates, social security numbers and
other spoken number sequences replaced by placeholders before any event carries them.

A call center's transcripts go to screens, webhooks, subscribers and a database; PCI DSS forbids
storing a card number, and a transcript that spells one out is such a store. So redaction happens
in the session, on the words themselves, before the first delta or caption is rendered: nothing
downstream (dialects, the session store, webhooks, SSE subscribers) ever sees the digits.

What counts is decided on *runs*: consecutive words that are numbers, as numerals ("4111",
"5,", "12/25") or as words ("four", "oh", "double", "twenty"). A run's length in digits (as
spoken: "double five" is two, "twenty" two) and the words said shortly before it on any channel
(the agent's "what is the card number?" names the customer's digits) decide what it is:

==============================  ====================================================================
placeholder                     when (``redact`` names)
==============================  ====================================================================
``[CREDIT_CARD_n]``             12-19 digits (a decoder misses some of a card's 13-19); or 4+ after
                                a card word ("card", "visa", ...) (``pci``, ``credit_card``)
``[CREDIT_CARD_EXPIRATION_n]``  3-6 digits after "expiry", "expiration", "expires", "valid thru"
                                (``pci``, ``credit_card_expiration``)
``[CVV_n]``                     3-4 digits after "cvv", "cvc", "security code", "verification code"
                                (``pci``, ``cvv``)
``[SSN_n]``                     9 digits; or 4+ after "social" or "ssn" (``ssn``)
``[NUMBER_n]``                  any other run of 3+ digits (``numbers``)
==============================  ====================================================================

``n`` numbers the distinct values of a kind within the session: the card read back by the agent
gets the same placeholder as when the customer said it. Deepgram writes its placeholders the
same way (``[CREDIT_CARD_1]``), which is why this form was chosen.

Streaming: a run that reaches the end of the committed words may still grow ("four one one one"
and then the rest of the card), so its words are *held*: not in any delta, and left out of the
caption, until a word that is not a number follows (and the word after that: it may be a digit
misheard, "please" for "three", with more digits to come) or the utterance ends. Then the whole
run is judged at once. Text is therefore never shown and then taken back; a card number read out
only delays the words after it by the time it takes to say it. Runs split by a misheard word
are judged together when together they are a card or an SSN (``MAX_BRIDGES``), and a run that
opens a channel's next utterance soon after the run that ended its last continues it
(``JOIN_S``); the session keeps a turn open longer while its words end in a number
(``SessionLimits.number_pause_ms``), so a card read in groups is one turn.

Everything here is plain synchronous code on :class:`~stream_server.decoding.Word` lists; the
session owns one :class:`Redactor` and one :class:`HeldRun` per utterance.
"""

from __future__ import annotations

import dataclasses
import re
from collections import deque
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from stream_server.decoding import Token, Word
from stream_server.words import SPOKEN_DIGITS, TENS, UNITS, bare_word, digits_in

#: What a session's ``redact`` may name: the kinds, and the groups that stand for several.
KINDS = ("credit_card", "credit_card_expiration", "cvv", "ssn", "numbers")
GROUPS: dict[str, frozenset[str]] = {
    "pci": frozenset({"credit_card", "credit_card_expiration", "cvv"}),
    **{kind: frozenset({kind}) for kind in KINDS},
}
NAMES = tuple(GROUPS)

#: Words said this long before a run (seconds, on its channel's clock; every channel of a session
#: shares one clock) make its context: an agent's question and the customer's digits are seconds
#: apart.
CONTEXT_S = 20.0
#: A run that opens an utterance within this long (seconds) after the run that ended the last
#: one on its channel continues it: a card read in groups, with a pause the VAD took for the end
#: of a turn between them, is judged by all its digits.
JOIN_S = 3.0
#: Words taken as misheard digits inside one number (``Redactor.redact``).
MAX_BRIDGES = 2
#: Words of context kept per session (about the last 20 s of a two-party call).
CONTEXT_WORDS = 80

#: A run never starts with these: "oh" is an interjection until a number comes before it.
NOT_FIRST = {"oh", "o", "double", "triple", "hundred", "thousand"}

#: Words that name what the digits after them are, by kind.
CUE_WORDS: dict[str, frozenset[str]] = {
    "credit_card": frozenset({"card", "cards", "visa", "mastercard", "amex", "discover", "credit", "debit"}),
    "credit_card_expiration": frozenset({"expiry", "expiration", "expires", "expire", "exp", "thru"}),
    "cvv": frozenset({"cvv", "cvc", "cvv2", "cv2", "csc", "cid"}),
    "ssn": frozenset({"social", "ssn"}),
}
CUE_PAIRS: dict[str, frozenset[tuple[str, str]]] = {
    "cvv": frozenset({("security", "code"), ("verification", "code")}),
    "credit_card_expiration": frozenset({("valid", "through"), ("valid", "until")}),
}
#: How many digits each kind may have when a cue word names it ...
CUES: tuple[tuple[str, Callable[[int], bool]], ...] = (
    ("cvv", lambda d: 3 <= d <= 4),
    ("credit_card_expiration", lambda d: 3 <= d <= 6),
    ("ssn", lambda d: d >= 4),
    ("credit_card", lambda d: d >= 4),  # a card read in parts, a pause between them
)
#: ... and when none does: only a length that is hardly anything else.
LENGTHS: tuple[tuple[str, Callable[[int], bool]], ...] = (
    # Cards have 13-19 digits; a decoder reading a card digit by digit misses some (tiny.en read
    # 16 as 12): 12 counts, while a phone number (10-11) does not.
    ("credit_card", lambda d: 12 <= d <= 19),
    ("ssn", lambda d: d == 9),
)


#: A placeholder as :meth:`Redactor._placeholder` writes it, with the space before it.
PLACEHOLDER = re.compile(r" ?\[[A-Z_]+_\d+\]")


def without_placeholders(text: str) -> str:
    """``text`` without its placeholders: what a decoder's prompt may hold of a redacted
    transcript (a bracketed label is no speech to continue from)."""
    return PLACEHOLDER.sub("", text)


def names_from(values: Iterable[str]) -> list[str]:
    """The redaction names in ``values`` (each may be a comma-separated list, any case), in
    order, once each; raises ValueError naming the first that is not one of :data:`NAMES`.
    Dialects refuse such a request rather than transcribe it unredacted."""
    names: list[str] = []
    for value in values:
        for raw in value.split(","):
            name = raw.strip().lower()
            if not name:
                continue
            if name not in GROUPS:
                raise ValueError(f"{raw.strip()[:40]!r} is not a redaction this server does (it does {', '.join(NAMES)})")
            if name not in names:
                names.append(name)
    return names


def kinds_of(names: Iterable[str]) -> frozenset[str]:
    """The kinds a ``redact`` list names (``pci`` is three); raises KeyError for an unknown name."""
    kinds: set[str] = set()
    for name in names:
        kinds |= GROUPS[name]
    return frozenset(kinds)


def _is_number(word: Word, first: bool) -> bool:
    bare = bare_word(word.text)
    if first and bare in NOT_FIRST:
        return False
    return digits_in(bare) > 0


def _mark(word: Word) -> bool:
    """A word that is only punctuation: the decoder writes a pause's comma on its own (" 0" ","),
    and it neither breaks nor starts a run."""
    return not bare_word(word.text)


def _in_run(word: Word) -> bool:
    return _is_number(word, first=False) or _mark(word)


def run_digits(words: Sequence[Word]) -> int:
    """Digits a run stands for; a unit after a tens word ("twenty five") adds none."""
    total, previous = 0, ""
    for word in words:
        bare = bare_word(word.text)
        total += 0 if (previous in TENS and bare in UNITS and bare not in ("oh", "o", "zero")) else digits_in(bare)
        previous = bare
    return total


def open_run_start(words: Sequence[Word], *, bridge: bool = True) -> int:
    """The index where the run of numbers that ends ``words`` starts (``len(words)``: none).
    With ``bridge``, one word after the run is held with it: it may be a digit the decoder
    misheard, with the rest of the number still to come (:func:`_bridge_end`)."""
    start = len(words)
    if bridge:
        end = _last_word(words, len(words))
        before = _last_word(words, end - 1) if end else 0
        if end and not _in_run(words[end - 1]) and before and _is_number(words[before - 1], first=False):
            start = end - 1  # the word after a run, which the next words may show to be its digit
    while start > 0 and _in_run(words[start - 1]):
        start -= 1  # a lone "oh" is held too: it is the zero of a run that may follow
    for _ in range(MAX_BRIDGES if bridge and start < len(words) else 0):
        word = _last_word(words, start) - 1  # the word before the run, past the marks
        before = _last_word(words, word) if word > 0 else 0
        if word < 1 or _in_run(words[word]) or bare_word(words[word].text) in CUE_ALL or not before or not _is_number(words[before - 1], first=False):
            break
        start = before  # a misheard digit between two runs: the one before is held with it
        while start > 0 and _in_run(words[start - 1]):
            start -= 1
    while start < len(words) and _mark(words[start]):
        start += 1  # marks before the run are not held
    return start


def _last_word(words: Sequence[Word], end: int) -> int:
    """``end`` less the marks before it: one past the last word that is not a mark."""
    while end > 0 and _mark(words[end - 1]):
        end -= 1
    return end


def ends_in_number(words: Sequence[Word]) -> bool:
    """Whether ``words`` end in a run of numbers that may still grow, or in one word after one
    (a digit misheard: "2, 3, 0, please." with the rest of the card to come)."""
    return open_run_start(words) < len(words)


CUE_ALL = frozenset(w for cues in CUE_WORDS.values() for w in cues) | frozenset(w for pairs in CUE_PAIRS.values() for pair in pairs for w in pair)


def _bridge_end(words: Sequence[Word], j: int) -> int | None:
    """Where the run that starts one word after ``j`` (the end of a run, marks between allowed)
    ends, or None when there is no such run: "2, 3, 0, please. 1, 0, 4, 9" (tiny.en's "please"
    for "three")."""
    k = j
    while k < len(words) and _mark(words[k]):
        k += 1
    if k >= len(words) or _in_run(words[k]) or bare_word(words[k].text) in CUE_ALL:
        return None
    m = k + 1
    while m < len(words) and _mark(words[m]):
        m += 1
    if m >= len(words) or not _is_number(words[m], first=True):
        return None
    end = m + 1
    while end < len(words) and _in_run(words[end]):
        end += 1
    return _last_word(words, end)


@dataclasses.dataclass(frozen=True)
class ContextWord:
    bare: str
    end: float  # seconds


class Redactor:
    """A session's redaction: which kinds, the words said lately, and the placeholders given."""

    def __init__(self, kinds: frozenset[str]) -> None:
        self.kinds = kinds
        self._context: deque[ContextWord] = deque(maxlen=CONTEXT_WORDS)
        self._numbers: dict[str, dict[str, int]] = {}
        # Per channel, the run that ended its last utterance: (where it ended, its digits).
        self._trailing: dict[int, tuple[float, int]] = {}

    @property
    def active(self) -> bool:
        return bool(self.kinds)

    def redact(
        self, words: Sequence[Word], *, commit: bool = True, channel: int = 0, opening: bool = False, closing: bool = False
    ) -> list[Word]:
        """``words`` (closed: no run in them continues) with every run that is one of the kinds
        replaced by one placeholder word. ``commit``: the words are final, so they become context
        and their values get numbers; a caption's (``commit=False``) only borrow them.
        ``opening``: they start an utterance of ``channel``, whose first run may continue the
        run that ended its last one (:data:`JOIN_S`); ``closing``: they end it."""
        out: list[Word] = []
        trailing: tuple[float, int] | None = None
        heard: list[ContextWord] = []
        i = 0
        while i < len(words):
            if not _is_number(words[i], first=True):
                out.append(words[i])
                bare = bare_word(words[i].text)
                if bare:
                    heard.append(ContextWord(bare, words[i].end))
                i += 1
                continue
            j = i + 1
            while j < len(words) and _in_run(words[j]):
                j += 1
            while _mark(words[j - 1]):
                j -= 1  # marks after the run's last number follow it
            if out and out[-1] is words[i - 1] and bare_word(words[i - 1].text) in NOT_FIRST and _is_number(words[i - 1], first=False):
                i -= 1  # "oh four twenty seven": the "oh" before a run is its zero
                out.pop()
                heard.pop()
            # (a continuation may open with the mark that joins it to the last turn: ", 7, 3")
            first = opening and not any(bare_word(w.text) for w in words[:i])
            before = self._trailing.get(channel) if first else None
            prior = before[1] if before is not None and words[i].start - before[0] <= JOIN_S else 0
            context = [*self._context, *heard]
            kind = self._kind_of(words[i:j], context, prior=prior)
            probe, bridges = j, 0
            while kind is None and bridges < MAX_BRIDGES and (after := _bridge_end(words, probe)) is not None:
                # A digit the decoder misheard as a word splits a number into runs too short to
                # be anything; with that word counted as a digit, they may be one.
                probe, bridges = after, bridges + 1
                kind = self._kind_of(words[i:probe], context, prior=prior + bridges, lengths_only=True)
                j = probe if kind is not None else j
            run = words[i:j]
            out.extend([self._placeholder(kind, run, commit=commit)] if kind else run)
            ends = all(_mark(w) for w in words[j:])  # the run ends the words (a "." after it is no word)
            trailing = (run[-1].end, prior + run_digits(run)) if ends else None
            i = j
        if commit:
            self._context.extend(heard)
            if closing:
                self.end_utterance(channel, trailing)
        return out

    def end_utterance(self, channel: int, trailing: tuple[float, int] | None) -> None:
        """An utterance of ``channel`` ended, with a run (where it ended, its digits) or not."""
        if trailing is None:
            self._trailing.pop(channel, None)
        else:
            self._trailing[channel] = trailing

    def _kind_of(self, run: Sequence[Word], context: Sequence[ContextWord], *, prior: int = 0, lengths_only: bool = False) -> str | None:
        """The kind ``run`` is, when it is one this session redacts (None: it stays). The word
        said last decides among those that fit ("the CVV is 123 and it expires 12/25": 12/25 is
        the expiry date); without one, the length does, counting the ``prior`` digits of the run
        it continues (``lengths_only``: the length alone decides, and only cards and SSNs)."""
        digits = run_digits(run)
        if lengths_only:
            return next((kind for kind, fits in LENGTHS if fits(digits + prior) and (kind in self.kinds or "numbers" in self.kinds)), None)
        recent = [c.bare for c in context if c.end >= run[0].start - CONTEXT_S]
        everything = "numbers" in self.kinds
        cues = [kind for kind, fits in CUES if fits(digits)]
        for i in range(len(recent) - 1, -1, -1):
            pair = (recent[i - 1], recent[i]) if i else ("", recent[i])
            cued = [kind for kind in cues if recent[i] in CUE_WORDS[kind] or pair in CUE_PAIRS.get(kind, ())]
            if cued:  # named, even as a kind this session keeps ("expires 12/25" is no SSN)
                return cued[0] if cued[0] in self.kinds or everything else None
        for kind, fits in LENGTHS:
            if fits(digits + prior) and (kind in self.kinds or everything):
                return kind
        return "numbers" if everything and digits >= 3 else None

    def _placeholder(self, kind: str, run: Sequence[Word], *, commit: bool) -> Word:
        """One word for the whole run: its times, its tokens' mean log probability, the text
        ``[KIND_n]`` (``n`` the value's number among the session's values of that kind), and the
        run's leading space and closing punctuation, so the transcript still reads as a sentence."""
        # The digits said, so a card read back in words ("four one ...") is the same value.
        value = "".join(SPOKEN_DIGITS.get(b, b) for b in (bare_word(w.text) for w in run))
        value = "".join(c for c in value if c.isalnum())
        numbers = self._numbers.setdefault(kind, {})
        n = numbers.get(value, len(numbers) + 1)
        if commit:
            numbers[value] = n
        label = "NUMBER" if kind == "numbers" else kind.upper()
        last = run[-1].text.rstrip()
        closing = last[len(last.rstrip(".,;:!?")):]
        text = (" " if run[0].text.startswith(" ") else "") + f"[{label}_{n}]" + closing
        logprobs = [t.logprob for w in run for t in w.tokens]
        token = Token(-1, text, float(np.mean(logprobs)) if logprobs else 0.0)
        return Word(text, run[0].start, run[-1].end, (token,))


class HeldRun:
    """One utterance's committed words not yet emitted: a run of numbers that may still grow."""

    def __init__(self, redactor: Redactor, channel: int = 0) -> None:
        self._redactor = redactor
        self._channel = channel
        self._opened = False  # some of the utterance's words were judged already
        self.words: list[Word] = []

    def push(self, words: Sequence[Word]) -> list[Word]:
        """Newly committed ``words``: what may be emitted now (redacted); an open run is held."""
        if not self._redactor.active:
            return list(words)
        pending = [*self.words, *words]
        cut = open_run_start(pending)
        self.words = pending[cut:]
        return self._judge(pending[:cut], closing=False)

    def flush(self) -> list[Word]:
        """The utterance ended: the held run is closed, judged and emitted."""
        if not self._redactor.active:
            return []
        held, self.words = self.words, []
        if not held:
            self._redactor.end_utterance(self._channel, None)
        return self._judge(held, closing=True)

    def _judge(self, words: list[Word], *, closing: bool) -> list[Word]:
        if not words:
            return []
        opening = not self._opened
        self._opened = self._opened or any(bare_word(w.text) for w in words)  # a lone mark opens nothing
        return self._redactor.redact(words, channel=self._channel, opening=opening, closing=closing)

    def caption(self, tail: Sequence[Word]) -> list[Word]:
        """What the caption may show of the held run and the uncommitted ``tail``: closed runs
        judged (without numbering anything new: a caption's run may still change), the open run
        at the end left out."""
        if not self._redactor.active:
            return list(tail)
        pending = [*self.words, *tail]
        return self._redactor.redact(pending[: open_run_start(pending)], commit=False, channel=self._channel, opening=not self._opened)
