"""The real decoder (bundled tiny.en) on real speech, and its guards against Whisper's failure modes."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from stream_server.decoding import (
    DecodeRequest,
    Token,
    WhisperDecoder,
    Word,
    _drop_echo,
    _drop_hollow_repeat,
    _drop_one_word_sentence_loop,
    _drop_repetition_loop,
    _drop_resegmented_restart,
    _drop_squeezed_echo,
    _drop_squeezed_tail,
    _drop_unheard_copies,
    _drop_unheard_sentence_start,
    _words_from_alignment,
)
from stream_server.models import tiny_en_path
from tests.support import load_clip, manifest, require_speech, wer


@pytest.fixture(scope="module")
def decoder() -> WhisperDecoder:
    return WhisperDecoder(str(tiny_en_path()), compute_type="int8")


def test_words_tokens_and_logprobs_are_consistent(decoder: WhisperDecoder) -> None:
    require_speech()
    clip = "ljspeech_LJ001-0005"
    [result] = decoder.decode_batch([DecodeRequest(load_clip(clip))])
    assert wer([manifest()[clip]["text"]], [result.text]) < 0.1
    tokens = [t for w in result.words for t in w.tokens]
    assert "".join(t.text for t in tokens) == result.text
    assert all(t.logprob <= 0 for t in tokens) and any(t.logprob < -1e-3 for t in tokens)
    starts = [w.start for w in result.words]
    assert starts == sorted(starts) and result.words[-1].end <= len(load_clip(clip)) / 16000 + 0.1
    assert result.avg_logprob == pytest.approx(np.mean([t.logprob for t in tokens]))


def test_a_batch_equals_its_items_alone(decoder: WhisperDecoder) -> None:
    require_speech()
    clips = ["ljspeech_LJ001-0002", "leopard_en_test"]
    together = decoder.decode_batch([DecodeRequest(load_clip(c)) for c in clips])
    alone = [decoder.decode_batch([DecodeRequest(load_clip(c))])[0] for c in clips]
    # Each request is padded to its own window bucket, so a batch changes nothing it hears.
    assert [a.text for a in together] == [b.text for b in alone]



def test_requests_of_another_beam_size_take_their_own_pass(decoder: WhisperDecoder) -> None:
    """A recheck decodes with a beam (``SessionLimits.recheck_beam``) while the rest is greedy:
    one batch may hold both, and each reads as it would alone."""
    require_speech()
    clips = ["ljspeech_LJ001-0016", "ljspeech_LJ001-0002"]
    requests = [DecodeRequest(load_clip(c), beam_size=b) for c, b in zip(clips, (5, 1))]
    assert decoder.batch_key(requests[0]) != decoder.batch_key(dataclasses.replace(requests[0], beam_size=1))
    together = decoder.decode_batch(requests)
    alone = [decoder.decode_batch([r])[0] for r in requests]
    assert [a.text for a in together] == [b.text for b in alone]
    assert wer([manifest()[clips[0]]["text"]], [together[0].text]) < 0.25
    assert all(t.logprob <= 0 for w in together[0].words for t in w.tokens)

HISTORY = (
    "The invention of movable metal letters in the middle of the fifteenth century may justly be considered as the "
    "invention of the art of printing. And it is worth mention in passing that, as an example of fine typography, "
    "the earliest book printed with movable types"
)


def test_the_clients_prompt_reaches_every_decode_however_much_earlier_text_there_is(decoder: WhisperDecoder) -> None:
    """Vocabulary in the client's prompt (a Deepgram keyterm, an OpenAI prompt) is heard: tiny.en
    reads these names wrong without it. Before the prompt had a field of its own it was cut with
    the earlier text: under 16 tokens it never reached the decoder, and after a sentence or two of
    history it fell off the front."""
    require_speech()
    audio = load_clip("ljspeech_LJ001-0031")  # "In fourteen sixty-five Sweynheim and Pannartz ... Subiaco near Rome,"
    names = "Sweynheim, Pannartz, Subiaco."
    plain, hinted, with_history, history_only = decoder.decode_batch(
        [
            DecodeRequest(audio),
            DecodeRequest(audio, hint=names),
            DecodeRequest(audio, hint=names, prompt=HISTORY),
            DecodeRequest(audio, prompt=f"{names} {HISTORY}"),  # the prompt as it was given before
        ]
    )
    assert "Sweynheim" not in plain.text and "Pannartz" not in plain.text
    for result in (hinted, with_history):
        assert "Sweynheim and Pannartz" in result.text and "Subiaco" in result.text, result.text
    assert "Pannartz" not in history_only.text


def test_prompt_context_keeps_the_hint_whole_and_fills_a_batchable_shape(decoder: WhisperDecoder) -> None:
    """Hint first, then the end of the earlier text, to a multiple of 16 tokens (at most 48 unless
    the hint is longer): sessions with any hint and enough history share a model pass."""
    hint = decoder.encode_text(" Sweynheim, Pannartz, Subiaco.")
    history = decoder.encode_text(" " + HISTORY)
    assert len(hint) < 16 < 48 < len(history)
    assert decoder._context(DecodeRequest(np.zeros(1), hint="Sweynheim, Pannartz, Subiaco.")) == hint
    full = decoder._context(DecodeRequest(np.zeros(1), hint="Sweynheim, Pannartz, Subiaco.", prompt=HISTORY))
    assert len(full) == 48 and full[: len(hint)] == hint and full[len(hint) :] == history[len(hint) - 48 :]
    unhinted = decoder._context(DecodeRequest(np.zeros(1), prompt=HISTORY))
    assert unhinted == history[-48:] and decoder.batch_key(DecodeRequest(np.zeros(1), prompt=HISTORY)) == decoder.batch_key(
        DecodeRequest(np.zeros(1), hint="Sweynheim, Pannartz, Subiaco.", prompt=HISTORY)
    )
    long_hint = " ".join(["Pannartz"] * 40)  # past MAX_HINT_TOKENS: its last 96 tokens go, with 0 or more of history to a multiple of 16
    context = decoder._context(DecodeRequest(np.zeros(1), hint=long_hint, prompt=HISTORY))
    assert len(context) % 16 == 0 and len(context) >= 96


def test_a_pass_memory_bound_splits_long_windows_not_short_ones() -> None:
    """tiny.en has 6 heads: a 5 s window's attention needs 3 MB, a 20 s one 48 MB, so 64 MB holds
    every short request of a batch but one long request per pass; the results do not change."""
    require_speech()
    bounded = WhisperDecoder(str(tiny_en_path()), compute_type="int8", pass_memory_mb=64)
    assert bounded.pass_limit((0, 5)) == 22 and bounded.pass_limit((0, 15)) == 2 and bounded.pass_limit((0, 20)) == 1
    assert WhisperDecoder(str(tiny_en_path()), compute_type="int8").pass_limit((0, 20)) is None
    passes: list[int] = []
    original = bounded._decode_group

    def counting(requests, contexts):  # type: ignore[no-untyped-def]
        passes.append(len(requests))
        return original(requests, contexts)

    bounded._decode_group = counting  # type: ignore[method-assign]
    audio = np.resize(np.concatenate([load_clip("ljspeech_LJ001-0002"), load_clip("ljspeech_LJ001-0005")]), 16000 * 16)
    long_requests = [DecodeRequest(audio[: 16000 * 14]), DecodeRequest(audio[16000 : 16000 * 15])]
    short_requests = [DecodeRequest(load_clip("ljspeech_LJ001-0002")[: 16000 * 2]) for _ in range(3)]
    results = bounded.decode_batch([*long_requests, *short_requests])
    assert sorted(passes) == [1, 1, 3]
    alone = [bounded.decode_batch([r])[0].text for r in long_requests]
    assert [r.text for r in results[:2]] == alone


def test_forced_prefix_is_continued_not_repeated(decoder: WhisperDecoder) -> None:
    require_speech()
    audio = load_clip("ljspeech_LJ001-0001")
    prefix = tuple(decoder.encode_text(" Printing, in the only sense"))
    [result] = decoder.decode_batch([DecodeRequest(audio, prefix=prefix, prompt="Earlier text.")])
    assert result.text.split()[:3] == ["with", "which", "we"]
    assert "Printing" not in result.text
    assert result.prefix_end > 1.0


def test_partial_windows_do_not_loop_past_the_audio(decoder: WhisperDecoder) -> None:
    require_speech()
    audio = load_clip("ljspeech_LJ001-0002")  # "in being comparatively modern." (1.9 s)
    for cut in (0.6, 1.0, 1.5, 1.9):
        [result] = decoder.decode_batch([DecodeRequest(audio[: int(cut * 16000)])])
        assert len(result.words) <= 4, (cut, result.text)


def test_silence_and_noise_decode_to_nothing(decoder: WhisperDecoder) -> None:
    noise = np.random.default_rng(1).normal(0, 0.02, 32000).astype(np.float32)
    results = decoder.decode_batch([DecodeRequest(np.zeros(32000, np.float32)), DecodeRequest(noise)])
    assert [r.text for r in results] == ["", ""]


def word(text: str, start: float = 0.0, end: float = 0.1) -> Word:
    return Word(text, start, end, (Token(1, text, -0.1),))


def test_echo_of_the_prefix_inside_the_continuation_is_dropped() -> None:
    prefix = "the invention of movable metal letters".split()
    words = [word(" " + w) for w in "in the 15th century the invention of movable metal letters may justly be".split()]
    kept = " ".join(w.text.strip() for w in _drop_echo(prefix, words))
    assert kept == "in the 15th century may justly be"


def test_words_split_as_the_prefix_splits_so_an_echo_of_it_is_seen(decoder: WhisperDecoder) -> None:
    """Text without a space before it belongs to the word before it ("i.e.", "cold-hearted"),
    as a forced prefix's words split: re-read as " i" ".e." after a prefix ending "i.e.", the echo
    went through as new words (without timestamp tokens it grew into "i.e. i.e. ... i.e.")."""
    from types import SimpleNamespace

    tokenizer = decoder._tokenizer("en")
    tokens = tokenizer.encode(" black letter, i.e. the cold-hearted letter")
    alignment = SimpleNamespace(text_token_probs=[0.9] * (len(tokens) + 1),
                                alignments=[(i, 5 * i) for i in range(len(tokens) + 1)])
    words, _ = _words_from_alignment(tokenizer, tokens, 0, alignment)
    assert [w.text for w in words] == [" black", " letter,", " i.e.", " the", " cold-hearted", " letter"]
    assert sum(len(w.tokens) for w in words) == len(tokens)
    echo = [w for w in words if w.text.strip() in ("i.e.", "the")]
    assert [w.text for w in _drop_echo("printed in black letter, i.e.".split(), echo)] == [" the"]


def test_short_genuine_repeats_survive() -> None:
    words = [word(" " + w) for w in "no no I said no".split()]
    assert len(_drop_echo([], words)) == 5


def test_repetition_loops_and_squeezed_tails_are_cut() -> None:
    loop = [word(" " + w) for w in ("thank you " * 8).split()]
    assert len(_drop_repetition_loop(loop)) == 2
    words = [word(" a", 0.0, 0.5), word(" b", 0.5, 0.9), word(" c", 0.97, 0.97)]
    assert [w.text for w in _drop_squeezed_tail(words, 1.0)] == [" a", " b"]


def test_a_short_phrase_said_three_times_is_a_loop_but_a_word_said_three_times_is_speech() -> None:
    """Seen in the corpus replay: a 1.8 s window of "seven of clubs", prompted with the previous
    utterance, decoded as the phrase three times (too short for the compression test)."""
    phrase = [word(" " + w) for w in ("7 of clubs. " * 3).split()]
    assert " ".join(w.text.strip() for w in _drop_repetition_loop(phrase)) == "7 of clubs."
    no = [word(" " + w) for w in "no no no I said".split()] + [word(" no")]
    assert len(_drop_repetition_loop(no)) == 6


def test_a_word_written_three_times_as_a_sentence_each_is_a_loop() -> None:
    """Seen in the loaded-server replay: "one two three" with pauses, the last window decoded
    as "3. 3. 3."; "simpler," decoded as "simpler. simpler. simpler." at a comma's pause. The
    decoder writes a loop as sentences; a word said three times it writes with commas."""
    three = [word(" 3.", 0.0, 0.64), word(" 3.", 0.64, 0.82), word(" 3.", 0.82, 1.08)]
    assert [w.text for w in _drop_one_word_sentence_loop(three)] == [" 3."]
    simpler = [word(" hand,"), word(" simpler."), word(" simpler."), word(" simpler.")]
    assert [w.text for w in _drop_one_word_sentence_loop(simpler)] == [" hand,", " simpler."]
    said = [word(" No,"), word(" no,"), word(" no."), word(" Please.")]
    twice = [word(" Zero."), word(" Zero.")]
    for guard in (_drop_one_word_sentence_loop, _drop_repetition_loop):  # neither cuts real repeats
        assert guard(said) == said
        assert guard(twice) == twice


def card_read_aloud(seconds_per_digit: float) -> list[Word]:
    """ "7, 3," then ten zeros, "1, 6", then a sentence: a card number's middle read digit by digit."""
    texts = [" 7,", " 3,", *[" 0,"] * 10, " 1,", " 6.", " Has", " never", " been", " surpassed."]
    return [word(t, i * seconds_per_digit, (i + 1) * seconds_per_digit) for i, t in enumerate(texts)]


def test_a_digit_said_again_and_again_is_a_number_not_a_loop_or_an_echo() -> None:
    """tiny.en read a card's "7300 0000 0000 16" right, over 3.7 s, and the loop cut kept "7, 3,
    0, 0," (the sentence after it was lost too); the echo guard then took four of the zeros as a
    repeat of the two before them."""
    said = card_read_aloud(0.35)
    assert _drop_repetition_loop(said) == said
    assert _drop_echo([], said) == said
    assert _drop_echo("4, 0, 0".split(), said) == said


def test_a_digit_written_over_and_over_faster_than_speech_or_past_a_cards_length_is_a_loop() -> None:
    squeezed = card_read_aloud(0.05)
    assert " ".join(w.text.strip() for w in _drop_repetition_loop(squeezed)) == "7, 3, 0, 0,"
    endless = [word(" 1,", i * 0.3, i * 0.3 + 0.3) for i in range(20)]
    assert len(_drop_repetition_loop(endless)) == 1
    phrase = [word(" " + w, i * 0.4, i * 0.4 + 0.4) for i, w in enumerate(("7 of clubs. " * 3).split())]
    assert len(_drop_repetition_loop(phrase)) == 3, "a phrase said three times is still one"


def test_a_digit_loop_the_decoder_came_out_of_keeps_the_copies_its_audio_holds_and_what_follows() -> None:
    """Forced on from "0, 0, 0, 0, 0," of "7300 0000 0016", tiny.en wrote thirteen more zeros in
    1.1 s, then "1, 6" at their times: the cut lost "1, 6" and the sentence after them."""
    zeros = [word(" 0,", 0.4 + i * 1.1 / 13, 0.4 + (i + 1) * 1.1 / 13) for i in range(13)]
    looped = [word(" 3,", 0.0, 0.4), *zeros, word(" 1,", 1.5, 1.9), word(" 6.", 1.9, 2.3), word(" Has", 2.3, 2.6), word(" never", 2.6, 2.9)]
    kept = _drop_repetition_loop(looped)
    # 1.1 s at the 0.4 s the other digits took each: two zeros, the last one ending where the loop did.
    assert " ".join(w.text.strip() for w in kept) == "3, 0, 0, 1, 6. Has never"
    assert kept[2].end == zeros[-1].end
    # A word that is not a digit, looped so, is cut as before.
    words = [word(" the", 0.4 + i * 0.1, 0.5 + i * 0.1) for i in range(8)]
    cut = _drop_repetition_loop([word(" and", 0.0, 0.4), *words, word(" end", 1.3, 1.7), word(" here", 1.7, 2.0)])
    assert [w.text for w in cut] in ([" and", " the"], [" and", " the", " the"])


def test_a_repeat_without_audio_of_its_own_is_dropped() -> None:
    """Word times as the aligner gave them for "In 1813, in 1813," on 1.96 s of "In eighteen
    thirteen": the second copy sits in zero time."""
    invented = [word(" In", 0.0, 0.56), word(" 1813,", 0.56, 1.46), word(" in", 1.46, 1.46), word(" 1813,", 1.46, 1.46)]
    assert [w.text for w in _drop_hollow_repeat(invented)] == [" In", " 1813,"]
    said = [word(" no,", 0.0, 0.4), word(" no.", 0.5, 0.85)]  # a speaker's repeat takes time
    assert len(_drop_hollow_repeat(said)) == 2
    # tidigits "five five" as the aligner placed it: the first copy took most of the audio.
    lumped = [word(" Five,", 0.0, 1.06), word(" five.", 1.06, 1.52)]
    assert len(_drop_hollow_repeat(lumped)) == 2
    # "five five" in a 1.48 s window: a third "5" squeezed into the window's last 0.16 s.
    tripled = [word(" 5", 0.0, 0.9), word(" 5", 0.9, 1.32), word(" 5", 1.32, 1.46)]
    assert len(_drop_hollow_repeat(tripled)) == 2
    nested = [word(" a", 0.0, 0.5), word(" b", 0.5, 1.0), word(" a", 1.0, 1.1), word(" b", 1.1, 1.2), word(" b", 1.2, 1.2)]
    assert [w.text for w in _drop_hollow_repeat(nested)] == [" a", " b"]


def test_a_next_sentence_start_without_audio_is_dropped() -> None:
    """What the echo guard leaves of a restarted utterance: "... degree. And" with "And" at 2.36-2.36 s."""
    guessed = [word(" superlative", 1.48, 2.06), word(" degree.", 2.06, 2.36), word(" And", 2.36, 2.36)]
    assert [w.text for w in _drop_unheard_sentence_start(guessed)] == [" superlative", " degree."]
    heard = [word(" degree.", 2.06, 2.36), word(" And", 2.5, 2.62)]  # the next sentence, cut by the window
    assert len(_drop_unheard_sentence_start(heard)) == 2
    mid_sentence = [word(" in", 0.0, 0.3), word(" this.", 0.3, 0.3)]  # squeezed, but no sentence before it
    assert len(_drop_unheard_sentence_start(mid_sentence)) == 2
    # Corpus replay, a 2.27 s window after the prefix "... looks like a losing": three invented
    # words at the instant "game." was placed.
    invented = [word(" game.", 0.70, 0.70), word(" 4.", 0.70, 0.70), word(" The", 0.70, 0.70), word(" little", 0.70, 0.70)]
    assert [w.text for w in _drop_unheard_sentence_start(invented)] == [" game."]
    spoken = [word(" game.", 0.70, 1.1), word(" Now", 1.5, 1.7), word(" then.", 1.7, 1.7)]
    assert _drop_unheard_sentence_start(spoken) == spoken
    # A loop took the audio of "add the figures." (24-stream replay): words without audio, but real.
    robbed = [word(" you", 1.90, 1.98), word(" add", 1.98, 1.98), word(" the", 1.98, 1.98), word(" figures.", 1.98, 1.98)]
    assert _drop_unheard_sentence_start(robbed) == robbed


def test_a_restart_spelled_differently_and_squeezed_is_dropped_but_a_spoken_repeat_stays() -> None:
    """Calls replay, 400 ms turns: restarts the exact echo guards miss."""
    paris = [word(" Paris.", 1.00, 1.34), word(" Basil.", 1.34, 1.40), word(" Paris.", 1.40, 1.48)]
    assert [w.text for w in _drop_squeezed_echo([" Bazel."], paris)] == [" Paris."]
    capitol = [word(" then", 1.68, 1.78), word(" the", 1.78, 2.12), word(" capital", 2.12, 2.14), word(" letters.", 2.14, 2.14),
               word(" then", 2.14, 2.14), word(" the", 2.14, 2.14), word(" capitol", 2.14, 2.26)]
    assert [w.text for w in _drop_squeezed_echo([" lower", " case."], capitol)] == [" then", " the", " capital", " letters."]
    # A pause decode forced with "... centuries before the wood" went on past "Netherlands,"
    # with a restart the aligner put at the instant that word ended.
    forced = [" engraved", " in", " relief", " for", " centuries", " before", " the", " wood"]
    restart = [word(" cutters", 3.22, 3.56), word(" of", 3.56, 3.80), word(" the", 3.80, 3.94), word(" Netherlands,", 3.94, 4.18),
               word(" before", 4.18, 4.18), word(" the", 4.18, 4.18), word(" woodcutters", 4.18, 4.18)]
    assert [w.text for w in _drop_squeezed_echo(forced, restart)] == [" cutters", " of", " the", " Netherlands,"]
    said_again = [word(" I", 0.0, 0.1), word(" think,", 0.1, 0.4), word(" I", 0.5, 0.6), word(" think", 0.6, 0.9)]
    assert _drop_squeezed_echo([], said_again) == said_again  # a repeat with audio of its own
    unlike = [word(" go", 0.0, 0.3), word(" on", 0.3, 0.5), word(" now", 0.5, 0.52), word(" then", 0.52, 0.54)]
    assert _drop_squeezed_echo([], unlike) == unlike  # squeezed, but like nothing before it


def test_a_restart_split_into_other_words_is_dropped_but_a_number_said_twice_stays() -> None:
    """Corpus replay, tidigits "two nine three four zero" in a 1.84 s window: "29340. 2. 9340."."""
    restart = [word(" 29340.", 0.0, 0.48), word(" 2.", 0.48, 0.54), word(" 9340.", 0.54, 1.80)]
    assert [w.text for w in _drop_resegmented_restart(restart)] == [" 29340."]
    said_twice = [word(" It's"), word(" 5551234,"), word(" 5551234.")]
    assert _drop_resegmented_restart(said_twice) == said_twice
    sentence = [word(" in"), word(" to"), word(" the"), word(" into")]  # "into" is not a restart of "in to"'s tail
    assert _drop_resegmented_restart(sentence) == sentence


def test_a_window_too_short_for_one_encoder_frame_gives_no_words_and_spares_its_batch(decoder: WhisperDecoder) -> None:
    """An empty or 5 ms window used to raise inside the word builder (the aligner has no frame
    for the text the decoder still makes up), failing every request batched with it."""
    require_speech()
    speech = load_clip("ljspeech_LJ001-0002")
    tiny = np.random.default_rng(2).normal(0, 0.1, 80).astype(np.float32)
    results = decoder.decode_batch([DecodeRequest(np.zeros(0, np.float32)), DecodeRequest(tiny), DecodeRequest(speech)])
    [alone] = decoder.decode_batch([DecodeRequest(speech)])
    assert [r.words for r in results[:2]] == [(), ()]
    assert results[2].text == alone.text and alone.words


def bursts_of_sound(seconds: list[tuple[float, float]], length: float, rng: np.random.Generator) -> np.ndarray:
    """Noise at -66 dBFS with a 300 Hz tone at -20 dBFS over each (start, end) second span."""
    audio = rng.normal(0, 10 ** (-66 / 20), int(length * 16000)).astype(np.float32)
    for start, end in seconds:
        t = np.arange(int(start * 16000), int(end * 16000))
        audio[t] += (0.14 * np.sin(2 * np.pi * 300 * t / 16000)).astype(np.float32)
    return audio


def test_a_word_repeated_over_one_burst_of_sound_is_said_once() -> None:
    rng = np.random.default_rng(3)
    once = bursts_of_sound([(0.3, 0.57)], 1.1, rng)
    twice = bursts_of_sound([(0.3, 0.7), (1.0, 1.3)], 1.8, rng)
    doubled = [word(" four,", 0.0, 0.5), word(" four,", 0.5, 1.0)]
    assert [w.text for w in _drop_unheard_copies(doubled, once)] == [" four,"]
    tripled = [word(" 9"), word(" 9"), word(" 9")]
    assert [w.text for w in _drop_unheard_copies(tripled, once)] == [" 9"]
    assert _drop_unheard_copies(doubled, twice) == doubled, "a speaker's repeat has two bursts"
    unsure_first = [Word(" Zero.", 0.0, 0.5, (Token(1, " Zero", -1.5), Token(2, ".", -1.2))), Word(" Zero.", 0.5, 1.0, (Token(1, " Zero", -0.3), Token(2, ".", -0.1)))]
    assert _drop_unheard_copies(unsure_first, once) == unsure_first[1:], "the copy the decoder was surest of"
    assert _drop_unheard_copies(tripled, twice) == tripled[:2]
    other = [word(" four"), word(" five")]
    assert _drop_unheard_copies(other, once) == other, "only one word said over and over"
    assert _drop_unheard_copies(doubled, np.full(16000, 0.1, np.float32)) == doubled, "no noise to hear bursts over"


def test_spoken_digits_read_once_and_a_spoken_repeat_twice(decoder: WhisperDecoder) -> None:
    """Padded as the session pads a turn, tiny.en read these FSDD digits twice or three times
    ("four, four,", "9 9 9", "One. One."); pocketsphinx "five five" is said twice."""
    require_speech()
    rng = np.random.default_rng(0)
    pad = lambda s: rng.normal(0, 10 ** (-66 / 20), int(s * 16000)).astype(np.float32)  # noqa: E731
    clips = ["fsdd_4_theo_0", "fsdd_2_theo_0", "fsdd_1_yweweler_0", "fsdd_9_jackson_0", "fsdd_0_lucas_0", "pocketsphinx_cards_004"]
    requests = [DecodeRequest(np.concatenate([pad(0.3), load_clip(c), pad(0.5)]), language="en", final=True) for c in clips]
    counts = dict(zip(clips, (len(r.words) for r in decoder.decode_batch(requests))))
    assert counts.pop("pocketsphinx_cards_004") == 2
    assert max(counts.values()) == 1 and sum(counts.values()) >= 4, counts
