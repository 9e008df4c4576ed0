"""The decode scheduler: one queue shared by every session, worker threads, cross-session batches.

Why one queue: a GPU (and, less so, a CPU) does far more work per second on a batch of windows from
many streams than on each alone, so streams per machine hinge on batching across sessions. Rules:

* Finals before interim work, oldest first: a final is what a user waits for at the end of a turn.
* Interim work is dropped, never finals, when the server is overloaded: an interim request that
  has waited longer than ``interim_max_wait_s`` is answered with :class:`DecodeDropped`, and the
  session simply asks again with more audio later. Sessions keep at most one interim decode in
  flight each, so the queue is bounded by the number of channels.
* A batch holds requests for one model only (one model call).
* The asyncio loop never runs model code: results come back with ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from stream_server.audio import MODEL_RATE
from stream_server.decoding import (
    DecodeFailure,
    Decoder,
    DecodeRequest,
    DecodeResult,
    FailureKind,
)
from stream_server.metrics import ServerMetrics

log = logging.getLogger(__name__)


class Job(Protocol):
    """What the scheduler needs of a submission: its request (``request.final`` gives its
    priority at submission; :meth:`DecodeScheduler.promote` raises it later)."""

    @property
    def request(self) -> DecodeRequest: ...


class DecodeDropped(Exception):
    """Interim work shed under load."""


class ModelUnavailable(Exception):
    """The job's model could not be loaded."""


@dataclasses.dataclass(eq=False)
class _Entry:
    job: Job
    future: asyncio.Future[DecodeResult]
    loop: asyncio.AbstractEventLoop
    enqueued: float
    final: bool  # owned by the scheduler, under its lock; changed only by ``promote``


def failure_of(exc: BaseException) -> DecodeFailure:
    """The typed outcome of a decode that raised: what sessions and HTTP front ends act on."""
    if isinstance(exc, DecodeDropped):
        return DecodeFailure(FailureKind.DROPPED, str(exc))
    if isinstance(exc, ModelUnavailable):
        return DecodeFailure(FailureKind.MODEL_UNAVAILABLE, str(exc))
    return DecodeFailure(FailureKind.DECODER_ERROR, f"decoder failed: {exc}")


class DecodeScheduler:
    def __init__(
        self,
        get_decoder: Callable[[str], Decoder],
        *,
        workers: int = 1,
        max_batch_size: int = 8,
        interim_max_wait_s: float = 1.0,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self._get_decoder = get_decoder
        self._max_batch = max(1, max_batch_size)
        self._interim_max_wait = interim_max_wait_s
        self._metrics = metrics or ServerMetrics()
        self._pending: list[_Entry] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._threads = [
            threading.Thread(target=self._work, name=f"decode-{i}", daemon=True) for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    # ---------------------------------------------------------------- asyncio side

    def submit(self, job: Job) -> asyncio.Future[DecodeResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DecodeResult] = loop.create_future()
        with self._cond:
            if self._stopping:
                future.set_exception(RuntimeError("scheduler is stopped"))
                return future
            self._pending.append(_Entry(job, future, loop, time.monotonic(), job.request.final))
            self._metrics.queue_depth.set(len(self._pending))
            self._cond.notify()
        return future

    def cancel(self, jobs: list[Job]) -> None:
        """Forget queued jobs of a session that went away; running ones finish unseen."""
        ids = {id(j) for j in jobs}
        with self._cond:
            kept = [e for e in self._pending if id(e.job) not in ids]
            for entry in self._pending:
                if id(entry.job) in ids:
                    entry.loop.call_soon_threadsafe(_cancel, entry.future)
            self._pending = kept
            self._metrics.queue_depth.set(len(self._pending))

    def promote(self, jobs: list[Job]) -> None:
        """Treat queued interim jobs as finals from now on (their utterance ended while they
        waited): never shed, served before interim work. Jobs already running are unaffected."""
        ids = {id(j) for j in jobs}
        with self._cond:
            for entry in self._pending:
                if id(entry.job) in ids:
                    entry.final = True

    def queue_depth(self) -> int:
        with self._cond:
            return len(self._pending)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    # ---------------------------------------------------------------- worker side

    def _take_batch(self) -> list[_Entry] | None:
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping:
                return None
            now = time.monotonic()
            fresh = []
            for entry in self._pending:
                if not entry.final and now - entry.enqueued > self._interim_max_wait:
                    self._metrics.dropped_interim.inc()
                    entry.loop.call_soon_threadsafe(_fail, entry.future, DecodeDropped("interim decode shed under load"))
                else:
                    fresh.append(entry)
            self._pending = fresh
            if not fresh:
                self._metrics.queue_depth.set(0)
                return []
            # Finals first (stable sort keeps arrival order), then fill with the same model.
            ordered = sorted(fresh, key=lambda e: not e.final)
            model = ordered[0].job.request.model
            batch = [e for e in ordered if e.job.request.model == model][: self._max_batch]
            taken = {id(e) for e in batch}
            self._pending = [e for e in fresh if id(e) not in taken]
            self._metrics.queue_depth.set(len(self._pending))
            return batch

    def _work(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            if batch:
                self._run(batch)

    def _run(self, batch: list[_Entry]) -> None:
        started = time.monotonic()
        for entry in batch:
            self._metrics.queue_wait.observe(started - entry.enqueued)
        model = batch[0].job.request.model
        try:
            decoder = self._get_decoder(model)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to the sessions
            log.warning("model %s unavailable: %s", model, exc)
            for entry in batch:
                entry.loop.call_soon_threadsafe(_fail, entry.future, ModelUnavailable(f"model {model!r} could not be loaded: {exc}"))
            return
        try:
            results = decoder.decode_batch([e.job.request for e in batch])
        except Exception as exc:
            if len(batch) > 1:
                # One request can fail a whole model call; decode each alone so the failure stays
                # with the request that caused it and the other sessions get their text.
                log.warning("a batch of %d failed (%s); decoding its requests one by one", len(batch), exc)
                for entry in batch:
                    self._run_alone(decoder, entry)
                return
            log.exception("decode failed")
            batch[0].loop.call_soon_threadsafe(_fail, batch[0].future, exc)
            return
        elapsed = time.monotonic() - started
        audio_s = sum(len(e.job.request.audio) for e in batch) / MODEL_RATE
        self._metrics.batch_seconds.observe(elapsed)
        self._metrics.batch_size.observe(len(batch))
        if elapsed > 0:
            self._metrics.realtime_factor.observe(audio_s / elapsed)
        for entry, result in zip(batch, results):
            entry.loop.call_soon_threadsafe(_succeed, entry.future, result)

    def _run_alone(self, decoder: Decoder, entry: _Entry) -> None:
        try:
            [result] = decoder.decode_batch([entry.job.request])
        except Exception as exc:
            log.exception("decode failed for one request")
            entry.loop.call_soon_threadsafe(_fail, entry.future, exc)
            return
        entry.loop.call_soon_threadsafe(_succeed, entry.future, result)


def _succeed(future: asyncio.Future[DecodeResult], result: DecodeResult) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[DecodeResult], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


def _cancel(future: asyncio.Future[DecodeResult]) -> None:
    if not future.done():
        future.cancel()
