"""The decode scheduler: one queue shared by every session, worker threads, cross-session batches.

Why one queue: a GPU (and, less so, a CPU) does far more work per second on a batch of windows from
many streams than on each alone, so streams per machine hinge on batching across sessions. On this
2-core CPU one tiny.en ``generate`` step costs ~15 ms for one window and ~18 ms for four, so a
batch of four interim decodes costs little more than one. Rules, in order:

* Finals first, oldest first: a final is what a user waits for at the end of a turn.
* Then, oldest first, the first interim decode of an utterance that shows no text yet (every
  person who starts talking should see words within a second, whoever else is talking) and pause
  decodes (``DecodeRequest.commits``: a turn usually ends on its pause decode, which then stands
  in for its final). Served by staleness like other re-decodes, a loaded server made the end of
  every turn wait behind other streams' interims: 24 streams, final p50 / p95 0.75-0.82 /
  1.74-2.10 s before, 0.49-0.60 / 1.00-1.24 s after (docs/benchmarks.md, Capacity).
* Then other interim work by staleness: the utterance that has gone longest without a result goes
  first. (Arrival order let busy streams starve new ones: first text p50 was 5 s at 12 streams.)
  A whole file's decodes (``DecodeRequest.background``: the HTTP API, a recording sent at once)
  take their turn among these,
  by the time they were queued: no one is waiting on them live.
  ``DecodeRequest.key`` names the utterance; requests without one are their own utterance.
* A batch is the first request in that order plus the queued requests the decoder can run in the
  same model pass (``Decoder.batch_key``: same window length and prompt shape), in the same order.
  Requests that would need a second pass wait for the next batch, so an urgent final never waits
  behind someone else's differently shaped work.
* Interim work is dropped, never finals, when the server is overloaded: an interim request that
  has waited longer than ``interim_max_wait_s`` is answered with :class:`DecodeDropped`, and the
  session asks again with fresher audio, keeping its utterance's place in the staleness order.
  Sessions keep at most one interim decode in flight per channel, so the queue is bounded by the
  number of channels and load lengthens each stream's interim step instead of growing a queue.
* The asyncio loop never runs model code: results come back with ``call_soon_threadsafe``.
* A worker that raises outside a decode fails its batch's requests and goes on; :meth:`healthy`
  tells ``/readyz`` whether every worker thread is alive.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Hashable
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

# Utterances remembered for the staleness order; an utterance that asked nothing for this long is
# over (its final resolved, or its session gone) and is forgotten.
_FORGET_AFTER_S = 120.0


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
    utterance: Hashable
    batch_key: Hashable = None  # set by a worker from the decoder, once

    @property
    def model(self) -> str:
        return self.job.request.model

    @property
    def ends_turn(self) -> bool:
        """A live final, or a pause decode (usually the last decode of its turn): what a speaker
        who stopped waits for."""
        request = self.job.request
        return (self.final or request.commits) and not request.background


@dataclasses.dataclass
class _Utterance:
    """When an utterance first asked for work, and when it last got a result (None: never)."""

    first_asked: float
    last_served: float | None = None
    last_seen: float = 0.0


@dataclasses.dataclass
class _TurnEndLatency:
    """How long the decodes that end turns (finals and pause decodes) take from request to
    result: a moving average of recent ones, forgotten when none has run for a while (an idle
    server is not overloaded).

    Why these and not finals alone: most turns end on their pause decode, which the scheduler
    serves after finals, so on a full machine finals ran on time while every turn's last words
    came late; measured by wait alone, 32 streams on a 2-core host got in at final p95 2.5 s.
    Why request to result: the decode's own time is part of what the speaker waits for, and it
    grows with the batch a loaded server runs."""

    average: float = 0.0
    observed_at: float = float("-inf")
    busy: bool = False
    weight: float = 0.2
    memory_s: float = 5.0

    def observe(self, wait: float, now: float) -> None:
        recent = now - self.observed_at < self.memory_s
        self.average = (1 - self.weight) * self.average + self.weight * wait if recent else wait
        self.observed_at = now

    def over(self, limit_s: float, now: float, oldest_waiting: float) -> bool:
        average = self.average if now - self.observed_at < self.memory_s else 0.0
        level = max(average, oldest_waiting)
        # Enter above the limit, leave below three quarters of it: no flapping at the edge, and
        # no refusing for minutes after one slow batch (half of 0.4 s is under what 12 streams
        # average on a 2-core host, 0.26 s, where the targets hold).
        self.busy = level > (limit_s * 0.75 if self.busy else limit_s)
        return self.busy


def failure_of(exc: BaseException) -> DecodeFailure:
    """The typed outcome of a decode that raised: what sessions and HTTP front ends act on."""
    if isinstance(exc, DecodeDropped):
        return DecodeFailure(FailureKind.DROPPED, str(exc))
    if isinstance(exc, ModelUnavailable):
        return DecodeFailure(FailureKind.MODEL_UNAVAILABLE, str(exc))
    return DecodeFailure(FailureKind.DECODER_ERROR, f"decoder failed: {exc}")


def batch_key_of(decoder: Decoder, request: DecodeRequest) -> Hashable:
    """Which requests one model pass can take together; decoders without a notion of it batch
    anything (the fakes, the synthetic model's wrappers)."""
    key = getattr(decoder, "batch_key", None)
    return key(request) if key is not None else None


def pass_limit_of(decoder: Decoder, key: Hashable) -> int | None:
    """How many requests of batch key ``key`` the decoder takes in one pass (its memory bound),
    or None where it sets none."""
    limit = getattr(decoder, "pass_limit", None)
    if limit is None or not (isinstance(key, tuple) and key[:1] == ("key",)):
        return None
    try:
        bound: int | None = limit(key[1])
    except Exception:
        log.exception("pass limit of a batch key failed")
        return None
    return bound


def _batch_key(decoder: Decoder, entry: _Entry) -> Hashable:
    try:
        return ("key", batch_key_of(decoder, entry.job.request))
    except Exception:
        log.exception("batch key of a request failed")
        return ("alone", id(entry))


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
        self._utterances: dict[Hashable, _Utterance] = {}
        self._cond = threading.Condition()
        self._stopping = False
        self._load = _TurnEndLatency()
        self._threads = [
            threading.Thread(target=self._work, name=f"decode-{i}", daemon=True) for i in range(max(1, workers))
        ]
        for thread in self._threads:
            thread.start()

    # ---------------------------------------------------------------- asyncio side

    def submit(self, job: Job) -> asyncio.Future[DecodeResult]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[DecodeResult] = loop.create_future()
        request = job.request
        now = time.monotonic()
        with self._cond:
            if self._stopping:
                future.set_exception(RuntimeError("scheduler is stopped"))
                return future
            utterance = request.key if request.key is not None else object()
            self._utterances.setdefault(utterance, _Utterance(now)).last_seen = now
            self._pending.append(_Entry(job, future, loop, now, request.final, utterance))
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

    def overloaded(self, limit_s: float, first_text_limit_s: float = 0.0) -> bool:
        """Whether the decodes that end turns take longer than ``limit_s`` from request to result
        (recent average, or the oldest one waiting now), or a turn has waited longer than
        ``first_text_limit_s`` for its first text (0: not watched), with hysteresis (see
        :class:`_TurnEndLatency`): admission control refuses new sessions while this holds,
        so the people already talking keep their latency. Measured, not a session count: what a
        server holds depends on the model, the machine and how much people talk.

        Why first text too: finals go first, so a full machine keeps its turn ends nearly on
        time while new turns wait for their first words behind them. Traced at 24 live streams
        (admission off), one turn's first interim was shed twelve times in a row and its first
        text came 16 s after the speaker began; by turn ends alone, 20 of 24 streams got in
        and read first text p50 / p95 1.32 / 3.65 s (docs/benchmarks.md, "First text in admission control")."""
        if limit_s <= 0:
            return False
        now = time.monotonic()
        with self._cond:
            oldest = max((now - e.enqueued for e in self._pending if e.ends_turn), default=0.0)
            if first_text_limit_s > 0:
                # On the turn-end scale, so one meter (and its hysteresis) holds both.
                oldest = max(oldest, self._longest_first_text_wait(now) * limit_s / first_text_limit_s)
            return self._load.over(limit_s, now, oldest)

    def _longest_first_text_wait(self, now: float) -> float:
        """How long the longest-waiting live turn without a result has asked for its first text
        (since its first interim was queued: a shed one is asked again, keeping its place)."""
        asked = (self._first_text_of(e) for e in self._pending)
        return max((now - u.first_asked for u in asked if u is not None), default=0.0)

    def _first_text_of(self, entry: _Entry) -> _Utterance | None:
        """The utterance ``entry`` would show the first text of: a live interim (not a final,
        pause decode or recording) of an utterance that has had no result yet; else None."""
        request = entry.job.request
        if entry.final or request.commits or request.background:
            return None
        utterance = self._utterances.get(entry.utterance)
        return utterance if utterance is not None and utterance.last_served is None else None

    def healthy(self) -> bool:
        """Every worker thread is alive (a dead one would leave requests waiting forever)."""
        return not self._stopping and all(thread.is_alive() for thread in self._threads)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=5)

    # ---------------------------------------------------------------- ordering

    def _priority(self, entry: _Entry) -> tuple[int, float]:
        if entry.job.request.background:
            return (2, entry.enqueued)
        if entry.final:
            return (0, entry.enqueued)
        first = self._first_text_of(entry)
        if first is not None:
            return (1, first.first_asked)
        utterance = self._utterances.get(entry.utterance)
        if entry.job.request.commits or utterance is None or utterance.last_served is None:
            return (1, entry.enqueued)
        return (2, utterance.last_served)

    def _shed_stale(self, now: float) -> None:
        fresh = []
        for entry in self._pending:
            if not entry.final and now - entry.enqueued > self._interim_max_wait:
                self._metrics.dropped_interim.inc()
                entry.loop.call_soon_threadsafe(_fail, entry.future, DecodeDropped("interim decode shed under load"))
            else:
                fresh.append(entry)
        self._pending = fresh

    def _forget_old_utterances(self, now: float) -> None:
        if len(self._utterances) < 256:
            return
        waiting = {e.utterance for e in self._pending}
        for key in [k for k, u in self._utterances.items() if now - u.last_seen > _FORGET_AFTER_S and k not in waiting]:
            del self._utterances[key]

    # ---------------------------------------------------------------- worker side

    def _next_model(self) -> str | None:
        """Wait for work; the model of the most urgent request (None: stopping)."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                self._shed_stale(time.monotonic())
                if self._pending:
                    return min(self._pending, key=self._priority).model
                self._metrics.queue_depth.set(0)
                self._cond.wait()

    def _take_batch(self, model: str, decoder: Decoder) -> list[_Entry]:
        """The most urgent request of ``model`` and the queued requests of its model pass."""
        with self._cond:
            candidates = sorted((e for e in self._pending if e.model == model), key=self._priority)
            if not candidates:
                return []  # another worker took them meanwhile
            for entry in candidates:
                if entry.batch_key is None:
                    entry.batch_key = _batch_key(decoder, entry)
            head = candidates[0]
            size = min(self._max_batch, pass_limit_of(decoder, head.batch_key) or self._max_batch)
            batch = [e for e in candidates if e.batch_key == head.batch_key][:size]
            taken = {id(e) for e in batch}
            self._pending = [e for e in self._pending if id(e) not in taken]
            self._metrics.queue_depth.set(len(self._pending))
            self._forget_old_utterances(time.monotonic())
            return batch

    def _work(self) -> None:
        while True:
            model = self._next_model()
            if model is None:
                return
            batch: list[_Entry] = []
            try:
                decoder = self._decoder(model)
                if decoder is None:
                    continue
                batch = self._take_batch(model, decoder)
                if batch:
                    self._run(decoder, batch)
            except BaseException as exc:
                log.exception("decode worker error; failing its batch and going on")
                for entry in batch:
                    entry.loop.call_soon_threadsafe(_fail, entry.future, RuntimeError(f"decode worker error: {exc}"))

    def _decoder(self, model: str) -> Decoder | None:
        """The model's decoder; when it cannot load, every queued request for it fails."""
        try:
            return self._get_decoder(model)
        except Exception as exc:  # noqa: BLE001 - any load failure is reported to the sessions
            log.warning("model %s unavailable: %s", model, exc)
            with self._cond:
                failed = [e for e in self._pending if e.model == model]
                self._pending = [e for e in self._pending if e.model != model]
            for entry in failed:
                entry.loop.call_soon_threadsafe(_fail, entry.future, ModelUnavailable(f"model {model!r} could not be loaded: {exc}"))
            return None

    def _served(self, batch: list[_Entry]) -> None:
        now = time.monotonic()
        with self._cond:
            for entry in batch:
                utterance = self._utterances.get(entry.utterance)
                if utterance is not None:
                    utterance.last_served = now

    def _run(self, decoder: Decoder, batch: list[_Entry]) -> None:
        started = time.monotonic()
        for entry in batch:
            self._metrics.queue_wait.observe(started - entry.enqueued)
        try:
            results = decoder.decode_batch([e.job.request for e in batch])
        except Exception as exc:
            if len(batch) > 1:
                # One request can fail a whole model call; decode each alone so the failure stays
                # with the request that caused it and the other sessions get their text.
                log.warning("a batch of %d failed (%s); decoding its requests one by one", len(batch), exc)
                for entry in batch:
                    self._run_alone(decoder, entry)
                self._served(batch)
                self._observe_turn_ends(batch, time.monotonic())
                return
            log.exception("decode failed")
            batch[0].loop.call_soon_threadsafe(_fail, batch[0].future, exc)
            self._observe_turn_ends(batch, time.monotonic())
            return
        self._served(batch)
        done = time.monotonic()
        elapsed = done - started
        self._observe_turn_ends(batch, done)
        audio_s = sum(len(e.job.request.audio) for e in batch) / MODEL_RATE
        self._metrics.batch_seconds.observe(elapsed)
        self._metrics.batch_size.observe(len(batch))
        if elapsed > 0:
            self._metrics.realtime_factor.observe(audio_s / elapsed)
        for entry, result in zip(batch, results):
            entry.loop.call_soon_threadsafe(_succeed, entry.future, result)

    def _observe_turn_ends(self, batch: list[_Entry], done: float) -> None:
        """Feed the admission meter the slowest turn-ending decode of a batch that just ran (or
        failed: its speakers waited all the same)."""
        latencies = [done - e.enqueued for e in batch if e.ends_turn]
        if not latencies:
            return
        slowest = max(latencies)
        with self._cond:
            self._load.observe(slowest, done)
        self._metrics.turn_end_decode.observe(slowest)

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
