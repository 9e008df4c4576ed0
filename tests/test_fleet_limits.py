"""Per-key limits over several replicas, through a real redis-server (``fleet_limits.py``).

The unit tests drive :class:`FleetLimits` instances as two replicas would (one process, one
Redis); the last test starts two real server processes sharing one Redis and connects to each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from stream_server import keys
from stream_server.bench import calls
from stream_server.fleet_limits import FleetLimits, sessions_key
from stream_server.keys import KeyLimits, KeyRing, Principal
from tests.local_services import needs_redis, running_redis
from tests.support import ServerProcess, free_port, load_clip, start_server

pytestmark = [needs_redis, pytest.mark.timeout(180)]

redis = pytest.importorskip("redis", reason="the redis package is not installed (pip install -e '.[dev]')")


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    with running_redis(tmp_path) as url:
        yield url


def principal(max_sessions: int = 0, audio_s_per_min: float = 0) -> Principal:
    return Principal("ab" * 32, "acme", KeyLimits(max_sessions, audio_s_per_min))


async def test_two_replicas_share_a_keys_session_slots(redis_url: str) -> None:
    a, b = FleetLimits(redis_url), FleetLimits(redis_url)
    acme = principal(max_sessions=2)
    try:
        first = await a.take_session(acme)
        second = await b.take_session(acme)
        assert isinstance(first, str) and isinstance(second, str) and first != second
        assert await a.take_session(acme) is False and await b.take_session(acme) is False
        a.give_back_session(acme, first)
        await asyncio.sleep(0.1)  # the release runs in the background
        assert isinstance(await b.take_session(acme), str), "a slot given back on one replica is free on the other"
        other = Principal("cd" * 32, "other", KeyLimits(2, 0))
        assert isinstance(await a.take_session(other), str), "another key has slots of its own"
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_simultaneous_admissions_never_pass_the_limit(redis_url: str) -> None:
    """12 sessions of one key arrive at the same moment on two replicas: exactly 3 get in."""
    a, b = FleetLimits(redis_url), FleetLimits(redis_url)
    acme = principal(max_sessions=3)
    try:
        taken = await asyncio.gather(*(replica.take_session(acme) for replica in (a, b) * 6))
        assert sum(isinstance(t, str) for t in taken) == 3 and taken.count(False) == 9, taken
        client = redis.Redis.from_url(redis_url)
        assert client.zcard(sessions_key(acme.id)) == 3
        client.close()
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_a_dead_replicas_leases_expire_and_a_live_ones_are_renewed(redis_url: str) -> None:
    lease_s = 0.6
    live, dead, other = (FleetLimits(redis_url, lease_s=lease_s) for _ in range(3))
    acme = principal(max_sessions=2)
    try:
        assert isinstance(await live.take_session(acme), str)
        assert isinstance(await dead.take_session(acme), str)
        for renewal in dead._renewals.values():  # the replica dies: no renewal, no release
            renewal.cancel()
        assert await other.take_session(acme) is False
        await asyncio.sleep(3 * lease_s)
        # The dead replica's lease expired; the live one's, renewed every lease_s / 3, did not.
        assert isinstance(await other.take_session(acme), str)
        assert await other.take_session(acme) is False
    finally:
        await asyncio.gather(live.close(), dead.close(), other.close())


async def test_audio_charged_on_one_replica_counts_on_the_other(redis_url: str) -> None:
    """6 audio seconds a minute for the key: 5 s spent through replica A leave ~1 s on B,
    which B's own meter (untouched) would not know."""
    acme = principal(audio_s_per_min=6)
    a, b = keys.Usage(fleet=FleetLimits(redis_url)), keys.Usage(fleet=FleetLimits(redis_url))
    try:
        assert a.audio_left(acme) == pytest.approx(6.0)
        a.charge_audio(acme, 5.0)
        assert a.audio_left(acme) <= 1.0 + 0.01
        await wait_until(lambda: a.fleet is not None and a.fleet._audio[acme.id].unflushed == 0)
        b.audio_left(acme)  # the first ask starts B's first read of the bucket
        await wait_until(lambda: b.audio_left(acme) < 1.1)
        assert 0.9 <= b.audio_left(acme) <= 1.1
        b.charge_audio(acme, 2.0)
        assert b.audio_left(acme) < 0, "the session that crossed the allowance is told at once"
        await wait_until(lambda: a.audio_left(acme) < 0)  # and A learns it at its next read
    finally:
        await asyncio.gather(*(u.fleet.close() for u in (a, b) if u.fleet is not None))


async def test_without_redis_each_replica_enforces_its_own_limits(caplog: pytest.LogCaptureFixture) -> None:
    """A Redis that does not answer must not stop transcription: admission falls back to the
    replica's own count within the timeout, audio to its own meter, and the outage is logged once."""
    fleet = FleetLimits(f"redis://127.0.0.1:{free_port()}/0")
    ring = KeyRing(["sk-a"], defaults=KeyLimits(max_sessions=1, audio_s_per_min=6), fleet=fleet)
    acme = ring.identify("sk-a")
    assert acme is not None
    try:
        with caplog.at_level(logging.WARNING, logger="stream_server.fleet_limits"):
            started = time.monotonic()
            access = ring.access(acme)
            assert isinstance(access, keys.Access)
            assert await access.hold_fleet_slot() is None, "admitted on the replica's own count"
            assert time.monotonic() - started < 2.0
            assert isinstance(ring.access(acme), keys.Refusal), "and that count still holds"
            assert ring.usage.audio_left(acme) == pytest.approx(6.0)
            access.charge(5.0)
            await asyncio.sleep(0.6)
            assert ring.usage.audio_left(acme) == pytest.approx(1.0, abs=0.1)
            access.release()
        warnings = [r for r in caplog.records if "each replica enforces its own limits" in r.getMessage()]
        assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    finally:
        await fleet.close()


async def wait_until(condition: object, timeout: float = 3.0) -> None:
    assert callable(condition)
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)


# ------------------------------------------------------------------------------ two real replicas


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, ServerProcess]]:
    folder = tmp_path_factory.mktemp("fleet")
    (folder / "keys").write_text("sk-one max_sessions=1\nsk-audio max_sessions=4 audio_s_per_min=6\n")
    with running_redis(folder) as url:
        args = ("--api-keys-file", str(folder / "keys"), "--redis-url", url, "--cpu-threads", "1")
        servers = [start_server(folder, *args) for _ in range(2)]
        try:
            yield servers[0], servers[1]
        finally:
            for server in servers:
                server.stop()


def test_a_keys_session_limit_holds_across_replicas(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    a, b = replicas
    bearer = {"additional_headers": {"Authorization": "Bearer sk-one"}}

    async def go() -> None:
        held = await websockets.connect(a.ws_url, **bearer)  # type: ignore[arg-type]
        assert json.loads(await held.recv())["type"] == "session.created"
        with pytest.raises(InvalidStatus) as refused:
            await websockets.connect(b.ws_url, **bearer)  # type: ignore[arg-type]
        response = refused.value.response
        assert response.status_code == 429 and response.headers.get("retry-after") == str(keys.RETRY_AFTER_S)
        assert "limit of 1 concurrent" in json.loads(response.body or b"{}")["error"]["message"]
        # Twilio's key arrives after the upgrade: the fleet's count applies there too (close 1013).
        twilio = f"ws://127.0.0.1:{b.port}/v1/twilio"
        assert (await calls.replay(twilio, silent_call(), parameters={"api_key": "sk-one"})).close_code == 1013
        await held.close()
        deadline = time.monotonic() + 5
        while True:  # the slot goes back once A has counted the session out
            try:
                again = await websockets.connect(b.ws_url, **bearer)  # type: ignore[arg-type]
                break
            except InvalidStatus as exc:
                assert exc.response.status_code == 429 and time.monotonic() < deadline
                await asyncio.sleep(0.1)
        assert json.loads(await again.recv())["type"] == "session.created"
        await again.close()

    asyncio.run(go())


def test_a_keys_audio_allowance_is_spent_across_replicas(replicas: tuple[ServerProcess, ServerProcess]) -> None:
    """6 s a minute: 5 s of speech through A, then B stops the same key's next clip after ~1 s."""
    clip = load_clip("ljspeech_LJ001-0001")

    async def stream(server: ServerProcess, seconds: float) -> tuple[list[dict], int | None]:
        samples = clip[: int(seconds * 16000)]
        async with websockets.connect(server.ws_url, additional_headers={"Authorization": "Bearer sk-audio"}) as ws:
            events: list[dict] = []

            async def send() -> None:
                with contextlib.suppress(websockets.ConnectionClosed):
                    for i in range(0, len(samples), 1600):
                        await ws.send((np.clip(samples[i : i + 1600], -1, 1) * 32767).astype("<i2").tobytes())
                        await asyncio.sleep(0.02)
                    await ws.send(json.dumps({"type": "session.close"}))

            sender = asyncio.create_task(send())
            with contextlib.suppress(websockets.ConnectionClosedError):
                async for message in ws:
                    events.append(json.loads(message))
            sender.cancel()
            return events, ws.close_code

    async def go() -> None:
        events, code = await stream(a, 5.0)
        assert code == 1000 and events[-1]["type"] == "transcript.text.done", [e["type"] for e in events]
        await asyncio.sleep(0.6)  # A's last charges reach Redis (flushed every 0.25 s)
        events, code = await stream(b, 6.0)
        kinds = [e["type"] for e in events]
        assert code == 1008 and events[-1]["type"] == "error" and events[-1]["error"]["code"] == "rate_limited", kinds
        usage_s = float(next(e for e in events if e["type"] == "transcript.text.done")["usage"]["seconds"])
        # ~1 s left after A's 5 s, plus the refill while streaming and the message that crossed it.
        assert usage_s <= 2.5, usage_s

    a, b = replicas
    asyncio.run(go())


def silent_call() -> calls.Call:
    leg = b"\xff" * (calls.FRAME * 25)
    return calls.Call([], {"inbound": leg, "outbound": leg})
