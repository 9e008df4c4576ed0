"""Pure scoring functions: from a recorded event sequence and the stream's ground truth to figures.

Everything here is deterministic and free of I/O so it can be unit-tested with hand-made event
sequences. Conventions:

* An event sequence is a list of ``(t, event)`` pairs: ``t`` is the arrival time in wall seconds
  since the stream's audio time 0 was "spoken" (the client paces audio in real time, so at
  ``speed`` 1 audio time and wall time are directly comparable; at other speeds audio time ``a``
  was spoken at wall time ``a / speed``).
* Words are compared after Whisper's English text normaliser (the standard for WER). For WER the
  normaliser runs on whole texts; for *attributing* final words to reference utterances it runs
  word by word, so that every normalised token keeps the arrival time of the raw word it came from.
* A final word's time is the arrival of the ``transcript.text.delta`` that completed it (deltas
  are append-only, so that is the moment it became final).
"""

from __future__ import annotations

import math
import statistics
import string
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jiwer

from .corpus import Utterance

Event = dict[str, Any]
TimedEvent = tuple[float, Event]

_PUNCT_EDGES = string.punctuation + "“”‘’«»…—–"


@lru_cache(maxsize=1)
def _normalizer() -> Any:
    from whisper_normalizer.english import EnglishTextNormalizer

    return EnglishTextNormalizer()


@lru_cache(maxsize=65536)
def normalize_word(word: str) -> tuple[str, ...]:
    """Whisper-normalised tokens of one raw word (zero, one or several tokens)."""
    return tuple(_normalizer()(word).split())


def normalize_text(text: str) -> str:
    """Whisper English normalisation of a whole text (for WER)."""
    return " ".join(_normalizer()(text).split())


# ------------------------------------------------------------------------------------------
# WER
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WerCounts:
    """Edit counts; kept as counts so streams can be pooled (corpus WER, not a mean of WERs)."""

    substitutions: int
    deletions: int
    insertions: int
    reference_words: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def wer(self) -> float:
        return self.errors / self.reference_words if self.reference_words else 0.0

    def __add__(self, other: WerCounts) -> WerCounts:
        return WerCounts(
            self.substitutions + other.substitutions,
            self.deletions + other.deletions,
            self.insertions + other.insertions,
            self.reference_words + other.reference_words,
        )


ZERO_COUNTS = WerCounts(0, 0, 0, 0)


def wer_counts(reference: str, hypothesis: str) -> WerCounts:
    """Edit counts between two texts after Whisper normalisation of both."""
    ref = normalize_text(reference)
    hyp = normalize_text(hypothesis)
    n_ref = len(ref.split())
    if n_ref == 0:
        return WerCounts(0, 0, len(hyp.split()), 0)
    if not hyp:
        return WerCounts(0, n_ref, 0, n_ref)
    out = jiwer.process_words(ref, hyp)
    return WerCounts(out.substitutions, out.deletions, out.insertions, n_ref)


def pooled_wer(pairs: Iterable[tuple[str, str]]) -> WerCounts:
    """Corpus-level edit counts over ``(reference, hypothesis)`` pairs."""
    total = ZERO_COUNTS
    for ref, hyp in pairs:
        total = total + wer_counts(ref, hyp)
    return total


# ------------------------------------------------------------------------------------------
# Final words from deltas
# ------------------------------------------------------------------------------------------


@dataclass
class FinalWord:
    """One whitespace-separated word of the final (delta) text with its timing."""

    raw: str
    item_id: str | None
    t_first: float  # arrival of the first delta holding part of it
    t_final: float  # arrival of the delta that completed it


def final_words(events: Sequence[TimedEvent]) -> list[FinalWord]:
    """Split the concatenated deltas into words, each stamped with when it became final.

    A delta that does not start with whitespace continues the previous word (a word may arrive
    in pieces); the word is final when its last piece with a letter or digit arrives. A trailing
    mark sent later does not make it later: a word committed at a pause goes out at once while its
    guessed punctuation waits for what follows (``policy.without_trailing_punctuation``); the
    reader has the word, and only a "," or "." may still join it.
    """
    words: list[FinalWord] = []
    at_boundary = True
    for t, ev in events:
        if ev.get("type") != "transcript.text.delta":
            continue
        delta = ev.get("delta") or ""
        if not delta:
            continue
        parts = delta.split()
        if not parts:
            at_boundary = True
            continue
        continues = not delta[0].isspace() and not at_boundary and bool(words)
        for k, part in enumerate(parts):
            if k == 0 and continues:
                words[-1].raw += part
                if any(c.isalnum() for c in part):
                    words[-1].t_final = t
            else:
                words.append(FinalWord(part, ev.get("item_id"), t, t))
        at_boundary = delta[-1].isspace()
    return words


def delta_text(events: Sequence[TimedEvent]) -> str:
    """Concatenation of every delta: by the protocol, exactly the ``done`` text."""
    return "".join(
        ev.get("delta") or "" for _, ev in events if ev.get("type") == "transcript.text.delta"
    )


def done_text(events: Sequence[TimedEvent]) -> str | None:
    for _, ev in events:
        if ev.get("type") == "transcript.text.done":
            return str(ev.get("text") or "")
    return None


# ------------------------------------------------------------------------------------------
# Attribution of final words to reference utterances
# ------------------------------------------------------------------------------------------


@dataclass
class Attribution:
    """Result of aligning the final words with the reference utterances of one stream."""

    # For each hypothesis token: index into ``words`` and the utterance it aligned to (or None).
    token_word: list[int]
    token_utt: list[int | None]
    token_equal: list[bool]
    words: list[FinalWord]
    utt_tokens: list[int]  # reference tokens per utterance
    inserted_tokens: int = 0
    # Per utterance: whether its last reference token has a hypothesis token aligned to it.
    # When it has not, the utterance's latency is measured at the last word that *was*
    # transcribed, which flatters it; the count is reported so that is visible.
    last_token_aligned: list[bool] = field(default_factory=list)

    def words_of(self, utt: int) -> list[int]:
        """Indices of final words attributed (equal or substituted) to utterance ``utt``."""
        seen: list[int] = []
        for w, u in zip(self.token_word, self.token_utt):
            if u == utt and (not seen or seen[-1] != w):
                seen.append(w)
        return seen


def _ref_tokens(utterances: Sequence[Utterance]) -> tuple[list[str], list[int]]:
    tokens: list[str] = []
    owner: list[int] = []
    for i, utt in enumerate(utterances):
        for raw in utt.text.split():
            for tok in normalize_word(raw):
                tokens.append(tok)
                owner.append(i)
    return tokens, owner


def align_tokens(ref: Sequence[str], hyp: Sequence[str]) -> list[tuple[str, int, int, int, int]]:
    """Levenshtein alignment chunks ``(type, ref_start, ref_end, hyp_start, hyp_end)``.

    Thin wrapper over jiwer that also accepts empty sides (jiwer refuses an empty reference).
    """
    if not ref and not hyp:
        return []
    if not ref:
        return [("insert", 0, 0, 0, len(hyp))]
    if not hyp:
        return [("delete", 0, len(ref), 0, 0)]
    out = jiwer.process_words(" ".join(ref), " ".join(hyp))
    return [
        (c.type, c.ref_start_idx, c.ref_end_idx, c.hyp_start_idx, c.hyp_end_idx)
        for c in out.alignments[0]
    ]


def attribute(words: list[FinalWord], utterances: Sequence[Utterance]) -> Attribution:
    """Align final words to the reference utterances they transcribe.

    Equal and substituted tokens belong to the reference word they align with; inserted tokens
    (for example text hallucinated in a pause) belong to no utterance and are counted apart.
    """
    ref, owner = _ref_tokens(utterances)
    hyp: list[str] = []
    token_word: list[int] = []
    for wi, word in enumerate(words):
        for tok in normalize_word(word.raw):
            hyp.append(tok)
            token_word.append(wi)
    token_utt: list[int | None] = [None] * len(hyp)
    token_equal = [False] * len(hyp)
    ref_aligned = [False] * len(ref)
    inserted = 0
    for kind, r0, _r1, h0, h1 in align_tokens(ref, hyp):
        if kind in ("equal", "substitute"):
            for k in range(h1 - h0):
                token_utt[h0 + k] = owner[r0 + k]
                token_equal[h0 + k] = kind == "equal"
                ref_aligned[r0 + k] = True
        elif kind == "insert":
            inserted += h1 - h0
    utt_tokens = [0] * len(utterances)
    last_aligned = [False] * len(utterances)
    for r, o in enumerate(owner):
        utt_tokens[o] += 1
        last_aligned[o] = ref_aligned[r]  # ends holding the utterance's last token's status
    return Attribution(
        token_word, token_utt, token_equal, words, utt_tokens, inserted, last_aligned
    )


# ------------------------------------------------------------------------------------------
# Per-utterance latencies
# ------------------------------------------------------------------------------------------


@dataclass
class UtteranceResult:
    """What happened to one reference utterance in one stream (times in wall seconds)."""

    clip_id: str
    speech_start_s: float
    speech_end_s: float
    ref_tokens: int
    matched_tokens: int  # hypothesis tokens aligned (equal or substituted) to it
    last_word_transcribed: bool  # False: its final word was deleted, latency measured earlier
    final_time: float | None  # arrival of the delta completing its last attributed word
    first_text_time: float | None
    finalization_latency_s: float | None
    first_text_latency_s: float | None
    # Arrival of the transcript.segment closing the utterance its last word went to − its end of
    # speech: the turn as a screen that shows only segments sees it (the words were final sooner).
    segment_latency_s: float | None = None

    @property
    def lost(self) -> bool:
        return self.matched_tokens == 0


def _display_words(text: str) -> list[str]:
    """Words as a reader compares them on screen: case and edge punctuation ignored."""
    out = []
    for w in text.split():
        w = w.strip(_PUNCT_EDGES).casefold()
        if w:
            out.append(w)
    return out


def _join(committed: str, interim: str) -> str:
    if committed and interim and not committed[-1].isspace() and not interim[0].isspace():
        return committed + " " + interim
    return committed + interim


def first_interim_hits(
    events: Sequence[TimedEvent],
    attribution: Attribution,
    utterances: Sequence[Utterance],
    speed: float = 1.0,
) -> dict[int, float]:
    """Earliest interim arrival showing a correct word of each utterance.

    An interim event of item X shows X's committed text plus a tentative tail. The displayed
    words are aligned with the reference words of the utterances X's final words were
    attributed to; an *exactly matching* word of utterance u counts as u's first text. Requiring
    an exact match keeps early garbage (which would align as a substitution) from counting.
    Text shown before the utterance's onset was spoken cannot be its text (it is an alignment
    artifact, e.g. a repeated word of the previous utterance) and is ignored.
    """
    item_utts, _ = _item_links(attribution)
    ref_by_utt = _words_of_utterances(utterances)
    hits: dict[int, float] = {}
    committed: dict[str, str] = defaultdict(str)
    for t, ev in events:
        kind = ev.get("type")
        item = ev.get("item_id")
        if kind == "transcript.text.delta" and item is not None:
            committed[item] += ev.get("delta") or ""
            continue
        if kind != "transcript.text.interim" or item is None or not (ev.get("text") or "").strip():
            continue
        utts = sorted(item_utts.get(item, []))
        if not utts or all(u in hits for u in utts):
            continue
        for u in _matches(ref_by_utt, utts, _join(committed[item], ev.get("text") or "")):
            if t >= utterances[u].speech_start_s / speed:
                hits.setdefault(u, t)
    return hits


def _matches(ref_by_utt: Sequence[Sequence[str]], utts: Sequence[int], shown: str, *, misheard: bool = False) -> list[int]:
    """The utterance (of ``utts``, in order) of each reference token that ``shown`` matches
    exactly (``misheard``: or stands in for with another word), aligned with those utterances'
    reference tokens in a row."""
    kinds = ("equal", "substitute") if misheard else ("equal",)
    hyp = [tok for raw in shown.split() for tok in normalize_word(raw)]
    ref: list[str] = []
    owner: list[int] = []
    for u in utts:
        ref.extend(ref_by_utt[u])
        owner.extend([u] * len(ref_by_utt[u]))
    return [owner[k] for kind, r0, r1, _h0, _h1 in align_tokens(ref, hyp) if kind in kinds for k in range(r0, r1)]


def _words_of_utterances(utterances: Sequence[Utterance]) -> list[list[str]]:
    """Each reference utterance's normalised tokens."""
    return [[t for raw in utt.text.split() for t in normalize_word(raw)] for utt in utterances]


def _item_links(attribution: Attribution) -> tuple[dict[str, list[int]], dict[int, list[str]]]:
    """Which reference utterances each item's (server utterance's) final words went to, and
    which items each reference utterance's words went to, both in order of the words."""
    utts: dict[str, list[int]] = defaultdict(list)
    items: dict[int, list[str]] = defaultdict(list)
    for tok_i, u in enumerate(attribution.token_utt):
        item = attribution.words[attribution.token_word[tok_i]].item_id
        if u is None or item is None:
            continue
        if u not in utts[item]:
            utts[item].append(u)
        if item not in items[u]:
            items[u].append(item)
    return utts, items


#: How often, in wall seconds, :func:`caption_delays` samples the screen while someone speaks.
CAPTION_SAMPLE_S = 0.25


def caption_delays(
    events: Sequence[TimedEvent],
    attribution: Attribution,
    utterances: Sequence[Utterance],
    speed: float = 1.0,
) -> list[float]:
    """How far the captions trail the speaker while each utterance is spoken: every
    ``CAPTION_SAMPLE_S`` from its onset to its end of speech, the speech time elapsed less the
    speech time the words on screen stand for (words taken as evenly spread over the utterance;
    ahead of that counts 0). Pacing interims under load shows here, where first text and
    finalization cannot see it: a turn whose caption stands still for 3 s reads ~3 s behind.

    The screen is what a caption client shows: per item its committed (delta) text plus the last
    interim tail, the final text once the segment is out; an utterance's caption is that of the
    items its final words went to, aligned with their reference utterances, and the words of this
    utterance it shows count, misheard ones too (a wrong word on screen is the caption keeping
    up, not falling behind; WER counts it). A pause inside an utterance (JFK's) reads as delay
    after it, since the words are spread evenly: compare runs on the same audio, not utterances."""
    owners, by_utt = _item_links(attribution)
    ref_by_utt = _words_of_utterances(utterances)
    committed: dict[str, str] = defaultdict(str)
    tail: dict[str, str] = defaultdict(str)
    shown: dict[int, list[tuple[float, int]]] = defaultdict(list)  # per utterance: (time, correct words)
    for t, ev in events:
        item, kind = ev.get("item_id"), ev.get("type")
        if not isinstance(item, str) or item not in owners:
            continue
        if kind == "transcript.text.delta":
            committed[item] += ev.get("delta") or ""
        elif kind == "transcript.text.interim":
            tail[item] = ev.get("text") or ""
        elif kind == "transcript.segment":
            tail[item] = ""
        else:
            continue
        for u in owners[item]:
            covered = sorted({v for i in by_utt[u] for v in owners[i]})
            caption = " ".join(_join(committed[i], tail[i]) for i in by_utt[u])
            shown[u].append((t, _matches(ref_by_utt, covered, caption, misheard=True).count(u)))
    delays: list[float] = []
    for u, utt in enumerate(utterances):
        words = len(ref_by_utt[u])
        start, end = utt.speech_start_s / speed, utt.speech_end_s / speed
        if not words or end <= start:
            continue
        timeline = shown.get(u, [])
        k = 0
        correct = 0
        t = start
        while t <= end + 1e-9:
            while k < len(timeline) and timeline[k][0] <= t:
                correct = timeline[k][1]
                k += 1
            delays.append(max(0.0, (t - start) - min(correct, words) / words * (end - start)))
            t += CAPTION_SAMPLE_S
    return delays


def utterance_results(
    events: Sequence[TimedEvent], utterances: Sequence[Utterance], speed: float = 1.0
) -> tuple[list[UtteranceResult], Attribution]:
    """Finalization and first-text latency of every reference utterance of one stream.

    Finalization latency = arrival of the delta that made the utterance's last attributed word
    final − the utterance's end of speech; segment latency = arrival of the ``transcript.segment``
    of that word's item − the same end of speech. First-text latency = the earliest of (first delta
    holding a word attributed to it, first interim showing a correct word of it) − its speech
    onset. Both are wall seconds; stream times are converted with ``speed``.
    """
    words = final_words(events)
    attribution = attribute(words, utterances)
    interim_hits = first_interim_hits(events, attribution, utterances, speed)
    segment_at: dict[str, float] = {}
    for t, e in events:
        if e.get("type") == "transcript.segment" and isinstance(e.get("item_id"), str):
            segment_at.setdefault(e["item_id"], t)
    results = []
    for i, utt in enumerate(utterances):
        idx = attribution.words_of(i)
        matched = sum(1 for u in attribution.token_utt if u == i)
        start_wall = utt.speech_start_s / speed
        end_wall = utt.speech_end_s / speed
        last = max(idx, key=lambda w: words[w].t_final, default=None)
        final_t = None if last is None else words[last].t_final
        segment_t = None if last is None else segment_at.get(words[last].item_id or "")
        # A delta that arrived before the onset was spoken is misattributed (see above).
        first_delta = min(
            (words[w].t_first for w in idx if words[w].t_first >= start_wall), default=None
        )
        candidates = [x for x in (first_delta, interim_hits.get(i)) if x is not None]
        first_t = min(candidates) if candidates else None
        results.append(
            UtteranceResult(
                clip_id=utt.clip_id,
                speech_start_s=utt.speech_start_s,
                speech_end_s=utt.speech_end_s,
                ref_tokens=attribution.utt_tokens[i],
                matched_tokens=matched,
                last_word_transcribed=attribution.last_token_aligned[i],
                final_time=final_t,
                first_text_time=first_t,
                finalization_latency_s=None if final_t is None else final_t - end_wall,
                first_text_latency_s=None if first_t is None else first_t - start_wall,
                segment_latency_s=None if segment_t is None else segment_t - end_wall,
            )
        )
    return results, attribution


# ------------------------------------------------------------------------------------------
# Flicker
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flicker:
    """Words a reader saw erased or changed, and how many final words there were."""

    changed_words: int
    final_words: int
    interim_events: int

    @property
    def per_final_word(self) -> float:
        return self.changed_words / self.final_words if self.final_words else 0.0


def _erased(prev: list[str], new: list[str]) -> int:
    common = 0
    for a, b in zip(prev, new):
        if a != b:
            break
        common += 1
    return len(prev) - common


def flicker(events: Sequence[TimedEvent]) -> Flicker:
    """Count displayed words that were later erased or changed.

    The caption of item X after each interim is X's committed (delta) text plus the interim
    tail; when X's segment arrives the caption becomes its final text. Between two successive
    captions, every word of the earlier one after their common prefix was erased or changed.
    Case and edge punctuation are ignored (a comma appearing is not flicker).
    """
    committed: dict[str, str] = defaultdict(str)
    shown: dict[str, list[str]] = {}
    changed = 0
    interims = 0
    for _, ev in events:
        kind = ev.get("type")
        item = ev.get("item_id")
        if kind == "transcript.text.delta" and item is not None:
            committed[item] += ev.get("delta") or ""
        elif kind == "transcript.text.interim" and item is not None:
            interims += 1
            caption = _display_words(_join(committed[item], ev.get("text") or ""))
            if item in shown:
                changed += _erased(shown[item], caption)
            shown[item] = caption
        elif kind == "transcript.segment" and item in shown:
            changed += _erased(shown.pop(item), _display_words(committed[item]))
    for item, caption in shown.items():  # items never closed by a segment
        changed += _erased(caption, _display_words(committed[item]))
    n_final = len(_display_words(delta_text(events)))
    return Flicker(changed, n_final, interims)


# ------------------------------------------------------------------------------------------
# Protocol checks that affect scoring
# ------------------------------------------------------------------------------------------


def protocol_violations(events: Sequence[TimedEvent]) -> list[str]:
    """Departures from protocol.md that the bench can see (reported, not fatal)."""
    problems: list[str] = []
    done = done_text(events)
    if done is None:
        problems.append("no transcript.text.done received")
    elif done != delta_text(events):
        problems.append("concatenated deltas differ from transcript.text.done text")
    seg_items = set()
    delta_items = set()
    for _, ev in events:
        kind = ev.get("type")
        if kind == "transcript.segment":
            if ev.get("item_id") in seg_items:
                problems.append(f"two segments for item {ev.get('item_id')}")
            seg_items.add(ev.get("item_id"))
        elif kind == "transcript.text.delta":
            if ev.get("item_id") in seg_items:
                problems.append(f"delta after the segment of item {ev.get('item_id')}")
            delta_items.add(ev.get("item_id"))
        elif kind == "error":
            err = ev.get("error") or {}
            problems.append(f"error event {err.get('code')}: {err.get('message')}")
    missing = delta_items - seg_items
    if missing:
        problems.append(f"{len(missing)} item(s) with deltas but no transcript.segment")
    return problems


# ------------------------------------------------------------------------------------------
# Statistics
# ------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default method); None for no data."""
    xs = sorted(v for v in values if v is not None and not math.isnan(v))
    if not xs:
        return None
    if len(xs) == 1:
        return float(xs[0])
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    return float(xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))


def summarize(values: Sequence[float], prefix: str) -> dict[str, float]:
    """``{prefix_p50, prefix_p90, prefix_p95, prefix_mean, prefix_max}``; empty when no data.

    Absent data is omitted rather than written as null so that every figure in results.json
    is a number; summary.md says "n/a".
    """
    xs = [v for v in values if v is not None and not math.isnan(v)]
    if not xs:
        return {}
    out = {f"{prefix}_p{q}": percentile(xs, q) for q in (50, 90, 95)}
    out[f"{prefix}_mean"] = sum(xs) / len(xs)
    out[f"{prefix}_max"] = max(xs)
    return {k: float(v) for k, v in out.items() if v is not None}


# ------------------------------------------------------------------------------------------
# Stream and run evaluation
# ------------------------------------------------------------------------------------------


@dataclass
class StreamEvaluation:
    """All figures for one stream; pooled into a run by :func:`evaluate_run`."""

    index: int
    wer: WerCounts
    utterances: list[UtteranceResult]
    flicker: Flicker
    inserted_tokens: int
    hypothesis: str
    reference: str
    problems: list[str] = field(default_factory=list)
    caption_delays: list[float] = field(default_factory=list)  # see :func:`caption_delays`


def evaluate_stream(
    index: int, events: Sequence[TimedEvent], utterances: Sequence[Utterance], speed: float = 1.0
) -> StreamEvaluation:
    """Score one recorded stream against its ground truth."""
    hypothesis = delta_text(events)
    reference = " ".join(u.text for u in utterances)
    results, attribution = utterance_results(events, utterances, speed)
    return StreamEvaluation(
        index=index,
        wer=wer_counts(reference, hypothesis),
        utterances=results,
        flicker=flicker(events),
        inserted_tokens=attribution.inserted_tokens,
        hypothesis=hypothesis,
        reference=reference,
        problems=protocol_violations(events),
        caption_delays=caption_delays(events, attribution, utterances, speed),
    )


def run_figures(streams: Sequence[StreamEvaluation]) -> dict[str, float]:
    """Pool per-stream evaluations into the run's headline figures (all plain numbers)."""
    wer = ZERO_COUNTS
    fin: list[float] = []
    first: list[float] = []
    segment: list[float] = []
    lost = 0
    n_utt = 0
    last_missing = 0
    changed = final = interims = inserted = 0
    delays: list[float] = []
    for s in streams:
        wer = wer + s.wer
        delays.extend(s.caption_delays)
        for u in s.utterances:
            n_utt += 1
            if u.lost:
                lost += 1
            elif not u.last_word_transcribed:
                last_missing += 1
            if u.finalization_latency_s is not None:
                fin.append(u.finalization_latency_s)
            if u.first_text_latency_s is not None:
                first.append(u.first_text_latency_s)
            if u.segment_latency_s is not None:
                segment.append(u.segment_latency_s)
        changed += s.flicker.changed_words
        final += s.flicker.final_words
        interims += s.flicker.interim_events
        inserted += s.inserted_tokens
    figures: dict[str, float] = {
        "wer": wer.wer,
        "wer_substitutions": wer.substitutions,
        "wer_deletions": wer.deletions,
        "wer_insertions": wer.insertions,
        "reference_words": wer.reference_words,
        "utterances": n_utt,
        "utterances_lost": lost,
        "utterances_last_word_missing": last_missing,
        "utterances_without_first_text": n_utt - len(first),
        "inserted_tokens_outside_utterances": inserted,
        "flicker_changed_words": changed,
        "final_words": final,
        "flicker_per_final_word": changed / final if final else 0.0,
        "interim_events": interims,
        "protocol_problems": sum(len(s.problems) for s in streams),
    }
    figures.update(summarize(fin, "finalization_latency_s"))
    figures.update(summarize(first, "first_text_latency_s"))
    figures.update(summarize(segment, "segment_latency_s"))
    figures.update(summarize(delays, "caption_delay_s"))
    return figures


def capacity(
    levels: Sequence[dict[str, float]],
    p95_limit_s: float = 1.5,
    wer_margin: float = 0.01,
) -> tuple[int | None, list[str]]:
    """Largest N whose run meets the capacity criteria; also the reason each level failed.

    Criteria (issue 3): p95 finalization latency ≤ ``p95_limit_s``, no utterance lost, and WER
    within ``wer_margin`` (1 point) of the N=1 run. Each level is a figures dict with
    ``n_streams``. Levels are judged independently: the answer is the largest passing N, and the
    reasons list makes any non-monotonic result visible.
    """
    base = next((lv for lv in levels if lv.get("n_streams") == 1), None)
    best: int | None = None
    reasons: list[str] = []
    for lv in sorted(levels, key=lambda x: x["n_streams"]):
        n = int(lv["n_streams"])
        why = []
        p95 = lv.get("finalization_latency_s_p95")
        if p95 is None:
            why.append("no finalization latency measured")
        elif p95 > p95_limit_s:
            why.append(f"p95 finalization {p95:.2f} s > {p95_limit_s} s")
        if lv.get("utterances_lost", 0) > 0:
            why.append(f"{int(lv['utterances_lost'])} utterance(s) lost")
        if lv.get("streams_refused", 0) > 0:
            why.append(f"{int(lv['streams_refused'])} stream(s) refused with server_busy (admission control)")
        if base is not None and lv["wer"] > base["wer"] + wer_margin + 1e-12:
            why.append(f"WER {100 * lv['wer']:.2f}% > N=1 {100 * base['wer']:.2f}% + 1 point")
        if lv.get("client_send_lag_max_s", 0.0) > 0.5:
            why.append("bench client could not keep real-time pace (result invalid)")
        if why:
            reasons.append(f"N={n}: " + "; ".join(why))
        else:
            reasons.append(f"N={n}: pass")
            best = n if best is None else max(best, n)
    return best, reasons


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float | None:
    """Upper bound of the cumulative ``(upper_bound, count)`` bucket holding quantile ``q``.

    Deliberately no interpolation inside a bucket: server buckets are coarse (batch sizes
    1, 2, 4, ...), and interpolating would report a median batch of 0.5. The answer reads
    "at most this". Returns the largest finite bound when the quantile is in the +Inf bucket.
    """
    bs = sorted(buckets)
    if not bs or bs[-1][1] <= 0:
        return None
    rank = q * bs[-1][1]
    finite = [b for b, _ in bs if not math.isinf(b)]
    for bound, count in bs:
        if count >= rank and count > 0:
            return bound if not math.isinf(bound) else (finite[-1] if finite else None)
    return finite[-1] if finite else None


def least_squares_slope(points: Sequence[tuple[float, float]], min_points: int = 2) -> float | None:
    """Slope of the least-squares line through ``(x, y)`` points (None: too few, or x constant)."""
    if len(points) < min_points:
        return None
    try:
        return statistics.linear_regression([x for x, _ in points], [y for _, y in points]).slope
    except statistics.StatisticsError:
        return None
