"""Deterministic stand-ins for the two models, so the session core is testable without weights.

Test audio is a sequence of tone bursts ("words"): burst ``k`` has amplitude ``0.1 + 0.02 * k``
and is heard as the word ``w{k}``. The fake VAD calls a frame speech when its RMS is above a floor;
the fake decoder finds bursts in the window, and reports a burst that runs into the window's end
as a partial word (``w{k}~``), the way a real decoder mishears a word cut off mid-syllable. This
makes the agreement policy observable: a word is only stable once its burst is complete.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from stream_server.decoding import DecodeRequest, DecodeResult, Token, Word

RATE = 16000


def word_amplitude(k: int) -> float:
    return 0.1 + 0.02 * k


def burst(k: int, seconds: float = 0.25) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (word_amplitude(k) * np.sin(2 * np.pi * 220 * t) * np.sqrt(2)).astype(np.float32)


def silence(seconds: float) -> np.ndarray:
    return np.zeros(int(seconds * RATE), np.float32)


def speech(words: Sequence[int], gap: float = 0.12, seconds: float = 0.25) -> np.ndarray:
    parts: list[np.ndarray] = []
    for i, k in enumerate(words):
        if i:
            parts.append(silence(gap))
        parts.append(burst(k, seconds))
    return np.concatenate(parts)


def to_pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


class EnergyVad:
    """Frame is speech when its RMS exceeds 0.02 (probability 1.0), else 0.0."""

    def new_state(self) -> object:
        return None

    def probabilities(self, frames: np.ndarray, state: object) -> tuple[np.ndarray, object]:
        rms = np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=1))
        return (rms > 0.02).astype(np.float32), state


def _bursts(audio: np.ndarray) -> list[tuple[int, int]]:
    loud = np.abs(audio) > 0.02
    # Close the gaps between zero crossings of the sine (a few samples) so a burst is one run.
    kernel = np.ones(64, bool)
    loud = np.convolve(loud, kernel, mode="same") > 0
    edges = np.flatnonzero(np.diff(np.concatenate([[0], loud.astype(np.int8), [0]])))
    return list(zip(edges[::2], edges[1::2]))


class BurstDecoder:
    """Hears burst ``k`` as word `` w{k}``; one token per word with token id ``k``."""

    multilingual = False

    def __init__(self) -> None:
        self.calls: list[list[DecodeRequest]] = []
        self.fail_next = 0
        self.fail_next_final = 0

    def encode_text(self, text: str) -> list[int]:
        return [int(w[1:].rstrip("~")) for w in text.split()]

    def decode_one(self, request: DecodeRequest) -> DecodeResult:
        audio = request.audio
        words: list[Word] = []
        for lo, hi in _bursts(audio):
            rms = float(np.sqrt(np.mean(audio[lo:hi].astype(np.float64) ** 2)))
            k = round((rms - 0.1) / 0.02)
            # A final request holds all the audio there will be, so nothing in it is cut off.
            complete = request.final or len(audio) - hi >= int(0.05 * RATE)
            text = f" w{k}" if complete else f" w{k}~"
            token = Token(k, text, -0.1 if complete else -2.0)
            words.append(Word(text, lo / RATE, hi / RATE, (token,)))
        skip = len(request.prefix)
        return DecodeResult(tuple(words[skip:]), "en", 0.01, -0.1)

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]:
        self.calls.append(list(requests))
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected decoder failure")
        if self.fail_next_final and any(r.final for r in requests):
            self.fail_next_final -= 1
            raise RuntimeError("injected decoder failure")
        return [self.decode_one(r) for r in requests]
