"""The decoder interface and its faster-whisper / CTranslate2 implementation.

Design notes (measured on tiny.en int8, 2 CPU cores):

* The encoder runs on the real audio length rounded up to whole seconds, not on Whisper's fixed
  30 s window: a 10 s window encodes in ~70 ms instead of ~380 ms. Whisper was trained on 30 s
  windows and, given a short one, does not emit end-of-text: it repeats the utterance until
  ``max_length``. We therefore decode *with timestamp tokens* and keep only the text of timestamp
  segments that start inside the real audio; the repeats always start at or past its end. The
  token budget is bounded by the audio duration, so a loop costs a few tokens, not 448.
* Per-token log probabilities and word timings come from one batched ``align`` pass
  (cross-attention DTW + teacher-forced token probabilities) over the kept tokens.
* Everything is batched: one ``encode``, one ``generate`` and one ``align`` call per batch of
  requests from any number of sessions.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import itertools
import logging
import math
import time
import zlib
from collections.abc import Sequence
from typing import Any, Protocol, TypeAlias

import numpy as np

from stream_server.audio import MODEL_RATE
from stream_server.crosstalk import frame_levels
from stream_server.profiling import StageProfile, timed
from stream_server.vad import FRAME, sound_bursts
from stream_server.words import bare_word, digits_in

log = logging.getLogger(__name__)

# faster-whisper and CTranslate2 ship no type information: their objects are ``Any``, named here
# for what they are.
Tokenizer: TypeAlias = Any  # faster_whisper.tokenizer.Tokenizer
StorageView: TypeAlias = Any  # ctranslate2.StorageView (encoder output)

FRAMES_PER_SECOND = 100  # mel frames
MAX_WINDOW_S = 30
# The client's own prompt (``DecodeRequest.hint``: vocabulary, names, style) goes before the
# earlier text in every decode of a long enough window (``SessionLimits.min_context_window_ms``),
# cut to its last this many tokens (~70 words). Before it had a field of its own it was part of
# the earlier text and cut with it: a prompt under 16 tokens never reached the decoder, a longer
# one fell off once a sentence or two had been said. Given, tiny.en read LJ Speech's "Sweynheim
# and Pannartz ... Subiaco" (prompt "Sweynheim, Pannartz, Subiaco.") and "Schoeffer", which it
# reads "Swainheim and Panerts ... Subiakul" and "chauffeur" without. Each token costs every
# decode ~0.3 ms of one pass over the prompt (README, "Names and vocabulary").
MAX_HINT_TOKENS = 96
# Earlier text is cut to this many tokens. CTranslate2 needs <|startoftranscript|> at the same
# position in every prompt of a batch, so one fixed context length lets sessions with any history
# share a batch; 48 tokens (~35 words) carry the topic and spelling the decoder benefits from.
CONTEXT_TOKENS = 48
# A shorter history is cut to a multiple of this, so prompts come in four shapes (0, 16, 32, 48
# tokens before <|startoftranscript|>) and early-session requests batch too: with any length,
# a batch of eight requests from eight sessions split into up to eight model passes.
CONTEXT_STEP = 16
MIN_WINDOW_S = 5
PAD_S = 3.0
# Encoder input lengths. Each request is padded to the first of these that holds its audio plus
# PAD_S, whatever else is in its batch: the result of a request must not depend on which other
# requests it happened to be batched with (it did, by a WER point on a loaded machine).
WINDOW_BUCKETS_S = (5, 8, 10, 15, 20, 25, 30)
# The encoder's self-attention holds a float32 score matrix per head of (frames x frames) and its
# softmax while a pass runs: 2 * heads * T^2 * 4 bytes per request, T = 50 encoder frames per
# second of window. That term dominates a pass's memory: measured with tiny.en int8 on one
# thread, eight requests of a 15 s window raised peak RSS by 222 MB, two by 16 MB, for the same
# CPU (1.66 vs 1.68 s); eight 20 s windows by 300 MB, two by 92 MB (2.67 vs 2.65 s). Batching
# saves CPU only on short windows (eight 5 s windows: 0.55 s vs 0.77 s in pairs), where the
# matrices are small, so a memory bound per pass costs no throughput.
ENCODER_FRAMES_PER_SECOND = 50
WHISPER_HEAD_DIM = 64  # every Whisper size: heads = d_model / 64
# With ``language: null`` each decode of an utterance detects its language until one decode has
# heard at least LANGUAGE_SETTLE_S of audio and the detector gives its language at least
# LANGUAGE_SETTLE_PROBABILITY; that language is then forced on the utterance's later decodes (so
# they cannot flip-flop, and a forced prefix and its continuation share one language) and becomes
# the channel's ``language_hint``: the language an unsure detection falls back to (see
# :func:`choose_language`). Measured with ``base`` on the corpus's 12 non-English and 2 English
# clips, every interim step decoded (110.7 s of speech; error = word or, for zh/ja/ko, character
# error against the references): the rule before (keep the first decode's language, 0.3-0.5 s of
# audio) labelled 10.8 s of the speech correctly at 75.5% error; keeping the first decode of
# >= 1 s, 31.9 s at 58.9%; of >= 2 s, 52.7 s at 23.2%; never keeping one, 90.6 s at 23.2%; this
# rule 96.8 s at 19.2%: every segment of the referenced clips right (Spanish's last phrase was
# Portuguese without the hint), what remains is Catalan conversation before anything settled.
LANGUAGE_SETTLE_S = 2.0
LANGUAGE_SETTLE_PROBABILITY = 0.9


def language_settled(n_samples: int, probability: float) -> bool:
    """Whether a decode of ``n_samples`` whose detected language had ``probability`` settles its
    utterance's language (otherwise the next decode detects again)."""
    return n_samples >= LANGUAGE_SETTLE_S * MODEL_RATE and probability >= LANGUAGE_SETTLE_PROBABILITY


def window_seconds(n_samples: int) -> int:
    """Whisper ends its text reliably only when it hears the audio stop: measured on partial
    windows of real speech, 0.3 s of padding left 6 of 24 hypotheses looping, 3 s (at least 5 s
    in all) none, for ~7% more decode time."""
    need = max(MIN_WINDOW_S, math.ceil(n_samples / MODEL_RATE + PAD_S))
    return next((b for b in WINDOW_BUCKETS_S if b >= need), MAX_WINDOW_S)  # Whisper's n_text_ctx // 2 - 1


@dataclasses.dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float


@dataclasses.dataclass(frozen=True)
class Word:
    text: str  # with its leading space, exactly as it joins the transcript
    start: float  # seconds from the start of the request's audio
    end: float
    tokens: tuple[Token, ...]

    @property
    def probability(self) -> float:
        return float(np.exp(np.mean([t.logprob for t in self.tokens]))) if self.tokens else 0.0


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    """One window of one channel to transcribe.

    ``prefix`` are token ids already committed inside this window: the decoder is forced to
    continue from them, so committed text can never be contradicted. ``prompt`` is earlier text
    (previous utterances) given as context only; ``hint`` is the client's own prompt (vocabulary,
    names, style), given before it in every decode.
    """

    audio: np.ndarray
    prefix: tuple[int, ...] = ()
    prompt: str = ""
    hint: str = ""
    language: str | None = None
    task: str = "transcribe"  # or "translate": English text of any speech (multilingual models)
    # Without ``language``: what to decode in when the detector is unsure of this window (below
    # LANGUAGE_SETTLE_PROBABILITY), e.g. the language the channel's last utterance settled on.
    language_hint: str | None = None
    model: str = ""
    final: bool = False
    key: object = None  # names the utterance: the scheduler orders interim work by its staleness
    # A pause decode: its words are committed when the pause lasts, and it is usually the turn's
    # last decode, so the scheduler serves it with first interims, before re-decodes.
    commits: bool = False
    # A whole file's decode (the HTTP API, or a WebSocket client ahead of real time: the runner
    # marks those, ``SessionRunner._mark_recording``), which no one waits on live: served after live
    # speakers' turn ends and first interims, in turn with their re-decodes, and not counted by
    # admission control. As finals, a file's four decodes in flight went before every live pause
    # decode: a 244 s file (4.6 s of decoding) held a live stream's first text up to 3.5 s, and
    # admission control refused a live session meanwhile.
    background: bool = False
    # Hypotheses the decoder keeps at each step (1: greedy). Requests of one beam size share a
    # pass. A turn's unsure last words are decoded again with a beam (``recheck_beam``): a greedy
    # recheck of the same window mostly read the same words again.
    beam_size: int = 1


@dataclasses.dataclass(frozen=True)
class DecodeResult:
    words: tuple[Word, ...]  # new words after the prefix, in order
    language: str
    no_speech_prob: float
    avg_logprob: float
    prefix_end: float = 0.0  # where the aligned prefix ends in the audio (seconds)
    language_probability: float = 1.0  # the detector's probability of ``language`` (1.0: not detected)

    @property
    def text(self) -> str:
        return "".join(w.text for w in self.words)


class FailureKind(enum.Enum):
    """Why a decode produced no result; the value is the error code clients see."""

    DROPPED = "dropped"  # interim work shed under load; the session simply asks again later
    MODEL_UNAVAILABLE = "model_unavailable"  # the request's model could not be loaded
    DECODER_ERROR = "decode_failed"  # the decoder raised on this request


@dataclasses.dataclass(frozen=True)
class DecodeFailure:
    """A typed decode outcome without a result (instead of a code string and a message)."""

    kind: FailureKind
    message: str


class Decoder(Protocol):
    """A batched speech decoder. Implementations may be slow; they are called from worker threads."""

    multilingual: bool

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]: ...

    def encode_text(self, text: str) -> list[int]: ...


class WhisperDecoder:
    """faster-whisper's model pieces, driven directly so that batches can span sessions."""

    def __init__(
        self,
        model_path: str,
        *,
        device: str = "cpu",
        compute_type: str = "default",
        cpu_threads: int = 0,
        num_workers: int = 1,
        timestamp_tokens: bool = True,
        pass_memory_mb: float = 0.0,
        profile: StageProfile | None = None,
    ) -> None:
        from faster_whisper import WhisperModel

        self._model = WhisperModel(
            str(model_path),
            device=device,
            compute_type=compute_type,
            cpu_threads=cpu_threads,
            num_workers=num_workers,
        )
        self.multilingual: bool = self._model.model.is_multilingual
        self._tokenizers: dict[tuple[str, str], Tokenizer] = {}
        self._num_mels = self._model.feature_extractor.mel_filters.shape[0]
        # Timestamp tokens let us drop text stamped past the audio (see the module notes). On
        # CUDA, CTranslate2's timestamp rules cost ~20x per decoding step (38 ms vs 1.8 ms at
        # batch 32 on an H100). Without them only the align-based guards and the token budget
        # remain: replays (``bench --replay --replay-timestamp-tokens off``, 2026-12-04) read the
        # whole corpus at 19.4% WER instead of 7.9% and 8 calls at 10.9% instead of 7.8%, most of
        # it echoes of the forced prefix split into other words ("i .e.", "cold -hearted") that
        # grew into loops; with words split as the prefix splits (``_words_from_alignment``),
        # 9.8% and 8.3% (timestamp tokens on: 7.9% and 7.8%, unchanged by that). Off stays for
        # throughput experiments until the rest of the gap is closed (docs/benchmarks.md, replay).
        self._timestamps = timestamp_tokens
        self._profile = profile  # per-stage CPU and wall time (``bench --profile``), or None
        self._pass_memory = pass_memory_mb * 2**20  # bound on one pass's attention memory (0: none)
        # Read once at load, not under the scheduler's lock when the first batch is formed.
        self._heads = self._encoder_heads() if self._pass_memory else 0

    # -- tokens ---------------------------------------------------------------------------

    def _tokenizer(self, language: str, task: str = "transcribe") -> Tokenizer:
        """The tokenizer whose start sequence names ``language`` and ``task`` (an English-only
        model's names neither: it has no task tokens, and transcribes)."""
        from faster_whisper.tokenizer import Tokenizer as WhisperTokenizer

        key = (language, task if self.multilingual else "transcribe")
        if key not in self._tokenizers:
            self._tokenizers[key] = WhisperTokenizer(
                self._model.hf_tokenizer,
                self.multilingual,
                task=key[1],
                language=language if self.multilingual else "en",
            )
        return self._tokenizers[key]

    def encode_text(self, text: str) -> list[int]:
        ids: list[int] = self._tokenizer("en").encode(text)
        return ids

    def decode_tokens(self, ids: Sequence[int]) -> str:
        """Text of token ids (a request's forced prefix, for traces)."""
        text: str = self._tokenizer("en").decode(list(ids))
        return text

    # -- decoding -------------------------------------------------------------------------

    def _features(self, requests: Sequence[DecodeRequest]) -> tuple[np.ndarray, int]:
        seconds = max(window_seconds(len(r.audio)) for r in requests)
        n = seconds * MODEL_RATE
        extractor = self._model.feature_extractor
        feats = np.zeros((len(requests), self._num_mels, seconds * FRAMES_PER_SECOND), np.float32)
        for i, request in enumerate(requests):
            audio = np.zeros(n, np.float32)
            clip = request.audio[:n]
            audio[: len(clip)] = clip
            mel = extractor(audio, padding=0)
            feats[i, :, : mel.shape[1]] = mel[:, : seconds * FRAMES_PER_SECOND]
        return feats, seconds

    def _languages(self, requests: Sequence[DecodeRequest], encoded: StorageView) -> tuple[list[str], list[float]]:
        """Each request's language (its own, or detected on its window) and the detector's
        probability of it (1.0 where nothing was detected)."""
        probabilities = [1.0] * len(requests)
        if not self.multilingual:
            return ["en"] * len(requests), probabilities
        missing = [i for i, r in enumerate(requests) if not r.language]
        languages = [r.language or "" for r in requests]
        if missing:
            with timed(self._profile, "detect_language"):
                detected = self._model.model.detect_language(encoded)
            for i in missing:
                languages[i], probabilities[i] = choose_language(detected[i], requests[i].language_hint)
        return languages, probabilities

    def _context(self, request: DecodeRequest) -> list[int]:
        """The tokens before <|startoftranscript|>: the client's hint, whole (up to
        MAX_HINT_TOKENS), then the end of the earlier text, so that hint and text together come
        to a multiple of CONTEXT_STEP, at most CONTEXT_TOKENS where the hint is shorter (a hint
        longer than that goes alone, or with what rounds it up)."""
        hint = self._text_tokens(request.hint)[-MAX_HINT_TOKENS:]
        history = self._text_tokens(request.prompt)
        longest = max(CONTEXT_TOKENS, -(-len(hint) // CONTEXT_STEP) * CONTEXT_STEP)
        total = min(longest, len(hint) + len(history))
        keep = max(0, total - total % CONTEXT_STEP - len(hint))
        return hint + history[len(history) - keep :] if keep else hint

    def _text_tokens(self, text: str) -> list[int]:
        if not text.strip():
            return []
        ids: list[int] = self._tokenizer("en").encode(" " + text.strip())
        return ids

    def batch_key(self, request: DecodeRequest) -> tuple[int, int, int]:
        """Requests with equal keys run in one encode/generate/align pass (the scheduler fills
        batches by it): the same encoder window, the same prompt position of
        <|startoftranscript|>, which CTranslate2 requires of a batch, and the same beam size,
        which one ``generate`` call takes for all of its requests."""
        return _pass_shape(self._context(request), request)

    def pass_limit(self, key: tuple[int, int, int]) -> int | None:
        """How many requests of pass shape ``key`` (:meth:`batch_key`) one pass may take within
        ``pass_memory_mb`` (None: no bound). The scheduler fills batches up to it, so the rest
        of a big batch can go to another worker instead of waiting behind it."""
        if not self._pass_memory:
            return None
        frames = key[1] * ENCODER_FRAMES_PER_SECOND
        per_request = 2 * self._heads * frames * frames * 4
        return max(1, int(self._pass_memory // per_request))

    def _encoder_heads(self) -> int:
        """The encoder's attention heads, from the width of its output on one second of silence."""
        import ctranslate2

        feats = np.zeros((1, self._num_mels, FRAMES_PER_SECOND), np.float32)
        encoded = self._model.model.encode(ctranslate2.StorageView.from_array(feats), to_cpu=True)
        return max(1, int(encoded.shape[2]) // WHISPER_HEAD_DIM)

    def _mode_token(self, tokenizer: Tokenizer) -> int:
        token: int = tokenizer.timestamp_begin if self._timestamps else tokenizer.no_timestamps
        return token

    def _prompt_tokens(self, request: DecodeRequest, tokenizer: Tokenizer, context: list[int]) -> list[int]:
        tokens = [tokenizer.sot_prev, *context] if context else []
        return [*tokens, *tokenizer.sot_sequence, self._mode_token(tokenizer), *request.prefix]

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]:
        """Decode any batch: requests are grouped by :meth:`batch_key`, each group is one
        encode/generate/align pass."""
        contexts = [self._context(r) for r in requests]
        groups: dict[tuple[int, int, int], list[int]] = {}
        for i, (context, request) in enumerate(zip(contexts, requests)):
            groups.setdefault(_pass_shape(context, request), []).append(i)
        results: list[DecodeResult | None] = [None] * len(requests)
        for key, group in groups.items():
            size = self.pass_limit(key) or len(group)
            for part in (group[k : k + size] for k in range(0, len(group), size)):
                for i, result in zip(part, self._decode_group([requests[i] for i in part], [contexts[i] for i in part])):
                    results[i] = result
        return results  # type: ignore[return-value]

    def _decode_group(self, requests: Sequence[DecodeRequest], contexts: list[list[int]]) -> list[DecodeResult]:
        import ctranslate2

        if not requests:
            return []
        started = time.perf_counter()
        with timed(self._profile, "features"):
            feats, _ = self._features(requests)
        with timed(self._profile, "encode"):
            encoded = self._model.model.encode(ctranslate2.StorageView.from_array(feats), to_cpu=False)
        languages, probabilities = self._languages(requests, encoded)
        tokenizers = [self._tokenizer(lang, r.task) for lang, r in zip(languages, requests)]
        prompts = [self._prompt_tokens(r, tok, c) for r, tok, c in zip(requests, tokenizers, contexts)]
        max_length, suppress_tokens = self._generation_limits(requests, prompts, tokenizers)
        with timed(self._profile, "generate"):
            generated = self._model.model.generate(
                encoded,
                prompts,
                beam_size=requests[0].beam_size,  # one per group (_pass_shape)
                max_length=max_length,
                return_scores=True,
                return_no_speech_prob=True,
                suppress_blank=True,
                suppress_tokens=suppress_tokens,
                max_initial_timestamp_index=50,
            )
        new_tokens = [
            _without_prompt_tail(g.sequences_ids[0], [self._mode_token(tok), *r.prefix])
            for g, tok, r in zip(generated, tokenizers, requests)
        ]
        kept = self._kept_tokens(requests, tokenizers, new_tokens)
        if self._profile is not None:
            self._count_work(requests, feats.shape[2] / FRAMES_PER_SECOND, new_tokens, kept)
        results = self._align_and_build(requests, encoded, tokenizers, kept, generated, languages)
        results = [dataclasses.replace(r, language_probability=q) for r, q in zip(results, probabilities)]
        log.debug("decoded batch of %d in %.3fs", len(requests), time.perf_counter() - started)
        return results

    def _count_work(
        self, requests: Sequence[DecodeRequest], window_s: float, new_tokens: list[list[int]], kept: list[list[int]]
    ) -> None:
        """The group's work in machine-independent units (``profiling.WORK_COUNTS``)."""
        assert self._profile is not None
        self._profile.count("requests", len(requests))
        self._profile.count("encoder_s", window_s * len(requests))
        self._profile.count("forced_steps", sum(1 + len(r.prefix) for r in requests))
        self._profile.count("generated_steps", sum(len(t) for t in new_tokens))
        self._profile.count("aligned_tokens", sum(len(r.prefix) + len(k) for r, k in zip(requests, kept)))

    @staticmethod
    def _token_budgets(requests: Sequence[DecodeRequest]) -> list[int]:
        """New tokens each request may keep. Speech runs at ~3-4 tokens/s; the budget leaves room
        for fast talkers and timestamp tokens while capping what a repetition loop can cost."""
        return [12 + int(len(r.audio) / MODEL_RATE * 8) for r in requests]

    def _generation_limits(
        self, requests: Sequence[DecodeRequest], prompts: list[list[int]], tokenizers: list[Tokenizer]
    ) -> tuple[int, list[int]]:
        """``max_length`` and ``suppress_tokens`` of the group's one ``generate`` call: long
        enough for the largest budget, model-default suppression."""
        budgets = self._token_budgets(requests)
        return min(448, max(len(p) + b for p, b in zip(prompts, budgets))), [-1]

    def _kept_tokens(
        self, requests: Sequence[DecodeRequest], tokenizers: list[Tokenizer], new_tokens: list[list[int]]
    ) -> list[list[int]]:
        """The generated tokens (after the forced prefix) that become text: those of timestamp
        segments starting inside the audio, within the budget (see the module notes)."""
        return [
            _tokens_inside_audio(tokens, tok, len(r.audio) / MODEL_RATE, budget)
            for tokens, tok, r, budget in zip(new_tokens, tokenizers, requests, self._token_budgets(requests))
        ]

    def _align_and_build(
        self,
        requests: Sequence[DecodeRequest],
        encoded: StorageView,
        tokenizers: list[Tokenizer],
        kept: list[list[int]],
        generated: Sequence[Any],  # ctranslate2.models.WhisperGenerationResult
        languages: list[str],
    ) -> list[DecodeResult]:
        """The kept tokens (after each request's forced prefix) aligned, then made words."""
        text_tokens = [list(r.prefix) + k for r, k in zip(requests, kept)]
        with timed(self._profile, "align"):
            alignments = self._align(requests, encoded, tokenizers, text_tokens)
        with timed(self._profile, "words"):
            return self._build(requests, tokenizers, text_tokens, alignments, generated, languages)

    def _align(
        self, requests: Sequence[DecodeRequest], encoded: StorageView, tokenizers: list[Tokenizer], text_tokens: list[list[int]]
    ) -> list[Any]:
        """One ``align`` pass per start sequence: word timings and teacher-forced token
        probabilities of each request's text (None where a request has no text)."""
        num_frames = [
            max(1, min(int(len(r.audio) / MODEL_RATE * FRAMES_PER_SECOND), MAX_WINDOW_S * 100)) // 2 * 2
            for r in requests
        ]
        # align takes one start sequence per call: group the batch by it (one group unless
        # languages differ).
        alignments: list[Any] = [None] * len(requests)  # ctranslate2 alignment results
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, tok in enumerate(tokenizers):
            if text_tokens[i]:
                groups.setdefault(tuple(tok.sot_sequence), []).append(i)
        for start_sequence, idx in groups.items():
            feats = encoded if len(idx) == len(requests) else _select(encoded, idx)
            out = self._model.model.align(
                feats,
                list(start_sequence),
                [text_tokens[i] for i in idx],
                [num_frames[i] for i in idx],
                median_filter_width=7,
            )
            for i, res in zip(idx, out):
                alignments[i] = res
        return alignments

    def _build(
        self,
        requests: Sequence[DecodeRequest],
        tokenizers: list[Tokenizer],
        text_tokens: list[list[int]],
        alignments: list[Any],  # ctranslate2 alignment results
        generated: Sequence[Any],  # ctranslate2.models.WhisperGenerationResult
        languages: list[str],
    ) -> list[DecodeResult]:
        """Words from the alignments, through the guards (squeezed tail, loops, echoes)."""
        results: list[DecodeResult] = []
        for i, request in enumerate(requests):
            words, prefix_end = _words_from_alignment(
                tokenizers[i], text_tokens[i], len(request.prefix), alignments[i]
            )
            words = _drop_squeezed_tail(words, len(request.audio) / MODEL_RATE)
            words = _drop_repetition_loop(words)
            words = _drop_hollow_repeat(words)
            prefix_words = tokenizers[i].decode(list(request.prefix)).split()
            words = _drop_echo(prefix_words, words)
            words = _drop_squeezed_echo(prefix_words, words)
            words = _drop_resegmented_restart(words)
            # Both after the echo's removal, which can expose them: "simpler. Imitates a much
            # freer hand, simpler. ..." loses its restarts and leaves "simpler. simpler. simpler.".
            words = _drop_one_word_sentence_loop(words)
            words = _drop_unheard_sentence_start(words)
            words = _drop_unheard_copies(words, request.audio[int(prefix_end * MODEL_RATE) :])
            logprobs = [t.logprob for w in words for t in w.tokens]
            avg = float(np.mean(logprobs)) if logprobs else 0.0
            no_speech = float(generated[i].no_speech_prob)
            if no_speech > 0.6 and avg < -1.0:
                # Whisper's own rule: probably silence or noise, and the text is a guess.
                words = []
            results.append(
                DecodeResult(tuple(words), languages[i], no_speech, avg, prefix_end=prefix_end)
            )
        return results


def _pass_shape(context: list[int], request: DecodeRequest) -> tuple[int, int, int]:
    """What must be equal across one model pass: prompt context length, encoder window (seconds)
    and beam size."""
    return len(context), window_seconds(len(request.audio)), request.beam_size


def choose_language(ranked: Sequence[tuple[str, float]], hint: str | None) -> tuple[str, float]:
    """The detector's language (``ranked``: ``(<|code|>, probability)``, most likely first) and
    its probability; the hint instead when the detector is unsure and the hint is a language.

    Short phrases are where detection fails: "y tiene muy poca asistencia" alone, after two
    Spanish sentences, is Portuguese to ``base`` (0.54); the conversation's language is the
    better guess then, and a sure detection still switches language."""
    probabilities = {token.strip("<|>"): float(p) for token, p in ranked}
    best = ranked[0][0].strip("<|>")
    if hint is not None and hint != best and hint in probabilities and probabilities[best] < LANGUAGE_SETTLE_PROBABILITY:
        return hint, probabilities[hint]
    return best, probabilities[best]


def _select(encoded: StorageView, idx: list[int]) -> StorageView:
    import ctranslate2

    arr = np.asarray(encoded.to_device(ctranslate2.Device.cpu) if hasattr(encoded, "to_device") else encoded)
    return ctranslate2.StorageView.from_array(np.ascontiguousarray(arr[idx]))


def _without_prompt_tail(sequence: Sequence[int], tail: Sequence[int]) -> list[int]:
    # CTranslate2 returns the prompt tokens after the SOT sequence (the first timestamp and the
    # forced prefix) as part of the generated sequence.
    n = len(tail)
    if list(sequence[:n]) == list(tail):
        return list(sequence[n:])
    return list(sequence)


def _tokens_inside_audio(sequence: Sequence[int], tokenizer: Tokenizer, duration: float, budget: int) -> list[int]:
    """Text tokens of the timestamp segments that start inside the audio.

    On a short window Whisper repeats itself in new segments stamped at or after the audio's end;
    those, and a segment cut off by the token budget while repeating, are dropped.
    """
    begin = tokenizer.timestamp_begin
    eot = tokenizer.eot
    if not any(t >= begin for t in sequence):  # decoded without timestamps
        return [t for t in sequence[: sequence.index(eot) if eot in sequence else len(sequence)]][:budget]
    kept: list[int] = []
    segment: list[int] = []
    segment_start = 0.0
    for token in sequence:
        if token == eot:
            break
        if token >= begin:
            stamp = (token - begin) * 0.02
            if segment:
                kept.extend(segment)
                segment = []
            segment_start = stamp
            if stamp >= duration - 0.1:
                return kept
            continue
        if segment_start < duration - 0.1:
            segment.append(token)
    # An unterminated last segment is normal in streaming (speech continues past the window's end).
    kept.extend(segment)
    return kept


def _words_from_alignment(
    tokenizer: Tokenizer, tokens: list[int], n_prefix: int, alignment: Any
) -> tuple[list[Word], float]:
    if not tokens or alignment is None or not len(alignment.alignments):
        # No alignment: the window is shorter than the two feature frames of one encoder frame
        # (an empty or 5 ms window still gets text such as " you" from the decoder, and the
        # aligner has no frame to put it on). Text that no audio holds is not a word.
        return [], 0.0
    words_text, word_tokens = tokenizer.split_to_word_tokens(tokens + [tokenizer.eot])
    probs = np.asarray(alignment.text_token_probs, dtype=np.float64)
    pairs = np.asarray(alignment.alignments, dtype=np.int64).reshape(-1, 2)
    text_idx, time_idx = pairs[:, 0], pairs[:, 1]
    jumps = np.pad(np.diff(text_idx), (1, 0), constant_values=1).astype(bool)
    jump_times = time_idx[jumps] / 50.0  # encoder frames: 50 per second
    boundaries = np.pad(np.cumsum([len(t) for t in word_tokens[:-1]]), (1, 0))
    words: list[Word] = []
    prefix_end = 0.0
    for k in range(len(word_tokens) - 1):
        lo, hi = int(boundaries[k]), int(boundaries[k + 1])
        start = float(jump_times[lo]) if lo < len(jump_times) else 0.0
        end = float(jump_times[hi]) if hi < len(jump_times) else start
        if hi <= n_prefix:
            prefix_end = end
            continue
        toks = tuple(
            Token(t, tokenizer.decode([t]), float(np.log(max(probs[j], 1e-12))) if j < len(probs) else 0.0)
            for j, t in zip(range(lo, hi), word_tokens[k])
        )
        text = words_text[k]
        if words and not text.startswith(" ") and text.strip():
            # Punctuation, and any text without a space before it, belongs to the word before it
            # ("modern." not "modern" + "."; "i.e." not "i" + ".e."; "cold-hearted"), as the words
            # of a forced prefix split: the echo guards compare the two, and " i" ".e." after a
            # prefix ending "i.e." went through as new words (without timestamp tokens it was
            # committed and grew into "i.e. i.e. ... i.e." in every draw).
            last = words[-1]
            words[-1] = Word(last.text + text, last.start, max(last.end, end), last.tokens + toks)
            continue
        words.append(Word(text, start, max(end, start), toks))
    return words, prefix_end


def _drop_squeezed_tail(words: list[Word], duration: float) -> list[Word]:
    """Drop words the aligner could only place at the very end of the audio.

    Text the decoder invents past the audio (a repeat, a guessed continuation) has no audio to
    align to, so DTW piles it onto the last frames.
    """
    for k, word in enumerate(words):
        if word.start >= duration - 0.06:
            return words[:k]
    return words


def _drop_echo(prefix_words: list[str], words: list[Word], min_tail: int = 2, min_inner: int = 4) -> list[Word]:
    """Remove text the decoder says a second time, word for word, within one window.

    A decoder that loses its place after a forced prefix restarts the window ("... century. the
    invention of ... century. may justly ..."). A run of ``min_inner`` or more words that repeats
    earlier text of the window verbatim is dropped (``min_tail`` at the very end of the window,
    where such restarts are cut off; a genuine repeat cut there comes back once more audio makes
    it inner text). Speakers do repeat themselves, but rarely four words
    verbatim within one utterance window; decoders do it often.
    """

    earlier = [bare_word(w) for w in prefix_words]
    current = [bare_word(w.text) for w in words]
    # At the seam: the continuation starting with the prefix's last words ("Printing." →
    # "Printing. In the ...") is the decoder re-reading them, for runs of any length.
    for n in range(min(5, len(earlier), len(current)), 0, -1):
        if earlier[-n:] == current[:n]:
            words, current = words[n:], current[n:]
            break
    kept: list[Word] = []
    i = 0
    while i < len(current):
        history = earlier + [bare_word(w.text) for w in kept]
        run = _longest_repeat(history, current, i)
        at_end = i + run == len(current)
        if (run >= min_inner or (at_end and run >= min_tail)) and not _one_digit_again(current[i - 1 : i + run] if i else []):
            i += run
            continue
        kept.append(words[i])
        i += 1
    return kept


def _one_digit_again(words: list[str]) -> bool:
    """Whether ``words`` (bare) are one digit said again and again ("0 0 0 0 0" in a card number):
    a number, not an echo; the loop guard judges whether each copy had time to be said."""
    return len(words) > 1 and len(set(words)) == 1 and digits_in(words[0]) == 1


def _drop_squeezed_echo(prefix_words: list[str], words: list[Word], per_word_s: float = 0.08, max_size: int = 8) -> list[Word]:
    """Drop a last run of two or more words that repeats earlier words of the window (the
    forced prefix too) and that the aligner squeezed into almost no audio: a restart.

    The exact echo guards miss a restart the decoder spells a little differently, or that
    starts inside the prefix. Calls replay, 400 ms turns: "Bazel. | Paris. Basil. Paris."
    ("Basil. Paris." in 0.14 s, after the forced "Bazel."); "... the lower case. | then the
    capital letters. then the capitol" ("letters. then the" at one instant, "capitol" in
    0.12 s); "... centuries before the wood | cutters of the Netherlands, before the
    woodcutters", the last three at the instant "Netherlands," ended, which the pause then
    committed. Words match when spelled alike (``difflib`` ratio 0.6: "bazel"/"basil",
    "capital"/"capitol") or when one begins with the other ("wood"/"woodcutters"). A speaker's
    repeat takes time: two words in under ``per_word_s`` each are not heard.
    """
    earlier = [bare_word(w) for w in prefix_words]
    current = [bare_word(w.text) for w in words]
    for size in range(min(max_size, len(words) - 1), 1, -1):
        tail = words[-size:]
        if tail[-1].end - tail[0].start > per_word_s * size:
            continue
        history = earlier + current[:-size]
        said = current[-size:]
        for j in range(len(history) - size + 1):
            if all(_spelled_alike(a, b) for a, b in zip(history[j : j + size], said)):
                return words[:-size]
    return words


def _spelled_alike(a: str, b: str, min_stem: int = 4) -> bool:
    """Whether a decoder's second spelling of a word could be its first: near in letters
    ("capital"/"capitol"), or one the other's stem of at least ``min_stem`` letters
    ("wood"/"woodcutters"; "a" is no stem of "and")."""
    if a == b:
        return True
    short, long = sorted((a, b), key=len)
    return (len(short) >= min_stem and long.startswith(short)) or difflib.SequenceMatcher(None, a, b).ratio() >= 0.6


def _drop_hollow_repeat(words: list[Word], max_size: int = 8, ratio: float = 0.5, per_word_s: float = 0.15) -> list[Word]:
    """Drop a tail that repeats the words just before it but has (almost) no audio of its own.

    Prompted with earlier text, the decoder sometimes says a short utterance twice ("In 1813, in
    1813,"); the aligner then squeezes the second copy into a few frames, often zero. A tail
    whose aligned span is under ``ratio`` of its first copy's *and* under ``per_word_s`` a word
    is that invention (a third "5" for "five five", 0.14 s at the window's very end). A speaker's repeat has audio of its own even where the aligner gives
    the first copy too much of it (tidigits "five five": 1.06 s and 0.46 s), so it stays.
    """
    while True:
        norm = [bare_word(w.text) for w in words]
        for size in range(1, min(max_size, len(words) // 2) + 1):
            tail, first = words[-size:], words[-2 * size : -size]
            span = tail[-1].end - tail[0].start
            if norm[-size:] == norm[-2 * size : -size] and span < ratio * (first[-1].end - first[0].start) and span <= per_word_s * size:
                words = words[:-size]
                break
        else:
            return words


def _drop_unheard_copies(words: list[Word], audio: np.ndarray) -> list[Word]:
    """One word said over and over, cut to as many copies as ``audio`` (the window after its
    forced prefix) holds bursts of sound.

    Around a short word, tiny.en often writes it twice or three times: a 0.27 s "four" padded as
    a turn is "four, four," (or "Four. Four."), and 11 of 30 spoken digits (FSDD, with 0.3 to 0.5 s
    of padding) read so in at least one of two paddings, "9 9 9" among them; the aligner spreads
    the copies over the padding, so ``_drop_hollow_repeat`` sees each with audio of its own. Each
    of those windows holds one burst of sound. A speaker's repeat is two ("five five": two bursts
    35 dB over the dip between them), and keeps both copies.

    The copies kept are those the decoder was surest of: Whisper's no-speech rule weighs the
    mean log probability of what is left, and a first copy at -1.5 before a second at -0.3 would
    have turned a heard "Zero." into silence (24-stream replay).
    """
    if len(words) < 2 or len({bare_word(w.text) for w in words}) != 1:
        return words
    n = len(audio) // FRAME
    bursts = sound_bursts(frame_levels(audio[: n * FRAME].reshape(n, FRAME)))
    if not 0 < bursts < len(words):
        return words
    surest = sorted(range(len(words)), key=lambda k: -float(np.mean([t.logprob for t in words[k].tokens] or [0.0])))
    return [words[k] for k in sorted(surest[:bursts])]


def _drop_unheard_sentence_start(words: list[Word], max_span_s: float = 0.02) -> list[Word]:
    """Drop the words after a sentence's end when the aligner gave them no audio at all.

    After a sentence ends, the decoder sometimes goes on with a guessed next one. Seen: "...
    superlative degree. And you always want to see it in the superlative degree." for an
    utterance that began "And you always want", prompted with text ending in "And": the echo
    guard removes the restart after the forced prefix, leaving "And", which the aligner (like the
    whole restart) gave zero length. And "a losing game. 4. The little" on a window whose audio
    held only "game": the three invented words all at one instant (corpus replay).
    A real next sentence cut by the window's end has at least a frame or two of its first word.
    Words without audio after no sentence end can be real: a loop that took the audio of "add
    the figures." left the first copy at 1.98-1.98 s (``_drop_squeezed_echo`` takes the restarts).
    """
    for k in range(1, len(words)):
        if words[k - 1].text.rstrip().endswith((".", "?", "!")) and words[-1].end - words[k].start <= max_span_s:
            return words[:k]
    return words


def _drop_resegmented_restart(words: list[Word], min_chars: int = 3) -> list[Word]:
    """Drop a tail that spells the words just before it again, split into other words.

    Seen on "two nine three four zero" (1.84 s): "29340. 2. 9340." The echo guards compare words
    and miss it; a speaker who repeats a number says it the same way twice, and the decoder then
    writes it the same way ("5551234, 5551234"), so only a *different* split is taken as a restart.
    """
    spelled = [bare_word(w.text) for w in words]
    text = "".join(spelled)
    offsets = list(itertools.accumulate(map(len, spelled), initial=0))  # where each word starts in text
    word_at = {offset: k for k, offset in enumerate(offsets)}  # the last word starting there
    for j in range(1, len(words)):
        size = offsets[-1] - offsets[j]  # the tail words[j:], spelled
        if size < min_chars:
            break
        k = word_at.get(offsets[j] - size)  # the words before j that spell as much, if a word starts there
        if k is not None and j - k != len(words) - j and text[offsets[k] : offsets[j]] == text[offsets[j] :]:
            return words[:j]
    return words


def _longest_repeat(history: list[str], current: list[str], i: int) -> int:
    """Length of the longest run current[i:i+n] that occurs contiguously in ``history``."""
    best = 0
    for j in range(len(history)):
        n = 0
        while i + n < len(current) and j + n < len(history) and history[j + n] == current[i + n]:
            n += 1
        best = max(best, n)
    return best


def _drop_one_word_sentence_loop(words: list[Word]) -> list[Word]:
    """``words`` up to the first copy of a word written three times running as a sentence of
    its own each time (same word, each ending in ". ? !"); ``words`` itself when there is none."""
    ends = [w.text.rstrip().endswith((".", "?", "!")) for w in words]
    norm = [bare_word(w.text) for w in words]
    for i in range(len(words) - 2):
        if norm[i] and ends[i] and norm[i] == norm[i + 1] == norm[i + 2] and ends[i + 1] and ends[i + 2]:
            return words[: i + 1]
    return words


def _drop_repetition_loop(words: list[Word]) -> list[Word]:
    """Cut a tail that repeats the same 1-8 word phrase three or more times in a row.

    Real speech repeats a phrase twice at most ("no, no"), a single word sometimes three times
    ("no, no, no"): one-word loops are cut here only in a text that compresses like a loop (a
    word written three times as sentences, "3. 3. 3.", is ``_drop_one_word_sentence_loop``'s,
    which runs once, after the echo guard); a phrase of two or more words said three times
    running ("7 of clubs. 7 of clubs. 7 of clubs.") is one.
    """
    if len(words) < 6:
        return words
    text = "".join(w.text for w in words).encode()
    loop_like = len(text) >= 40 and len(text) / max(1, len(zlib.compress(text))) >= 2.0
    norm = [bare_word(w.text) for w in words]
    for size in range(1 if loop_like else 2, 9):
        for start in range(0, len(norm) - 3 * size + 1):
            phrase = norm[start : start + size]
            if norm[start + size : start + 2 * size] == phrase and norm[start + 2 * size : start + 3 * size] == phrase:
                if len(set(phrase)) == 1 and _spoken_digit_run(words, norm, start):
                    continue
                if len(set(phrase)) == 1 and (kept := _digit_loop_left(words, norm, start)) is not None:
                    return kept
                return words[: start + size]
    return words


#: A digit said again and again is a number ("5200 0000 0000 0007" has eleven zeros running), not
#: a loop, while each copy had time to be said; a copy under this long (seconds), or more copies
#: than a card number holds, is the decoder's loop.
DIGIT_SAID_S = 0.15
MAX_DIGIT_REPEATS = 12
#: How long a digit read out takes, with its gap, when a reading has no other digit to time one by.
DIGIT_READ_S = 0.4


def _digit_loop_left(words: list[Word], norm: list[str], start: int) -> list[Word] | None:
    """``words`` with a one-digit loop the decoder came out of cut to the copies its audio holds,
    or None when it did not come out (nothing after the loop, or only words squeezed as it was).

    Forced on from "0, 0, 0, 0, 0," of a card read "7300 0000 0016", tiny.en wrote thirteen more
    zeros in 1.1 s, then "1, 6" at their times: cutting at the loop lost "1, 6" and the sentence
    after it, and left a card too short to redact. The copies kept are as many as the loop's
    span holds at the time its reading's other digits took each (``DIGIT_READ_S`` without any),
    at least one. Guards after this one judge what is left; the loop guard runs on the rest."""
    if digits_in(norm[start]) != 1:
        return None
    end = start
    while end < len(norm) and norm[end] == norm[start]:
        end += 1
    after = words[end:]
    if not after or any(w.end - w.start < DIGIT_SAID_S for w in after[:2]):
        return None
    copies = words[start:end]
    others = [w.end - w.start for i, w in enumerate(words) if not start <= i < end and digits_in(norm[i]) == 1]
    each = float(np.median(others)) if others else DIGIT_READ_S
    kept = max(1, min(len(copies), int((copies[-1].end - copies[0].start) / max(each, DIGIT_SAID_S))))
    last = dataclasses.replace(copies[kept - 1], end=copies[-1].end)
    return [*words[:start], *copies[: kept - 1], last, *_drop_repetition_loop(after)]


def _spoken_digit_run(words: list[Word], norm: list[str], start: int) -> bool:
    """Whether the word repeated from ``start`` on is a one-digit number whose copies were each
    heard for :data:`DIGIT_SAID_S` on average, and no more than :data:`MAX_DIGIT_REPEATS` of them:
    tiny.en read "7, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 6. Has never been surpassed." right,
    and the loop cut kept "7, 3, 0, 0," of it."""
    if digits_in(norm[start]) != 1:
        return False
    end = start
    while end < len(norm) and norm[end] == norm[start]:
        end += 1
    copies = words[start:end]
    return end - start <= MAX_DIGIT_REPEATS and (copies[-1].end - copies[0].start) / len(copies) >= DIGIT_SAID_S
