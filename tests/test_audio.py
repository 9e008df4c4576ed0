"""Sample formats, frame remainders and resampling."""

from __future__ import annotations

import numpy as np
import pytest

from stream_server.audio import AudioInput, resample
from stream_server.buffer import SampleBuffer


def test_pcm16_remainders_join_the_next_frame() -> None:
    samples = (np.arange(-500, 500) * 30).astype("<i2")
    data = samples.tobytes()
    audio = AudioInput("pcm16", 16000)
    out = np.concatenate([audio.feed(data[i : i + 7]).samples for i in range(0, len(data), 7)])
    np.testing.assert_allclose(out, samples / 32768.0)


def test_float32_nan_inf_become_silence_and_are_counted() -> None:
    samples = np.array([0.1, np.nan, -0.2, np.inf, -np.inf, 0.3], "<f4")
    decoded = AudioInput("float32", 16000).feed(samples.tobytes())
    assert decoded.invalid_samples == 3
    np.testing.assert_allclose(decoded.samples, [0.1, 0, -0.2, 0, 0, 0.3], atol=1e-7)


@pytest.mark.parametrize("rate", [8000, 22050, 44100, 48000])
def test_streaming_resampler_matches_one_shot_and_keeps_duration(rate: int) -> None:
    t = np.arange(rate * 2) / rate
    tone = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    pcm = (tone * 32767).astype("<i2").tobytes()
    audio = AudioInput("pcm16", rate)
    parts = [audio.feed(pcm[i : i + 1234]).samples for i in range(0, len(pcm), 1234)]
    parts.append(audio.flush())
    streamed = np.concatenate(parts)
    assert len(streamed) == pytest.approx(32000, abs=2)
    spectrum = np.abs(np.fft.rfft(streamed[2000:30000]))
    assert np.argmax(spectrum) * 16000 / 28000 == pytest.approx(440, abs=2)
    np.testing.assert_allclose(streamed[1000:31000], resample(tone, rate)[1000:31000], atol=2e-3)


def test_reconfigure_flushes_the_old_rate_first() -> None:
    audio = AudioInput("pcm16", 8000)
    got = len(audio.feed(np.zeros(8000, "<i2").tobytes()).samples)
    got += len(audio.reconfigure("float32", 16000))
    assert got == pytest.approx(16000, abs=2)
    assert len(audio.feed(np.zeros(100, "<f4").tobytes()).samples) == 100


def test_sample_buffer_addresses_absolute_time_and_trims() -> None:
    buf = SampleBuffer(capacity=10)
    buf.append(np.arange(100, dtype=np.float32))
    buf.trim_before(40)
    assert (buf.start, buf.end) == (40, 100)
    np.testing.assert_array_equal(buf.slice(30, 45), np.arange(40, 45))
    buf.append(np.arange(100, 150, dtype=np.float32))
    np.testing.assert_array_equal(buf.slice(95, 105), np.arange(95, 105))
    buf.trim_before(10_000)
    assert buf.start == buf.end == 150
