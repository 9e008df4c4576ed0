"""How late the event loop runs what is due: the load signal of the work that is not decoding.

Every client frame goes through the one event loop: the dialect's parse, the session's resampler
and VAD, the runner, the hub's fan-out. Decodes run on worker threads and are watched by the
scheduler's own meter (``DecodeScheduler.overloaded``), but the loop has no queue to look at:
its backlog is the frames waiting in the sockets. On 2 cores, 24 two-leg calls (48 phone lines,
2,400 frames a second) asked more of the loop than it had beside the decoders, and it fell
further behind every second: turn ends seen 15-19 s late while every decode, once asked, was
quick, so admission control saw nothing wrong (README, "Phone lines when the loop is behind").

:class:`LoopLag` measures that directly: a timer that asks to wake every ``interval_s`` and
records how late it woke. It reads two ways over the last ``window_s``: the worst lateness (the
metric: one busy callback shows for a moment) and the typical one, the median, which is what
the server acts on. A loaded but healthy loop has bursts (a batch of decode results reaching
many sessions at once: 8 calls on a slow hour read 50-120 ms at worst in most windows) that
cost nothing to wait out, and taking longer intake steps for them made 8 calls' turns 0.03 s
later; a loop that is behind is late at every sample.
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

    async def run(self) -> None:
        """Sample until cancelled (the server's lifespan owns the task)."""
        while True:
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
