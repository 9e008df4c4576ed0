"""The commit policy: which words of a hypothesis become final, as pure functions.

Nothing here holds state; the session passes in the words and the audio times (samples at
16 kHz since the session began) and applies the answer.

Words are compared after light normalisation (case and edge punctuation), because Whisper often
flips "modern." to "modern," when more audio arrives while the word itself is settled; comparing
raw strings would hold back correct words for another decode.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from stream_server.audio import MODEL_RATE
from stream_server.decoding import Word
from stream_server.words import bare_word

MS = MODEL_RATE // 1000  # samples per millisecond

def comparable(word: Word) -> str:
    return bare_word(word.text)


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


def words_starting_before(words: Sequence[Word], pause_start: float) -> int:
    """How many leading words start before a pause that began at ``pause_start`` (seconds).

    A pause decode commits these: the VAD heard silence from ``pause_start`` to the window's end,
    so a word that started before it was finished when the speaker paused. Their *ends* are not
    used: DTW often stretches the last word into the silence, and waiting for the turn's end
    instead cost ~0.17 s of finalization (replay, 300 s of read speech: p50 0.57 -> 0.40 s).
    """
    n = 0
    for word in words:
        if word.start >= pause_start:
            break
        n += 1
    return n


def without_trailing_punctuation(word: Word) -> tuple[Word, Word | None]:
    """``word`` split into its spoken part and its trailing punctuation tokens (None if none).

    The newest word of a hypothesis carries a guessed punctuation mark ("Strasburg." while the
    speaker breathes before "Basil"): committed at a pause, its words go out now and the mark
    waits, as the next hypothesis's first word, for what comes after (", Basil" or the turn's end).
    """
    spoken = list(word.tokens)
    while spoken and not any(c.isalnum() for c in spoken[-1].text):
        spoken.pop()
    if not spoken or len(spoken) == len(word.tokens):
        return word, None
    marks = word.tokens[len(spoken):]
    text = "".join(t.text for t in spoken)
    return (
        dataclasses.replace(word, text=text, tokens=tuple(spoken)),
        # Timed as the word it closes: a final keeps the words that *start* in the turn, and DTW
        # may have stretched the word's end past the turn's end.
        Word("".join(t.text for t in marks), word.start, word.end, tuple(marks)),
    )


def absolute(words: Sequence[Word], window_start: int) -> list[Word]:
    """A decode's words (times relative to its window) on the session's audio clock."""
    offset = window_start / MODEL_RATE
    return [dataclasses.replace(w, start=w.start + offset, end=w.end + offset) for w in words]


def interim_commit_count(
    previous: Sequence[Word],
    words: Sequence[Word],
    *,
    utterance_start: int,
    window_end: int,
    pause_start: int | None,
    right_context_ms: int,
    min_commit_window_ms: int,
    previous_window_end: int = 0,
) -> int:
    """How many leading ``words`` of an interim hypothesis to commit.

    ``previous`` is the utterance's last uncommitted hypothesis and ``words`` the new one, both
    after the committed prefix; ``pause_start`` is the start of the pause the window ends in;
    ``previous_window_end`` the end of the window ``previous`` was decoded from.
    """
    # The newest word waits for the word after it: until then its punctuation ("printed."
    # vs "printed in") is a guess. A pause settles it instead (below).
    n = min(agreed_prefix_length(previous, words), max(0, len(words) - 1))
    horizon = (window_end - right_context_ms * MS) / MODEL_RATE
    n = min(n, words_before(words, horizon, tolerance=0.0))
    short = window_end - utterance_start < min_commit_window_ms * MS
    if short:
        n = 0
    if pause_start is not None:
        at_pause = words_starting_before(words, pause_start / MODEL_RATE)
        if short and previous_window_end - utterance_start >= DISSENT_WINDOW_MS * MS:
            at_pause = min(at_pause, _settled_at_pause(previous, words, previous_window_end - right_context_ms * MS))
        n = max(n, at_pause)
    if n and not comparable(words[n - 1]):
        # A bare mark ("?" left waiting after committed words) waits for the word after it, as
        # the newest word does: committed alone, it ends the forced prefix, and after a forced
        # "it?" tiny.en closed the segment and read nothing more of the 10 s of digits that
        # followed in the same turn (every interim empty, the final's digits lost).
        n -= 1
    return n


#: A hypothesis decoded from less of its turn than this is no reading to disagree with at a pause:
#: a turn's first interims are often noise ("Thank you." for a 0.4 s "four"), and a spoken digit
#: whose word waited for the turn's end on such a dissent was final 0.2 s later (replay, lag 100).
DISSENT_WINDOW_MS = 1000


def _settled_at_pause(previous: Sequence[Word], words: Sequence[Word], previous_horizon: int) -> int:
    """How many leading ``words`` of a short window's pause decode are settled enough to commit.

    A short window's reading of a turn's first words is a guess even at a pause ("But, they'll
    want the hole" at a comma, where the decode before heard "But, go on the whole"): a word
    that the previous hypothesis heard with right context (it starts before ``previous_horizon``)
    and read differently stays interim, with every word after it. Words the previous decode
    heard too little of (the newest ones) cannot disagree. What stays interim is made final, as
    heard, by the turn's end if the pause was it, or agreed on as the speaker goes on.
    """
    # Bare marks (a "." left waiting after committed words) are neither agreement nor dissent.
    heard = [w for w in previous if comparable(w)]
    spoken = [i for i, w in enumerate(words) if comparable(w)]
    agreed = agreed_prefix_length(heard, [words[i] for i in spoken])
    if agreed < len(spoken) and agreed < len(heard) and words[spoken[agreed]].start * MODEL_RATE < previous_horizon:
        return spoken[agreed]
    return len(words)


def after_agreeing_prefix(kept: Sequence[Word], words: Sequence[Word]) -> list[Word] | None:
    """The words of an unforced final hypothesis after the committed words ``kept`` that it
    repeats word for word (punctuation and case aside), or None when it says something else.

    A mark the hypothesis puts after the last kept word ("so" committed, "so," decoded) comes
    first: it was waiting, as the tail, for this.
    """
    kept = glued_marks(kept)
    n = len(kept)
    if agreed_prefix_length(kept, words) < n:
        return None
    rest = list(words[n:])
    if n:
        _, marks = without_trailing_punctuation(words[n - 1])
        if marks is not None and not kept[-1].text.rstrip().endswith(marks.text.strip()):
            rest.insert(0, marks)
    return rest


def read_past(committed: Sequence[Word], words: Sequence[Word]) -> list[Word]:
    """The words of a reading that disagrees with ``committed`` which lie past it: those ending
    after the last committed word does (the aligner stretches a word over audio the reading
    skipped: " has" over a run of zeros it did not read), less a first one that is that last
    word again."""
    if not committed:
        return list(words)
    last = committed[-1]
    past = [w for w in words if w.end > last.end]
    if past and past[0].start < last.end and comparable(past[0]) == comparable(last):
        past = past[1:]
    return past


def glued_marks(words: Sequence[Word]) -> list[Word]:
    """``words`` with each bare mark joined to the word before it ("it" "?" as "it?"), as a
    decoder's words are split: committed apart, they are still one word of the hypothesis."""
    out: list[Word] = []
    for word in words:
        if out and not comparable(word):
            last = out[-1]
            out[-1] = Word(last.text + word.text, last.start, max(last.end, word.end), last.tokens + word.tokens)
        else:
            out.append(word)
    return out


def heard_the_pause(window_end: int, turn_end: int, stable_silence_ms: int) -> bool:
    """Whether a window reaches ``stable_silence_ms`` past the turn's end: its hypothesis then
    already knew the speaker paused, and can be the utterance's final text without a new decode."""
    return window_end >= turn_end + stable_silence_ms * MS


def within_turn(words: Sequence[Word], turn_end: int | None, end_tolerance_ms: int) -> list[Word]:
    """The words of a final hypothesis that belong to the turn ending at ``turn_end``.

    A final decode's words that start more than ``end_tolerance_ms`` after the VAD's speech end
    belong to the next turn (its first syllable often sits in the trailing audio).
    """
    if turn_end is None:
        return list(words)
    limit = (turn_end + end_tolerance_ms * MS) / MODEL_RATE
    return [w for w in words if w.start <= limit]


SENTENCE_ENDS = (".", "?", "!")


def continued_sentence_case(carried: Sequence[Word], words: Sequence[Word]) -> list[Word]:
    """A continuation's words (decoded after ``carried``, the previous turn's last words) with
    the first one capitalized when the carried words end a sentence.

    Forced to continue after "... go on forever." tiny.en sometimes starts the next sentence in
    lower case ("five five."); that text then prompts the turns after it, and a replayed stream
    went on in lower case for minutes ("now as all books ... god bless him. i hope"). The token
    ids are left as decoded: they are what the decoder saw.
    """
    if not words or not carried or not carried[-1].text.rstrip().endswith(SENTENCE_ENDS):
        return list(words)
    first = words[0]
    text = first.text.lstrip()
    if not text[:1].islower():
        return list(words)
    lead = first.text[: len(first.text) - len(text)]
    tokens = list(first.tokens)
    if tokens and tokens[0].text.lstrip()[:1].islower():
        token = tokens[0]
        stripped = token.text.lstrip()
        tokens[0] = dataclasses.replace(token, text=token.text[: len(token.text) - len(stripped)] + stripped[:1].upper() + stripped[1:])
    capital = dataclasses.replace(first, text=lead + text[:1].upper() + text[1:], tokens=tuple(tokens))
    return [capital, *words[1:]]


def mean_logprob(words: Sequence[Word]) -> float:
    """The decoder's mean log probability over the tokens of the spoken words among ``words``
    (0.0 for none): how sure it was of that reading, comparable across windows of the same
    audio. Bare marks do not count: a "." left waiting after committed words scored -1.2."""
    values = [t.logprob for w in words if comparable(w) for t in w.tokens]
    return sum(values) / len(values) if values else 0.0


def unread_speech(words: Sequence[Word], speech_end_s: float, limit_s: float) -> bool:
    """Whether a reading of a turn stops more than ``limit_s`` before its speech does (0: never
    said): the decoder ended its text early, leaving words unread."""
    return bool(limit_s) and bool(words) and speech_end_s - words[-1].end > limit_s


def surer_reading(rival: Sequence[Word], words: Sequence[Word], *, speech_end_s: float | None = None, unread_s: float = 0.0) -> list[Word]:
    """Of two readings of a turn's last words, the one the decoder was surer of; a reading with
    words beats one without (nothing said is lost to a decode that heard nothing), and with
    ``speech_end_s`` (where the turn's speech ends), one that reads ``unread_s`` or more further
    into that speech beats one that stopped early (:func:`unread_speech`)."""
    if speech_end_s is not None and rival and words:
        rival_end, words_end = rival[-1].end, words[-1].end
        if unread_speech(words, speech_end_s, unread_s) and rival_end - words_end >= unread_s:
            return list(rival)
        if unread_speech(rival, speech_end_s, unread_s) and words_end - rival_end >= unread_s:
            return list(words)
    if rival and (not words or mean_logprob(rival) > mean_logprob(words)):
        return list(rival)
    return list(words)
