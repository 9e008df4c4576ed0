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


class KeyedDecoder(GatedDecoder):
    """Batches only requests whose prompts start with the same letter (a model pass's shape)."""

    def batch_key(self, request):
        return request.prompt[:1]


def keyed_job(name: str, key: object, final: bool = False, commits: bool = False, background: bool = False) -> Job:
    request = DecodeRequest(np.zeros(1600, np.float32), prompt=name, model="m", final=final, key=key, commits=commits,
                            background=background)
    return Job(request, final)


async def test_interim_work_goes_to_new_utterances_first_then_by_staleness() -> None:
    """Fair to people: an utterance with no text yet is decoded before re-decodes of utterances
    that already show text, and among those the one that waited longest since its last result
    goes first, whatever the order the requests arrived in."""
    decoder = GatedDecoder()
    decoder.gate.set()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=1)
    try:
        await scheduler.submit(keyed_job("old-1", "old"))  # served first: the stalest now
        await scheduler.submit(keyed_job("recent-1", "recent"))  # served later
        decoder.gate.clear()
        blocker = scheduler.submit(keyed_job("warm", "warm", final=True))
        await asyncio.sleep(0.05)
        futures = [scheduler.submit(keyed_job(name, key)) for name, key in (("recent-2", "recent"), ("old-2", "old"), ("new-1", "new"))]
        final = scheduler.submit(keyed_job("F", "other", final=True))
        decoder.gate.set()
        await asyncio.gather(blocker, final, *futures)
        assert decoder.batches[3:] == [["F"], ["new-1"], ["old-2"], ["recent-2"]]
    finally:
        scheduler.stop()


async def test_a_pause_decode_goes_with_first_interims_before_re_decodes() -> None:
    """A pause decode (its words are committed, and a turn usually ends on it) waits for finals
    only: behind the re-decodes of every other stream it made a loaded server's turns final late."""
    decoder = GatedDecoder()
    decoder.gate.set()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=1)
    try:
        for name in ("a", "b", "c"):  # each utterance has had a result: re-decodes from now on
            await scheduler.submit(keyed_job(f"{name}-1", name))
        decoder.gate.clear()
        blocker = scheduler.submit(keyed_job("warm", "warm", final=True))
        await asyncio.sleep(0.05)
        futures = [scheduler.submit(keyed_job("a-2", "a")), scheduler.submit(keyed_job("b-2", "b")),
                   scheduler.submit(keyed_job("new-1", "new")), scheduler.submit(keyed_job("c-pause", "c", commits=True)),
                   scheduler.submit(keyed_job("F", "other", final=True))]
        decoder.gate.set()
        await asyncio.gather(blocker, *futures)
        # The final; then the first interim and the pause decode in the order they asked; then
        # the re-decodes by staleness.
        assert decoder.batches[4:] == [["F"], ["new-1"], ["c-pause"], ["a-2"], ["b-2"]]
    finally:
        scheduler.stop()


async def test_a_files_decodes_wait_for_live_speakers_and_take_turns_with_their_re_decodes() -> None:
    """A whole file's finals (HTTP) no one waits on live: after live finals, pause decodes and
    first interims, by queue time among re-decodes; and a late one does not close admission."""
    decoder = GatedDecoder()
    decoder.gate.set()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=1)
    try:
        for name in ("a", "b"):
            await scheduler.submit(keyed_job(f"{name}-1", name))
        decoder.gate.clear()
        blocker = scheduler.submit(keyed_job("warm", "warm", final=True))
        await asyncio.sleep(0.05)
        futures = [scheduler.submit(keyed_job("file", "f", final=True, background=True))]
        await asyncio.sleep(0.3)
        assert not scheduler.overloaded(0.2), "a file's final waiting is not a speaker waiting"
        futures += [scheduler.submit(keyed_job("a-2", "a")), scheduler.submit(keyed_job("c-pause", "c", commits=True)),
                    scheduler.submit(keyed_job("new-1", "new")), scheduler.submit(keyed_job("F", "other", final=True))]
        decoder.gate.set()
        await asyncio.gather(blocker, *futures)
        # "a" was last served before the file's final was queued: its re-decode goes first.
        assert decoder.batches[3:] == [["F"], ["c-pause"], ["new-1"], ["a-2"], ["file"]]
    finally:
        scheduler.stop()


async def test_a_batch_is_one_model_pass_led_by_the_most_urgent_request() -> None:
    decoder = KeyedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=8)
    try:
        blocker = scheduler.submit(keyed_job("warm", "w", final=True))
        await asyncio.sleep(0.05)
        names = ["b1", "a1", "b2", "a2", "b3"]
        futures = [scheduler.submit(keyed_job(n, n)) for n in names]
        final = scheduler.submit(keyed_job("a-final", "f", final=True))
        decoder.gate.set()
        await asyncio.gather(blocker, final, *futures)
        # The final leads; only same-shape work rides along; the rest forms the next pass.
        assert decoder.batches[1:] == [["a-final", "a1", "a2"], ["b1", "b2", "b3"]]
    finally:
        scheduler.stop()


async def test_a_pass_takes_no_more_requests_than_the_decoder_allows_for_its_shape() -> None:
    """A decoder's memory bound per pass (``pass_limit``) caps the batch below ``max_batch_size``;
    what is left forms the next pass, which another worker could run meanwhile."""

    class BoundedDecoder(KeyedDecoder):
        def pass_limit(self, key):
            return 2 if key == "l" else None

    decoder = BoundedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=8)
    try:
        blocker = scheduler.submit(keyed_job("warm", "w", final=True))
        await asyncio.sleep(0.05)
        futures = [scheduler.submit(keyed_job(n, n)) for n in ["l1", "l2", "l3", "s1", "s2", "s3"]]
        decoder.gate.set()
        await asyncio.gather(blocker, *futures)
        assert decoder.batches[1:] == [["l1", "l2"], ["l3"], ["s1", "s2", "s3"]]
    finally:
        scheduler.stop()


async def test_a_worker_survives_a_failure_outside_the_decode_and_health_says_so() -> None:
    class BadKeyDecoder(GatedDecoder):
        def batch_key(self, request):
            if request.prompt == "bad":
                raise ValueError("cannot shape this request")
            return None

    decoder = BadKeyDecoder()
    decoder.gate.set()
    scheduler = DecodeScheduler(lambda name: decoder)
    try:
        assert scheduler.healthy()
        results = await asyncio.gather(scheduler.submit(job("bad")), scheduler.submit(job("good")), return_exceptions=True)
        assert all(isinstance(r, DecodeResult) for r in results)  # the bad key ran alone
        assert scheduler.healthy()
    finally:
        scheduler.stop()
    assert not scheduler.healthy()


def test_turn_end_meter_enters_above_the_limit_leaves_below_three_quarters_and_forgets_when_idle() -> None:
    from stream_server.scheduler import _TurnEndLatency

    meter = _TurnEndLatency()
    assert not meter.over(1.0, now=0.0, oldest_waiting=0.0)
    meter.observe(1.4, now=1.0)
    assert meter.over(1.0, now=1.0, oldest_waiting=0.0)
    meter.observe(0.7, now=2.0)  # average 1.26: still over
    assert meter.over(1.0, now=2.0, oldest_waiting=0.0)
    for t in range(3, 8):
        meter.observe(0.8, now=float(t))
    assert 0.75 < meter.average < 1.0
    assert meter.over(1.0, now=8.0, oldest_waiting=0.0)  # under the limit, not yet under three quarters
    for t in range(8, 17):
        meter.observe(0.5, now=float(t))
    assert not meter.over(1.0, now=16.0, oldest_waiting=0.0)  # under three quarters: admitting again
    assert not meter.over(1.0, now=16.0, oldest_waiting=0.9)  # and entering again only above the limit
    assert meter.over(1.0, now=16.0, oldest_waiting=1.2)  # a turn's end waiting now counts at once
    meter.observe(5.0, now=20.0)
    assert not meter.over(1.0, now=40.0, oldest_waiting=0.0)  # nothing ran for 20 s: idle, not overloaded


async def test_overloaded_while_a_pause_decode_waits_past_the_limit() -> None:
    """A turn usually ends on its pause decode, served after finals: its wait counts too."""
    decoder = GatedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=1)
    try:
        blocker = scheduler.submit(job("warm"))
        await asyncio.sleep(0.05)
        pause = Job(DecodeRequest(np.zeros(1600, np.float32), prompt="P", model="m", commits=True), False)
        interim = scheduler.submit(job("i"))
        waiting = scheduler.submit(pause)
        await asyncio.sleep(0.3)
        assert scheduler.overloaded(0.2)
        decoder.gate.set()
        await asyncio.gather(blocker, interim, waiting)
    finally:
        scheduler.stop()


async def test_overloaded_while_a_turn_waits_past_its_limit_for_its_first_text() -> None:
    """A live turn with no text yet counts from its first ask (a shed interim is asked again and
    keeps its place), on the turn-end scale: the first-text limit maps to the turn-end limit. A
    recording's first interim is no one waiting live; a turn that shows text is not starving."""
    decoder = GatedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder, max_batch_size=1, interim_max_wait_s=5)
    try:
        blocker = scheduler.submit(keyed_job("warm", "w"))  # an interim: turn-end latency stays 0
        await asyncio.sleep(0.05)
        recording = scheduler.submit(keyed_job("file-1", "f", background=True))
        await asyncio.sleep(0.3)
        assert not scheduler.overloaded(0.2, first_text_limit_s=0.2), "a recording is not a speaker waiting"
        asked = scheduler.submit(keyed_job("new-1", "new"))
        await asyncio.sleep(0.3)
        assert not scheduler.overloaded(0.2, first_text_limit_s=0.6)
        asked_again = scheduler.submit(keyed_job("new-2", "new"))  # as after a shed: the same turn
        await asyncio.sleep(0.4)
        assert not scheduler.overloaded(0.2), "not watched without a first-text limit"
        assert scheduler.overloaded(0.2, first_text_limit_s=0.6), "0.7 s since the turn first asked"
        decoder.gate.set()
        await asyncio.gather(blocker, recording, asked, asked_again)
        # The turn shows text now: its next interim is a re-decode, not a first text.
        decoder.gate.clear()
        blocker = scheduler.submit(keyed_job("warm-2", "w2"))
        await asyncio.sleep(0.05)
        redecode = scheduler.submit(keyed_job("new-3", "new"))
        await asyncio.sleep(0.3)
        assert not scheduler.overloaded(0.2, first_text_limit_s=0.1)
        decoder.gate.set()
        await asyncio.gather(blocker, redecode)
    finally:
        scheduler.stop()


async def test_a_slow_turn_end_decode_counts_though_it_never_waited() -> None:
    """Request to result, not wait: a turn-ending decode that took 0.3 s in the model is as late
    for its speaker as one that waited 0.3 s; interim decodes do not count."""
    decoder = GatedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder)
    try:
        interim = scheduler.submit(job("i"))
        await asyncio.sleep(0.3)
        decoder.gate.set()
        await interim
        assert not scheduler.overloaded(0.2)
        decoder.gate.clear()
        final = scheduler.submit(job("F", final=True))
        await asyncio.sleep(0.3)
        decoder.gate.set()
        await final
        assert scheduler.overloaded(0.2)
    finally:
        scheduler.stop()


async def test_overloaded_while_a_final_waits_past_the_limit() -> None:
    decoder = GatedDecoder()
    scheduler = DecodeScheduler(lambda name: decoder)
    try:
        blocker = scheduler.submit(job("warm", final=True))
        await asyncio.sleep(0.05)
        waiting = scheduler.submit(job("F", final=True))
        assert not scheduler.overloaded(0.2)
        await asyncio.sleep(0.3)
        assert scheduler.overloaded(0.2)
        assert not scheduler.overloaded(0)  # 0 turns admission control off
        decoder.gate.set()
        await asyncio.gather(blocker, waiting)
    finally:
        scheduler.stop()
