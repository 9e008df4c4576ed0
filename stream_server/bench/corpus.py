"""Build long-form benchmark streams from a folder of short real-speech clips.

A streaming server is judged on long sessions with pauses, not on isolated clips, so the bench
concatenates clips with natural pauses. Because the bench builds the stream itself it knows, for
every utterance, its reference text and where its *speech* starts and ends in the stream: that is
what makes per-utterance latency measurable without trusting the server's own timestamps.

Speech boundaries inside a clip come from two detectors run on the clean clip (frame energy and
Silero VAD offline), combined so that the reference onset and end are never later than either
says (see :func:`prepare_clips`); clips are trimmed to the speech plus a short margin, and the gap
between one utterance's end of speech and the next one's onset is the drawn pause (0.6–1.5 s by
default; a clip's own noisy tail can make it slightly longer).

Pauses are filled with low-level white noise (about -66 dBFS RMS by default) rather than digital
zeros: real microphones never send true silence, and a VAD that only works on zeros would look
better than it is. ``fill="silence"`` gives true zeros.

The corpus is held-out material: nothing here is tuned on it, clips are only selected by the
manifest's metadata (English, a human reference, not a model output).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import soxr

from stream_server.audio_files import read_wav

SAMPLE_RATE = 16000
TELEPHONE_RATE = 8000
# Margin of clip audio kept around the detected speech: soft onsets/offsets (fricatives, breath)
# sit below an energy threshold, and cutting them would make the clips unnaturally hard.
SPEECH_MARGIN_S = 0.12
LEAD_IN_S = 0.5  # noise before the first utterance: a session never starts mid-word
TRAIL_S = 1.5  # noise after the last utterance so that the server's VAD, not session.close, ends it
NOISE_DBFS = -66.0
# Speech-to-speech pauses between clips in a benchmark stream, and what fills them, unless flags say
# otherwise (live runs, replays and soaks alike).
DEFAULT_PAUSE_RANGE_S: tuple[float, float] = (0.6, 1.5)
DEFAULT_PAUSE_FILL = "noise"


@dataclass(frozen=True)
class Clip:
    """One manifest entry that qualifies as an English utterance with a human reference."""

    id: str
    path: Path
    text: str
    kind: str
    duration_s: float


@dataclass(frozen=True)
class Utterance:
    """One clip placed in a stream; times are audio seconds from the stream's first sample."""

    clip_id: str
    text: str
    speech_start_s: float  # energy-detected onset of speech
    speech_end_s: float  # energy-detected end of speech
    audio_start_s: float  # where the (trimmed) clip audio starts, margin included
    audio_end_s: float


@dataclass
class Stream:
    """A long-form test stream: pcm16 samples plus the ground truth needed to score it."""

    index: int
    sample_rate: int
    samples: np.ndarray  # int16 mono
    utterances: list[Utterance] = field(default_factory=list)

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate

    @property
    def speech_s(self) -> float:
        return sum(u.speech_end_s - u.speech_start_s for u in self.utterances)

    def reference_text(self) -> str:
        return " ".join(u.text for u in self.utterances)


def eligible_clips(corpus_dir: Path, telephone: bool = False) -> list[Clip]:
    """Clips usable as scored utterances: English, human reference text, audio present.

    ``text_source`` values starting with ``model_output`` are another ASR's guess, so scoring
    against them would measure agreement with that system rather than accuracy.
    """
    manifest = corpus_dir / "manifest.jsonl"
    clips: list[Clip] = []
    with manifest.open(encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            row = json.loads(line)
            if row.get("language") != "en" or not row.get("text"):
                continue
            if str(row.get("text_source") or "").startswith("model_output"):
                continue
            rel = row.get("orig8k_path") if telephone else row.get("path")
            if not rel:
                continue
            path = corpus_dir / rel
            if not path.exists():
                continue
            clips.append(
                Clip(
                    id=str(row["id"]),
                    path=path,
                    text=str(row["text"]).strip(),
                    kind=str(row.get("kind") or ""),
                    duration_s=float(row.get("duration_s") or 0.0),
                )
            )
    clips.sort(key=lambda c: c.id)  # manifest order must not matter for a fixed seed
    return clips


def load_clip(clip: Clip, sample_rate: int) -> np.ndarray:
    """Read a clip as mono float32 in [-1, 1] at ``sample_rate``."""
    return load_wav(clip.path, sample_rate)


def load_wav(path: Path | str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A 16-bit PCM WAV as mono float32 in [-1, 1] at ``sample_rate`` (resampled with soxr, as
    the server resamples)."""
    mono, sr = read_wav(path)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate).astype(np.float32)
    return np.ascontiguousarray(mono, dtype=np.float32)


def speech_bounds(audio: np.ndarray, sample_rate: int) -> tuple[int, int]:
    """Return ``(first, last)`` sample indices of speech found by frame energy.

    The threshold adapts to the clip: 40 dB under its loudest 10 ms frame, but at least 12 dB
    over its noise floor (10th percentile frame), so noisy recordings do not count their hiss
    as speech and quiet ones do not lose their soft consonants.
    """
    hop = max(1, sample_rate // 100)
    n_frames = len(audio) // hop
    if n_frames == 0:
        return 0, len(audio)
    frames = audio[: n_frames * hop].reshape(n_frames, hop).astype(np.float64)
    rms = np.sqrt(np.mean(frames * frames, axis=1)) + 1e-9
    peak = float(rms.max())
    floor = float(np.percentile(rms, 10))
    threshold = max(peak * 10 ** (-40 / 20), floor * 10 ** (12 / 20))
    active = np.flatnonzero(rms >= threshold)
    if active.size == 0:
        return 0, len(audio)
    return int(active[0] * hop), int(min(len(audio), (active[-1] + 1) * hop))


def silero_bounds(audio: np.ndarray, sample_rate: int) -> tuple[int, int] | None:
    """Speech ``(first, last)`` sample per Silero VAD run offline on the clean 16 kHz clip.

    Uses the ONNX Silero model bundled with faster-whisper (no torch). Returns None when the
    VAD is unavailable or hears no speech.
    """
    try:
        from faster_whisper.vad import VadOptions, get_speech_timestamps
    except ImportError:
        return None
    x = audio if sample_rate == SAMPLE_RATE else soxr.resample(audio, sample_rate, SAMPLE_RATE)
    opts = VadOptions(threshold=0.5, min_silence_duration_ms=100, speech_pad_ms=0)
    stamps = get_speech_timestamps(np.ascontiguousarray(x, dtype=np.float32), opts)
    if not stamps:
        return None
    scale = sample_rate / SAMPLE_RATE
    return int(stamps[0]["start"] * scale), int(stamps[-1]["end"] * scale)


def _fill(n: int, rng: np.random.Generator, fill: str) -> np.ndarray:
    if n <= 0:
        return np.zeros(0, dtype=np.float32)
    if fill == "silence":
        return np.zeros(n, dtype=np.float32)
    amplitude = 10 ** (NOISE_DBFS / 20)
    return (rng.standard_normal(n) * amplitude).astype(np.float32)


@dataclass(frozen=True)
class PreparedClip:
    """A clip trimmed to speech ± margin, cached so N streams do not re-read the same files."""

    clip: Clip
    audio: np.ndarray  # float32 at the stream rate, already trimmed
    speech_start: int  # sample index of speech onset inside ``audio``
    speech_end: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.audio) / self.sample_rate


def prepare_clips(clips: list[Clip], sample_rate: int) -> list[PreparedClip]:
    """Trim every clip to its detected speech plus :data:`SPEECH_MARGIN_S` on each side.

    Two detectors bound the speech: the energy detector (lenient: breath and background noise
    can count) and Silero VAD run offline on the clean clip (strict: a soft final consonant
    can fall outside). Trimming uses the wider span so no speech is cut; the *reference times*
    use the earlier onset and the earlier end of the two, so neither latency can be flattered
    by a late ground truth (a noisy tail would otherwise make finals look early).
    """
    prepared = []
    margin = int(SPEECH_MARGIN_S * sample_rate)
    for clip in clips:
        audio = load_clip(clip, sample_rate)
        e_first, e_last = speech_bounds(audio, sample_rate)
        vad = silero_bounds(audio, sample_rate)
        s_first, s_last = vad if vad is not None else (e_first, e_last)
        lo = max(0, min(e_first, s_first) - margin)
        hi = min(len(audio), max(e_last, s_last) + margin)
        first = min(e_first, s_first)
        last = max(first + 1, min(e_last, s_last))
        prepared.append(
            PreparedClip(clip, audio[lo:hi].copy(), first - lo, last - lo, sample_rate)
        )
    return prepared


def select_pool(
    prepared: list[PreparedClip], duration_s: float | None, seed: int, mean_pause_s: float
) -> list[PreparedClip]:
    """Choose the clips every stream will contain (a seeded sample filling ``duration_s``).

    All streams of a run share the *same* clips (each in its own order, with its own pauses), so
    WER at N streams is comparable with WER at one stream and with the offline baseline.
    """
    order = list(prepared)
    random.Random(seed).shuffle(order)
    if duration_s is None:
        return order
    budget = duration_s - LEAD_IN_S - TRAIL_S
    pool: list[PreparedClip] = []
    used = 0.0
    for pc in order:
        seconds = pc.seconds
        if pool and used + seconds + mean_pause_s > budget:
            continue
        pool.append(pc)
        used += seconds + mean_pause_s
    return pool


def build_streams(
    corpus_dir: Path,
    n_streams: int,
    seed: int = 0,
    duration_s: float | None = None,
    telephone: bool = False,
    pause_range_s: tuple[float, float] = DEFAULT_PAUSE_RANGE_S,
    fill: str = DEFAULT_PAUSE_FILL,
) -> tuple[list[Stream], list[PreparedClip]]:
    """Build ``n_streams`` streams from the same clip pool, each in its own seeded order.

    Returns the streams and the pool (for the offline baseline, which transcribes each pool clip
    once). Stream ``i`` is identical whatever ``n_streams`` is, so a capacity sweep compares like
    with like.
    """
    sample_rate = TELEPHONE_RATE if telephone else SAMPLE_RATE
    clips = eligible_clips(corpus_dir, telephone=telephone)
    if not clips:
        raise ValueError(f"no eligible English clips with human references under {corpus_dir}")
    prepared = prepare_clips(clips, sample_rate)
    pool = select_pool(prepared, duration_s, seed, mean_pause_s=sum(pause_range_s) / 2)
    streams = [
        _assemble(i, pool, sample_rate, seed, pause_range_s, fill) for i in range(n_streams)
    ]
    return streams, pool


def _assemble(
    index: int,
    pool: list[PreparedClip],
    sample_rate: int,
    seed: int,
    pause_range_s: tuple[float, float],
    fill: str,
) -> Stream:
    rng = random.Random(f"{seed}:{index}")
    nrng = np.random.default_rng([seed, index])
    order = list(pool)
    rng.shuffle(order)
    pieces: list[np.ndarray] = []
    utterances: list[Utterance] = []
    pos = 0
    prev_speech_end: int | None = None
    for pc in order:
        head = pc.speech_start  # clip audio before its speech onset (part of the margin)
        if prev_speech_end is None:
            gap = int(LEAD_IN_S * sample_rate)
        else:
            gap = int(rng.uniform(*pause_range_s) * sample_rate)
        # The pause is measured speech-to-speech: the previous clip's tail margin and this
        # clip's head margin are part of it; the rest is filler.
        already = (pos - prev_speech_end) if prev_speech_end is not None else 0
        filler = max(0, gap - already - head)
        pieces.append(_fill(filler, nrng, fill))
        pos += filler
        start = pos
        pieces.append(pc.audio)
        pos += len(pc.audio)
        utterances.append(
            Utterance(
                clip_id=pc.clip.id,
                text=pc.clip.text,
                speech_start_s=(start + pc.speech_start) / sample_rate,
                speech_end_s=(start + pc.speech_end) / sample_rate,
                audio_start_s=start / sample_rate,
                audio_end_s=pos / sample_rate,
            )
        )
        prev_speech_end = start + pc.speech_end
    tail = int(TRAIL_S * sample_rate) - (pos - (prev_speech_end or 0))
    pieces.append(_fill(tail, nrng, fill))
    audio = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    samples = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    return Stream(index=index, sample_rate=sample_rate, samples=samples, utterances=utterances)
