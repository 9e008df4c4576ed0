"""Deepgram's audio intake, shared by both of its live APIs (``/v1/listen``, Nova, and
``/v2/listen``, Flux): what the binary frames of a stream hold and how they reach the core.

Raw audio comes in ``encoding`` at ``sample_rate`` with ``channels`` interleaved. Without an
encoding the stream is "containerized" and says its own format: a WAV header is read here; any
other container (WebM/Ogg Opus from a browser, MP3, FLAC, AAC, ...) is decoded by FFmpeg as it
arrives (:mod:`stream_server.audio_stream`). Several channels are transcribed one by one with
``multichannel``, else mixed into one voice, as Deepgram does. Pure state, as the dialects: the
decoder's thread reports through a wake-up the shell hands to its loop.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable

from stream_server import protocol as p
from stream_server.audio import MODEL_RATE, decode_samples
from stream_server.audio_stream import ContainerStream, Decoded
from stream_server.dialects.base import Action, Close

#: Close frame for audio that cannot be decoded (Deepgram's DATA-0000, code 1008).
DATA_CLOSE_CODE = 1008

RAW_ENCODINGS = {"linear16": "pcm16", "linear32": "float32", "mulaw": "g711_ulaw", "alaw": "g711_alaw"}
#: Encodings whose bitstream FFmpeg recognises by itself (Ogg Opus, FLAC, AMR's storage format):
#: decoded as containerized audio is, with the rate and channels the stream says.
DECODED_ENCODINGS = {"opus", "ogg-opus", "flac", "amr-nb", "amr-wb"}
#: AMR's storage format starts with this line (RFC 4867 §5); bare AMR frames get it added.
AMR_MAGIC = {"amr-nb": b"#!AMR\n", "amr-wb": b"#!AMR-WB\n"}
SAMPLE_WIDTH = {"pcm16": 2, "float32": 4, "g711_ulaw": 1, "g711_alaw": 1}
MAX_HEADER_BYTES = 64 * 1024  # a WAV header larger than this is not a header
MAX_CHANNELS = 8  # the core's channel limit (Deepgram's own is 20)

WAV_FORMAT_TAGS = {1: "pcm16", 3: "float32", 6: "g711_alaw", 7: "g711_ulaw"}
WAV_BITS = {"pcm16": 16, "float32": 32, "g711_alaw": 8, "g711_ulaw": 8}

#: Renders a data error in the dialect's own shape (one or more messages to the client).
DataError = Callable[[str], list[Action]]


def channel_config(channels: int, multichannel: bool, audio_format: str) -> dict[str, object]:
    """Native fields for ``channels`` > 1 interleaved channels in ``audio_format``: one core
    channel each with ``multichannel``, else mono float32 (the intake mixes, see :func:`mix_down`)."""
    if multichannel:
        return {"channels": channels}
    return {"input_audio_format": "float32"}


def mix_down(data: bytes, audio_format: str, channels: int) -> bytes:
    """Whole interleaved frames in ``audio_format`` averaged into mono float32 bytes: what Deepgram
    does with several channels when ``multichannel`` is off (one transcript of everyone)."""
    samples, _ = decode_samples(data, audio_format)
    mono = samples.reshape(-1, channels).mean(axis=1, dtype="float32")
    return bytes(mono.astype("<f4").tobytes())


class NotWav(Exception):
    """The stream does not start with a WAV header this server can read."""


def parse_wav_header(data: bytes) -> tuple[str, int, int, int] | None:
    """(native format, sample rate, channels, header length) of a WAV stream's start, None when more bytes
    are needed; raises :class:`NotWav`. The data chunk's size is ignored: streamed WAVs often
    carry 0 or 0xFFFFFFFF there, and everything after the header is audio."""
    if len(data) < 12:
        if not b"RIFF".startswith(data[:4]):
            raise NotWav("the audio has no encoding parameter and is not a WAV stream")
        return None
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise NotWav("the audio has no encoding parameter and is not a WAV stream")
    fmt: tuple[str, int, int] | None = None
    pos = 12
    while pos + 8 <= len(data):
        chunk, size = data[pos : pos + 4], struct.unpack_from("<I", data, pos + 4)[0]
        body = pos + 8
        if chunk == b"data":
            if fmt is None:
                raise NotWav("WAV data chunk before its fmt chunk")
            return fmt[0], fmt[1], fmt[2], body
        if body + size > len(data):
            return None
        if chunk == b"fmt ":
            fmt = _wav_format(data[body : body + size])
        pos = body + size + (size & 1)
    return None


def _wav_format(fmt: bytes) -> tuple[str, int, int]:
    if len(fmt) < 16:
        raise NotWav("WAV fmt chunk too short")
    tag, channels, rate, _, _, bits = struct.unpack_from("<HHIIHH", fmt)
    if tag == 0xFFFE and len(fmt) >= 26:
        tag = struct.unpack_from("<H", fmt, 24)[0]  # WAVE_FORMAT_EXTENSIBLE: the sub-format GUID
    native = WAV_FORMAT_TAGS.get(tag)
    if native is None or WAV_BITS[native] != bits:
        raise NotWav(f"WAV format tag {tag} with {bits}-bit samples is not supported (linear16, float32, mulaw, alaw)")
    if not 1 <= channels <= MAX_CHANNELS:
        raise NotWav(f"WAV audio has {channels} channels; this server transcribes 1 to {MAX_CHANNELS}")
    if not 8000 <= rate <= 48000:
        raise NotWav(f"WAV sample rate {rate} Hz is outside 8000..48000")
    return native, rate, channels


def raw_config(encoding: str | None, sample_rate: int | None, channels: int, multichannel: bool) -> dict[str, object]:
    """The core ``session`` fields of a raw stream (none for containerized audio: it says them)."""
    audio_format = RAW_ENCODINGS.get(encoding or "")
    if audio_format is None:
        return {}
    config: dict[str, object] = {"input_audio_format": audio_format, "sample_rate": sample_rate}
    if channels > 1:
        config.update(channel_config(channels, multichannel, audio_format))
    return config


class AudioIntake:
    """One stream's binary frames → core commands (``SessionUpdate`` once a container says its
    format, ``AudioAppend``), with the count and hash of what came. ``data_error`` renders a
    ``DATA-0000`` description in the dialect's shape; ``on_channels`` hears the number of
    transcribed channels whenever a container changes it."""

    def __init__(
        self,
        encoding: str | None,
        sample_rate: int | None,
        channels: int,
        multichannel: bool,
        *,
        data_error: DataError,
        on_channels: Callable[[int], None] = lambda _: None,
    ) -> None:
        self.multichannel = multichannel
        self._data_error = data_error
        self._on_channels = on_channels
        self._format = RAW_ENCODINGS.get(encoding or "", "pcm16")
        self._rate = sample_rate or 16000
        # Containerized audio: a WAV header is read here; anything else FFmpeg decodes (_stream).
        self._header: bytearray | None = None if encoding else bytearray()
        self._stream: ContainerStream | None = None
        self._stream_channels: int | None = None  # the decoded stream's channels, once it said
        self._wakeup: Callable[[], None] | None = None
        self._magic: bytes | None = None
        self.samples = 0.0  # audio received, in samples of the stream's format (all channels)
        self.sha256 = hashlib.sha256()  # of the bytes received: Deepgram's Metadata reports it
        self.closing = False  # the stream ended (CloseStream, or audio that cannot be read)
        self._set_channels(channels)
        if encoding in DECODED_ENCODINGS:
            self._start_stream(AMR_MAGIC.get(encoding or ""))

    @property
    def audio_format(self) -> str:
        """The format of the samples as they come (float32 once a compressed stream is decoded)."""
        return self._format

    @property
    def rate(self) -> int:
        return self._rate

    @property
    def seconds(self) -> float:
        """Seconds of audio received so far (the clock Deepgram's times are in)."""
        return self.samples / self.audio_channels / self._rate

    @property
    def sniffing(self) -> bool:
        """Bytes wait here for a WAV header to complete."""
        return self._header is not None

    @property
    def mixing(self) -> bool:
        """Several channels are mixed into one (a frame split across messages waits here)."""
        return bool(self._mix_frame)

    @property
    def decoding(self) -> bool:
        """A compressed stream's bytes go to FFmpeg (its audio may come later)."""
        return self._stream is not None

    def _set_channels(self, channels: int) -> None:
        self.audio_channels = channels
        transcribed = channels if self.multichannel else 1
        self._mix_frame = 0 if transcribed == channels else channels * SAMPLE_WIDTH[self._format]
        self._mix_rest = b""
        self._on_channels(transcribed)

    # ---------------------------------------------------------------- frames in

    def receive(self, data: bytes) -> list[Action]:
        """One binary frame (not empty) of the stream."""
        if self.closing:
            return []
        if self._header is not None:
            return self._sniff(data)
        if self._stream is not None:
            self.sha256.update(data)
            if self._magic is not None:
                data = data if data.startswith(b"#!AMR") else self._magic + data
                self._magic = None
            return self._decoded(self._stream.feed(data))
        return self._append(data)

    def end(self) -> list[Action]:
        """The client ended the stream: the audio still inside the decoder, then ``SessionClose``
        (now, or from :meth:`pending` once the decoder is done)."""
        if self.closing:
            return []
        self.closing = True
        if self._header:  # a WAV header that never completed is not audio
            self._header = None
        if self._stream is not None:
            self._stream.end()
            return self.pending()
        return [p.SessionClose()]

    def set_wakeup(self, wakeup: Callable[[], None]) -> None:
        """How the decoder of a compressed stream says it has audio (or its end) to collect with
        :meth:`pending`: called from its thread; the shell hands it to its event loop. Without
        one (tests, the fuzzer) every hand-off waits for the decoder instead."""
        self._wakeup = wakeup
        if self._stream is not None:
            self._stream.set_wakeup(wakeup)

    def pending(self) -> list[Action]:
        """What the decoder made since the client's last frame (a large frame decodes in the
        background), and once a closing stream's decoder is done, the session's close."""
        stream = self._stream
        if stream is None:
            return []
        done = stream.done  # before the poll: audio that comes after it is not missed
        actions = self._decoded(stream.poll())
        if self.closing and done and self._stream is stream:
            self._stream = None
            stream.release()
            actions.append(p.SessionClose())
        return actions

    def release(self) -> None:
        """The connection is gone: the decoder of a compressed stream stops."""
        self._wakeup = None  # it calls into the connection: no cycle outlives it
        if self._stream is not None:
            self._stream.release()
            self._stream = None

    # ---------------------------------------------------------------- containers

    def _sniff(self, data: bytes) -> list[Action]:
        assert self._header is not None
        self._header += data
        if len(self._header) >= 4 and self._header[:4] != b"RIFF":
            # Not WAV: a compressed stream (WebM or Ogg Opus, MP3, FLAC, AAC, ...) for FFmpeg.
            head, self._header = bytes(self._header), None
            self._start_stream(None)
            return self.receive(head)
        try:
            parsed = parse_wav_header(bytes(self._header))
            if parsed is None and len(self._header) > MAX_HEADER_BYTES:
                raise NotWav("no WAV data chunk in the first 64 KiB")
        except NotWav as exc:
            self._header = None
            return self._refuse(str(exc))
        if parsed is None:
            return []
        audio_format, rate, channels, header_length = parsed
        rest = bytes(self._header[header_length:])
        self._header = None
        self._format, self._rate = audio_format, rate
        self._set_channels(channels)
        fields: dict[str, object] = {"input_audio_format": audio_format, "sample_rate": rate}
        if channels > 1:
            fields.update(channel_config(channels, self.multichannel, audio_format))
        update = p.SessionUpdate(fields)
        return [update, *self._append(rest)] if rest else [update]

    def _refuse(self, reason: str) -> list[Action]:
        """Nothing of the stream could be heard: Deepgram's DATA-0000 and the close."""
        self.release()
        self.closing = True
        return [
            *self._data_error(f"DATA-0000: {reason}."),
            Close(DATA_CLOSE_CODE, f"DATA-0000: the payload cannot be decoded as audio ({reason})"[:120]),
        ]

    def _start_stream(self, magic: bytes | None) -> None:
        """Decode the stream with FFmpeg from here on; ``magic``: AMR's first line, added to a
        stream of bare AMR frames."""
        self._stream = ContainerStream(keep_channels=self.multichannel)
        self._stream.set_wakeup(self._wakeup)
        self._magic = magic

    def _decoded(self, decoded: Decoded) -> list[Action]:
        """Audio out of the decoder: the first says the stream's channels (a session update, as a
        WAV header's does); an error ends the stream as a bad WAV header does if nothing was
        heard, else after the finals of what was (nothing received is lost)."""
        actions: list[Action] = []
        if decoded.channels is not None and self._stream_channels is None:
            self._stream_channels = decoded.channels
            self._format, self._rate = "float32", MODEL_RATE
            self._set_channels(decoded.channels)
            fields: dict[str, object] = {"input_audio_format": "float32", "sample_rate": MODEL_RATE}
            if decoded.channels > 1:
                fields.update(channel_config(decoded.channels, self.multichannel, "float32"))
            actions.append(p.SessionUpdate(fields))
        if decoded.samples.size:
            actions.extend(self._append(decoded.samples.astype("<f4").tobytes(), hashed=True))
        error = decoded.error
        if error is None:
            return actions
        if not self.samples:
            return [*actions, *self._refuse(error)]
        actions.extend(self._data_error(f"DATA-0000: the audio after {self.seconds:.2f} s could not be decoded ({error})."))
        return [*actions, *self.end()]

    # ---------------------------------------------------------------- samples

    def _append(self, data: bytes, *, hashed: bool = False) -> list[Action]:
        """Audio in the session's format; ``hashed``: its bytes were counted in the sha256 as they
        came (compressed)."""
        self.samples += len(data) / SAMPLE_WIDTH[self._format]
        if not hashed:
            self.sha256.update(data)
        if self._mix_frame:
            data = self._mix(data)
            if not data:
                return []
        return [p.AudioAppend(data)]

    def _mix(self, data: bytes) -> bytes:
        """Mix whole interleaved frames to mono float32; a frame split across messages waits."""
        data = self._mix_rest + data
        whole = len(data) - len(data) % self._mix_frame
        self._mix_rest = data[whole:]
        return mix_down(data[:whole], self._format, self.audio_channels) if whole else b""
