"""Decoding compressed audio that arrives in pieces: a WebM or Ogg stream of Opus from a browser's
``MediaRecorder``, an MP3 radio stream, FLAC, AAC (ADTS), AMR, ... sent over a WebSocket a chunk
at a time, as Deepgram's clients send "containerized" audio.

FFmpeg (through PyAV) only *pulls* its input, and a demuxer cannot be stopped when the bytes run
out mid-packet. So the demuxer and decoder run in a worker thread that reads from a pipe, and
:class:`ContainerStream` is a push decoder in front of it: :meth:`~ContainerStream.feed` puts
bytes in the pipe and hands back the audio decoded so far, 16 kHz float32, in order.

A feed waits (at most ``handoff_wait_s``) until FFmpeg has taken every byte and asks for more,
so the audio of a live piece (250 ms of WebM decodes in about a millisecond) comes back with the
piece itself. What takes longer (a large message: a MiB of Opus is two minutes of audio and 0.3 s
of decoding) is not waited for: the caller is told through ``wakeup`` (called from the worker
thread) and collects it with :meth:`~ContainerStream.poll`, so an event loop is never held for a
big message. :meth:`~ContainerStream.end` ends the stream the same way.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections.abc import Callable

import numpy as np

from stream_server.audio import MODEL_RATE
from stream_server.audio_files import (
    MAX_CHANNELS,
    AudioDecodeError,
    Damage,
    UnsupportedMedia,
    decoded_chunks,
    open_audio,
    refuse_playlist,
)

log = logging.getLogger(__name__)

#: Bytes looked at before FFmpeg is started: a playlist or manifest is refused by its first bytes.
HEAD_BYTES = 64
#: FFmpeg's probe reads this many bytes to recognise the container, and then looks at no more of
#: the stream before decoding (``analyzeduration`` 0). FFmpeg's defaults (5 MB, 5 s) held an MP3
#: stream's first audio back for 1.4 s of it; with these it comes with the first 0.3 s.
PROBE_OPTIONS = {"probesize": "2048", "analyzeduration": "0"}
#: How long :meth:`ContainerStream.feed` and :meth:`~ContainerStream.end` wait for FFmpeg to
#: catch up before handing back what is there (the rest comes through ``wakeup``).
HANDOFF_WAIT_S = 0.02
#: How long a hand-off waits for FFmpeg to catch up when there is no wake-up to tell of late audio
#: (a caller with no event loop: tests, the fuzzer).
NO_WAKEUP_WAIT_S = 5.0
#: The most audio the decoder makes ahead of its caller: what one message may hold. A MiB of
#: 32 kbit/s Opus (the largest WebSocket message the server takes) is 260 s; a MiB of FLAC
#: silence is hours (a decompression bomb), and would be as many hundred MB of samples.
MAX_AHEAD_S = 300.0


@dataclasses.dataclass(frozen=True)
class Decoded:
    """Audio decoded since the previous call: float32 at 16 kHz, ``channels`` interleaved.
    ``channels`` is None until FFmpeg has recognised the stream; ``error`` says why decoding
    stopped, when it did (the audio before it is still here)."""

    samples: np.ndarray
    channels: int | None
    error: str | None = None


class _Pipe:
    """What the worker thread shares with the caller: the bytes not yet read by FFmpeg, the audio
    not yet handed back, and whether FFmpeg is waiting for more (``idle``)."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.buffer = bytearray()
        self.ended = False  # no more bytes will come: FFmpeg's next read past them is the end
        self.idle = False  # FFmpeg is blocked in read() with nothing left to read
        self.done = False  # the worker finished (end of stream, error, or released)
        self.chunks: list[np.ndarray] = []
        self.ahead = 0  # samples per channel in ``chunks``
        self.channels: int | None = None
        self.error: str | None = None
        self.waiting = False  # the caller waits in feed()/end() and collects without a wake-up
        self.wakeup: Callable[[], None] | None = None

    def wake(self) -> None:
        """Tell the caller there is something to collect (called with ``cond`` held)."""
        self.cond.notify_all()
        if self.wakeup is not None and not self.waiting:
            try:
                self.wakeup()
            except Exception:  # the caller's loop is gone: nothing waits for the audio
                log.debug("compressed audio stream: wake-up failed", exc_info=True)

    def read(self, size: int = -1) -> bytes:
        """FFmpeg's read: blocks while there is nothing to read and the stream goes on."""
        with self.cond:
            while not self.buffer and not self.ended:
                self.idle = True
                self.cond.notify_all()
                self.cond.wait()
            self.idle = False
            size = len(self.buffer) if size < 0 else size
            chunk = bytes(self.buffer[:size])
            del self.buffer[:size]
            return chunk

    def end(self) -> None:
        with self.cond:
            self.ended = True
            self.cond.notify_all()

    def caught_up(self) -> bool:
        return self.done or (self.idle and not self.buffer)


def _decode(pipe: _Pipe, keep_channels: bool, max_ahead_s: float) -> None:
    """The worker thread: FFmpeg reads the pipe; each decoded frame goes into ``pipe.chunks``,
    until more than ``max_ahead_s`` of audio waits there (the decoding then stops)."""
    import av

    try:
        container, stream = open_audio(pipe, options=PROBE_OPTIONS)
        with container:
            in_stream = max(1, stream.codec_context.layout.nb_channels)
            channels = in_stream if keep_channels else 1
            if channels > MAX_CHANNELS:
                raise UnsupportedMedia(f"the audio has {channels} channels; at most {MAX_CHANNELS} are transcribed one by one")
            layout = stream.codec_context.layout if channels > 1 else "mono"
            resampler = av.AudioResampler(format="flt", layout=layout, rate=MODEL_RATE)
            with pipe.cond:
                pipe.channels = channels
            damage = Damage()
            for samples in decoded_chunks(container, stream, resampler, damage):
                with pipe.cond:
                    if not pipe.chunks:
                        pipe.wake()  # one wake-up per batch the caller collects
                    pipe.chunks.append(samples)
                    pipe.ahead += len(samples) // channels
                    if pipe.ahead > max_ahead_s * MODEL_RATE:
                        pipe.error = f"one message held more than {max_ahead_s:g} s of audio; the rest of the stream is not decoded"
                        return
            damage.check(stream)
    except (UnsupportedMedia, AudioDecodeError) as exc:
        pipe.error = str(exc)
    except Exception as exc:  # noqa: BLE001 - FFmpeg on hostile bytes: the stream ends, the server goes on
        log.warning("compressed audio stream failed: %r", exc)
        pipe.error = f"the audio could not be decoded ({type(exc).__name__})"
    finally:
        with pipe.cond:
            pipe.done = True
            pipe.wake()


def _release(pipe: _Pipe) -> None:
    with pipe.cond:
        pipe.wakeup = None
    pipe.end()


class ContainerStream:
    """One compressed audio stream, decoded as its bytes come (see the module's docstring).
    ``keep_channels``: a multi-channel stream keeps its channels (interleaved, at most
    :data:`MAX_CHANNELS`); otherwise FFmpeg mixes them to mono. ``wakeup`` is called (from the
    worker thread) when audio decoded after a feed returned, or the stream's end, waits for
    :meth:`poll`; without one, poll when convenient."""

    def __init__(
        self,
        *,
        keep_channels: bool = False,
        max_ahead_s: float = MAX_AHEAD_S,
        wakeup: Callable[[], None] | None = None,
    ) -> None:
        self.keep_channels = keep_channels
        self.max_ahead_s = max_ahead_s
        self._pipe = _Pipe()
        self.set_wakeup(wakeup)
        self._head = bytearray()  # the first bytes, held until they show the stream is no playlist
        self._thread: threading.Thread | None = None
        self._error_told = False  # an error is reported once, with the audio before it
        self._decoded = 0  # samples handed back so far
        # A stream dropped without release() still lets its worker thread end.
        self._finalizer = weakref.finalize(self, _release, self._pipe)

    def set_wakeup(self, wakeup: Callable[[], None] | None) -> None:
        """Announce late audio through ``wakeup``; without one, each hand-off waits for the
        decoder to catch up (up to :data:`NO_WAKEUP_WAIT_S`), as a caller with no loop needs."""
        with self._pipe.cond:
            self._pipe.wakeup = wakeup
            self.handoff_wait_s = HANDOFF_WAIT_S if wakeup is not None else NO_WAKEUP_WAIT_S

    def feed(self, data: bytes) -> Decoded:
        """The next bytes of the stream; the audio decoded so far that was not handed back yet."""
        if self._thread is None:
            self._head += data
            if len(self._head) >= HEAD_BYTES:
                head, self._head = bytes(self._head), bytearray()
                self._start(head)
            return self.poll()
        with self._pipe.cond:
            if not self._pipe.done:
                self._pipe.buffer += data
                self._wait(self._pipe.caught_up)
        return self.poll()

    def end(self) -> bool:
        """No more bytes will come; True once the worker has decoded everything (then
        :meth:`poll` has the last audio), else the wake-up tells when it has."""
        if self._thread is None and self._head:
            head, self._head = bytes(self._head), bytearray()
            self._start(head)
        if self._thread is None:
            return True
        with self._pipe.cond:
            self._pipe.ended = True
            self._wait(lambda: self._pipe.done)
            return self._pipe.done

    @property
    def done(self) -> bool:
        """The worker finished (or never started): nothing more will come after a poll."""
        return self._thread is None or self._pipe.done

    def release(self) -> None:
        """Stop decoding (the connection is gone): the worker ends at its next read."""
        self._finalizer()

    def poll(self) -> Decoded:
        """The audio decoded and not handed back yet; once the worker is done, any error (once),
        including that a stream that held bytes gave no audio at all."""
        pipe = self._pipe
        with pipe.cond:
            chunks, pipe.chunks, pipe.ahead = pipe.chunks, [], 0
            if pipe.done and not pipe.error and not self._decoded and not chunks and self._thread is not None:
                # An MP4 whose index comes at its end (FFmpeg cannot seek back in a stream),
                # or a container that held nothing: say so rather than end in silence.
                pipe.error = "no audio could be decoded from the stream"
            channels, error = pipe.channels, None if self._error_told else pipe.error
            self._error_told = self._error_told or error is not None
        samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
        self._decoded += len(samples)
        # Some decoders overshoot [-1, 1] slightly; NaN/inf from broken streams become silence.
        np.nan_to_num(samples, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
        np.clip(samples, -1.0, 1.0, out=samples)
        return Decoded(samples, channels, error)

    def _wait(self, ready: Callable[[], bool]) -> None:
        """With ``cond`` held: wake the worker and wait for ``ready``, at most the hand-off time;
        what comes later is announced by the wake-up."""
        pipe = self._pipe
        pipe.waiting = True
        try:
            pipe.cond.notify_all()
            pipe.cond.wait_for(ready, timeout=self.handoff_wait_s)
        finally:
            pipe.waiting = False  # what the worker appended meanwhile is collected by the caller now

    def _start(self, head: bytes) -> None:
        """Start FFmpeg on a stream whose first bytes are ``head`` (unless they are refused)."""
        try:
            refuse_playlist(head)
        except UnsupportedMedia as exc:
            with self._pipe.cond:
                self._pipe.error, self._pipe.done = str(exc), True
            return
        self._pipe.buffer += head
        self._thread = threading.Thread(target=_decode, args=(self._pipe, self.keep_channels, self.max_ahead_s), name="audio-stream", daemon=True)
        self._thread.start()
        with self._pipe.cond:
            self._wait(self._pipe.caught_up)
