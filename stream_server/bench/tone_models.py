"""Deterministic stand-ins for the VAD and the decoder: tone bursts are words.

Burst ``k`` is a 220 Hz tone with RMS ``0.1 + 0.02 * k``, heard as the word ``w{k}``. The VAD
calls a frame speech when its RMS is above a floor; the decoder finds the bursts in its window
and reports one that runs into the window's end as a partial word (``w{k}~``), the way a real
decoder mishears a word cut off mid-syllable, so the agreement policy is observable: a word is
only stable once its burst is complete.

They make the session core runnable without weights, which is what the unit tests and the
fuzzer (``bench --fuzz``, many thousands of sessions) need: the same input gives the same words.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from stream_server.audio import MODEL_RATE
from stream_server.decoding import DecodeRequest, DecodeResult, Token, Word

#: A frame or sample run louder than this is speech.
SPEECH_RMS = 0.02


def word_amplitude(k: int) -> float:
    """RMS of the burst heard as ``w{k}``."""
    return 0.1 + 0.02 * k


def burst(k: int, seconds: float = 0.25) -> np.ndarray:
    t = np.arange(int(seconds * MODEL_RATE)) / MODEL_RATE
    tone: np.ndarray = (word_amplitude(k) * np.sin(2 * np.pi * 220 * t) * np.sqrt(2)).astype(np.float32)
    return tone


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * MODEL_RATE), np.float32)


def speech(words: Sequence[int], gap: float = 0.12, seconds: float = 0.25) -> np.ndarray:
    """The bursts of ``words`` with ``gap`` seconds of silence between them."""
    parts: list[np.ndarray] = []
    for i, k in enumerate(words):
        if i:
            parts.append(silence(gap))
        parts.append(burst(k, seconds))
    return np.concatenate(parts)


def to_pcm16(samples: np.ndarray) -> bytes:
    pcm: bytes = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    return pcm


class EnergyVad:
    """A frame is speech (probability 1.0) when its RMS exceeds ``SPEECH_RMS``, else 0.0."""

    def new_state(self) -> object:
        return None

    def probabilities(self, frames: np.ndarray, state: object) -> tuple[np.ndarray, object]:
        rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
        return (rms > SPEECH_RMS).astype(np.float32), state


#: Samples per level block: a little over one period of the 220 Hz tone, so each block holds a peak.
LEVEL_BLOCK = 80


def bursts(audio: np.ndarray) -> list[tuple[int, int]]:
    """``(start, end)`` sample ranges of the bursts in ``audio``: its loud runs, each split where
    the tone's level changes (two words said without a pause are still two words)."""
    loud = np.abs(audio) > SPEECH_RMS
    # Close the gaps between zero crossings of the sine (a few samples) so a burst is one run.
    loud = np.convolve(loud, np.ones(64, bool), mode="same") > 0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
    return [part for lo, hi in zip(edges[::2], edges[1::2], strict=True) for part in _level_runs(audio, int(lo), int(hi))]


def _level_runs(audio: np.ndarray, lo: int, hi: int, min_blocks: int = 3) -> list[tuple[int, int]]:
    """``[lo, hi)`` split where the word its level encodes changes; a run of fewer than
    ``min_blocks`` blocks (a run's ragged edge) joins the run before it."""
    n = (hi - lo) // LEVEL_BLOCK
    if n < 2 * min_blocks:
        return [(lo, hi)]
    peaks = np.abs(audio[lo : lo + n * LEVEL_BLOCK]).reshape(n, LEVEL_BLOCK).max(axis=1)
    levels = np.round((peaks / np.sqrt(2) - 0.1) / 0.02).astype(int)
    cuts = [0] + [i for i in range(1, n) if levels[i] != levels[i - 1]] + [n]
    runs: list[list[int]] = []
    for a, b in itertools.pairwise(cuts):
        if runs and (b - a < min_blocks or runs[-1][1] - runs[-1][0] < min_blocks):
            runs[-1][1] = b
        else:
            runs.append([a, b])
    bounds = [lo + a * LEVEL_BLOCK for a, _ in runs] + [hi]
    return list(itertools.pairwise(bounds))


class BurstDecoder:
    """Hears burst ``k`` as the word `` w{k}``: one token per word, with token id ``k``."""

    multilingual = False

    def encode_text(self, text: str) -> list[int]:
        return [int(w[1:].rstrip("~")) for w in text.split()]

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        audio = request.audio
        words: list[Word] = []
        for lo, hi in bursts(audio):
            rms = float(np.sqrt(np.mean(audio[lo:hi].astype(np.float64) ** 2)))
            k = max(0, round((rms - 0.1) / 0.02))
            # A final request holds all the audio there will be, so nothing in it is cut off.
            complete = request.final or len(audio) - hi >= int(0.05 * MODEL_RATE)
            text = f" w{k}" if complete else f" w{k}~"
            words.append(Word(text, lo / MODEL_RATE, hi / MODEL_RATE, (Token(k, text, -0.1 if complete else -2.0),)))
        return DecodeResult(tuple(words[len(request.prefix) :]), "en", 0.01, -0.1)

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]:
        return [self.decode_one(r) for r in requests]
