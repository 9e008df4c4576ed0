"""The engine: what every front end (WebSocket, HTTP) shares — models, VAD, scheduler, metrics.

It also drives a :class:`Session` over a whole file, so the HTTP API transcribes through exactly the
same VAD, commit policy and decoder as live streams, with every utterance's final decode submitted
at once so the scheduler can batch them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np

from stream_server import protocol as p
from stream_server.audio import MODEL_RATE
from stream_server.callbacks import CallbackJobs
from stream_server.decoding import Decoder, WhisperDecoder
from stream_server.hub import SessionHub
from stream_server.loop_lag import LoopLag
from stream_server.metrics import ServerMetrics
from stream_server.models import ModelRegistry
from stream_server.request_urls import UrlPolicy
from stream_server.runner import SessionRunner
from stream_server.scheduler import DecodeScheduler
from stream_server.session import Session, SessionLimits
from stream_server.settings import Settings
from stream_server.store import TranscriptStore
from stream_server.vad import SileroVad, VadModel
from stream_server.webhooks import WebhookSender

log = logging.getLogger(__name__)

#: A file's turn is prompted with the text up to this many turns before it, and waits for that
#: turn (``SessionLimits.final_context_lag``): the file's text then does not depend on decode
#: timing, and this many of its finals still decode at once (measurements: docs/benchmarks.md, Capacity).
FILE_CONTEXT_LAG = 4

#: The longest intake step the event loop's lag asks for (``Engine.load_intake_step_ms``): a
#: turn's end is seen at most this much later for it; a loop further behind gets refusals
#: (``--admission-max-loop-lag-ms``), not longer steps.
MAX_LOAD_STEP_MS = 400
#: Load steps are whole phone frames (20 ms: Twilio's and AudioHook's frame).
LOAD_STEP_GRAIN_MS = 20


def session_limits(settings: Settings) -> SessionLimits:
    """The commit policy every live session of this server runs with: the defaults measured with
    the benchmark, with what the operator set (flags, environment)."""
    return SessionLimits(
        interim_step_ms=settings.interim_step_ms,
        first_interim_ms=settings.first_interim_ms,
        interim_pace=settings.interim_pace,
        interim_pace_loaded=settings.interim_pace_loaded,
        loaded_round_trip_ms=settings.loaded_round_trip_ms,
        pause_decode_ms=settings.pause_decode_ms,
        stable_silence_ms=settings.stable_silence_ms,
        min_commit_window_ms=settings.min_commit_window_ms,
        held_commit_ms=settings.held_commit_ms,
        max_utterance_s=settings.max_utterance_s,
        carry_gap_ms=settings.carry_gap_ms,
        handover_pause_ms=settings.handover_pause_ms,
        narrowband_padding_ms=settings.narrowband_padding_ms,
        number_pause_ms=settings.number_pause_ms,
        level_onset_reach_ms=settings.level_onset_reach_ms,
        padding_from_level_ms=settings.padding_from_level_ms,
        fresh_listen_prob=settings.fresh_listen_prob,
        level_end_reach_ms=settings.level_end_reach_ms,
        intake_step_ms=settings.intake_step_ms,
        narrowband_intake_step_ms=settings.narrowband_intake_step_ms,
        crosstalk_margin_db=settings.crosstalk_margin_db,
    )


class Engine:
    def __init__(
        self, settings: Settings, *, vad: VadModel | None = None, decoder_factory: Callable[[str], Decoder] | None = None
    ) -> None:
        self.settings = settings
        self.metrics = ServerMetrics()
        # How late the event loop runs (sampled by a task the server's lifespan starts; without
        # one, as in tests that drive an engine directly, it reads 0 and nothing adapts).
        self.loop_lag = LoopLag()
        self.metrics.loop_lag.set_function(self.loop_lag.seconds)
        self.vad = vad or SileroVad(profile=self.metrics.stages)
        options = settings.decoder_options()

        def load(path: str) -> Decoder:
            return WhisperDecoder(path, **options, profile=self.metrics.stages)

        self.registry = ModelRegistry(
            default=settings.model,
            cache_dir=Path(settings.cache_dir),
            factory=decoder_factory or load,
        )
        self.scheduler = DecodeScheduler(
            self.registry.get,
            workers=settings.resolved_decode_workers(),
            max_batch_size=settings.max_batch_size,
            interim_max_wait_s=settings.interim_max_wait_s,
            metrics=self.metrics,
        )
        self.limits = session_limits(settings)
        self.ready = False
        self.draining = False  # SIGTERM: no new sessions; open ones are being finalized
        self.active_sessions = 0
        self.connections: set[Any] = set()  # open WebSocket connections (ws.Connection), for the drain
        # Live fan-out of every WebSocket session's events, the durable transcript store and webhooks.
        db_path = settings.transcript_db_path()
        self.store = TranscriptStore(db_path, retention_days=settings.transcript_retention_days) if db_path else None
        self.webhooks = (
            WebhookSender(
                settings.webhook_url,
                secret=settings.webhook_secret,
                timeout_s=settings.webhook_timeout_s,
                max_attempts=settings.webhook_max_attempts,
            )
            if settings.webhook_url
            else None
        )
        self.hub = SessionHub(
            [observer for observer in (self.store, self.webhooks) if observer is not None], redis_url=settings.redis_url
        )
        # Which URLs requests may have the server reach (--request-urls), and the requests
        # answered at a callback URL (Deepgram's callback=), run in the background.
        self.url_policy = UrlPolicy(settings.request_urls)
        self.callbacks = CallbackJobs(
            self.url_policy,
            retries=settings.callback_retries,
            retry_s=settings.callback_retry_s,
            secret=settings.webhook_secret,
        )

    def refusal(self) -> str | None:
        """Why a new session is refused now (``server_busy``), or None: draining, at the session
        limit, or overloaded (the decodes that end turns already take longer than
        ``admission_max_turn_end_s``, a turn has waited longer than ``admission_max_first_text_s``
        for its first text, or the event loop runs ``admission_max_loop_lag_ms`` late: the
        decoders may be keeping up while the intake of the audio is not)."""
        if self.draining:
            return "the server is shutting down"
        if self.active_sessions >= self.settings.max_sessions:
            return f"the server is at its limit of {self.settings.max_sessions} sessions"
        settings = self.settings
        if self.scheduler.overloaded(settings.admission_max_turn_end_s, settings.admission_max_first_text_s):
            return "the server is at capacity (transcripts are running late)"
        if self.loop_lag.behind(settings.admission_max_loop_lag_ms / 1000):
            return "the server is at capacity (its audio intake is running late)"
        return None

    def load_intake_step_ms(self) -> int:
        """The intake step live sessions take audio in now, else 0 (each session's configured step).

        While the event loop runs ``--loaded-loop-lag-ms`` late or more: ``--loaded-intake-step-ms``,
        or the loop's lag itself when that is longer (up to :data:`MAX_LOAD_STEP_MS`). Every frame
        already waits that long for the loop, so steps as long cost the turns little more and
        take the most work off it (24 calls on a slow hour: final p95 2.17-2.68 s against
        2.30-4.60 s with 100 ms steps; docs/benchmarks.md, "Phone lines when the loop is behind")."""
        settings = self.settings
        if not settings.loaded_intake_step_ms or not self.loop_lag.behind(settings.loaded_loop_lag_ms / 1000):
            return 0
        lag_ms = math.ceil(self.loop_lag.sustained() * 1000 / LOAD_STEP_GRAIN_MS) * LOAD_STEP_GRAIN_MS
        return max(settings.loaded_intake_step_ms, min(MAX_LOAD_STEP_MS, lag_ms))

    def load_default_model(self) -> None:
        """Load and warm the default model (blocking: call from a thread at start-up)."""
        decoder = self.registry.get(self.settings.model)
        # The first call of a CTranslate2 model allocates its buffers; pay that before traffic.
        from stream_server.decoding import DecodeRequest

        decoder.decode_batch([DecodeRequest(np.zeros(MODEL_RATE, np.float32), model=self.settings.model)])
        self.ready = True

    def close(self) -> None:
        self.scheduler.stop()
        self.hub.shutdown()  # with --redis-url: the last events (a drain's finals) reach Redis first
        if self.webhooks is not None:
            self.webhooks.close()
        if self.store is not None:
            self.store.close()

    def new_session(self, config: p.SessionConfig | None = None, *, limits: SessionLimits | None = None) -> Session:
        return Session(
            "sess_" + uuid.uuid4().hex[:16],
            config=config or p.SessionConfig(model=self.settings.model),
            vad=self.vad,
            limits=limits or self.limits,
            model_exists=self.registry.exists,
            model_speaks=self.registry.speaks,
            redact_floor=self.settings.redact_names(),
        )

    async def transcribe_events(self, audio: np.ndarray, config: p.SessionConfig) -> AsyncIterator[p.ServerEvent]:
        """Transcribe a whole 16 kHz signal; yields the session's events in order, ending with done.

        ``audio``: mono (shape ``[n]``), or one column per channel (``[n, channels]``: a call's
        legs), each channel then transcribed on its own as in a live multi-channel session
        (``config.channel_labels``, when set, names as many channels as ``audio`` has: the
        config's own validation refuses other labels, with a ProtocolError).
        Audio is fed as fast as the VAD runs; each utterance's final decode is submitted as soon
        as the VAD closes it, so long files keep the scheduler's batches full.
        """
        channels = audio.shape[1] if audio.ndim == 2 else 1
        config = config.updated({"interim_results": False, "input_audio_format": "float32", "sample_rate": MODEL_RATE, "channels": channels})
        # Every turn of a file is queued at once on purpose (batches stay full); the file's size
        # limit bounds that work, so turn ends are never deferred here as they are for a live
        # client that outruns the decoder.
        session = self.new_session(config, limits=SessionLimits(
            interim_decoding=False, max_utterance_s=self.limits.max_utterance_s, max_pending_finals=1_000_000,
            final_context_lag=FILE_CONTEXT_LAG,
        ))
        events: asyncio.Queue[p.ServerEvent | None] = asyncio.Queue()  # None: the session closed
        runner = SessionRunner(session, self.scheduler, emit=events.put_nowait, on_close=lambda close: events.put_nowait(None))
        chunk = MODEL_RATE * 10
        try:
            runner.start()
            for i in range(0, len(audio), chunk):
                # Rows of several channels go out interleaved, as a live client sends them.
                runner.feed_audio(np.ascontiguousarray(audio[i : i + chunk], "<f4").tobytes())
                await asyncio.sleep(0)  # let decode results flow while a long file is segmented
                while not events.empty():  # and pass on what is already final (streamed responses)
                    event = events.get_nowait()
                    if event is not None:
                        yield event
            runner.close()
            while (event := await events.get()) is not None:
                yield event
        finally:
            runner.cancel()

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
