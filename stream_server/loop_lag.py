"""How late the event loop runs what is due: the load signal of the work that is not decoding.

Every client frame goes through the one event loop: the dialect's parse, the session's resampler
and VAD, the runner, the hub's fan-out. Decodes run on worker threads and are watched by the
scheduler's own meter (``DecodeScheduler.overloaded``), but the loop has no queue to look at:
its backlog is the frames waiting in the sockets. On 2 cores, 24 two-leg calls (48 phone lines,
2,400 frames a second) asked more of the loop than it had beside the decoders, and it fell
further behind every second: turn ends seen 15-19 s late while every decode, once asked, was
quick, so admission control saw nothing wrong (docs/benchmarks.md, "Phone lines when the loop is behind").

:class:`LoopLag` measures that directly: a timer that asks to wake every ``interval_s`` and
records how late it woke. It reads two ways over the last ``window_s``: the worst lateness (the
metric: one busy callback shows for a moment) and the typical one, the median, which is what
the server acts on. A loaded but healthy loop has bursts (a batch of decode results reaching
many sessions at once: 8 calls on a slow hour read 50-120 ms at worst in most windows) that
cost nothing to wait out, and taking longer intake steps for them made 8 calls' turns 0.03 s
later; a loop that is behind is late at every sample.

The timer runs only while a live session is open (:meth:`LoopLag.watch`): on the 2-core VM the
benchmarks run on, each wakeup of an idle asyncio loop costs ~0.15 ms of CPU, and this timer's
20 a second were most of an idle server's 5.5-7.2 ms of CPU a second. With no session open there is
nothing to step and the loop is not late.
"""

from __future__ import annotations

import asyncio
import collections
import statistics
import time


class LoopLag:
    """The event loop's lateness, sampled by a timer task (:meth:`run`) that the server starts."""

    def __init__(self, *, interval_s: float = 0.05, window_s: float = 2.0) -> None:
        self.interval_s = interval_s
        self.window_s = window_s
        self._samples: collections.deque[tuple[float, float]] = collections.deque()  # (when, lag s)
        self._behind: dict[float, bool] = {}  # limit -> behind at the last look (hysteresis)
        # The readings, kept from the last sample: the runner asks for them with every audio
        # message (2,400 a second at 24 calls), the window changes only 20 times a second.
        self._worst = 0.0
        self._median = 0.0
        self._watchers = 0  # live sessions open
        self._watched: asyncio.Event | None = None  # made by run(), in the loop it measures

    def watch(self) -> None:
        """A live session opened: sample while any is open."""
        self._watchers += 1
        if self._watched is not None:
            self._watched.set()

    def unwatch(self) -> None:
        """A live session closed: the last one stops the sampling, and the readings go to 0."""
        self._watchers = max(0, self._watchers - 1)
        if not self._watchers and self._watched is not None:
            self._watched.clear()

    async def run(self) -> None:
        """Sample while a session is open, until cancelled (the server's lifespan owns the task)."""
        self._watched = asyncio.Event()
        if self._watchers:
            self._watched.set()
        while True:
            if not self._watched.is_set():
                self._forget()
                await self._watched.wait()
            asked = time.monotonic()
            await asyncio.sleep(self.interval_s)
            now = time.monotonic()
            self.observe(now - asked - self.interval_s, now)

    def observe(self, lag_s: float, now: float) -> None:
        """One timer's lateness (also how tests drive the meter without a loop)."""
        self._samples.append((now, max(0.0, lag_s)))
        while self._samples and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()
        lags = [lag for _, lag in self._samples]
        self._worst, self._median = max(lags), statistics.median(lags)

    def _forget(self) -> None:
        """No session open: the readings of the last one no longer say anything."""
        self._samples.clear()
        self._worst = self._median = 0.0

    def seconds(self) -> float:
        """The worst lateness of the last ``window_s`` (0 before the first sample)."""
        return self._worst

    def sustained(self) -> float:
        """The median lateness of the last ``window_s``: how late the loop runs, bursts aside."""
        return self._median

    def behind(self, limit_s: float) -> bool:
        """Whether the loop runs ``limit_s`` or more late (:meth:`sustained`), with hysteresis:
        once behind, it is behind until the lag falls under half the limit, so a load near the
        limit does not flip the sessions' intake from step to step (0: never behind)."""
        if limit_s <= 0:
            return False
        was_behind = self._behind.get(limit_s, False)
        self._behind[limit_s] = behind = self.sustained() >= (limit_s / 2 if was_behind else limit_s)
        return behind


__all__ = ["LoopLag"]
