"""Audio sources: the microphone and audio files, both as async iterators of pcm16 frames.

Both sources hand the protocol loop the same thing -- little-endian signed 16-bit frames of about
``frame_ms`` milliseconds, mono or (files only) interleaved channels -- so the loop does not care
where audio comes from. Frames are
small (50 ms by default) because the server's VAD works on 32 ms frames and its latency targets are
sub-second: batching audio on the client would add directly to the caption delay.

Design notes

* The file source decodes with PyAV (wav/flac/mp3/anything FFmpeg reads) and resamples to 16 kHz
  with PyAV's resampler, so the server never has to resample a file. A file with several channels
  (a call recording: agent on the left, customer on the right) keeps them, interleaved, and the
  server transcribes each channel on its own; a "stereo" file whose channels carry the same signal
  (most stereo podcasts and music-style encodes of one voice) is streamed as mono, since splitting
  it would only transcribe every word twice. See :func:`same_signal`. It is paced against the
  monotonic clock (not by sleeping a fixed time per frame), so scheduling jitter does not accumulate
  and a 60 s file takes 60 s to stream at ``speed=1``.
* The microphone source uses a PortAudio callback stream. The callback runs on PortAudio's thread
  and only copies the block into an asyncio queue via ``call_soon_threadsafe``; anything slower
  there would make PortAudio drop input.
* ``sounddevice`` is imported lazily: importing it fails when the PortAudio shared library is
  missing, and ``--file`` streaming must keep working on machines without any audio stack.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

SAMPLE_RATE = 16000
"""The rate the server expects by default (protocol.md: pcm16, 16 kHz, mono)."""

BYTES_PER_SAMPLE = 2
DEFAULT_FRAME_MS = 50

MAX_CHANNELS = 8
"""The most channels one server session takes (protocol.md: ``channels`` 1-8)."""

ChannelMode = Literal["auto", "split", "mix"]
CHANNEL_MODES: tuple[ChannelMode, ...] = ("auto", "split", "mix")

#: ``auto`` looks at up to this much audio for sound to compare the channels on.
SNIFF_LIMIT_S = 10.0
#: Below this RMS (int16 units, about -60 dBFS) a block is silence and says nothing about channels.
SILENCE_RMS = 32.0
#: Channels whose differences hold at most this share of the common signal's energy (-20 dB) are
#: one signal: lossy joint-stereo coding of a mono voice stays far below it, two call legs far above.
SAME_SIGNAL_RATIO = 0.01


class AudioSourceError(Exception):
    """An audio source could not be opened or read; the message is meant for the user."""


class AudioSource(abc.ABC):
    """A stream of pcm16 frames at :attr:`sample_rate`, :attr:`channels` samples interleaved.

    Life cycle: ``await start()`` (opens the device or file, so errors surface before any network
    traffic), ``async for frame in source`` (ends at end of file or after :meth:`stop`), and
    ``await aclose()`` (releases the device or file; safe to call more than once).
    """

    sample_rate: int = SAMPLE_RATE
    channels: int = 1

    @abc.abstractmethod
    async def start(self) -> None:
        """Open the underlying device or file."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Ask iteration to end soon, after audio that was already captured.

        Called from the event loop thread (a signal handler installed with
        ``loop.add_signal_handler``), so it must not block.
        """

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the device or file."""

    @abc.abstractmethod
    def frames(self) -> AsyncIterator[bytes]:
        """The frames, as an async generator."""

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self.frames()


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def probe_audio(path: str | Path) -> tuple[int, int]:
    """``(channels, sample rate)`` of the file's first audio stream (raises :class:`AudioSourceError`)."""
    import av

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:
        raise AudioSourceError(f"cannot open audio file {str(path)!r}: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise AudioSourceError(f"{str(path)!r} has no audio stream")
        stream = container.streams.audio[0]
        return int(stream.layout.nb_channels), int(stream.sample_rate or SAMPLE_RATE)


#: Files recorded at this rate or less (phone calls) are streamed at it, not upsampled to
#: ``SAMPLE_RATE``: the server then knows the audio is telephone band (it starts utterances
#: earlier there, see the server's ``--narrowband-padding-ms``) and nothing is sent twice over.
TELEPHONE_RATE = 8000


def iter_file_pcm16(path: str | Path, sample_rate: int = SAMPLE_RATE, channels: int = 1) -> Iterator[bytes]:
    """Decode any audio file FFmpeg can read into pcm16 bytes at ``sample_rate``.

    ``channels`` 1 mixes the file down to mono; otherwise it must be the file's own channel count,
    and the channels are kept, interleaved in the file's order (packed s16 is interleaved).
    Yields blocks of whatever size the decoder produces; the caller re-frames them. The resampler
    is flushed at the end so the last few milliseconds (held back by the resampling filter) are not
    lost.
    """
    import av  # local: keeps ``mic-client --help`` fast

    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError) as exc:  # FileNotFoundError is an OSError too
        raise AudioSourceError(f"cannot open audio file {str(path)!r}: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise AudioSourceError(f"{str(path)!r} has no audio stream")
        stream = container.streams.audio[0]
        if channels != 1 and stream.layout.nb_channels != channels:
            raise AudioSourceError(f"{str(path)!r} has {stream.layout.nb_channels} channels, not {channels}")
        layout = "mono" if channels == 1 else stream.layout
        resampler = av.AudioResampler(format="s16", layout=layout, rate=sample_rate)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    yield _frame_bytes(out)
            for out in resampler.resample(None):
                yield _frame_bytes(out)
        except av.error.FFmpegError as exc:
            raise AudioSourceError(f"cannot decode {str(path)!r}: {exc}") from exc


def mix_down(interleaved: bytes, channels: int) -> bytes:
    """Interleaved pcm16 channels mixed into mono pcm16 (their mean, so nothing clips)."""
    frames = np.frombuffer(interleaved, dtype="<i2").reshape(-1, channels)
    return bytes(np.rint(frames.mean(axis=1)).astype("<i2").tobytes())


def same_signal(interleaved: bytes, channels: int) -> bool | None:
    """Whether interleaved pcm16 channels carry one signal (None: too quiet to tell).

    The test is the energy of each channel's difference from the channels' mean against the
    mean's own energy: a mono voice copied to both sides (even through lossy joint-stereo coding)
    leaves almost nothing, two call legs leave about as much as they hold.
    """
    samples = np.frombuffer(interleaved[: len(interleaved) // (2 * channels) * 2 * channels], dtype="<i2")
    frames = samples.reshape(-1, channels).astype(np.float64)
    if not len(frames):
        return None
    common = frames.mean(axis=1)
    signal = float(np.mean(common**2))
    if signal < SILENCE_RMS**2:
        # Quiet in the mean may still be loud in the channels (one leg talks, or opposite phase).
        louder = float(np.mean(frames**2))
        if louder < SILENCE_RMS**2:
            return None
        return False
    residual = float(np.mean((frames - common[:, None]) ** 2))
    return residual <= SAME_SIGNAL_RATIO * signal


def _close_quietly(close: Any) -> None:
    # After a cancellation a worker thread may still be inside the generator; it then finishes
    # on its own and the garbage collector closes the container.
    with contextlib.suppress(ValueError):  # "generator already executing"
        close()


def _frame_bytes(frame: Any) -> bytes:
    # Packed s16: one plane, shape (1, samples * channels), interleaved. to_ndarray trims padding.
    data: bytes = frame.to_ndarray().tobytes()
    return data


class FileSource(AudioSource):
    """Streams an audio file as if it were being spoken now.

    ``speed`` multiplies the pace: 1.0 is real time (what a live microphone would produce), 2.0 is
    twice as fast, and 0 sends as fast as the connection accepts (useful for batch transcription,
    though the server then sees no real-time pauses between frames).

    ``channel_mode`` says what happens to a file with several channels: ``split`` streams them as
    they are (one server channel each, at most :data:`MAX_CHANNELS`), ``mix`` mixes them down to
    mono, and ``auto`` (the default) splits unless the channels carry one signal
    (:func:`same_signal` on the first seconds with sound), which is then streamed as mono.
    After :meth:`start`, :attr:`channels` is what is streamed and :attr:`file_channels` what the
    file has.
    """

    #: Decode this much audio per trip to the worker thread: big enough that thread hops are rare,
    #: small enough that a long file is never held in memory whole.
    DECODE_BLOCK_S = 1.0

    def __init__(
        self,
        path: str | Path,
        *,
        speed: float = 1.0,
        frame_ms: int = DEFAULT_FRAME_MS,
        channel_mode: ChannelMode = "auto",
    ) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        if frame_ms <= 0:
            raise ValueError("frame_ms must be > 0")
        if channel_mode not in CHANNEL_MODES:
            raise ValueError(f"channel_mode must be one of {CHANNEL_MODES}")
        self.path = Path(path)
        self.speed = speed
        self.frame_ms = frame_ms
        self.channel_mode = channel_mode
        self.sample_rate = SAMPLE_RATE
        self.channels = 1
        self.file_channels = 1
        self._decoder: Iterator[bytes] | None = None
        self._pending = b""
        self._stopped = False
        self.sent_seconds = 0.0

    @property
    def frame_bytes(self) -> int:
        return self.sample_rate * self.frame_ms // 1000 * BYTES_PER_SAMPLE * self.channels

    @property
    def mixed_same_signal(self) -> bool:
        """``auto`` found the file's channels to be one signal and streams it as mono."""
        return self.channel_mode == "auto" and self.file_channels > 1 and self.channels == 1

    async def start(self) -> None:
        if not self.path.is_file():
            raise AudioSourceError(f"audio file not found: {str(self.path)!r}")
        self.file_channels, rate = await asyncio.to_thread(probe_audio, self.path)
        if rate <= TELEPHONE_RATE:
            self.sample_rate = TELEPHONE_RATE
        self.channels = self._channels_to_stream(self.file_channels)
        # The decoder always keeps the file's channels; mixing down is ours (:func:`mix_down`),
        # since FFmpeg cannot downmix channels it has no speaker positions for (a 9-channel WAV).
        self._decoder = iter_file_pcm16(self.path, self.sample_rate, self.file_channels)
        # Prime the generator in a thread so open/probe errors surface here, before connecting.
        self._pending = await asyncio.to_thread(self._decode_block)
        if self.channel_mode == "auto" and self.channels > 1:
            self._pending = await asyncio.to_thread(self._sniff_channels, self._pending)

    def _channels_to_stream(self, found: int) -> int:
        if found == 1 or self.channel_mode == "mix":
            return 1
        if found > MAX_CHANNELS:
            raise AudioSourceError(
                f"{str(self.path)!r} has {found} channels; a session takes at most {MAX_CHANNELS} "
                "(use --multichannel mix to stream it mixed down to mono)"
            )
        return found

    def _sniff_channels(self, primed: bytes) -> bytes:
        """``auto``: decode until the channels can be compared (or SNIFF_LIMIT_S of silence), then
        keep them, or mix them down from here on when they are one signal. Worker thread."""
        buffered = bytearray(primed)
        limit = int(SNIFF_LIMIT_S * self.sample_rate) * BYTES_PER_SAMPLE * self.channels
        verdict = same_signal(bytes(buffered), self.channels)
        while verdict is None and len(buffered) < limit:
            block = self._decode_block()
            if not block:
                break
            buffered += block
            verdict = same_signal(bytes(buffered), self.channels)
        if verdict:
            self.channels = 1
            return mix_down(bytes(buffered), self.file_channels)
        return bytes(buffered)  # distinct (or silent) channels: stream them as they are

    def _decode_block(self) -> bytes:
        """Decode about DECODE_BLOCK_S of audio (less at end of file, b"" when exhausted)."""
        assert self._decoder is not None
        want = int(self.DECODE_BLOCK_S * self.sample_rate) * BYTES_PER_SAMPLE * self.file_channels
        parts: list[bytes] = []
        size = 0
        for block in self._decoder:
            parts.append(block)
            size += len(block)
            if size >= want:
                break
        data = b"".join(parts)
        return mix_down(data, self.file_channels) if self.channels != self.file_channels else data

    def stop(self) -> None:
        self._stopped = True

    async def aclose(self) -> None:
        self._stopped = True
        if self._decoder is not None:
            decoder, self._decoder = self._decoder, None
            close = getattr(decoder, "close", None)
            if close is not None:
                # Closing the generator runs its ``with container`` exit: frees FFmpeg state.
                await asyncio.to_thread(_close_quietly, close)

    async def frames(self) -> AsyncIterator[bytes]:
        if self._decoder is None:
            raise RuntimeError("FileSource.start() was not awaited")
        buffer = bytearray(self._pending)
        self._pending = b""
        exhausted = not buffer
        frame_bytes = self.frame_bytes
        bytes_per_second = BYTES_PER_SAMPLE * self.channels * self.sample_rate
        frame_s = frame_bytes / bytes_per_second
        t0: float | None = None
        sent = 0
        while not self._stopped:
            if len(buffer) < frame_bytes and not exhausted:
                block = await asyncio.to_thread(self._decode_block)
                if block:
                    buffer += block
                    continue
                exhausted = True
            if not buffer:
                break
            frame = bytes(buffer[:frame_bytes])
            del buffer[:frame_bytes]
            if self.speed > 0:
                if t0 is None:
                    t0 = time.monotonic()
                # Frame k goes out at t0 + k * duration / speed: an absolute schedule, so a late
                # wake-up is made up on the next frame instead of drifting.
                due = t0 + sent * frame_s / self.speed
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                if self._stopped:
                    break
            else:
                await asyncio.sleep(0)  # let the receiver run between frames
            sent += 1
            self.sent_seconds += len(frame) / bytes_per_second
            yield frame


# ------------------------------------------------------------------------------------------------
# Microphone
# ------------------------------------------------------------------------------------------------


def import_sounddevice() -> Any:
    """Import ``sounddevice`` or explain how to get PortAudio, which it needs at import time."""
    try:
        import sounddevice
    except OSError as exc:  # "PortAudio library not found"
        raise AudioSourceError(
            f"microphone capture needs the PortAudio library ({exc}); install it, e.g. "
            "'apt-get install libportaudio2' on Debian/Ubuntu or 'brew install portaudio' on macOS"
        ) from exc
    return sounddevice


def list_devices() -> str:
    """The device table ``--list-devices`` prints (``>`` marks the default input)."""
    sd = import_sounddevice()
    return str(sd.query_devices())


def parse_device(value: str | None) -> int | str | None:
    """``--device`` takes an index (``3``) or a (sub)string of a device name (``"USB"``)."""
    if value is None or value == "":
        return None
    stripped = value.strip()
    if stripped.lstrip("-").isdigit():
        with contextlib.suppress(ValueError):  # "²" or thousands of digits: a name, then
            return int(stripped)
    return stripped


class MicSource(AudioSource):
    """Captures an input device as pcm16 mono.

    It asks for 16 kHz; a device that cannot open at 16 kHz is opened at its own default rate and
    :attr:`sample_rate` says so -- the client then tells the server (``session.sample_rate``) and
    the server resamples as it streams, which is better than a second resampler here.
    """

    def __init__(
        self,
        device: int | str | None = None,
        *,
        frame_ms: int = DEFAULT_FRAME_MS,
    ) -> None:
        self.device = device
        self.frame_ms = frame_ms
        self.sample_rate = SAMPLE_RATE
        self.device_name: str | None = None
        self.overflows = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: Any = None
        self._stopping = False

    async def start(self) -> None:
        sd = import_sounddevice()
        self._loop = asyncio.get_running_loop()
        try:
            info = sd.query_devices(self.device, "input")
        except (ValueError, sd.PortAudioError) as exc:
            what = "no default input device" if self.device is None else f"input device {self.device!r}"
            raise AudioSourceError(f"{what}: {exc} (see --list-devices)") from exc
        self.device_name = str(info.get("name"))
        try:
            sd.check_input_settings(self.device, channels=1, dtype="int16", samplerate=SAMPLE_RATE)
            rate = SAMPLE_RATE
        except (ValueError, sd.PortAudioError):
            rate = int(info["default_samplerate"])
        self.sample_rate = rate
        try:
            self._stream = sd.RawInputStream(
                samplerate=rate,
                blocksize=rate * self.frame_ms // 1000,
                device=self.device,
                channels=1,
                dtype="int16",
                callback=self._callback,
            )
            self._stream.start()
        except (ValueError, sd.PortAudioError) as exc:
            raise AudioSourceError(f"cannot open input device {self.device_name!r}: {exc}") from exc

    def _callback(self, indata: Any, frames: int, time_info: Any, status: Any) -> None:
        # PortAudio's thread: copy and hand over, nothing else.
        if status and status.input_overflow:
            self.overflows += 1
        if self._stopping or self._loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are shutting down
            self._loop.call_soon_threadsafe(self._queue.put_nowait, bytes(indata))

    def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        # Queued after the blocks already scheduled by the callback, so they are still sent.
        self._queue.put_nowait(None)

    async def aclose(self) -> None:
        self._stopping = True
        stream, self._stream = self._stream, None
        if stream is not None:

            def _shutdown() -> None:
                stream.abort()
                stream.close()

            await asyncio.to_thread(_shutdown)

    async def frames(self) -> AsyncIterator[bytes]:
        while True:
            block = await self._queue.get()
            if block is None:
                return
            yield block
