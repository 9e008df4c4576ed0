"""Sample formats, frame remainders and resampling."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from stream_server.audio import AudioInput, G711Law, encode_g711, g711_table, resample
from stream_server.buffer import SampleBuffer
from stream_server.protocol import SessionConfig
from tests.support import load_clip, manifest, require_speech

LAWS: list[G711Law] = ["ulaw", "alaw"]
# Real recordings made at 8 kHz (telephone rate), so the round trip sees what a phone line carries.
TELEPHONE_CLIPS = ["deepspeech_LDC93S1_8k", "vosk_test_8k"]


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


@pytest.mark.parametrize("audio_format, rate", [("g711_ulaw", 8000), ("pcm16", 24000), ("pcm16", 44100), ("pcm16", 48000)])
def test_streaming_resampler_holds_back_only_milliseconds(audio_format: str, rate: int) -> None:
    """A phone line's 20 ms frames come out as they arrive, not in blocks: every turn end and
    pause decode waits for what the resampler holds back (soxr's stream held 63 ms on average,
    114 ms at worst, of an 8 kHz line)."""
    audio = AudioInput(audio_format, rate)
    frame = rate // 50
    width = 1 if audio_format == "g711_ulaw" else 2
    rng = np.random.default_rng(0)
    fed = out = 0
    held_ms = []
    for _ in range(100):
        out += len(audio.feed(rng.integers(0, 256, frame * width, dtype=np.uint8).tobytes()).samples)
        fed += frame
        held_ms.append((fed * 16000 / rate - out) / 16)
    assert max(held_ms) <= 5.0
    assert out + len(audio.flush()) == pytest.approx(fed * 16000 / rate, abs=2)


def test_interleaved_channels_resample_like_each_channel_alone() -> None:
    rng = np.random.default_rng(1)
    left, right = (rng.standard_normal(8000) * 3000).astype("<i2"), (rng.standard_normal(8000) * 3000).astype("<i2")
    stereo = AudioInput("pcm16", 8000, channels=2)
    both = np.concatenate([stereo.feed(np.stack([left, right], 1)[i : i + 333].tobytes()).samples for i in range(0, 8000, 333)] + [stereo.flush()])
    for column, mono in ((0, left), (1, right)):
        alone = AudioInput("pcm16", 8000)
        expected = np.concatenate([alone.feed(mono[i : i + 333].tobytes()).samples for i in range(0, 8000, 333)] + [alone.flush()])
        np.testing.assert_array_equal(both[:, column], expected)


@pytest.mark.parametrize("audio_format, rate", [("g711_ulaw", 8000), ("pcm16", 16000)])
def test_samples_held_for_a_step_come_out_whole_and_the_same(audio_format: str, rate: int) -> None:
    """``step_ms`` releases audio in steps (fewer resampler calls and VAD runs) without changing a
    sample; what is short of a step is pending, and a flush gives it."""
    rng = np.random.default_rng(2)
    width = 1 if audio_format == "g711_ulaw" else 2
    frames = [rng.integers(0, 256, rate // 50 * width, dtype=np.uint8).tobytes() for _ in range(23)]
    plain, stepped = AudioInput(audio_format, rate), AudioInput(audio_format, rate, step_ms=100)
    released = [len(stepped.feed(frame).samples) > 0 for frame in frames]
    assert released == [(i + 1) % 5 == 0 for i in range(23)]  # every fifth 20 ms frame
    assert stepped.has_pending() and not plain.has_pending()
    expected = np.concatenate([plain.feed(frame).samples for frame in frames] + [plain.flush()])
    stepped = AudioInput(audio_format, rate, step_ms=100)
    got = np.concatenate([stepped.feed(frame).samples for frame in frames] + [stepped.flush()])
    np.testing.assert_array_equal(got, expected)
    assert not stepped.has_pending()


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


def pyav_decode(data: bytes, law: G711Law) -> np.ndarray:
    """Decode with PyAV directly (the reference the lookup table must reproduce)."""
    import av

    ctx = av.CodecContext.create({"ulaw": "pcm_mulaw", "alaw": "pcm_alaw"}[law], "r")
    ctx.sample_rate = 8000
    ctx.layout = "mono"
    frames = ctx.decode(av.Packet(data))
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]).astype(np.float32) / 32768.0


def decode_stream(data: bytes, audio_format: str, rate: int, cuts: list[int]) -> np.ndarray:
    """Feed ``data`` split at ``cuts`` through one AudioInput, flushing at the end."""
    audio = AudioInput(audio_format, rate)
    bounds = [0, *cuts, len(data)]
    parts = [audio.feed(data[a:b]).samples for a, b in itertools.pairwise(bounds)]
    return np.concatenate([*parts, audio.flush()])


def telephone_clip(clip_id: str) -> np.ndarray:
    require_speech()
    if clip_id not in manifest() or "orig8k_path" not in manifest()[clip_id]:
        pytest.skip(f"8 kHz clip {clip_id} not in the speech corpus")
    return load_clip(clip_id, rate=8000)


@pytest.mark.parametrize("law", LAWS)
def test_g711_table_equals_pyav_decoder_for_every_byte(law: G711Law) -> None:
    every_byte = bytes(range(256))
    table = g711_table(law)
    assert table.dtype == np.float32 and table.shape == (256,) and not table.flags.writeable
    np.testing.assert_array_equal(table, pyav_decode(every_byte, law))
    decoded = AudioInput(f"g711_{law}", 16000).feed(every_byte)
    np.testing.assert_array_equal(decoded.samples, table)
    assert decoded.invalid_samples == 0


@pytest.mark.parametrize("law", LAWS)
def test_encode_g711_is_the_inverse_of_the_table(law: G711Law) -> None:
    table = g711_table(law)
    encoded = encode_g711(table, law)
    assert len(encoded) == 256
    np.testing.assert_array_equal(table[np.frombuffer(encoded, np.uint8)], table)
    # Out-of-range input clips to the largest code rather than wrapping.
    loud = table[np.frombuffer(encode_g711(np.array([4.0, -4.0], np.float32), law), np.uint8)]
    np.testing.assert_array_equal(loud, [table.max(), table.min()])
    assert encode_g711(np.zeros(0, np.float32), law) == b""
    with pytest.raises(ValueError):
        encode_g711(np.zeros((2, 10), np.float32), law)


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("clip_id", TELEPHONE_CLIPS)
def test_g711_round_trip_keeps_real_speech(law: G711Law, clip_id: str) -> None:
    speech = telephone_clip(clip_id)
    decoded = decode_stream(encode_g711(speech, law), f"g711_{law}", 8000, cuts=[])
    reference = resample(speech, 8000)
    assert len(decoded) == pytest.approx(len(reference), abs=2)
    n = min(len(decoded), len(reference))
    decoded, reference = decoded[:n], reference[:n]
    snr_db = 10 * np.log10(np.sum(reference**2) / np.sum((decoded - reference) ** 2))
    assert snr_db > 30, snr_db  # measured ~34 dB on these clips (G.711 quantisation noise)
    assert np.corrcoef(decoded, reference)[0, 1] > 0.999


@pytest.mark.parametrize("law", LAWS)
@pytest.mark.parametrize("rate", [8000, 16000])
def test_g711_frames_split_anywhere_decode_like_one_frame(law: G711Law, rate: int) -> None:
    rng = np.random.default_rng(7)
    signal = (0.2 * rng.standard_normal(12000)).astype(np.float32)
    data = encode_g711(signal, law)
    cuts = sorted(int(c) for c in rng.choice(np.arange(1, len(data)), size=60, replace=False))
    whole = decode_stream(data, f"g711_{law}", rate, cuts=[])
    np.testing.assert_array_equal(decode_stream(data, f"g711_{law}", rate, cuts=cuts), whole)
    np.testing.assert_array_equal(decode_stream(data, f"g711_{law}", rate, cuts=list(range(1, len(data)))), whole)


@pytest.mark.parametrize("audio_format", ["g711_ulaw", "g711_alaw"])
def test_session_update_to_g711_implies_8khz_unless_sample_rate_given(audio_format: str) -> None:
    assert SessionConfig().updated({"input_audio_format": audio_format}).sample_rate == 8000
    explicit = SessionConfig().updated({"input_audio_format": audio_format, "sample_rate": 16000})
    assert explicit.sample_rate == 16000
    # A later update that leaves the format alone keeps the rate it has.
    assert SessionConfig().updated({"input_audio_format": audio_format}).updated({"prompt": "x"}).sample_rate == 8000
    assert SessionConfig().updated({"sample_rate": 22050}).sample_rate == 22050
