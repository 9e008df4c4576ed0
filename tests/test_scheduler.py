"""The shared decode scheduler: priorities, batching, shedding, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time

import numpy as np
import pytest

from stream_server.decoding import DecodeRequest, DecodeResult
from stream_server.metrics import ServerMetrics
from stream_server.scheduler import DecodeDropped, DecodeScheduler, ModelUnavailable


@dataclasses.dataclass(eq=False)
class Job:
    request: DecodeRequest
    final: bool


class GatedDecoder:
    """Records batches; blocks the first batch until released so a queue can build up."""

    multilingual = False

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gate = threading.Event()
        self.fail = False

    def decode_batch(self, requests):
        self.gate.wait(10)
        self.batches.append([r.prompt for r in requests])
        if self.fail:
            raise RuntimeError("boom")
        return [DecodeResult((), "en", 0.0, 0.0) for _ in requests]

    def encode_text(self, text):
        return []


def job(name: str, final: bool = False, model: str = "m") -> Job:
    return Job(DecodeRequest(np.zeros(1600, np.float32), prompt=name, model=model, final=final), final)


async def test_finals_go_first_and_batches_span_sessions() -> None:
    decoder = GatedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=3)
    try:
        first = scheduler.submit(job("warm"))
        await asyncio.sleep(0.05)  # the worker now holds "warm" at the gate
        futures = [scheduler.submit(job(n, final=n.startswith("F"))) for n in ("i1", "F1", "i2", "F2", "i3")]
        decoder.gate.set()
        await asyncio.gather(first, *futures)
        assert decoder.batches == [["warm"], ["F1", "F2", "i1"], ["i2", "i3"]]
    finally:
        scheduler.stop()


async def test_stale_interim_work_is_shed_but_finals_never_are() -> None:
    decoder = GatedDecoder()
    metrics = ServerMetrics()
    scheduler = DecodeScheduler(lambda name: decoder, interim_max_wait_s=0.05, metrics=metrics)
    try:
        blocker = scheduler.submit(job("warm", final=True))
        await asyncio.sleep(0.02)
        interim, final = scheduler.submit(job("late")), scheduler.submit(job("F", final=True))
        await asyncio.sleep(0.15)
        decoder.gate.set()
        await blocker
        with pytest.raises(DecodeDropped):
            await interim
        await final
        assert metrics.dropped_interim._value.get() == 1
    finally:
        scheduler.stop()


async def test_a_promoted_job_is_not_shed() -> None:
    decoder = GatedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder, interim_max_wait_s=0.05)
    try:
        blocker = scheduler.submit(job("warm", final=True))
        await asyncio.sleep(0.02)
        promoted = job("promoted")
        future = scheduler.submit(promoted)
        scheduler.promote([promoted])  # the session promoted it while it waited
        await asyncio.sleep(0.15)
        decoder.gate.set()
        await asyncio.gather(blocker, future)
    finally:
        scheduler.stop()


async def test_decoder_exceptions_and_load_failures_reach_the_caller() -> None:
    decoder = GatedDecoder()
    decoder.gate.set()
    decoder.fail = True

    def get(name: str):
        if name == "missing":
            raise FileNotFoundError("no such model")
        return decoder

    scheduler = DecodeScheduler(get)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            await scheduler.submit(job("x"))
        with pytest.raises(ModelUnavailable):
            await scheduler.submit(job("y", model="missing"))
        decoder.fail = False
        assert isinstance(await scheduler.submit(job("z")), DecodeResult)  # the worker survived
    finally:
        scheduler.stop()


async def test_cancel_forgets_queued_work() -> None:
    decoder = GatedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder)
    try:
        blocker = scheduler.submit(job("warm"))
        await asyncio.sleep(0.02)
        gone = job("gone")
        future = scheduler.submit(gone)
        scheduler.cancel([gone])
        assert scheduler.queue_depth() == 0
        decoder.gate.set()
        await blocker
        assert future.cancelled()
        assert ["gone"] not in decoder.batches
    finally:
        scheduler.stop()


async def test_the_event_loop_keeps_running_while_a_batch_decodes() -> None:
    class SlowDecoder(GatedDecoder):
        def decode_batch(self, requests):
            time.sleep(0.3)
            return super().decode_batch(requests)

    decoder = SlowDecoder()
    decoder.gate.set()
    scheduler = DecodeScheduler(lambda name: decoder)
    try:
        future = scheduler.submit(job("slow"))
        ticks = 0
        while not future.done():
            await asyncio.sleep(0.01)
            ticks += 1
        assert ticks > 10
    finally:
        scheduler.stop()


async def test_one_bad_request_fails_alone_and_its_batch_mates_get_their_text() -> None:
    """A request that makes the model call raise (an empty window once did) must not take the
    other sessions' requests in the same batch down with it."""

    class PoisonDecoder(GatedDecoder):
        def decode_batch(self, requests):  # type: ignore[no-untyped-def]
            self.gate.wait(10)
            self.batches.append([r.prompt for r in requests])
            if any(r.prompt == "poison" for r in requests):
                raise IndexError("alignment of an empty window")
            return [DecodeResult((), "en", 0.0, 0.0) for _ in requests]

    decoder = PoisonDecoder()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=4)
    try:
        blocker = scheduler.submit(job("warm", final=True))
        await asyncio.sleep(0.02)
        futures = [scheduler.submit(job(name, final=True)) for name in ("a", "poison", "b")]
        decoder.gate.set()
        await blocker
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert isinstance(results[0], DecodeResult) and isinstance(results[2], DecodeResult)
        assert isinstance(results[1], IndexError)
        assert ["a", "poison", "b"] in decoder.batches and ["poison"] in decoder.batches
    finally:
        scheduler.stop()
