"""Where the server's CPU goes: per-stage CPU and wall time, cheap enough to be always on.

Two ways of measuring a stage's CPU, because the work runs in two kinds of places:

* **inline** (:meth:`StageProfile.inline_start` / :meth:`StageProfile.inline_stop`): work that runs
  in the calling thread and nowhere else, such as Silero VAD (onnxruntime with one intra-op
  thread runs in the caller). Its CPU is the calling thread's CPU time (``time.thread_time``).
* **native** (:meth:`StageProfile.native`): work a Python worker thread hands to native threads
  and waits for, such as a CTranslate2 ``encode`` (run by CTranslate2's own thread pool: the
  calling thread's CPU time stays at zero, measured) or NumPy with a threaded BLAS. Its CPU is the
  whole process's CPU time over the stage minus the event-loop (main) thread's: the worker, the
  native threads it waits on, and whatever else ran meanwhile outside the event loop. With one
  decode worker (the default) that is the stage's own work; with several, concurrent model calls
  overlap and each stage's figure is an upper bound.

Cost, measured on the 2-core CI machine while it was loaded (load average 7; one clock read took
~1-2.5 µs): one inline record ~9 µs against ~350 µs per one-frame VAD call measured alike; one
native stage ~21 µs against milliseconds of model time. Over a 52 s one-stream bench run (1625 VAD
calls, 126 decode batches of six stages) that is ~30 ms of 42 CPU-seconds, under 0.1%: cheap
enough to be always on. ``tests/test_profile.py`` bounds both costs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

#: The stages the decoder and the VAD report, in pipeline order.
STAGES = ("vad", "features", "encode", "detect_language", "generate", "align", "words")
#: The decoder's work counters: requests decoded, encoder input seconds, decoder steps forced
#: (the mode token and the committed prefix: CTranslate2 runs them one step each, measured ~4.6 ms
#: per token on tiny.en, where context before <|startoftranscript|> costs ~0.3 ms per token in one
#: pass), decoder steps generated, and tokens through the alignment pass.
WORK_COUNTS = ("requests", "encoder_s", "forced_steps", "generated_steps", "aligned_tokens")


def _thread_clock(ident: int | None) -> int | None:
    """The CPU-time clock of thread ``ident`` (a pthread id), or None where there is none."""
    getter = getattr(time, "pthread_getcpuclockid", None)
    if ident is None or getter is None:
        return None
    try:
        clock: int = getter(ident)
        time.clock_gettime(clock)
    except (OSError, OverflowError):
        return None
    return clock


class StageProfile:
    """Running totals per stage: CPU seconds, wall seconds and calls (thread-safe).

    CPU spent by an inline stage on the event-loop (main) thread is also kept apart, so a report
    can tell the event loop's own work from the stages it runs (``loop_cpu_s``).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._cpu: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._wall: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        self._calls: dict[str, int] = dict.fromkeys(STAGES, 0)
        self._loop_cpu: dict[str, float] = dict.fromkeys(STAGES, 0.0)
        # Work done, in units that do not depend on the machine (decoder steps, encoder seconds):
        # what a policy change saves, whatever else the machine was running.
        self._counts: dict[str, float] = {}
        self._main = threading.main_thread().ident
        self._main_clock = _thread_clock(self._main)

    # ---------------------------------------------------------------- clocks

    def process_cpu(self) -> float:
        """CPU seconds of the whole process (every thread, native ones included)."""
        return time.process_time()

    def main_thread_cpu(self) -> float:
        """CPU seconds of the main thread, which runs the event loop (0 where unmeasurable)."""
        return time.clock_gettime(self._main_clock) if self._main_clock is not None else 0.0

    # ---------------------------------------------------------------- recording

    def record(self, stage: str, cpu_s: float, wall_s: float, *, on_loop: bool = False) -> None:
        with self._lock:
            self._cpu[stage] = self._cpu.get(stage, 0.0) + cpu_s
            self._wall[stage] = self._wall.get(stage, 0.0) + wall_s
            self._calls[stage] = self._calls.get(stage, 0) + 1
            if on_loop:
                self._loop_cpu[stage] = self._loop_cpu.get(stage, 0.0) + cpu_s

    def count(self, name: str, amount: float) -> None:
        """Add ``amount`` to the work counter ``name`` (see :data:`WORK_COUNTS`)."""
        with self._lock:
            self._counts[name] = self._counts.get(name, 0.0) + amount

    @staticmethod
    def inline_start() -> tuple[float, float]:
        """Start timing inline work: (thread CPU, wall) now; hand it to :meth:`inline_stop`."""
        return time.thread_time(), time.perf_counter()

    def inline_stop(self, stage: str, started: tuple[float, float]) -> None:
        cpu0, wall0 = started
        self.record(
            stage,
            time.thread_time() - cpu0,
            time.perf_counter() - wall0,
            on_loop=threading.get_ident() == self._main,
        )

    @contextmanager
    def native(self, stage: str) -> Iterator[None]:
        """Time work that a worker thread waits on native threads for (see the module notes)."""
        cpu0, loop0, wall0 = self.process_cpu(), self.main_thread_cpu(), time.perf_counter()
        try:
            yield
        finally:
            cpu = (self.process_cpu() - cpu0) - (self.main_thread_cpu() - loop0)
            self.record(stage, max(0.0, cpu), time.perf_counter() - wall0)

    # ---------------------------------------------------------------- reading

    def counts(self) -> dict[str, float]:
        """Work counter → total so far."""
        with self._lock:
            return dict(self._counts)

    def totals(self) -> dict[str, tuple[float, float, int, float]]:
        """Stage → (CPU s, wall s, calls, CPU s of it on the event-loop thread)."""
        with self._lock:
            return {s: (self._cpu[s], self._wall[s], self._calls[s], self._loop_cpu[s]) for s in self._cpu}


def timed(profile: StageProfile | None, stage: str) -> AbstractContextManager[None]:
    """``profile.native(stage)``, or nothing at all without a profile."""
    return profile.native(stage) if profile is not None else nullcontext()


__all__ = ["STAGES", "WORK_COUNTS", "StageProfile", "timed"]
