"""Helpers for the HTTP API tests: a real server in a subprocess, speech clips, audio encoding.

The corpus, WER and server-process helpers are those of ``tests/support.py``; this module adds
what only the HTTP tests need.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.support import require_speech, start_server

JFK_TEXT = "and so my fellow americans ask not what your country can do for you ask what you can do for your country"


def jfk_path() -> Path:
    return require_speech() / "audio" / "whisper_jfk.wav"


@contextlib.contextmanager
def running_server(**settings: object) -> Iterator[str]:
    """``python -m stream_server`` on a free port, each keyword as its CLI flag
    (``max_file_bytes=200_000`` is ``--max-file-bytes 200000``; log level warning unless given);
    yields its base URL once /readyz says ready."""
    settings = {"log_level": "warning", **settings}
    flags = [arg for key, value in settings.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    with tempfile.TemporaryDirectory(prefix="http-api-server-") as log_dir:
        server = start_server(Path(log_dir), *flags)
        try:
            yield server.http_url
        finally:
            server.stop()


def encode(
    samples: np.ndarray, path: Path, codec: str, *, rate: int = 16000, container: str | None = None, bit_rate: int | None = None
) -> Path:
    """Write 16 kHz float samples with PyAV (``codec`` such as libmp3lame, aac, flac, libopus,
    libopencore_amrnb), resampled to ``rate`` in the file: mono, or two columns as stereo. A test
    whose encoder this PyAV build lacks is skipped, saying which (PyAV 18.1.1's wheels dropped
    libopencore_amrnb; the server only decodes AMR, with FFmpeg's own decoder, which they keep)."""
    import av

    try:
        av.codec.Codec(codec, "w")
    except av.codec.codec.UnknownCodecError:
        pytest.skip(f"this PyAV {av.__version__} build has no {codec} encoder to make the test's input (the dev extra pins a PyAV that has it)")
    layout = "mono" if samples.ndim == 1 else "stereo"
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream(codec, rate=48000 if codec == "libopus" else rate)
        stream.layout = layout
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        pcm = (np.clip(samples, -1, 1) * 32767).astype(np.int16)
        frame = av.AudioFrame.from_ndarray(pcm.reshape(1, -1), format="s16", layout=layout)  # interleaved
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=stream.codec_context.sample_rate)
        for chunk in resampler.resample(frame) + resampler.resample(None):
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


def write_wav(samples: np.ndarray, path: Path, rate: int = 16000) -> Path:
    import soundfile

    soundfile.write(path, samples, rate, subtype="PCM_16")
    return path
