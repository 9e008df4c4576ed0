"""The event loop's lateness: the meter on a real loop, its window and its hysteresis, and the
intake step the engine derives from it for live sessions."""

from __future__ import annotations

import asyncio
import contextlib
import time

from stream_server.engine import MAX_LOAD_STEP_MS, Engine
from stream_server.loop_lag import LoopLag
from stream_server.settings import Settings
from tests.fakes import BurstDecoder, EnergyVad


async def test_a_callback_that_holds_the_loop_shows_as_lag_and_passes_with_the_window() -> None:
    meter = LoopLag(interval_s=0.01, window_s=0.5)
    meter.watch()  # a live session is open
    task = asyncio.create_task(meter.run())
    try:
        await asyncio.sleep(0.1)
        assert meter.seconds() < 0.1
        time.sleep(0.25)  # a callback that keeps the loop for a quarter second
        await asyncio.sleep(0.05)
        assert 0.2 <= meter.seconds() < 0.5
        await asyncio.sleep(0.7)  # the window moves past it
        assert meter.seconds() < 0.1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_meter_samples_only_while_a_session_is_open() -> None:
    """An idle server's loop wakes for nothing: each timer wakeup cost ~0.15 ms of CPU on the
    benchmark VM, and this meter's 20 a second were most of an idle server's CPU. With no session
    open the meter neither samples nor keeps the last session's readings."""
    meter = LoopLag(interval_s=0.01, window_s=0.5)
    task = asyncio.create_task(meter.run())
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.2)  # held, but no one is watching
        await asyncio.sleep(0.05)
        assert meter.seconds() == 0.0
        meter.watch()
        meter.watch()
        await asyncio.sleep(0.02)
        time.sleep(0.2)
        await asyncio.sleep(0.05)
        assert meter.seconds() >= 0.15
        meter.unwatch()  # one session of the two closed: still watching
        await asyncio.sleep(0.02)
        assert meter.seconds() >= 0.15
        meter.unwatch()
        await asyncio.sleep(0.03)
        assert meter.seconds() == 0.0 and meter.sustained() == 0.0
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_behind_from_the_limit_until_under_half_of_it() -> None:
    meter = LoopLag(window_s=1.0)
    meter.observe(0.04, now=10.0)
    assert not meter.behind(0.05)
    meter.observe(0.06, now=10.1)
    assert meter.sustained() == 0.05 and meter.behind(0.05)
    meter.observe(0.03, now=11.5)  # the earlier ones left the window; 0.03 is over half the limit
    assert meter.sustained() == 0.03 and meter.behind(0.05)
    meter.observe(0.02, now=12.6)
    assert not meter.behind(0.05)
    assert not meter.behind(0.0)  # 0: never


def test_a_burst_shows_in_the_worst_lateness_but_not_in_the_sustained_one() -> None:
    """A batch of results reaching many sessions at once holds the loop for a moment: the metric
    shows it, the server does not act on it; a loop late at every sample is behind."""
    meter = LoopLag(window_s=2.0)
    for k, lag in enumerate([0.01, 0.02, 0.12, 0.01, 0.02, 0.09, 0.01]):
        meter.observe(lag, now=k * 0.05)
    assert meter.seconds() == 0.12 and meter.sustained() == 0.02 and not meter.behind(0.05)
    for k in range(40):
        meter.observe(0.3, now=1.0 + k * 0.05)
    assert meter.behind(0.05)


def test_each_limit_keeps_its_own_hysteresis() -> None:
    meter = LoopLag(window_s=1.0)
    meter.observe(0.3, now=1.0)
    assert meter.behind(0.05) and meter.behind(0.25)
    meter.observe(0.1, now=2.5)
    assert meter.behind(0.05) and not meter.behind(0.25)


def test_live_sessions_take_longer_steps_while_the_loop_is_behind() -> None:
    """Under the lag limit, each session's own step; from it, the loaded step, or the lag itself
    (in whole 20 ms frames) when the loop is further behind, up to the cap; 0 turns it off."""
    settings = Settings(loaded_intake_step_ms=100, loaded_loop_lag_ms=50)
    engine = Engine(settings, vad=EnergyVad(), decoder_factory=lambda name: BurstDecoder())
    try:
        assert engine.load_intake_step_ms() == 0
        now = time.monotonic()
        engine.loop_lag.observe(0.08, now)
        assert engine.load_intake_step_ms() == 100
        engine.loop_lag.observe(0.25, now + 3)  # further behind (the window is 2 s): the step follows the lag
        assert engine.load_intake_step_ms() == 260
        engine.loop_lag.observe(3.0, now + 6)  # up to its cap
        assert engine.load_intake_step_ms() == MAX_LOAD_STEP_MS
        assert "stream_event_loop_lag_seconds 3.0" in engine.metrics.render()[0].decode()
    finally:
        engine.close()


def test_a_loaded_step_of_zero_never_steps() -> None:
    engine = Engine(Settings(loaded_intake_step_ms=0), vad=EnergyVad(), decoder_factory=lambda name: BurstDecoder())
    try:
        engine.loop_lag.observe(1.0, time.monotonic())
        assert engine.load_intake_step_ms() == 0
    finally:
        engine.close()
