"""The one runner: pumps a Sans-I/O :class:`Session` through the shared decode scheduler.

Every front end drives sessions through this class: the WebSocket endpoints of every dialect
(``ws.py``), the HTTP file path (``engine.transcribe_events``), the in-process benchmark and the
tests. It owns no transport: core events go to an ``emit`` callback, and the session's request to
close goes to ``on_close``, both called synchronously in the order the session produced them.

After each input the runner drains the session's output queues (``decodes_to_submit``,
``decodes_to_promote``, ``events_to_send``, ``close_expected``); each decode runs as a task that
awaits the scheduler (worker threads; the event loop never runs model code) and feeds the result
or a typed :class:`~stream_server.decoding.DecodeFailure` back, then drains again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable

from stream_server import protocol as p
from stream_server.decoding import FailureKind
from stream_server.metrics import ServerMetrics
from stream_server.scheduler import DecodeScheduler, failure_of
from stream_server.session import CloseConnection, DecodeTicket, Session

#: Audio this far ahead of the wall clock still counts as sent in real time (frames are sent in
#: bursts; a client catching up after a network stall is never ahead of the clock).
REAL_TIME_SLACK_S = 2.0


class SessionRunner:
    """Moves one session's decodes to the scheduler and its events to ``emit``."""

    def __init__(
        self,
        session: Session,
        scheduler: DecodeScheduler,
        *,
        emit: Callable[[p.ServerEvent], None],
        on_close: Callable[[CloseConnection], None] = lambda close: None,
        metrics: ServerMetrics | None = None,
        elapsed_s: Callable[[], float] | None = None,
        load_intake_step_ms: Callable[[], int] | None = None,
    ) -> None:
        self.session = session
        # The intake step the server's load asks for now (``Engine.load_intake_step_ms``; None:
        # the session's configured step always).
        self._load_intake_step_ms = load_intake_step_ms
        # Wall seconds since the client connected (a live transport's clock; None: no clock, every
        # decode is live). A client this far behind its own audio sent a recording at full speed.
        self._elapsed_s = elapsed_s
        self._scheduler = scheduler
        self._emit = emit
        self._on_close = on_close
        self._metrics = metrics
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopped_at: dict[str, float] = {}
        self.closed = asyncio.Event()  # set once the session asked to close (after its last event)
        self._caught_up = asyncio.Event()  # set while the session is not backlogged (flow control)
        self._caught_up.set()

    # ---------------------------------------------------------------- inputs

    def start(self) -> None:
        self.session.start()
        self.pump()

    def apply(self, command: p.ClientMessage) -> None:
        """One typed client command (from any dialect), then whatever it produced goes out."""
        if self._load_intake_step_ms is not None and isinstance(command, p.AudioAppend):
            self.session.set_load_intake_step_ms(self._load_intake_step_ms())
        self.session.receive_message(command)
        self.pump()

    def feed_audio(self, data: bytes) -> None:
        self.session.receive_bytes(data)
        self.pump()

    def close(self) -> None:
        """Flush the session (finalize open utterances); ``closed`` is set when it is done."""
        self.session.close()
        self.pump()

    async def wait_closed(self, timeout: float | None = None) -> bool:
        """Wait for the session's close after a flush; False on timeout."""
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def ahead_of_real_time(self, elapsed_s: float) -> bool:
        """Whether the client has sent more audio than ``elapsed_s`` wall seconds hold (beyond
        ``REAL_TIME_SLACK_S`` of network jitter): a file sent faster than real time, not a live source."""
        return self.session.audio_seconds > elapsed_s + REAL_TIME_SLACK_S

    async def wait_caught_up(self, timeout: float, *, elapsed_s: float | None = None) -> float:
        """Wait until the session is no longer backlogged (or is closing), at most ``timeout``
        seconds; returns the seconds waited. A shell calls this before reading the client's next
        message, so a client that sends faster than the decoder finalizes is slowed by its own
        transport (TCP) instead of the session merging its turns.

        With ``elapsed_s`` (wall seconds since the session started) only a client ahead of real
        time waits: one that sends live audio (a microphone, a telephony platform) cannot send
        less, and left unread on an overloaded server its pings would go unanswered (AudioHook
        drops a call after 5 s); it keeps the deferred turn ends instead (``Session.backlogged``)."""
        if self._caught_up.is_set():
            return 0.0
        if elapsed_s is not None and not self.ahead_of_real_time(elapsed_s):
            return 0.0
        started = time.monotonic()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._caught_up.wait(), timeout)
        return time.monotonic() - started

    def cancel(self) -> None:
        """The client is gone: forget queued decodes and stop waiting for running ones."""
        self._scheduler.cancel(list(self.session.pending_tickets()))
        self._caught_up.set()
        for task in list(self._tasks):
            task.cancel()
        if self._metrics is not None:
            self._metrics.audio_seconds.inc(self.session.audio_seconds)
            self._metrics = None  # count a session's audio once

    # ---------------------------------------------------------------- pump

    def pump(self) -> None:
        session = self.session
        for ticket in session.decodes_to_submit():
            task = asyncio.ensure_future(self._decode(ticket))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        promoted = session.decodes_to_promote()
        if promoted:
            self._scheduler.promote(list(promoted))
        for event in session.events_to_send():
            self._observe(event)
            self._emit(event)
        if session.backlogged and not session.closing:
            self._caught_up.clear()
        else:
            self._caught_up.set()
        close = session.close_expected()
        if close is not None:
            self._on_close(close)
            self.closed.set()

    def _mark_recording(self, ticket: DecodeTicket) -> None:
        """A decode of a client ahead of real time (``mic-client --speed 0``, any recording sent
        at once) is background work, as a file's through the HTTP API: served after live
        speakers' turn ends and first interims, and not counted by admission control. Counted,
        one such file's finals (up to ``max_pending_finals`` queued at once, windows up to 15 s)
        made an idle server refuse the next session with ``server_busy`` for seconds."""
        if self._elapsed_s is None or ticket.request.background:
            return
        if self.ahead_of_real_time(self._elapsed_s()):
            ticket.request = dataclasses.replace(ticket.request, background=True)

    async def _decode(self, ticket: DecodeTicket) -> None:
        self._mark_recording(ticket)
        try:
            result = await self._scheduler.submit(ticket)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure is typed and goes to the session
            failure = failure_of(exc)
            if self._metrics is not None and failure.kind is FailureKind.DECODER_ERROR:
                self._metrics.decode_errors.inc()
            self.session.receive_decode_failure(ticket, failure)
        else:
            self.session.receive_decode_result(ticket, result)
        self.pump()

    def _observe(self, event: p.ServerEvent) -> None:
        """Finalization latency as the server sees it: speech stopped → segment out."""
        if self._metrics is None:
            return
        if isinstance(event, p.SpeechStopped):
            self._stopped_at[event.item_id] = time.monotonic()
        elif isinstance(event, p.TranscriptSegment):
            stopped = self._stopped_at.pop(event.item_id, None)
            if stopped is not None:
                self._metrics.finalization_latency.observe(time.monotonic() - stopped)
