"""The engine: what every front end (WebSocket, HTTP) shares — models, VAD, scheduler, metrics.

It also drives a :class:`Session` over a whole file, so the HTTP API transcribes through exactly the
same VAD, commit policy and decoder as live streams, with every utterance's final decode submitted
at once so the scheduler can batch them.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np

from stream_server import protocol as p
from stream_server.audio import MODEL_RATE
from stream_server.decoding import Decoder, WhisperDecoder
from stream_server.metrics import ServerMetrics
from stream_server.models import ModelRegistry
from stream_server.scheduler import DecodeDropped, DecodeScheduler, ModelUnavailable
from stream_server.session import DecodeTicket, Output, Session, SessionLimits
from stream_server.settings import Settings
from stream_server.vad import SileroVad, VadModel

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, settings: Settings, *, vad: VadModel | None = None, decoder_factory=None) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        self.vad = vad or SileroVad()
        device = settings.resolved_device()
        compute_type = settings.resolved_compute_type()

        def load(path: str) -> Decoder:
            return WhisperDecoder(
                path,
                device=device,
                compute_type=compute_type,
                cpu_threads=settings.cpu_threads,
                num_workers=settings.decode_workers,
                timestamp_tokens=settings.resolved_timestamp_tokens(),
            )

        self.registry = ModelRegistry(
            default=settings.model,
            cache_dir=Path(settings.cache_dir),
            factory=decoder_factory or load,
        )
        self.scheduler = DecodeScheduler(
            self.registry.get,
            workers=settings.decode_workers,
            max_batch_size=settings.max_batch_size,
            interim_max_wait_s=settings.interim_max_wait_s,
            metrics=self.metrics,
        )
        self.limits = SessionLimits(
            interim_step_ms=settings.interim_step_ms, max_utterance_s=settings.max_utterance_s
        )
        self.ready = False
        self.active_sessions = 0

    def load_default_model(self) -> None:
        """Load and warm the default model (blocking: call from a thread at start-up)."""
        decoder = self.registry.get(self.settings.model)
        # The first call of a CTranslate2 model allocates its buffers; pay that before traffic.
        from stream_server.decoding import DecodeRequest

        decoder.decode_batch([DecodeRequest(np.zeros(MODEL_RATE, np.float32), model=self.settings.model)])
        self.ready = True

    def close(self) -> None:
        self.scheduler.stop()

    def new_session(self, config: p.SessionConfig | None = None, *, limits: SessionLimits | None = None) -> Session:
        return Session(
            "sess_" + uuid.uuid4().hex[:16],
            config=config or p.SessionConfig(model=self.settings.model),
            vad=self.vad,
            limits=limits or self.limits,
            model_exists=self.registry.exists,
        )

    async def decode(self, session: Session, ticket: DecodeTicket) -> list[Output]:
        """Run one ticket through the scheduler and feed the outcome back to its session."""
        try:
            result = await self.scheduler.submit(ticket)
        except DecodeDropped:
            return session.receive_decode_failure(ticket, "dropped", "interim decode shed under load")
        except ModelUnavailable as exc:
            return session.receive_decode_failure(ticket, "model_unavailable", str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported to the client as decode_failed
            self.metrics.decode_errors.inc()
            return session.receive_decode_failure(ticket, "decode_failed", f"decoder failed: {exc}")
        return session.receive_decode_result(ticket, result)

    async def transcribe_events(self, audio: np.ndarray, config: p.SessionConfig) -> AsyncIterator[p.ServerEvent]:
        """Transcribe a whole 16 kHz signal; yields the session's events in order, ending with done.

        Audio is fed as fast as the VAD runs; each utterance's final decode is submitted as soon
        as the VAD closes it, so long files keep the scheduler's batches full.
        """
        config = config.model_copy(update={"interim_results": False, "input_audio_format": "float32", "sample_rate": MODEL_RATE})
        session = self.new_session(config, limits=SessionLimits(
            interim_decoding=False, max_utterance_s=self.limits.max_utterance_s
        ))
        pending: set[asyncio.Task] = set()
        # Decode tasks are read back in the order they *finished* (a done-callback queue): the
        # session computes its outputs when a task runs, so this is the order it produced them in.
        # (Iterating the set that ``asyncio.wait`` returns emitted utterances out of audio order
        # whenever several decodes of one batch completed in the same loop iteration.)
        finished: asyncio.Queue[asyncio.Task] = asyncio.Queue()
        chunk = MODEL_RATE * 10

        def route(outputs: list[Output]) -> list[p.ServerEvent]:
            events = []
            for out in outputs:
                if isinstance(out, DecodeTicket):
                    task = asyncio.ensure_future(self.decode(session, out))
                    pending.add(task)
                    task.add_done_callback(finished.put_nowait)
                elif isinstance(out, p.ServerEvent):
                    events.append(out)
            return events

        def drain() -> list[p.ServerEvent]:
            events = []
            while not finished.empty():
                task = finished.get_nowait()
                pending.discard(task)
                events += route(task.result())
            return events

        try:
            route(session.start())
            for i in range(0, len(audio), chunk):
                for event in route(session.receive_bytes(np.ascontiguousarray(audio[i : i + chunk], "<f4").tobytes())):
                    yield event
                await asyncio.sleep(0)  # let decode results flow while a long file is segmented
                for event in drain():  # and pass on what is already final (streamed responses)
                    yield event
            for event in route(session.close()):
                yield event
            while pending:
                task = await finished.get()
                pending.discard(task)
                for event in route(task.result()):
                    yield event
        finally:
            for task in pending:
                task.cancel()
            self.scheduler.cancel(session.pending_tickets())

    async def transcribe(self, audio: np.ndarray, config: p.SessionConfig) -> FileTranscript:
        segments: list[p.TranscriptSegment] = []
        done: p.TranscriptDone | None = None
        errors: list[p.Error] = []
        async for event in self.transcribe_events(audio, config):
            if isinstance(event, p.TranscriptSegment):
                segments.append(event)
            elif isinstance(event, p.TranscriptDone):
                done = event
            elif isinstance(event, p.Error):
                errors.append(event)
        assert done is not None
        return FileTranscript(segments=segments, done=done, errors=errors)


class FileTranscript:
    """A whole file's result: its segments, the done event (text, logprobs, usage) and errors."""

    def __init__(self, segments: list[p.TranscriptSegment], done: p.TranscriptDone, errors: list[p.Error]) -> None:
        self.segments = segments
        self.done = done
        self.errors = errors

    @property
    def text(self) -> str:
        return self.done.text


__all__ = ["Engine", "FileTranscript"]
