"""Decode planning: when an interim decode is due, its window, forced prefix and prompt."""

from __future__ import annotations

from stream_server.decoding import Token, Word
from stream_server.planner import (
    InterimDue,
    SessionLimits,
    carried,
    carry_audio_from,
    carry_of,
    carry_start,
    context_prompt,
    interim_due,
    plan_decode,
    prefix_from,
)
from stream_server.policy import MS

RATE = 16000
LIMITS = SessionLimits()


def words(n: int, *, start: float = 0.5, step: float = 0.4) -> list[Word]:
    return [Word(f" w{k}", start + k * step, start + k * step + 0.3, (Token(k, f" w{k}", -0.1),)) for k in range(n)]


def due(
    now_ms: int,
    *,
    last_ms: int = 0,
    silence_ms: int | None = None,
    pause_decoded: int | None = None,
    round_trip_ms: int = 0,
    last_round_trip_ms: int = 0,
    onset_ms: int | None = None,
    limits: SessionLimits = LIMITS,
) -> InterimDue | None:
    return interim_due(
        limits,
        now=now_ms * MS,
        utterance_start=0,
        last_window_end=last_ms * MS,
        silence_samples=None if silence_ms is None else silence_ms * MS,
        pause_decoded=pause_decoded,
        round_trip=round_trip_ms * MS,
        last_round_trip=last_round_trip_ms * MS,
        onset=None if onset_ms is None else onset_ms * MS,
    )


def test_interim_decodes_wait_for_min_decode_and_each_step() -> None:
    assert due(299) is None  # under min_decode_ms
    plan = due(300)
    assert plan is not None and (plan.end, plan.pause_start, plan.early) == (300 * MS, None, False)
    assert due(1000, last_ms=800) is None  # only 200 ms of new audio
    assert due(1100, last_ms=800) is not None
    assert due(5000, limits=SessionLimits(interim_decoding=False)) is None


def test_a_turns_first_interim_waits_for_speech_after_the_onset_but_its_pause_decode_does_not() -> None:
    """The VAD opens a turn ~0.1 s after its onset, with 0.3 s of padding before: a decode of
    those 0.4 s usually reads nothing and, under load, costs the turn a round trip."""
    assert LIMITS.first_interim_ms == 300
    assert due(599, onset_ms=300) is None  # 299 ms of speech
    plan = due(600, onset_ms=300)
    assert plan is not None and not plan.early
    # Only the first: later interims step from the last window, whenever the onset was.
    assert due(1100, last_ms=800, onset_ms=1000) is not None
    # A pause in a short turn is decoded at once: it may be the turn's last decode.
    plan = due(500, silence_ms=100, onset_ms=300)
    assert plan is not None and plan.early
    # 0: the first interim comes at min_decode_ms of audio, as before.
    assert due(400, onset_ms=300, limits=SessionLimits(first_interim_ms=0)) is not None


def test_interims_are_paced_by_the_last_round_trip_but_not_the_first_or_a_pause() -> None:
    # A fast decoder (round trip under interim_step_ms / pace) keeps the plain step.
    assert due(1100, last_ms=800, round_trip_ms=90) is not None
    # A loaded one: the next interim waits pace x round trip after the last window's end.
    assert LIMITS.interim_pace == 3.0
    assert due(1549, last_ms=800, round_trip_ms=250) is None
    assert due(1550, last_ms=800, round_trip_ms=250) is not None
    # From loaded_round_trip_ms on, the loaded pace (4).
    assert (LIMITS.interim_pace_loaded, LIMITS.loaded_round_trip_ms) == (4.0, 300)
    assert due(2799, last_ms=800, round_trip_ms=500) is None
    assert due(2800, last_ms=800, round_trip_ms=500) is not None
    assert due(2300, last_ms=800, round_trip_ms=500, limits=SessionLimits(interim_pace_loaded=0)) is not None
    # The turn's first interim (nothing decoded since its start) is never paced: people see text soon.
    assert due(300, round_trip_ms=900) is not None
    # Nor is a pause's early decode: it may be the utterance's final one.
    plan = due(1000, last_ms=900, silence_ms=200, round_trip_ms=900)
    assert plan is not None and plan.early
    # pace 0 turns it off.
    assert due(1100, last_ms=800, round_trip_ms=900, limits=SessionLimits(interim_pace=0)) is not None


def test_a_pause_gets_one_early_decode() -> None:
    """At ``pause_decode_ms`` of silence, before the step is due; then none while it lasts."""
    # By default the decode starts before its words may be committed (its result waits for that).
    assert LIMITS.pause_decode_ms == 100 and LIMITS.stable_silence_ms == 200
    together = SessionLimits(pause_decode_ms=200)  # the default until 2026-12-04: when it is final
    assert due(1000, last_ms=900, silence_ms=199, limits=together) is None
    plan = due(1000, last_ms=900, silence_ms=200, limits=together)
    assert plan is not None and plan.early and plan.pause_start == 800 * MS
    early = LIMITS
    plan = due(1000, last_ms=900, silence_ms=100, limits=early)
    assert plan is not None and plan.early and plan.pause_start == 900 * MS
    assert due(1000, last_ms=900, silence_ms=99, limits=early) is None  # shorter than pause_decode_ms
    # The same pause, already decoded: more of its silence is not decoded again, however long.
    assert due(1020, last_ms=1000, silence_ms=120, pause_decoded=900 * MS, limits=early) is None
    assert due(1500, last_ms=1000, silence_ms=600, pause_decoded=900 * MS, limits=early) is None
    # A new pause (the speaker went on in between) gets its own.
    plan = due(2000, last_ms=1800, silence_ms=100, pause_decoded=900 * MS, limits=early)
    assert plan is not None and plan.early and plan.pause_start == 1900 * MS
    # 0 ms means the first silent frame, never "no silence at all".
    assert due(1000, last_ms=900, silence_ms=0, limits=SessionLimits(pause_decode_ms=0)) is None
    # The early decode never waits longer than the pause the commit needs.
    plan = due(1000, last_ms=900, silence_ms=50, limits=SessionLimits(pause_decode_ms=300, stable_silence_ms=50))
    assert plan is not None and plan.early


def test_no_interim_starts_in_a_pause_that_its_decode_would_outlast() -> None:
    """One decode per channel: an interim started 80 ms into a pause, with round trips of 150 ms,
    would still be out when the pause decode falls due at 200 ms and hold the turn's last words
    back by up to 30 ms, only to hear the same words again (at the default 100 ms, the same with
    the times halved)."""
    at_200 = SessionLimits(pause_decode_ms=200)
    assert due(1100, last_ms=800, silence_ms=80, last_round_trip_ms=150, limits=at_200) is None
    assert due(1100, last_ms=800, silence_ms=40, last_round_trip_ms=150, limits=at_200) is not None  # back in time
    assert due(1100, last_ms=800, silence_ms=40, last_round_trip_ms=75) is None
    assert due(1100, last_ms=800, silence_ms=20, last_round_trip_ms=75) is not None
    assert due(1100, last_ms=800, silence_ms=0, last_round_trip_ms=400) is not None  # no pause: speech
    assert due(1100, last_ms=800, silence_ms=None, last_round_trip_ms=400) is not None  # no turn detection
    plan = due(1100, last_ms=1000, silence_ms=100, last_round_trip_ms=400)  # the pause decode itself
    assert plan is not None and plan.early


def test_the_window_starts_at_the_first_kept_prefix_word() -> None:
    committed = words(10)  # w0 starts 0.5 s, w2 (first of the last 8) at 1.3 s
    plan = plan_decode(LIMITS, committed=committed, utterance_start=0, start=0, end=8 * RATE, client_prompt="", transcript="")
    assert plan.start == int((1.3 - 0.05) * RATE)
    assert plan.prefix == tuple(range(2, 10))
    # A window that does not start at the utterance start keeps its start.
    plan = plan_decode(LIMITS, committed=committed, utterance_start=0, start=100, end=8 * RATE, client_prompt="", transcript="")
    assert plan.start == 100
    assert prefix_from(3, 8) == 0 and prefix_from(10, 8) == 2


def test_only_long_windows_get_earlier_text_as_context() -> None:
    committed = words(10)
    history = "Earlier text." + "".join(w.text for w in committed)
    long = plan_decode(LIMITS, committed=committed, utterance_start=0, start=0, end=8 * RATE, client_prompt=" Acme ", transcript=history)
    assert long.prompt == "Earlier text. w0 w1"  # the forced prefix (w2..w9) is not context too
    assert long.hint == "Acme"  # the client's prompt goes to every long decode, apart from the earlier text
    short = plan_decode(LIMITS, committed=[], utterance_start=0, start=0, end=RATE, client_prompt=" Acme ", transcript=history)
    assert short.prompt == "" and short.hint == "" and short.prefix == ()


def test_no_context_chars_means_no_earlier_text() -> None:
    assert context_prompt("earlier words here", context_chars=0) == ""


def test_context_is_cut_at_a_word_boundary() -> None:
    assert context_prompt("one two three", context_chars=8) == "three"  # "wo three" starts mid-word
    assert context_prompt("one two three", context_chars=6) == "three"  # " three" starts at a word
    assert context_prompt("one two", without=" two", context_chars=200) == "one"
    assert context_prompt("", context_chars=200) == ""


def test_a_turn_carries_its_last_words_within_carry_audio_ms_when_they_reach_its_end() -> None:
    turn = words(12)  # w0 at 0.5 s ... w11 ends at 5.2 s
    carry = carry_of(LIMITS, turn, turn_end=int(5.3 * RATE))
    assert [x.text for x in carry] == [f" w{k}" for k in range(12) if 0.5 + k * 0.4 >= 5.2 - LIMITS.carry_audio_ms / 1000]
    assert len(carry_of(SessionLimits(carry_audio_ms=10_000), turn, int(5.3 * RATE))) == LIMITS.prefix_words
    assert carry_of(LIMITS, turn, turn_end=int(6.0 * RATE)) == ()  # 0.8 s of its speech has no word
    assert carry_of(LIMITS, [], turn_end=RATE) == ()
    for off in (SessionLimits(carry_gap_ms=0), SessionLimits(interim_decoding=False), SessionLimits(final_context_lag=4)):
        assert carry_of(off, turn, int(5.3 * RATE)) == ()  # off, and never for whole files


def test_only_a_short_turns_committing_decodes_after_a_short_pause_are_carried() -> None:
    carry = carry_of(LIMITS, words(12), turn_end=int(5.3 * RATE))  # the last word ends at 5.2 s
    start = int(6.2 * RATE)  # the next turn's window starts 1.0 s later

    def decide(*, end_s: float = 7.0, committing: bool = True, turn_start: int = start, audio_from: int = 0) -> tuple[Word, ...]:
        return carried(LIMITS, carry, utterance_start=turn_start, end=int(end_s * RATE), committing=committing, audio_from=audio_from)

    assert decide() == carry
    assert carry_start(carry) == int((carry[0].start - 0.05) * RATE)
    assert decide(committing=False) == ()  # interims stay short
    assert decide(end_s=6.2 + LIMITS.carry_window_ms / 1000) == ()  # the turn has context of its own
    assert decide(turn_start=int((5.2 + LIMITS.carry_gap_ms / 1000 + 0.1) * RATE)) == ()  # a long pause
    assert decide(audio_from=int(carry[0].start * RATE) + 1) == ()  # its audio has left the buffer
    assert carried(LIMITS, (), utterance_start=start, end=int(7 * RATE), committing=True, audio_from=0) == ()


def test_the_audio_kept_for_a_continuation_covers_every_word_it_can_carry() -> None:
    turn = words(12)  # w0 at 0.5 s ... w11 ends at 5.2 s
    for end_s in (5.2, 5.3, 5.2 + 0.5):  # the speech end: at the last word, up to the slack after it
        keep = carry_audio_from(LIMITS, int(0.4 * RATE), int(end_s * RATE))
        carry = carry_of(LIMITS, turn, int(end_s * RATE))
        assert keep is not None and carry and keep <= carry_start(carry)
    assert carry_audio_from(LIMITS, int(4.0 * RATE), int(5.3 * RATE)) == int(4.0 * RATE)  # never before the turn
    for off in (SessionLimits(carry_gap_ms=0), SessionLimits(interim_decoding=False), SessionLimits(final_context_lag=4)):
        assert carry_audio_from(off, 0, int(5.3 * RATE)) is None
