"""Redaction (``stream_server/redaction.py``): which runs of spoken numbers become placeholders,
and, through the Sans-I/O session, that no event ever carries their digits, not even for a moment."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest

from stream_server import protocol as p
from stream_server.decoding import DecodeRequest, DecodeResult, Token, Word
from stream_server.redaction import NAMES, HeldRun, Redactor, kinds_of, names_from, run_digits, without_placeholders
from stream_server.session import Session, SessionLimits
from tests.fakes import BurstDecoder, EnergyVad, silence, speech
from tests.test_session import MECHANICS_COMMIT_WINDOW_MS, Driver


def words(text: str, start: float = 0.0, step: float = 0.3) -> list[Word]:
    """Whisper-style words (a leading space each), ``step`` seconds apart."""
    return [Word(" " + w, start + i * step, start + i * step + 0.25, (Token(i, " " + w, -0.2),)) for i, w in enumerate(text.split())]


def said(kinds: Sequence[str], text: str) -> str:
    run = HeldRun(Redactor(kinds_of(kinds)))
    return "".join(w.text for w in run.push(words(text)) + run.flush()).strip()


CARD = "4, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1."


@pytest.mark.parametrize(
    ("kinds", "text", "expected"),
    [
        (["pci"], f"My number is {CARD} Thanks.", "My number is [CREDIT_CARD_1]. Thanks."),
        (["pci"], "It is 4111 1111 1111 1111 and that's it.", "It is [CREDIT_CARD_1] and that's it."),
        # a card read in parts after a card word: each part is the card's
        (["pci"], "My visa is 4111 1111 and then 1111 1111.", "My visa is [CREDIT_CARD_1] and then [CREDIT_CARD_2]."),
        (["pci"], "The CVV is 123 and it expires 12/25.", "The CVV is [CVV_1] and it expires [CREDIT_CARD_EXPIRATION_1]."),
        (["pci"], "The security code is seven three one.", "The security code is [CVV_1]."),
        (["pci"], "Valid through oh four twenty seven.", "Valid through [CREDIT_CARD_EXPIRATION_1]."),
        (["pci"], "I have two kids and 4 cats, room 512.", "I have two kids and 4 cats, room 512."),
        (["pci"], "My social is 123 45 6789.", "My social is 123 45 6789."),
        (["ssn"], "My social is 123 45 6789.", "My social is [SSN_1]."),
        (["ssn"], "It is 123456789 I think.", "It is [SSN_1] I think."),
        (["ssn"], "The last four of my social are 6789.", "The last four of my social are [SSN_1]."),
        # the cue said last decides, even for a kind this session keeps
        (["ssn"], "My social, no, my expiry is 1225.", "My social, no, my expiry is 1225."),
        (["numbers"], "Order 12345, please, and two more.", "Order [NUMBER_1], please, and two more."),
        (["numbers"], "Call nine double five, two one two.", "Call [NUMBER_1]."),
        (["numbers"], f"Card {CARD}", "Card [CREDIT_CARD_1]."),
        (["numbers"], "Oh, I see.", "Oh, I see."),
        ([], f"My card is {CARD}", f"My card is {CARD}"),
    ],
)
def test_runs_of_numbers_become_placeholders_of_their_kind(kinds: list[str], text: str, expected: str) -> None:
    assert said(kinds, text) == expected


def test_the_same_value_gets_the_same_placeholder_and_another_the_next_number() -> None:
    run = HeldRun(Redactor(kinds_of(["pci"])))
    text = "Card 4111 1111 1111 1111, I repeat, 4111-1111-1111-1111, and the other is 5500 0000 0000 0004, that's 5500 0000 0000 oh oh oh four."
    assert "".join(w.text for w in run.push(words(text)) + run.flush()).strip() == (
        "Card [CREDIT_CARD_1], I repeat, [CREDIT_CARD_1], and the other is [CREDIT_CARD_2], that's [CREDIT_CARD_2]."
    )


def test_a_placeholder_spans_its_run_with_the_runs_mean_logprob() -> None:
    heard = words("Card 5 2 0 4 7 3 0 0 0 0 0 0 0 0 1 6 ok")
    [_, card, ok] = Redactor(kinds_of(["pci"])).redact(heard)
    assert card.text == " [CREDIT_CARD_1]"
    assert (card.start, card.end) == (heard[1].start, heard[16].end)
    assert card.tokens[0].logprob == pytest.approx(-0.2)
    assert ok is heard[17]


def test_digits_are_counted_as_spoken() -> None:
    assert run_digits(words("twenty five")) == 2
    assert run_digits(words("double five")) == 2
    assert run_digits(words("five hundred")) == 3
    assert run_digits(words("4111-1111 12/25")) == 12
    assert run_digits(words("oh four")) == 2


def test_a_run_that_may_still_grow_is_held_and_left_out_of_the_caption() -> None:
    run = HeldRun(Redactor(kinds_of(["pci"])))
    heard = words(f"My card is {CARD} thanks")
    assert [w.text for w in run.push(heard[:5])] == [" My", " card", " is"]  # "4," "1," held
    assert run.caption(heard[5:8]) == []  # the open run is not shown, even in part
    assert run.push(heard[5:19]) == []
    # the word after it is held too (it could be a digit misheard, the rest of the card to come)
    assert run.push(heard[19:]) == []
    assert [w.text for w in run.push(words("so much"))] == [" [CREDIT_CARD_1].", " thanks", " so", " much"]
    assert run.words == [] and run.flush() == []


def test_a_caption_shows_closed_runs_judged_without_numbering_them() -> None:
    redactor = Redactor(kinds_of(["numbers"]))
    run = HeldRun(redactor)
    caption = run.caption(words("order 12345 please and 678"))
    assert [w.text for w in caption] == [" order", " [NUMBER_1]", " please", " and"]
    shown = run.push(words("order 99999 please"))
    assert [w.text for w in shown] == [" order"]  # "please" may be a misheard digit: it waits for the next word
    shown += run.flush()
    assert [w.text for w in shown] == [" order", " [NUMBER_1]", " please"]  # the caption's value took no number


def test_names_are_checked_and_groups_expand() -> None:
    assert names_from(["pci, SSN", "pci"]) == ["pci", "ssn"]
    assert kinds_of(["pci"]) == {"credit_card", "credit_card_expiration", "cvv"}
    with pytest.raises(ValueError, match="'pii' is not a redaction this server does"):
        names_from(["pci,pii"])
    # the protocol's enum and the module's names are one list
    assert set(NAMES) == set(p.SessionConfig.model_fields["redact"].annotation.__args__[0].__args__)  # type: ignore[union-attr]


def test_placeholders_are_taken_out_of_a_decoder_prompt() -> None:
    assert without_placeholders("Pay with [CREDIT_CARD_1], code [CVV_2]. Done") == "Pay with, code. Done"


# ---------------------------------------------------------------- through the session

#: The tone decoder's bursts as words: 1-3 a sentence, 10-19 the digits 0-9 as tiny.en writes a
#: number read digit by digit ("5,"), 4 the word after.
VOCABULARY = {1: "My", 2: "card", 3: "is", 4: "thanks.", **{10 + d: f"{d}," for d in range(10)}}


class VocabularyDecoder(BurstDecoder):
    """The tone decoder with words from :data:`VOCABULARY` instead of ``w{k}``."""

    def encode_text(self, text: str) -> list[int]:
        codes = {v: k for k, v in VOCABULARY.items()}
        return [codes[w] for w in text.split() if w in codes]

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        result = super().decode_one(request)
        spoken = tuple(Word(self._text(w.text), w.start, w.end, tuple(Token(t.id, self._text(t.text), t.logprob) for t in w.tokens)) for w in result.words)
        return DecodeResult(spoken, result.language, result.no_speech_prob, result.avg_logprob)

    @staticmethod
    def _text(text: str) -> str:
        """A word cut off by the window's end reads otherwise than whole (the tone decoder's
        ``~``), as Whisper's do; a digit cut off still reads as a number ("5" for "5,")."""
        k, whole = int(text.strip()[1:].rstrip("~")), not text.endswith("~")
        word = VOCABULARY.get(k, f"w{k}")
        return " " + (word if whole else word.rstrip(",") if 10 <= k <= 19 else word + "~")


def card_session(redact: list[str], *, floor: Sequence[str] = (), number_pause_ms: int = SessionLimits.number_pause_ms) -> Driver:
    session = Session(
        "sess_redact01",
        config=p.SessionConfig(interim_results=True, include=["logprobs", "words"], redact=redact),  # type: ignore[list-item]
        vad=EnergyVad(),
        limits=SessionLimits(max_utterance_s=12.0, min_commit_window_ms=MECHANICS_COMMIT_WINDOW_MS, number_pause_ms=number_pause_ms),
        redact_floor=floor,
    )
    driver = Driver(session)
    driver.decoder = VocabularyDecoder()
    return driver


CARD_BURSTS = [15, 12, 10, 14, 17, 13, 10, 10, 10, 10, 10, 10, 10, 10, 11, 16]  # 5204 7300 0000 0016


def speak_card(d: Driver) -> None:
    d.feed(silence(0.5))
    d.feed(speech([1, 2, 3, *CARD_BURSTS, 4], gap=0.1, seconds=0.2))
    d.feed(silence(1.0))
    d.close()


def texts_of(d: Driver) -> list[str]:
    out: list[str] = []
    for e in d.events:
        if isinstance(e, p.TranscriptDelta):
            out += [e.delta, *(lp.token for lp in e.logprobs or [])]
        elif isinstance(e, p.TranscriptInterim):
            out += [e.text, *(w.word for w in e.words or [])]
        elif isinstance(e, p.TranscriptSegment):
            out += [e.text, *(w.word for w in e.words or []), *(lp.token for lp in e.logprobs or [])]
        elif isinstance(e, p.TranscriptDone):
            out += [e.text, *(c.text for c in e.channels or []), *(t.text for t in e.turns or []), *(lp.token for lp in e.logprobs or [])]
    return out


def test_a_card_number_never_reaches_any_event_and_the_words_after_it_still_come() -> None:
    d = card_session(["pci"])
    speak_card(d)
    texts = texts_of(d)
    # (a burst cut off by a window's end can read as another tone, "w9~": no digit of the card)
    assert not [t for t in texts if re.search(r"(?<!w)\d", without_placeholders(t))]
    [done] = d.of(p.TranscriptDone)
    assert done.text == "My card is [CREDIT_CARD_1], thanks."
    assert "".join(e.delta for e in d.of(p.TranscriptDelta)) == done.text
    [segment] = d.of(p.TranscriptSegment)
    assert segment.text == done.text
    card = segment.words[3]
    assert card.word == "[CREDIT_CARD_1],"
    assert card.end - card.start > 16 * 0.2  # the whole run's time
    assert [lp.token.strip() for lp in done.logprobs] == done.text.split()
    # the words before the card were sent while it was being read, the card once it was over
    deltas = [e.delta for e in d.of(p.TranscriptDelta)]
    assert deltas[0].startswith("My") and "[CREDIT_CARD_1]" not in deltas[0]
    assert sum("[CREDIT_CARD_1]" in delta for delta in deltas) == 1


def test_without_redaction_the_same_speech_keeps_its_digits() -> None:
    d = card_session([])
    speak_card(d)
    [done] = d.of(p.TranscriptDone)
    assert done.text == "My card is 5, 2, 0, 4, 7, 3, 0, 0, 0, 0, 0, 0, 0, 0, 1, 6, thanks."


def test_the_servers_redaction_cannot_be_removed_by_a_client() -> None:
    d = card_session([], floor=["pci"])
    [created] = d.of(p.SessionCreated)
    assert created.session["redact"] == ["pci"]
    d.send({"type": "session.update", "session": {"redact": ["ssn"]}})
    assert d.of(p.SessionUpdated)[-1].session["redact"] == ["ssn", "pci"]
    d.send({"type": "session.update", "session": {"redact": []}})
    assert d.of(p.SessionUpdated)[-1].session["redact"] == ["pci"]
    speak_card(d)
    assert d.of(p.TranscriptDone)[0].text == "My card is [CREDIT_CARD_1], thanks."


def test_an_unknown_redaction_is_refused_and_the_configuration_kept() -> None:
    d = card_session(["pci"])
    d.send({"type": "session.update", "session": {"redact": ["pii"]}})
    [error] = d.of(p.Error)
    assert (error.error.code, error.error.param) == ("invalid_value", "session.redact")
    assert d.session.config.redact == ["pci"]


def test_a_pause_comma_on_its_own_neither_breaks_nor_starts_a_run() -> None:
    """At a pause the session commits " 0" and holds its "," back until it knows what follows:
    the mark must not close the run there, or the card goes out in two short parts."""
    redactor = Redactor(kinds_of(["pci"]))
    run = HeldRun(redactor)
    first = words("Number 7, 3, 0, 0, 0")
    shown = run.push(first)
    assert [w.text for w in shown] == [" Number"]
    mark = Word(",", 2.0, 2.0, (Token(1, ",", -0.1),))
    assert run.push([mark]) == []
    shown = run.push(words("0, 0, 0, 0, 0, 1, 6 thanks now", start=2.1))
    assert [w.text for w in shown] == [" [CREDIT_CARD_1]", " thanks", " now"]


def test_a_card_split_by_a_pause_into_two_utterances_is_judged_whole() -> None:
    """The VAD ended a turn in the pause between "5, 2, 4" and the rest (tiny.en dropped a 0):
    the run that opens the next utterance of that channel within ``JOIN_S`` counts the digits of
    the one that ended the last, and 3 + 12 is a card."""
    redactor = Redactor(kinds_of(["pci"]))
    first = HeldRun(redactor, channel=1)
    ended = first.push(words("It is 5, 2, 4")) + first.push([Word(".", 2.0, 2.0, (Token(1, ".", -0.1),))]) + first.flush()
    assert "".join(w.text for w in ended) == " It is 5, 2, 4."  # three digits alone are nothing yet (a "." ends them)
    second = HeldRun(redactor, channel=1)
    rest = words(", 7, 3, 0, 0, 0, 0, 0, 0, 0, 1, 6, has never been surpassed.", start=2.5)
    assert "".join(w.text for w in second.push(rest) + second.flush()) == " , [CREDIT_CARD_1], has never been surpassed."
    # on another channel, or after a longer pause, it is a run of its own (nine digits: no card)
    other = HeldRun(redactor, channel=0)
    assert "[CREDIT_CARD" not in "".join(w.text for w in other.push(rest) + other.flush())
    late = HeldRun(Redactor(kinds_of(["pci"])), channel=1)
    late._redactor.end_utterance(1, (0.0, 3))
    assert "[CREDIT_CARD" not in "".join(w.text for w in late.push(words("7, 3, 0, 0, 0, 0, 0, 0, 0, 1, 6", start=5.0)) + late.flush())


def test_a_card_read_in_two_groups_with_a_pause_between_stays_one_turn() -> None:
    """0.8 s between the groups ends a turn (silence_duration_ms 500): without redaction the
    card is two turns; with it (and ``number_pause_ms`` at its 1200), a turn whose words end in
    a number waits 1.2 s, so the card is one run and none of it is shown. With the lever off,
    the first group is sent as said before the turn ends."""

    def read_in_groups(redact: list[str], number_pause_ms: int = SessionLimits.number_pause_ms) -> Driver:
        d = card_session(redact, number_pause_ms=number_pause_ms)
        d.feed(silence(0.5))
        d.feed(speech([1, 2, 3, *CARD_BURSTS[:8]], gap=0.1, seconds=0.2))
        d.feed(silence(0.8))
        d.feed(speech([*CARD_BURSTS[8:], 4], gap=0.1, seconds=0.2))
        d.feed(silence(1.5))
        d.close()
        return d

    plain = read_in_groups([])
    assert len(plain.of(p.TranscriptSegment)) == 2
    d = read_in_groups(["pci"])
    [segment] = d.of(p.TranscriptSegment)
    assert segment.text == "My card is [CREDIT_CARD_1], thanks."
    assert not [t for t in texts_of(d) if re.search(r"(?<!w)\d", without_placeholders(t))]
    off = read_in_groups(["pci"], number_pause_ms=0)
    assert len(off.of(p.TranscriptSegment)) == 2 and re.search(r"\d", off.of(p.TranscriptSegment)[0].text)


@pytest.mark.parametrize(
    ("kinds", "text", "expected"),
    [
        # tiny.en read "2303 1045 0932 2717" as "2, 3, 0, please. 1, 0, 4, 9. 0, 9, 3, 2. 7, 1, 7."
        (["pci"], "2, 3, 0, please. 1, 0, 4, 9. 0, 9, 3, 2. 7, 1, 7. Men the coat", "[CREDIT_CARD_1]. Men the coat"),
        (["ssn"], "It is 4 3 2 for 9 4 3 1 6 ok", "It is [SSN_1] ok"),
        # no bridge where the parts are each what they are, or together nothing
        (["pci"], "I have 2 kids and 3 cats", "I have 2 kids and 3 cats"),
        (["numbers"], "order 123 and 456 please", "order [NUMBER_1] and [NUMBER_2] please"),
        # a cue word is never a misheard digit
        (["pci"], "4111 1111 card 1111 1111 1111 ok", "4111 1111 card [CREDIT_CARD_1] ok"),
    ],
)
def test_a_word_misheard_inside_a_number_is_bridged_when_the_parts_make_one(kinds: list[str], text: str, expected: str) -> None:
    assert said(kinds, text) == expected
