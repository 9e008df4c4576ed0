"""Deterministic stand-ins for the two models, so the session core is testable without weights.

The models themselves (tone bursts are words) live in ``stream_server.bench.tone_models``, shared
with the fuzzer; here the decoder also records its calls and fails on demand.
"""

from __future__ import annotations

from collections.abc import Sequence

from stream_server.bench.tone_models import BurstDecoder as _BurstDecoder
from stream_server.bench.tone_models import EnergyVad, burst, silence, speech, to_pcm16, word_amplitude
from stream_server.decoding import DecodeRequest, DecodeResult

RATE = 16000

__all__ = ["RATE", "BurstDecoder", "EnergyVad", "burst", "silence", "speech", "to_pcm16", "word_amplitude"]


class BurstDecoder(_BurstDecoder):
    """The tone-burst decoder, recording every batch and raising when told to."""

    def __init__(self) -> None:
        self.calls: list[list[DecodeRequest]] = []
        self.fail_next = 0
        self.fail_next_final = 0

    def decode_batch(self, requests: Sequence[DecodeRequest]) -> list[DecodeResult]:
        self.calls.append(list(requests))
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("injected decoder failure")
        if self.fail_next_final and any(r.final for r in requests):
            self.fail_next_final -= 1
            raise RuntimeError("injected decoder failure")
        return super().decode_batch(requests)
