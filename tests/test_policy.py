"""The commit decisions as pure functions: agreement, right context, minimum window, pauses, turn end."""

from __future__ import annotations

import pytest

from stream_server.decoding import Token, Word
from stream_server.policy import (
    MS,
    absolute,
    after_agreeing_prefix,
    agreed_prefix_length,
    continued_sentence_case,
    heard_the_pause,
    interim_commit_count,
    mean_logprob,
    read_past,
    surer_reading,
    unread_speech,
    within_turn,
    without_trailing_punctuation,
    words_before,
    words_starting_before,
)

RATE = 16000


def w(text: str, start: float, end: float) -> Word:
    return Word(text, start, end, (Token(1, text, -0.1),))


def hypothesis(*texts: str, start: float = 0.0, step: float = 0.4) -> list[Word]:
    return [w(t, start + i * step, start + i * step + 0.3) for i, t in enumerate(texts)]


def count(
    previous: list[Word], words: list[Word], *, window_end_s: float, pause_start_s: float | None = None, utterance_start: int = 0,
    previous_end_s: float = 0.0,
) -> int:
    return interim_commit_count(
        previous,
        words,
        utterance_start=utterance_start,
        window_end=int(window_end_s * RATE),
        pause_start=None if pause_start_s is None else int(pause_start_s * RATE),
        right_context_ms=300,
        min_commit_window_ms=2000,
        previous_window_end=int(previous_end_s * RATE),
    )


def test_agreement_ignores_case_and_edge_punctuation() -> None:
    assert agreed_prefix_length(hypothesis(" Modern.", " times"), hypothesis(" modern,", " times", " now")) == 2
    assert agreed_prefix_length(hypothesis(" how", " do"), hypothesis(" had", " he")) == 0
    assert agreed_prefix_length([], hypothesis(" a")) == 0


def test_words_before_a_pause_allow_alignment_slack() -> None:
    words = [w(" a", 0.0, 0.5), w(" b", 0.6, 1.1), w(" c", 1.2, 1.5)]
    assert words_before(words, 1.0) == 2  # " b" ends 0.1 s after: within the 0.12 s tolerance
    assert words_before(words, 1.0, tolerance=0.0) == 1
    assert words_before(words, 0.2) == 0


def test_agreed_words_commit_but_the_newest_word_waits() -> None:
    old = hypothesis(" a", " b", " c")
    assert count(old, hypothesis(" a", " b", " c"), window_end_s=3.0) == 2


def test_words_without_right_context_wait() -> None:
    old = hypothesis(" a", " b", " c", " d", start=2.0)
    new = hypothesis(" a", " b", " c", " d", " e", start=2.0)  # ends 2.3, 2.7, 3.1, 3.5, 3.9 s
    assert count(old, new, window_end_s=4.5) == 4  # horizon 4.2 s: all four agreed words are heard past
    assert count(old, new, window_end_s=3.35) == 2  # horizon 3.05 s: " c" (ends 3.1 s) waits


def test_nothing_commits_in_a_short_utterance_but_what_a_pause_and_agreement_settle() -> None:
    old = hypothesis(" a", " b", " c")
    assert count(old, hypothesis(" a", " b", " c"), window_end_s=1.9) == 0
    assert count(old, hypothesis(" a", " b", " c"), window_end_s=2.9, utterance_start=RATE) == 0  # 1.9 s window
    # A pause in a short window commits the words before it that the previous hypothesis agrees on,
    # the newest one included (the pause settled it)...
    assert count(old, hypothesis(" a", " b", " c"), window_end_s=1.9, pause_start_s=1.5, previous_end_s=1.4) == 3
    assert count(old, hypothesis(" a", " b", " c"), window_end_s=1.9, pause_start_s=0.8, previous_end_s=1.4) == 2
    # ... but not a word the previous decode heard well (0.3 s before its window's end) and read
    # differently, nor the words after it ("But, they'll want" where the decode before heard "But, go on").
    before = hypothesis(" But,", " go", " on", " the")
    now = hypothesis(" But,", " they'll", " want", " the")  # " they'll" starts at 0.4 s
    assert count(before, now, window_end_s=1.9, pause_start_s=1.5, previous_end_s=1.4) == 1
    # A hypothesis of under a second of the turn is no reading to dissent from (a turn's first interims).
    assert count(before, now, window_end_s=1.9, pause_start_s=1.5, previous_end_s=0.9) == 4
    # Words the previous decode barely heard cannot disagree: a word cut at its window's end ("w~")...
    assert count(hypothesis(" a", " b", " c~"), hypothesis(" a", " b", " c"), window_end_s=1.9, pause_start_s=1.5, previous_end_s=1.0) == 3
    # ... nor words past its end, nor a first hypothesis, nor a bare mark left waiting.
    assert count(hypothesis(" a"), hypothesis(" a", " b", " c"), window_end_s=1.9, pause_start_s=1.5, previous_end_s=0.5) == 3
    assert count([], hypothesis(" a", " b", " c"), window_end_s=1.9, pause_start_s=1.5) == 3
    assert count(hypothesis("."), hypothesis(" a", " b"), window_end_s=1.9, pause_start_s=1.5, previous_end_s=1.4) == 2
    # Once the window is long enough, a pause commits every word that started before it, agreed or not.
    assert count([], hypothesis(" a", " b", " c"), window_end_s=2.1, pause_start_s=1.5) == 3
    assert count([], hypothesis(" a", " b", " c"), window_end_s=2.1, pause_start_s=0.8) == 2


def test_a_pause_commits_the_words_that_started_before_it_however_dtw_stretched_them() -> None:
    words = [w(" a", 0.0, 0.5), w(" b", 0.6, 1.6), w(" c", 1.9, 2.0)]  # " b" stretched into the silence
    assert words_starting_before(words, 1.2) == 2
    assert words_before(words, 1.2) == 1
    assert count([], words, window_end_s=2.5, pause_start_s=1.2) == 2


def test_a_words_trailing_punctuation_splits_off_as_its_own_word() -> None:
    word = Word(" Strasburg.", 1.0, 1.6, (Token(1, " Strasb", -0.1), Token(2, "urg", -0.2), Token(13, ".", -0.3)))
    spoken, marks = without_trailing_punctuation(word)
    assert (spoken.text, [t.id for t in spoken.tokens], spoken.start, spoken.end) == (" Strasburg", [1, 2], 1.0, 1.6)
    assert marks is not None and (marks.text, [t.id for t in marks.tokens], marks.start, marks.end) == (".", [13], 1.0, 1.6)
    assert without_trailing_punctuation(w(" plain", 0.0, 0.3)) == (w(" plain", 0.0, 0.3), None)
    only_marks = Word("...", 0.0, 0.1, (Token(986, "...", -0.1),))
    assert without_trailing_punctuation(only_marks) == (only_marks, None)


def test_a_window_heard_the_pause_once_it_reaches_past_the_stable_silence() -> None:
    end = 2 * RATE
    assert heard_the_pause(end + 200 * MS, end, 200)
    assert not heard_the_pause(end + 199 * MS, end, 200)


def test_words_of_the_next_turn_are_dropped_from_a_final() -> None:
    words = [w(" a", 0.0, 0.4), w(" b", 1.2, 1.5), w(" c", 1.3, 1.6)]
    assert [x.text for x in within_turn(words, RATE, 250)] == [" a", " b"]  # " c" starts 0.3 s after
    assert within_turn(words, None, 250) == words


def test_absolute_shifts_word_times_by_the_window_start() -> None:
    [moved] = absolute([w(" a", 0.1, 0.3)], RATE // 2)
    assert (moved.start, moved.end, moved.text) == (0.6, 0.8, " a")


def tokens_word(*pieces: str, start: float = 0.0, end: float = 0.3) -> Word:
    return Word("".join(pieces), start, end, tuple(Token(i, t, -0.1) for i, t in enumerate(pieces)))


def test_an_unforced_final_that_repeats_the_committed_words_gives_what_follows_them() -> None:
    """JFK under load: "And so" committed at a pause, the final forced to continue from it heard
    "am I fellow Americans"; decoded whole, the window says "And so, my fellow Americans"."""
    kept = [tokens_word(" And"), tokens_word(" so")]
    words = [tokens_word(" And"), tokens_word(" so", ","), tokens_word(" my"), tokens_word(" fellow")]
    rest = after_agreeing_prefix(kept, words)
    assert rest is not None and [x.text for x in rest] == [",", " my", " fellow"]  # the comma the tail held
    # Case and punctuation aside; a mark the committed word already has is not repeated.
    assert [x.text for x in after_agreeing_prefix([tokens_word(" And"), tokens_word(" so", ",")], [tokens_word(" and"), tokens_word(" so", ","), tokens_word(" my")]) or []] == [" my"]
    assert after_agreeing_prefix([], words) == words


def test_a_bare_mark_waits_for_the_word_after_it() -> None:
    """At a pause tiny.en's next reading began with the mark that waited ("?" then " Five.");
    committed alone, it ended every forced prefix, and after a forced "it?" the decoder closed
    its segment and read nothing of the digits that followed in the same turn."""
    waiting = [w("?", 1.6, 1.6)]
    assert count(waiting, [w("?", 1.6, 1.6), w(" Five.", 2.5, 2.7)], window_end_s=2.8, pause_start_s=2.0, previous_end_s=2.0) == 0
    # With the word after it, it goes out.
    assert count(waiting, [w("?", 1.6, 1.6), w(" 5,", 2.5, 2.8), w(" 2,", 3.0, 3.3)], window_end_s=3.8, pause_start_s=3.4, previous_end_s=2.8) == 3


def test_an_unforced_final_agrees_with_a_mark_committed_apart() -> None:
    kept = [tokens_word(" forget"), tokens_word(" it"), tokens_word("?")]
    rest = after_agreeing_prefix(kept, [tokens_word(" forget"), tokens_word(" it", "?"), tokens_word(" 5", ",")])
    assert rest is not None and [x.text for x in rest] == [" 5,"]


def test_the_words_past_the_committed_ones_of_a_reading_that_disagrees() -> None:
    committed = [w(" 0,", 7.3, 7.7), w(" 0,", 7.7, 8.7)]
    # A word stretched over the zeros the reading skipped counts; the last committed word read again does not.
    reading = [w(" 0,", 8.2, 8.9), w(" has", 5.3, 9.9), w(" never", 9.9, 10.9)]
    assert [x.text for x in read_past(committed, reading)] == [" has", " never"]
    assert [x.text for x in read_past(committed, [w(" 3,", 4.8, 5.3), w(" has", 9.0, 9.9)])] == [" has"]
    assert read_past([], reading) == reading


def test_an_unforced_final_that_contradicts_committed_words_is_refused() -> None:
    kept = [tokens_word(" And"), tokens_word(" so")]
    assert after_agreeing_prefix(kept, [tokens_word(" And"), tokens_word(" sew"), tokens_word(" my")]) is None
    assert after_agreeing_prefix(kept, [tokens_word(" And")]) is None  # says less than was committed


def test_a_continuation_after_a_sentence_end_starts_with_a_capital() -> None:
    """After "... go on forever." tiny.en continued "five five." in lower case, and the turns
    prompted with it after that stayed in lower case."""
    carried = [tokens_word(" on"), tokens_word(" forever", ".")]
    first, second = continued_sentence_case(carried, [tokens_word(" five"), tokens_word(" five", ".")])
    assert (first.text, [t.text for t in first.tokens], second.text) == (" Five", [" Five"], " five.")
    assert first.tokens[0].id == 0 and (first.start, first.end) == (0.0, 0.3)  # the decoded token, timed as decoded
    # Mid-sentence ("Americans," / no mark), already capitalized, a number, or nothing carried: as decoded.
    for before, after in (([tokens_word(" Americans", ",")], " ask"), ([tokens_word(" Americans")], " ask"),
                          (carried, " Ask"), (carried, " 55"), ([], " ask")):
        assert [x.text for x in continued_sentence_case(before, [tokens_word(after)])] == [after]
    assert continued_sentence_case(carried, []) == []
    assert [x.text for x in continued_sentence_case([tokens_word(" really", "?")], [tokens_word(" yes")])] == [" Yes"]


def sure(text: str, *logprobs: float) -> Word:
    return Word(text, 0.0, 0.3, tuple(Token(i, text, lp) for i, lp in enumerate(logprobs)))


def test_mean_logprob_is_over_the_spoken_words_tokens_only() -> None:
    assert mean_logprob([sure(" And", -0.2), sure(" so", -0.4, -0.6)]) == pytest.approx(-0.4)
    assert mean_logprob([sure(" so", -0.3), sure(".", -1.2)]) == pytest.approx(-0.3)  # a bare mark does not count
    assert mean_logprob([sure(".", -1.2)]) == mean_logprob([]) == 0.0


def test_the_surer_reading_wins_and_one_with_words_beats_one_without() -> None:
    unsure, surer = [sure(" am", -0.9), sure(" i", -0.7)], [sure(" my", -0.3)]
    assert surer_reading(unsure, surer) == surer
    assert surer_reading(surer, unsure) == surer
    assert surer_reading(unsure, []) == unsure
    assert surer_reading([], surer) == surer


def test_a_reading_that_stops_well_before_the_speech_does_leaves_it_unread() -> None:
    four = hypothesis(" four,", start=2.4)  # ends at 2.7
    assert unread_speech(four, speech_end_s=5.7, limit_s=1.0)
    assert not unread_speech(four, speech_end_s=3.5, limit_s=1.0)
    assert not unread_speech(four, speech_end_s=5.7, limit_s=0.0), "0: never"
    assert not unread_speech([], speech_end_s=5.7, limit_s=1.0), "nothing read is another rule's"


def test_of_two_readings_the_one_that_reads_the_turns_speech_wins_over_a_surer_one_that_stopped() -> None:
    """tiny.en's greedy reading of "4539 1488" said only " four," (sure of it); a beam read seven
    digits less surely. The turn's speech ran to 5.7 s: the reading that stopped at 2.7 s loses."""
    stopped = [sure(" four,", -0.1)]
    stopped = [Word(" four,", 2.4, 2.7, stopped[0].tokens)]
    digits = [Word(f" {d},", 2.4 + 0.4 * i, 2.7 + 0.4 * i, (Token(1, f" {d},", -0.5),)) for i, d in enumerate("4539148")]
    assert surer_reading(stopped, digits, speech_end_s=5.7, unread_s=1.0) == digits
    assert surer_reading(digits, stopped, speech_end_s=5.7, unread_s=1.0) == digits
    assert surer_reading(stopped, digits) == stopped, "without the turn's end, the surer one"
    assert surer_reading(stopped, digits, speech_end_s=5.7, unread_s=0.0) == stopped
