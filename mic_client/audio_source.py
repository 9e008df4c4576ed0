"""Audio sources: the microphone and audio files, both as async iterators of pcm16 frames.

Both sources hand the protocol loop the same thing -- little-endian signed 16-bit mono frames of
about ``frame_ms`` milliseconds -- so the loop does not care where audio comes from. Frames are
small (50 ms by default) because the server's VAD works on 32 ms frames and its latency targets are
sub-second: batching audio on the client would add directly to the caption delay.

Design notes

* The file source decodes with PyAV (wav/flac/mp3/anything FFmpeg reads) and resamples to 16 kHz
  mono with PyAV's resampler, so the server never has to resample a file. It is paced against the
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
from typing import Any

SAMPLE_RATE = 16000
"""The rate the server expects by default (protocol.md: pcm16, 16 kHz, mono)."""

BYTES_PER_SAMPLE = 2
DEFAULT_FRAME_MS = 50


class AudioSourceError(Exception):
    """An audio source could not be opened or read; the message is meant for the user."""


class AudioSource(abc.ABC):
    """A stream of pcm16 mono frames at :attr:`sample_rate`.

    Life cycle: ``await start()`` (opens the device or file, so errors surface before any network
    traffic), ``async for frame in source`` (ends at end of file or after :meth:`stop`), and
    ``await aclose()`` (releases the device or file; safe to call more than once).
    """

    sample_rate: int = SAMPLE_RATE

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


def iter_file_pcm16(path: str | Path, sample_rate: int = SAMPLE_RATE) -> Iterator[bytes]:
    """Decode any audio file FFmpeg can read into pcm16 mono bytes at ``sample_rate``.

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
        resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
        try:
            for frame in container.decode(stream):
                for out in resampler.resample(frame):
                    yield _frame_bytes(out)
            for out in resampler.resample(None):
                yield _frame_bytes(out)
        except av.error.FFmpegError as exc:
            raise AudioSourceError(f"cannot decode {str(path)!r}: {exc}") from exc


def _close_quietly(close: Any) -> None:
    # After a cancellation a worker thread may still be inside the generator; it then finishes
    # on its own and the garbage collector closes the container.
    with contextlib.suppress(ValueError):  # "generator already executing"
        close()


def _frame_bytes(frame: Any) -> bytes:
    # Packed s16 mono: one plane, shape (1, samples). to_ndarray trims the plane's padding.
    data: bytes = frame.to_ndarray().tobytes()
    return data


class FileSource(AudioSource):
    """Streams an audio file as if it were being spoken now.

    ``speed`` multiplies the pace: 1.0 is real time (what a live microphone would produce), 2.0 is
    twice as fast, and 0 sends as fast as the connection accepts (useful for batch transcription,
    though the server then sees no real-time pauses between frames).
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
    ) -> None:
        if speed < 0:
            raise ValueError("speed must be >= 0")
        if frame_ms <= 0:
            raise ValueError("frame_ms must be > 0")
        self.path = Path(path)
        self.speed = speed
        self.frame_ms = frame_ms
        self.sample_rate = SAMPLE_RATE
        self._decoder: Iterator[bytes] | None = None
        self._pending = b""
        self._stopped = False
        self.sent_seconds = 0.0

    @property
    def frame_bytes(self) -> int:
        return self.sample_rate * self.frame_ms // 1000 * BYTES_PER_SAMPLE

    async def start(self) -> None:
        if not self.path.is_file():
            raise AudioSourceError(f"audio file not found: {str(self.path)!r}")
        self._decoder = iter_file_pcm16(self.path, self.sample_rate)
        # Prime the generator in a thread so open/probe errors surface here, before connecting.
        self._pending = await asyncio.to_thread(self._decode_block)

    def _decode_block(self) -> bytes:
        """Decode about DECODE_BLOCK_S of audio (less at end of file, b"" when exhausted)."""
        assert self._decoder is not None
        want = int(self.DECODE_BLOCK_S * self.sample_rate) * BYTES_PER_SAMPLE
        parts: list[bytes] = []
        size = 0
        for block in self._decoder:
            parts.append(block)
            size += len(block)
            if size >= want:
                break
        return b"".join(parts)

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
        frame_s = frame_bytes / BYTES_PER_SAMPLE / self.sample_rate
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
            self.sent_seconds += len(frame) / BYTES_PER_SAMPLE / self.sample_rate
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
        return int(stripped)
    return stripped


class MicSource(AudioSource):
    """Captures an input device as pcm16 mono.

    It asks for 16 kHz; a device that cannot open at 16 kHz is opened at its own default rate and
    :attr:`sample_rate` says so -- the client then tells the server (``session.sample_rate``) and
    the server resamples with soxr, which is better than a second resampler here.
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
