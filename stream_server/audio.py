"""Audio input: byte framing, sample formats and resampling to the model rate.

Clients send frames of arbitrary length, so a sample may straddle two frames; the remainder is kept
rather than dropped or rejected, because WebSocket clients (browsers' MediaRecorder, telephony taps)
do not promise sample-aligned frames. Everything leaves this module as float32 at 16 kHz: mono
samples, or one column per channel for interleaved multi-channel input (a call's two legs).

G.711 (``g711_ulaw`` / ``g711_alaw``, one byte per sample) is what telephone networks and SIP/RTP
media streams carry. Its decoding is a fixed byte -> sample mapping, so PyAV's reference decoder is
run once per law over all 256 byte values and frames are then decoded by table lookup: no codec
state between frames, and a frame boundary can never split a sample.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

import av
import numpy as np
import soxr

MODEL_RATE = 16000

SAMPLE_WIDTH = {"pcm16": 2, "float32": 4, "g711_ulaw": 1, "g711_alaw": 1}

G711Law = Literal["ulaw", "alaw"]

# Wire format name -> law, and law -> FFmpeg codec name.
G711_FORMATS: dict[str, G711Law] = {"g711_ulaw": "ulaw", "g711_alaw": "alaw"}
_G711_CODECS: dict[str, str] = {"ulaw": "pcm_mulaw", "alaw": "pcm_alaw"}
# G.711 bytes carry no rate; the codec contexts need one, and any value gives the same samples.
_G711_CODEC_RATE = 8000


@dataclasses.dataclass
class DecodedAudio:
    samples: np.ndarray  # float32 at MODEL_RATE: shape (n,) for mono, (n, channels) otherwise
    invalid_samples: int  # NaN/inf samples that were replaced by silence

    def per_channel(self) -> list[np.ndarray]:
        return split_channels(self.samples)


def split_channels(samples: np.ndarray) -> list[np.ndarray]:
    """Mono ``(n,)`` or interleaved ``(n, channels)`` samples as one contiguous array per channel."""
    if samples.ndim == 1:
        return [samples]
    return [np.ascontiguousarray(samples[:, c]) for c in range(samples.shape[1])]


class AudioInput:
    """Turns client bytes in one format and rate into 16 kHz float32 samples, statefully.

    With ``channels`` > 1 the bytes are interleaved frames (one sample per channel each, as in a
    stereo WAV); a frame split across two messages is kept whole, like a split sample.
    """

    def __init__(self, audio_format: str = "pcm16", sample_rate: int = MODEL_RATE, channels: int = 1, *, step_ms: int = 0) -> None:
        self.audio_format = audio_format
        self.sample_rate = sample_rate
        self.channels = channels
        # Samples are released in steps of at least this much audio (0: as they arrive). Fewer,
        # larger steps cost less per audio second (one resampler call and one VAD run for
        # several frames) and add up to a step of latency to everything after them. It may change
        # between feeds (``Session.set_load_intake_step_ms``); samples held for a longer step
        # go out with the next feed that completes the current one.
        self.step_ms = step_ms
        self._remainder = b""
        self._held: list[np.ndarray] = []  # decoded samples waiting for a whole step
        self._held_samples = 0
        self._resampler = self._make_resampler(sample_rate, channels)

    @staticmethod
    def _make_resampler(rate: int, channels: int) -> StreamResampler | None:
        return None if rate == MODEL_RATE else StreamResampler(rate, channels)

    def _empty(self) -> np.ndarray:
        return np.zeros(0 if self.channels == 1 else (0, self.channels), np.float32)

    def reconfigure(self, audio_format: str, sample_rate: int) -> np.ndarray:
        """Switch format/rate; returns the resampler's tail for the old rate so nothing is lost.

        A partial sample of the old format cannot be interpreted in the new one and is dropped
        (at most 3 bytes).
        """
        if audio_format == self.audio_format and sample_rate == self.sample_rate:
            return self._empty()
        tail = self.flush()
        self.audio_format = audio_format
        self.sample_rate = sample_rate
        self._remainder = b""  # after flush: part of a sample of the old format
        self._resampler = self._make_resampler(sample_rate, self.channels)
        return tail

    def has_pending(self) -> bool:
        """Whether part of a sample or frame is waiting for the rest of its bytes, or samples for
        the rest of their step."""
        return bool(self._remainder) or self._held_samples > 0

    def drain(self) -> np.ndarray:
        """The resampler's delay line, now (at a commit), then a fresh stream: the audio a client
        sent before committing belongs to the committed utterance, not the next one."""
        tail = self.flush()
        self._resampler = self._make_resampler(self.sample_rate, self.channels)
        return tail

    def feed(self, data: bytes) -> DecodedAudio:
        width = SAMPLE_WIDTH[self.audio_format] * self.channels
        data = self._remainder + data
        usable = len(data) - len(data) % width
        self._remainder = data[usable:]
        samples, invalid = decode_samples(data[:usable], self.audio_format)
        if self.channels > 1:
            samples = samples.reshape(-1, self.channels)
        if (self.step_ms or self._held) and len(samples):  # held samples go with the next ones
            self._held.append(samples)
            self._held_samples += len(samples)
            if self._held_samples * 1000 < self.step_ms * self.sample_rate:
                return DecodedAudio(self._empty(), invalid)
            samples = self._release_held()
        return DecodedAudio(self._resampled(samples), invalid)

    def flush(self) -> np.ndarray:
        """Everything held: samples short of a step and the resampler's delay line (at a commit,
        a change of format, the session's end), so the last milliseconds count."""
        held = self._resampled(self._release_held())
        if self._resampler is None:
            return held
        return np.concatenate([held, self._resampler.flush()])

    def _release_held(self) -> np.ndarray:
        samples = np.concatenate(self._held) if self._held else self._empty()
        self._held, self._held_samples = [], 0
        return samples

    def _resampled(self, samples: np.ndarray) -> np.ndarray:
        if self._resampler is not None and len(samples):
            samples = self._resampler.feed(samples)
        return samples.astype(np.float32, copy=False)


#: swresample's filter, twice its default length with the cutoff near soxr HQ's passband
#: (0.91 of Nyquist). Its default (32 taps a phase, cutoff 0.97) lets more of μ-law's
#: quantisation noise at 3.9-4 kHz through, and eight calls replayed read 8.41% against
#: 7.87% with this one (soxr's stream: 7.79%; docs/benchmarks.md, "Resampling as audio arrives").
SWR_FILTER: Mapping[str, str] = MappingProxyType({"filter_size": "64", "cutoff": "0.92"})


class StreamResampler:
    """Frames at one rate in, 16 kHz out, with FFmpeg's swresample (through PyAV) per channel;
    its filter state carries across frames, so frame edges are seamless.

    Not soxr's streaming resampler (``soxr.ResampleStream``), whose filter runs in blocks: fed a
    phone line's 20 ms frames it held back 63 ms of audio on average and up to 114 ms (21 / 37 ms
    at 24 and 48 kHz), and everything downstream (the VAD's turn end, pause decodes, finals)
    waited for it. swresample holds back its filter's delay: 4 ms at 8 kHz with :data:`SWR_FILTER`.
    Whole signals (files) still go through soxr's one-shot :func:`resample`.
    """

    def __init__(self, rate: int, channels: int = 1) -> None:
        self.rate = rate
        self._resamplers = [
            av.AudioResampler(format="flt", layout="mono", rate=MODEL_RATE, options=dict(SWR_FILTER)) for _ in range(channels)
        ]
        self._pending = [np.zeros(0, np.float32) for _ in range(channels)]
        self._pts = 0

    def feed(self, samples: np.ndarray) -> np.ndarray:
        """Mono ``(n,)`` or interleaved ``(n, channels)`` samples; the 16 kHz samples ready now."""
        columns = split_channels(samples)
        for c, (resampler, column) in enumerate(zip(self._resamplers, columns, strict=True)):
            frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(column, np.float32)[None, :], format="flt", layout="mono")
            frame.sample_rate = self.rate
            frame.pts = self._pts
            self._pending[c] = self._joined(c, resampler.resample(frame))
        self._pts += len(columns[0])
        return self._take()

    def flush(self) -> np.ndarray:
        """The filter's delay line, at the end of the stream or before a change of rate."""
        for c, resampler in enumerate(self._resamplers):
            self._pending[c] = self._joined(c, resampler.resample(None))
        ready = max(len(p) for p in self._pending)
        # Channels fed alike come out alike; pad a shorter one rather than drop a longer one's tail.
        self._pending = [np.pad(p, (0, ready - len(p))) for p in self._pending]
        return self._take()

    def _joined(self, channel: int, frames: list[av.AudioFrame]) -> np.ndarray:
        # The plane's float samples as they are (to_ndarray stacks planes: 3.7 µs a frame against 0.8),
        # copied by the concatenation before the frame goes.
        parts = [self._pending[channel], *(np.frombuffer(memoryview(f.planes[0]), np.float32, f.samples) for f in frames)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _take(self) -> np.ndarray:
        """What every channel has ready (channels fed alike are ready alike): mono ``(n,)``, or
        ``(n, channels)`` as :class:`AudioInput` shapes several channels."""
        ready = min(len(p) for p in self._pending)
        out = [p[:ready] for p in self._pending]
        self._pending = [p[ready:] for p in self._pending]
        return out[0] if len(out) == 1 else np.stack(out, axis=1)


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
    if audio_format in G711_FORMATS:
        return g711_table(G711_FORMATS[audio_format])[np.frombuffer(data, dtype=np.uint8)], 0
    raise ValueError(f"unsupported audio format {audio_format!r}")


def resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """One-shot resampling of a whole signal to the model rate (files, tests)."""
    if rate == MODEL_RATE:
        return samples.astype(np.float32, copy=False)
    resampled: np.ndarray = soxr.resample(samples.astype(np.float32), rate, MODEL_RATE, quality="HQ")
    return resampled.astype(np.float32)


def _g711_codec(law: G711Law, mode: Literal["r", "w"]) -> av.AudioCodecContext:
    """A mono PyAV codec context for ``law``; one place so decoder and encoder cannot disagree."""
    if law not in _G711_CODECS:
        raise ValueError(f"unknown G.711 law {law!r}; expected 'ulaw' or 'alaw'")
    ctx = av.CodecContext.create(_G711_CODECS[law], mode)
    assert isinstance(ctx, av.AudioCodecContext)
    ctx.sample_rate = _G711_CODEC_RATE
    ctx.layout = "mono"
    return ctx


@functools.cache
def g711_table(law: G711Law) -> np.ndarray:
    """The 256 float32 samples that the G.711 byte values decode to, from PyAV's decoder.

    Built lazily and cached so the codec is opened once per law per process, not per frame; the
    table is read-only because every session shares it.
    """
    frames = _g711_codec(law, "r").decode(av.Packet(bytes(range(256))))
    pcm = np.concatenate([frame.to_ndarray().reshape(-1) for frame in frames])
    if pcm.dtype != np.int16 or len(pcm) != 256:
        raise RuntimeError(f"unexpected G.711 {law} decoder output: {pcm.dtype} x {len(pcm)}")
    table = pcm.astype(np.float32) / 32768.0
    table.flags.writeable = False
    return table


def encode_g711(samples: np.ndarray, law: G711Law) -> bytes:
    """Encode float32 mono samples in [-1, 1] as G.711 bytes (one per sample) with PyAV's encoder.

    For clients, tests and benchmarks that need telephone audio; the server itself only decodes.
    Values outside [-1, 1] are clipped, as a telephone line would; NaN becomes silence.
    """
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim != 1:
        raise ValueError(f"expected mono (1-D) samples, got shape {samples.shape}")
    if not len(samples):
        return b""
    pcm = np.round(np.clip(np.nan_to_num(samples, nan=0.0), -1.0, 1.0) * 32767.0).astype(np.int16)
    frame = av.AudioFrame.from_ndarray(pcm[None, :], format="s16", layout="mono")
    frame.sample_rate = _G711_CODEC_RATE
    encoder = _g711_codec(law, "w")
    encoder.format = "s16"
    packets = [*encoder.encode(frame), *encoder.encode(None)]
    return b"".join(bytes(packet) for packet in packets)
