"""Decode planning: when an utterance is due for a decode, and what to ask the decoder for.

Pure functions over :class:`SessionLimits` and audio times (samples at 16 kHz since the session
began); the session turns a :class:`DecodePlan` into a request by slicing its audio buffer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from stream_server.audio import MODEL_RATE
from stream_server.decoding import Word
from stream_server.policy import MS


@dataclasses.dataclass(frozen=True)
class SessionLimits:
    """Knobs of the commit policy and memory bounds; defaults measured with the benchmark."""

    interim_step_ms: int = 300
    # Under load an interim decode waits, after its last one started, at least this many of that
    # decode's round trips (audio the VAD judged while it was out): a stream then asks for at most
    # 1/pace of the decoder's time, and interim demand falls as the server fills instead of every
    # result being followed at once by the next request. One stream (round trip ~0.1 s) keeps
    # ``interim_step_ms``. Never paced: a turn's first interim, the interims of a turn that shows
    # no text yet (the session passes no round trip), and pause decodes.
    interim_pace: float = 3.0
    # ... and this many once the round trip reaches ``loaded_round_trip_ms``: a server that far
    # behind gains more from fewer interims than its captions lose, while one stream (round trip
    # ~0.1 s) keeps its 300 ms step (pace 4 everywhere paced it too). 24 live streams, three
    # alternated pairs: final p95 1.67 / 2.12 / 1.98 s against 2.32 / 2.52 / 2.21 s, first text
    # p50 0.07-0.21 s sooner, WER the same (docs/benchmarks.md, "Pacing a server that is behind").
    interim_pace_loaded: float = 4.0
    loaded_round_trip_ms: int = 300
    # A pause in a turn is decoded once it has lasted ``pause_decode_ms``, and the words before it
    # are committed once it has lasted ``stable_silence_ms`` (the result waits if it is back
    # sooner; a speaker who goes on makes it an ordinary interim). 100 against 200, over three
    # draws of each replay: last words final 0.08-0.09 s sooner (p50), WER within the draws'
    # spread (whole corpus scored alone 8.09 vs 7.89% at lag 200, 7.89 vs 8.28% at lag 100;
    # 8 calls 7.67 vs 7.59%). docs/benchmarks.md, "Pause timing".
    pause_decode_ms: int = 100
    stable_silence_ms: int = 200
    min_decode_ms: int = 300
    # A turn's first interim waits until the VAD has heard this much speech after its onset (a
    # pause decode does not: it may end the turn). The VAD opens a turn ~0.1 s after its onset;
    # a first interim then (the padding and those frames, 0.40-0.49 s) read words in 47 of 247
    # turns of 24 live streams, one of 0.6-0.9 s in 96 of 96. An empty reading costs a turn, under
    # load, a round trip (p50 0.49 s there) before its next interim is asked for. 300 against 0:
    # 24 live streams, first text p50 1.04 / 1.18 s against 1.38 / 1.44 s (two runs each, back
    # to back), decodes -6 to -13% in the replays, WER within their draws (docs/benchmarks.md, "First interim").
    first_interim_ms: int = 300
    max_utterance_s: float = 15.0
    trailing_audio_ms: int = 300  # silence kept after the speech end for the final decode
    context_chars: int = 200  # earlier text given to the decoder as its prompt
    # The decoder is forced to continue from at most this many committed words; older ones leave
    # the window and become context. CTranslate2 feeds forced tokens one step at a time, so an
    # unbounded prefix made every decode of a long turn as slow as decoding the whole turn.
    prefix_words: int = 8
    # Windows shorter than this get no earlier text as context: on a 0.4 s "four" the decoder
    # copied a whole earlier sentence out of the context (the largest single WER item on the
    # benchmark corpus). Nor the client's own prompt: with "Sweynheim, Pannartz, Subiaco." FSDD's
    # 30 spoken digits (0.3 s of noise each side) read "Pann" for "7" and nothing for two "4"s.
    min_context_window_ms: int = 1500
    # Agreement commits a word only once the decoder has heard this much audio after it: short
    # right context is where tiny models guess ("how do you marry" for "had he married").
    right_context_ms: int = 300
    # ... and only once the utterance is this long: the first words of a turn, decoded from a
    # second or two of audio, are the least reliable ones. Below it a pause does not commit a
    # word the previous hypothesis heard and read differently (``policy.interim_commit_count``):
    # at 2000, without that, a 2.0 s window decoded "But though on the whole" as "But, they'll
    # want the hole" and committed it at the comma. 3500 with that rule against 2000 without it,
    # replays: 8 calls 8.98 -> 7.75% WER (offline 6.89%); 413 -> 395 errors in 5011 words pooled
    # over four replays; finals p50 / p95 +0.00-0.02 s (docs/benchmarks.md, "First words of a turn").
    min_commit_window_ms: int = 3500
    # A final decode runs without its forced prefix, and its words after the committed ones it
    # repeats are kept; one that contradicts them is decoded again, forced. Forced to continue
    # from "And so", tiny.en heard "am I fellow Americans" where the whole window says "my
    # fellow Americans" (24 live streams: WER 9.15 -> 8.88%, JFK's excess errors 36 -> 24).
    final_agreement: bool = True
    # A final decode's words that start this long after the VAD's speech end belong to the next
    # turn (its first syllable often sits in the trailing audio), not to this one.
    end_tolerance_ms: int = 250
    interim_decoding: bool = True  # False for whole files: one final decode per utterance
    # An utterance with less audio than this is closed with the words it has, without a decode:
    # a commit right after a few samples once sent a zero-length window that made the decoder
    # raise and fail every other session's request in the same batch.
    min_final_ms: int = 100
    # Finals a channel may have waiting for the decoder; a commit beyond this is refused
    # (``rate_limited``), so a client cannot queue unbounded work (1000 commits once queued ~1000
    # finals: +900 MB and other sessions starved). VAD alone never gets near it.
    max_pending_finals: int = 8
    # 0: a final decode's context is the channel's text committed when the final is planned (live
    # speech: the turn before is nearly always final by then). N > 0: it is exactly the text of
    # the turns up to the N-th before it, and the final waits until that turn is final. A file is
    # segmented far ahead of its decodes, so "committed when planned" depends on decode timing:
    # with two decode workers the same file read 6.9-8.3% WER over six runs. N keeps N finals of
    # one file decoding at once (batches stay full) and makes its text independent of timing.
    final_context_lag: int = 0
    # A short turn that starts soon after the channel's previous one is decoded as its
    # continuation: the decodes that can commit its words (a pause's, the final) start at the
    # previous turn's last words, forced as the prefix. Alone, JFK's "ask not" (a 1.3 s turn
    # between pauses of ~1 s) decoded as "S not", "AS NOT", "S-0" depending on where the window
    # ended; after "And so my fellow Americans" it decoded "ask not" at every end tried.
    # ``carry_gap_ms``: the longest pause between the last carried word and the new turn's
    # window (0: never carry); ``carry_window_ms``: the turn's own window must be shorter
    # (longer turns have context of their own); ``carry_audio_ms``: how far back the carried
    # words reach from the last one's end (at most ``prefix_words`` of them).
    carry_gap_ms: int = 1500
    # In a session of several channels (the legs of a call), a turn whose speaker has been silent
    # this long when another channel's speaker starts ends there, without waiting for the rest of
    # ``turn_detection.silence_duration_ms``: the other person took the turn (0: never).
    handover_pause_ms: int = 200
    carry_window_ms: int = 2000
    carry_audio_ms: int = 1500
    # Input at ``NARROWBAND_RATE`` or less (a phone line) starts each utterance this much earlier
    # than ``turn_detection.prefix_padding_ms`` asks: on telephone-band audio Silero's probability
    # hovers under the threshold through a turn's first syllable ("Printing" started 0.35 s
    # before the onset it reported), the 300 ms padding cut into it, and the decoder dropped or
    # misheard the first words ("then for our purpose", "But, they'll want the hole"). 8 calls,
    # three draws each: 8.57 -> 7.83% WER (offline beam 5: 7.38%). Wideband audio keeps the plain
    # padding: 500 ms in all there read the whole corpus 7.90 -> 8.42% (docs/benchmarks.md, "Phone audio").
    narrowband_padding_ms: int = 200
    # A turn whose last words come from a hypothesis that already heard its pause (a promoted
    # pause decode, or the last interim) is final without a decode of its own; when the decoder's
    # mean token log probability over those words is below this, the turn is decoded again as a
    # final (to its end plus ``trailing_audio_ms``) and keeps the surer of the two readings.
    # tiny.en, on some window ends, falls into a lower-case reading without punctuation ("And so
    # am i fell in americans", -0.68 against -0.41 to -0.53 for the windows around it). -inf: never.
    recheck_logprob: float = -0.6
    # ... and so is a turn whose reading stops this long before the turn's speech does: the
    # decoder ended the text early (tiny.en, given "4539 1488" read digit by digit over 3.3 s,
    # wrote " four," and stopped, its word sure enough; a beam read "4, 5, 3, 9, 1, 4, 8,").
    # Between two readings, one that reads that much further into the turn's speech is kept
    # (``policy.surer_reading``). 0: never.
    unread_speech_ms: int = 1000
    # ... and that final keeps this many hypotheses at each step (1: greedy, as every other
    # decode). A greedy recheck of the same window mostly read the same words again; 8 calls,
    # 3 draws (lag 200 ± 50 ms): WER 7.38 -> 7.09% (offline beam 5: 7.13%), the whole corpus
    # (lag 100 ± 50 ms) 7.14 -> 7.21% (two words in one clip; offline 8.09%); the same finals
    # (docs/benchmarks.md, "Rechecks with a beam").
    recheck_beam: int = 5
    # Client audio reaches the VAD in steps of at least this much (0: as it arrives). A phone
    # line's 20 ms frames, resampled and judged one by one, cost the session 3.5-4.3 ms of CPU per
    # leg-second, 2.0-2.3 in 100 ms steps: at 24 calls on two cores that decided p95 (docs/benchmarks.md,
    # "Resampling as audio arrives"). Each step adds up to its length to every turn's end.
    intake_step_ms: int = 0
    # ... and input at ``NARROWBAND_RATE`` or less (a phone line, whose platform sends 20 ms frames
    # per leg) in steps of at least this much (0: ``intake_step_ms`` only). At 24 two-leg calls on
    # two cores, frame-by-frame intake put the event loop behind the calls: turns ended 15 s late
    # (endpoint p50 14.9 s, final p95 23.7 s); in 60 ms steps 0.60 s and 1.72 s. Off by default:
    # the 8-call replay reads 7.38 -> 7.67% in 60 ms steps (offline 7.13%) (docs/benchmarks.md, "Phone lines
    # in 60 ms steps"). The runner now lengthens every session's step while the event loop is
    # behind (``Session.set_load_intake_step_ms``), which holds 24 calls without this.
    narrowband_intake_step_ms: int = 0
    # A turn's audio starts where its level rose, up to this far before the VAD's onset, when
    # that is earlier than the onset minus the padding (``vad.level_onset``; 0: the padding only).
    # Silero can hear a soft first syllable late: 0.81 s into "imitates" on 8 kHz μ-law, 0.42 s
    # at 16 kHz. 1000 against 0, three draws each: whole corpus (lag 100) 7.83 -> 7.60% WER,
    # 8 calls 7.67 -> 7.71% (docs/benchmarks.md, "Where the level rose").
    level_onset_reach_ms: int = 1000
    # When the level rose after the padding began (the padding before the sound held only the
    # channel's noise), a turn's audio starts this long before the sound instead of at the onset
    # minus the padding (``Session._turn_start``; 0: the padding as asked). tiny.en reads 0.3 s of
    # noise before a short word as part of it: FSDD's "eight" read "A." after 0.3 s of -66 dBFS
    # noise and "eight." from 0.07 s before the word. Only once the channel's noise was heard
    # (``Channel.noise_floor``). 0 -> 100 (draws): whole corpus (lag 100) 7.83 -> 7.14% WER
    # (with digital silence between clips 8.23 -> 7.34%), 8 calls 7.54 -> 7.38%, 24 streams
    # 7.40 -> 7.48%; 200 and 50 read the corpus worse (docs/benchmarks.md, "Where the sound began").
    padding_from_level_ms: int = 100
    # Between turns, a frame the channel's Silero state puts at this probability or more makes a
    # fresh Silero state listen too, and the higher of the two decides whether a turn starts
    # (``vad.FreshListener``; 0: off). Silero's state after speech hears a short word that follows
    # faintly: two spoken digits of the corpus opened no turn in any replay.
    fresh_listen_prob: float = 0.2
    # A turn's ending silence (``turn_detection.silence_duration_ms``) counts from where the
    # level fell back to the channel's noise, up to this far before Silero's first frame under its
    # off threshold (``vad.quiet_lead``; 0: from that frame). Silero's probability falls ~0.1 s
    # after the level does. The pause timers of the commit policy keep Silero's timing.
    level_end_reach_ms: int = 128
    # Words a pause decode held back because the hypothesis before read them otherwise (a turn
    # shorter than ``min_commit_window_ms``) are committed as it heard them once the pause has
    # lasted this long, instead of at the turn's end, which made them final as heard anyway, only
    # ~0.25 s later (0: at the turn's end). 300 against 0, three draws of each replay: whole
    # corpus (lag 100) WER 7.93 -> 7.83%, last words final p95 0.57 -> 0.50 s; 8 calls the same
    # 7.67%, p95 0.57 -> 0.55 s (docs/benchmarks.md, "Held words").
    held_commit_ms: int = 300
    # ... and only when the decoder's mean token log probability over them is at least this: two
    # readings disagreed there, so a middling one is not enough (tiny.en read JFK's "And so am I
    # fellow Americans." at -0.53 where the decode before it and the turn's final heard "my fellow",
    # -0.28 and -0.35). Less sure held words wait for the turn's end, which decodes them again and
    # keeps the surer reading (as under ``recheck_logprob``). -0.45 against -0.6, 3 draws: 24
    # streams 7.57 -> 7.30% WER; docs/benchmarks.md, "Held words, unsure". -inf: committed however unsure.
    held_sure_logprob: float = -0.45
    # With redaction on, a turn whose words so far end in a number (its committed words and its
    # latest hypothesis) ends only after this much silence, when that is longer than the turn's
    # ``silence_duration_ms``: a card read in groups stays one turn, so redaction judges all of
    # it (``redaction.py``), where a turn end between two groups sent the first group as said.
    # 24 spoken numbers (``bench --replay --numbers``), three draws: card digits shown 52.9 -> 0%
    # (docs/benchmarks.md, "Spoken numbers and redaction"). 0: off.
    number_pause_ms: int = 1200
    # In a session of several channels, a frame of one channel this many dB or more under
    # another channel's loudest frame of the last 320 ms is that channel's speech heard faintly
    # (line or acoustic echo, bleed) and its VAD hears silence there (``crosstalk.CrosstalkGate``;
    # 0: off). Without it, 8 calls whose legs each carry the other 45 dB down read 64.9% WER
    # (the other leg's words on both); with it 7.9% (docs/benchmarks.md, "Echo between the legs").
    crosstalk_margin_db: float = 20.0

    @property
    def pause_heard_ms(self) -> int:
        """How far into a pause a pause decode's window reaches: it starts there (never later
        than the commit needs), and a window that reaches it was decoded knowing the speaker paused."""
        return min(self.pause_decode_ms, self.stable_silence_ms)


@dataclasses.dataclass(frozen=True)
class InterimDue:
    """An interim decode of ``[utterance start, end)`` is due now."""

    end: int
    pause_start: int | None  # start of a pause that the window ends in, if any
    early: bool  # started by that pause rather than by ``interim_step_ms`` of new audio


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    """What to decode: the audio ``[start, end)``, the forced prefix, the earlier text and the
    client's own prompt (``DecodeRequest.hint``)."""

    start: int
    end: int
    kept: tuple[Word, ...]  # the committed words kept in the window, forced as the prefix
    prompt: str
    hint: str = ""

    @property
    def prefix(self) -> tuple[int, ...]:
        """Token ids of the kept words: what the decoder is forced to continue from."""
        return token_ids(self.kept)


def token_ids(words: Sequence[Word]) -> tuple[int, ...]:
    """The decoder tokens of ``words``, in order (a forced prefix)."""
    return tuple(t.id for w in words for t in w.tokens)


def interim_due(
    limits: SessionLimits,
    *,
    now: int,
    utterance_start: int,
    last_window_end: int,
    silence_samples: int | None,
    pause_decoded: int | None,
    round_trip: int = 0,
    last_round_trip: int = 0,
    onset: int | None = None,
) -> InterimDue | None:
    """Whether the open utterance gets an interim decode now (the caller checks that none is in
    flight: one per channel, so a loaded server degrades to longer steps instead of a growing
    queue).

    ``now`` is the end of the audio the VAD has already judged; ``silence_samples`` the silence
    the turn segmenter has seen since the last speech (None without turn detection);
    ``pause_decoded`` the pause start that already got its early decode; ``round_trip`` the audio
    judged while the channel's last interim decode was out (see ``SessionLimits.interim_pace``);
    ``last_round_trip`` the same, whether or not the turn shows text yet (``round_trip`` is 0
    then), to foresee when a decode started now comes back.
    """
    if not limits.interim_decoding:
        return None
    if now - utterance_start < limits.min_decode_ms * MS:
        return None
    pause_start = None
    if silence_samples and silence_samples >= limits.pause_heard_ms * MS:
        pause_start = now - silence_samples
    # A pause is decoded at once, and once: its words can be committed without waiting for a
    # second agreeing hypothesis, and more of the same silence has nothing more to say.
    if pause_start is not None and pause_decoded == pause_start:
        return None
    early = pause_start is not None
    step = limits.interim_step_ms * MS
    first = last_window_end <= utterance_start
    if first and not early and now - (utterance_start if onset is None else onset) < limits.first_interim_ms * MS:
        return None
    if not first:  # pace it to the load
        pace = limits.interim_pace
        if pace and round_trip >= limits.loaded_round_trip_ms * MS:
            pace = max(pace, limits.interim_pace_loaded)
        step = max(step, int(pace * round_trip))
    if not early and now - last_window_end < step:
        return None
    if not early and silence_samples and silence_samples + last_round_trip >= limits.pause_heard_ms * MS:
        # The speaker has paused, and a decode started now would still be out when the pause
        # decode falls due (one decode per channel): it would hold up the turn's last words by
        # up to a round trip, to hear the same words again. The pause decode comes instead, or
        # the next interim once the speaker goes on.
        return None
    return InterimDue(now, pause_start, early)


#: A turn's words must reach this close to its speech end to be carried: audio after them that
#: no word covers (a failed final, words a guard dropped) would be heard again in the next turn.
CARRY_END_SLACK_S = 0.5
#: A carried decode's window starts this long before its first word.
CARRY_LEAD_S = 0.05

#: Input sample rates up to this are telephone band (``SessionLimits.narrowband_padding_ms``).
NARROWBAND_RATE = 8000


def carries(limits: SessionLimits) -> bool:
    """Whether sessions with ``limits`` decode short turns as continuations: never whole files,
    whose text must not depend on which final came back first."""
    return bool(limits.carry_gap_ms) and limits.interim_decoding and not limits.final_context_lag


def carry_audio_from(limits: SessionLimits, turn_start: int, turn_end: int) -> int | None:
    """The first sample of a closed turn ``[turn_start, turn_end)`` that a continuation of it may
    decode (its carried words and the lead before them), or None when nothing is ever carried."""
    if not carries(limits):
        return None
    reach_s = limits.carry_audio_ms / 1000 + CARRY_END_SLACK_S + 2 * CARRY_LEAD_S
    return max(turn_start, turn_end - int(reach_s * MODEL_RATE))


def carry_of(limits: SessionLimits, words: Sequence[Word], turn_end: int | None) -> tuple[Word, ...]:
    """The last words of a finished turn (speech ending at ``turn_end``) that a following short
    turn may be decoded after (see ``SessionLimits.carry_gap_ms``): those starting within
    ``carry_audio_ms`` of the last one's end, at most ``prefix_words``."""
    if not words or not carries(limits) or turn_end is None or words[-1].end < turn_end / MODEL_RATE - CARRY_END_SLACK_S:
        return ()
    reach = words[-1].end - limits.carry_audio_ms / 1000
    recent = [w for w in words[-limits.prefix_words :] if w.start >= reach]
    return tuple(recent)


def carried(
    limits: SessionLimits, carry: Sequence[Word], *, utterance_start: int, end: int, committing: bool, audio_from: int
) -> tuple[Word, ...]:
    """The carried words a decode of ``[utterance_start, end)`` continues from, or none: only a
    decode that can commit words (a pause's or a final), only while the turn is short, only
    after a short pause, and only while the buffer (from ``audio_from``) still holds their audio."""
    if not carry or not committing or end - utterance_start >= limits.carry_window_ms * MS:
        return ()
    if utterance_start - carry[-1].end * MODEL_RATE > limits.carry_gap_ms * MS:
        return ()
    if carry[0].start * MODEL_RATE < audio_from:
        return ()
    return tuple(carry)


def carry_start(carry: Sequence[Word]) -> int:
    """The sample a carried decode's window starts at: just before its first word."""
    return max(0, int((carry[0].start - CARRY_LEAD_S) * MODEL_RATE))


def prefix_from(committed: int, keep: int) -> int:
    """Index of the first committed word that stays in the decode window (the last ``keep``)."""
    return max(0, committed - keep)


def plan_decode(
    limits: SessionLimits,
    *,
    committed: Sequence[Word],
    utterance_start: int,
    start: int,
    end: int,
    client_prompt: str,
    transcript: str,
) -> DecodePlan:
    """A request for ``[start, end)``; with committed words, a window from the utterance's start
    starts at the first of the last ``prefix_words`` of them (those are forced as the prefix), so
    older words leave the audio and become context."""
    k = prefix_from(len(committed), limits.prefix_words)
    kept = committed[k:]
    if k and start == utterance_start:
        start = max(utterance_start, int((kept[0].start - 0.05) * MODEL_RATE))
    prefix_text = "".join(w.text for w in kept)
    if end - start < limits.min_context_window_ms * MS:
        return DecodePlan(start, end, tuple(kept), "", "")
    prompt = context_prompt(transcript, without=prefix_text, context_chars=limits.context_chars)
    return DecodePlan(start, end, tuple(kept), prompt, client_prompt.strip())


def context_prompt(transcript: str, *, without: str = "", context_chars: int) -> str:
    """The last ``context_chars`` of the session's committed text (less the forced prefix
    ``without``, which is not context too), starting at a word. The client's own prompt is not
    part of it: it goes to every decode whole, as ``DecodeRequest.hint``."""
    text = transcript
    if without and text.endswith(without):
        text = text[: len(text) - len(without)]  # the forced prefix is not context too
    history = text[-context_chars:] if context_chars > 0 else ""
    if history and not history[0].isspace() and len(text) > context_chars:
        history = history.split(" ", 1)[-1]  # do not start the context mid-word
    return history.strip()
