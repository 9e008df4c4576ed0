"""Decoding uploaded audio files (wav, mp3, m4a, flac, ogg, webm, ...) to 16 kHz float32: mono,
or one column per channel for a recording whose channels are separate voices (a call's legs).

The container is recognised by its *content* (FFmpeg's probe, through PyAV), never by the file
name or the declared content type. Three outcomes, each with its own HTTP answer:

* :class:`UnsupportedMedia` (415): FFmpeg does not recognise the bytes as a media container, the
  container is not one we accept, or it holds no audio stream (text, images, video without sound).
* :class:`AudioDecodeError` (the caller maps it to a server-side error): a recognised audio stream
  whose packets all failed to decode.
* a (possibly empty) array: zero-length audio gives an empty array, which transcribes to "".

Playlist and concatenation demuxers (HLS, ffconcat, ...) are refused before they can open other
URLs or local files named inside an upload, and no network or file protocol is whitelisted.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import wave
from collections.abc import Iterator
from typing import IO, TYPE_CHECKING

import numpy as np

from stream_server.audio import MODEL_RATE

if TYPE_CHECKING:
    from av.audio.frame import AudioFrame
    from av.audio.resampler import AudioResampler
    from av.audio.stream import AudioStream
    from av.container import InputContainer

log = logging.getLogger(__name__)

# FFmpeg demuxer names (``container.format.name``) of the containers that carry audio we accept.
# Anything else that FFmpeg happens to recognise (images, subtitles, playlists, raw video) is 415.
AUDIO_CONTAINERS = frozenset(
    {
        "wav", "w64", "rf64", "mp3", "flac", "ogg", "matroska,webm", "mov,mp4,m4a,3gp,3g2,mj2",
        "aac", "aiff", "au", "caf", "amr", "amrnb", "amrwb", "wv", "asf", "avi", "mpeg", "mpegts",
        "opus", "webm_dash_manifest", "ac3", "eac3", "mp2", "tta", "ape", "mpc", "mpc8", "dts",
        "voc", "ircam", "sox", "s16le", "gsm", "truehd", "mlp", "spdif", "shorten", "adts",
    }
) - {"webm_dash_manifest"}

_PLAYLIST_MAGIC = (b"#EXTM3U", b"ffconcat", b"[playlist]", b"<?xml", b"<smil", b"<MPD", b"#EXT")


class UnsupportedMedia(Exception):
    """The upload is not audio we can decode (HTTP 415)."""


class AudioDecodeError(Exception):
    """A recognised audio stream could not be decoded."""


class AudioTooLong(Exception):
    """The decoded audio exceeds the duration limit."""


class TooManyChannels(Exception):
    """A recording asked for channel by channel has more channels than a session takes."""


#: The most channels a file is transcribed channel by channel with (``SessionConfig.channels``).
MAX_CHANNELS = 8


def refuse_playlist(head: bytes) -> None:
    """Raise :class:`UnsupportedMedia` for a playlist or manifest (by its first bytes): FFmpeg
    would follow the URLs and file names inside it."""
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if any(stripped.startswith(magic) for magic in _PLAYLIST_MAGIC):
        raise UnsupportedMedia("playlists and manifests are not accepted; send the audio itself")


def open_audio(fileobj: object, *, options: dict[str, str] | None = None) -> tuple[InputContainer, AudioStream]:
    """FFmpeg's demuxer on ``fileobj`` (anything with ``read``) and its first audio stream, or
    :class:`UnsupportedMedia`. The container is closed again when it is refused."""
    import av

    try:
        # A bare protocol whitelist: demuxers that open further URLs (HLS, concat) cannot.
        container = av.open(fileobj, mode="r", options={"protocol_whitelist": "pipe", **(options or {})})
    except av.error.FFmpegError as exc:
        raise UnsupportedMedia(f"the file is not a recognised audio format ({_reason(exc)})") from None
    name = container.format.name
    if name not in AUDIO_CONTAINERS or not container.streams.audio:
        container.close()
        if name not in AUDIO_CONTAINERS:
            raise UnsupportedMedia(f"container format {name!r} is not an accepted audio format")
        raise UnsupportedMedia(f"the {name} file holds no audio stream")
    return container, container.streams.audio[0]


@dataclasses.dataclass
class Damage:
    """What went wrong while reading a stream's packets: a few damaged packets are skipped (as
    players do); a stream none of whose packets decoded is an error (:meth:`check`)."""

    packets: int = 0
    good: int = 0
    first_error: Exception | None = None

    def check(self, stream: AudioStream) -> None:
        if self.packets and not self.good and self.first_error is not None:
            raise AudioDecodeError(f"the {stream.codec_context.name} audio stream could not be decoded ({_reason(self.first_error)})")


def decoded_chunks(container: InputContainer, stream: AudioStream, resampler: AudioResampler, damage: Damage) -> Iterator[np.ndarray]:
    """The stream's audio as the resampler makes it, one flat float32 array per frame (channels
    interleaved), up to the end of the stream or a demuxer error (truncated or corrupt data:
    what was read is kept, the error is in ``damage``)."""
    import av

    try:
        for packet in container.demux(stream):
            if packet.size == 0 and packet.dts is None:
                continue  # the flush packet
            damage.packets += 1
            try:
                frames = packet.decode()
            except av.error.FFmpegError as exc:
                damage.first_error = damage.first_error or exc
                continue  # a damaged packet: keep what decodes (as players do)
            damage.good += 1
            for frame in frames:
                frame.pts = None  # timestamps of damaged files confuse the resampler
                yield from _flat(resampler.resample(frame))
    except av.error.FFmpegError as exc:
        damage.first_error = damage.first_error or exc
        log.info("audio ended early: %s", _reason(exc))
    yield from _flat(resampler.resample(None))


def _flat(frames: list[AudioFrame]) -> Iterator[np.ndarray]:
    for frame in frames:
        yield frame.to_ndarray().reshape(-1).astype(np.float32, copy=False)


def decode_file(fileobj: IO[bytes], *, max_seconds: float | None = None, split_channels: bool = False) -> np.ndarray:
    """Decode the first audio stream of ``fileobj`` to float32 at 16 kHz: mono (shape ``[n]``), or
    with ``split_channels`` one column per channel (shape ``[n, channels]``, in the file's order:
    a stereo call recording's left and right legs), up to :data:`MAX_CHANNELS`.

    Blocking (FFmpeg and resampling): call it from a worker thread.
    """
    import av

    fileobj.seek(0)
    head = fileobj.read(64)
    fileobj.seek(0)
    if not head:
        raise UnsupportedMedia("the file is empty")
    refuse_playlist(head)
    container, stream = open_audio(fileobj)
    with container:
        in_file = max(1, stream.codec_context.layout.nb_channels)
        if split_channels and in_file > MAX_CHANNELS:
            raise TooManyChannels(f"the file has {in_file} channels; at most {MAX_CHANNELS} are transcribed one by one")
        # FFmpeg mixes up to 8 channels down to mono; past that (a microphone array's raw channels,
        # which it has no downmix for) the channels are averaged here.
        averaged = not split_channels and in_file > MAX_CHANNELS
        channels = in_file if split_channels or averaged else 1
        # Packed float32 keeps the channels interleaved, in the file's layout order.
        layout = stream.codec_context.layout if channels > 1 else "mono"
        resampler = av.AudioResampler(format="flt", layout=layout, rate=MODEL_RATE)
        pieces: list[np.ndarray] = []
        total = 0
        limit = int(max_seconds * MODEL_RATE * channels) if max_seconds else None
        damage = Damage()
        for samples in decoded_chunks(container, stream, resampler, damage):
            pieces.append(samples)
            total += len(samples)
            if limit is not None and total > limit:
                raise AudioTooLong(f"the audio is longer than the limit of {max_seconds:g} s")
        damage.check(stream)
    if not pieces:
        return np.zeros((0, channels) if split_channels and channels > 1 else 0, np.float32)
    audio = np.concatenate(pieces)
    if channels > 1:
        audio = audio.reshape(-1, channels)
        if averaged:
            audio = audio.mean(axis=1, dtype=np.float32)
    # Some decoders overshoot [-1, 1] slightly; NaN/inf from broken streams become silence.
    np.nan_to_num(audio, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return np.clip(audio, -1.0, 1.0, out=audio)


def _reason(exc: Exception) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def read_wav(path: str | os.PathLike[str], *, dtype: str = "float32") -> tuple[np.ndarray, int]:
    """The samples of a 16-bit PCM WAV file, mixed down to mono, and its sample rate.

    For local files the bench and the tests stream (the speech corpus is PCM16 WAV): Python's
    ``wave`` reads them exactly and needs no dependency beyond the server's, unlike FFmpeg's probe
    in :func:`decode_file`, which is for untrusted uploads. ``dtype`` ``"float32"`` gives values
    in [-1, 1) (sample / 32768), ``"int16"`` the stored integers. Nothing is resampled.
    """
    with wave.open(os.fspath(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        channels, rate = w.getnchannels(), w.getframerate()
        data = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    if channels > 1:
        data = data.reshape(-1, channels).mean(axis=1)
    if np.dtype(dtype) == np.int16:
        return np.round(data).astype(np.int16), rate
    return (data.astype(np.float32) / 32768.0).astype(np.dtype(dtype), copy=False), rate
