"""Audio input: byte framing, sample formats and resampling to the model rate.

Clients send frames of arbitrary length, so a sample may straddle two frames; the remainder is kept
rather than dropped or rejected, because WebSocket clients (browsers' MediaRecorder, telephony taps)
do not promise sample-aligned frames. Everything leaves this module as float32 mono at 16 kHz.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import soxr

MODEL_RATE = 16000

SAMPLE_WIDTH = {"pcm16": 2, "float32": 4}


@dataclasses.dataclass
class DecodedAudio:
    samples: np.ndarray  # float32, mono, MODEL_RATE
    invalid_samples: int  # NaN/inf samples that were replaced by silence


class AudioInput:
    """Turns client bytes in one format and rate into 16 kHz float32 samples, statefully."""

    def __init__(self, audio_format: str = "pcm16", sample_rate: int = MODEL_RATE) -> None:
        self.audio_format = audio_format
        self.sample_rate = sample_rate
        self._remainder = b""
        self._resampler = self._make_resampler(sample_rate)

    @staticmethod
    def _make_resampler(rate: int) -> soxr.ResampleStream | None:
        # soxr's streaming resampler keeps filter state across frames, so frame edges are seamless.
        if rate == MODEL_RATE:
            return None
        return soxr.ResampleStream(rate, MODEL_RATE, 1, dtype="float32", quality="HQ")

    def reconfigure(self, audio_format: str, sample_rate: int) -> np.ndarray:
        """Switch format/rate; returns the resampler's tail for the old rate so nothing is lost.

        A partial sample of the old format cannot be interpreted in the new one and is dropped
        (at most 3 bytes).
        """
        if audio_format == self.audio_format and sample_rate == self.sample_rate:
            return np.zeros(0, np.float32)
        tail = self.flush()
        self.audio_format = audio_format
        self.sample_rate = sample_rate
        self._remainder = b""
        self._resampler = self._make_resampler(sample_rate)
        return tail

    def feed(self, data: bytes) -> DecodedAudio:
        width = SAMPLE_WIDTH[self.audio_format]
        data = self._remainder + data
        usable = len(data) - len(data) % width
        self._remainder = data[usable:]
        samples, invalid = decode_samples(data[:usable], self.audio_format)
        if self._resampler is not None and len(samples):
            samples = self._resampler.resample_chunk(samples)
        return DecodedAudio(samples.astype(np.float32, copy=False), invalid)

    def flush(self) -> np.ndarray:
        """Drain the resampler's delay line (at session end) so the last milliseconds count."""
        if self._resampler is None:
            return np.zeros(0, np.float32)
        return self._resampler.resample_chunk(np.zeros(0, np.float32), last=True).astype(np.float32)


def decode_samples(data: bytes, audio_format: str) -> tuple[np.ndarray, int]:
    """Interpret whole samples; non-finite float samples become 0 and are counted."""
    if audio_format == "pcm16":
        return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0, 0
    if audio_format == "float32":
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        bad = ~np.isfinite(samples)
        invalid = int(bad.sum())
        if invalid:
            samples = samples.copy()
            samples[bad] = 0.0
        return np.clip(samples, -1.0, 1.0), invalid
    raise ValueError(f"unsupported audio format {audio_format!r}")


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """One-shot resampling of a whole signal to the model rate (files, tests)."""
    if rate == MODEL_RATE:
        return samples.astype(np.float32, copy=False)
    return soxr.resample(samples.astype(np.float32), rate, MODEL_RATE, quality="HQ").astype(np.float32)
