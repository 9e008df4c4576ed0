"""Per-key limits over every replica, through Redis (``--redis-url``).

Behind nginx one key's sessions land on several replicas; each replica's own :class:`keys.Usage`
sees only its share, so a key allowed 4 sessions could hold 4 on each. With Redis configured the
ring also asks :class:`FleetLimits`, which keeps the key's fleet-wide use in Redis:

``stream-server:limits:{principal}:sessions``  sorted set: one member per open session (a lease,
                                               ``replica:uuid``), scored by when it expires
``stream-server:limits:{principal}:audio``     hash: the key's audio token bucket (``level``
                                               seconds left at ``at``, Redis' clock)

**Session slots** are leases, taken atomically by a Lua script at admission (expired leases are
swept first, then the lease is added only below the limit): two replicas admitting the same key
at the same instant cannot both take its last slot. A replica renews its leases every
``lease_s / 3`` while their sessions run and removes them when the sessions end; the leases of a
replica that dies expire after ``lease_s``, which gives its slots back without anyone's help. The
clock is Redis' own (``TIME``), so replicas' clocks need not agree.

**Audio seconds per minute** is one token bucket per key in Redis. The event loop never waits for
it: each replica charges audio locally, flushes what it charged at most every
:data:`SYNC_S` (one script: refill, charge, read back the level) and between flushes uses the
level it last read, refilled at the key's rate, minus what it charged since. The fleet can
overdraw a key by what its replicas take in one sync interval; the next flush pays that back
first.

When Redis cannot be reached the server keeps serving with each replica's own limits (logged at
most every :data:`WARN_EVERY_S`): a shared-state outage must not take transcription down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import redis.asyncio

    from stream_server.keys import Principal

log = logging.getLogger(__name__)

PREFIX = "stream-server:limits"
#: A replica's session lease outlives its last renewal by this long (a replica that died).
LEASE_S = 15.0
#: Longest gap between two flushes of a key's locally charged audio.
SYNC_S = 0.25
#: How long admission waits for Redis before deciding with this replica's own count.
TIMEOUT_S = 0.5
#: Redis errors are logged at most this often.
WARN_EVERY_S = 30.0

# Expired leases out, then a new lease only below the limit (0 = unlimited: counted, never refused).
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local limit = tonumber(ARGV[1])
if limit > 0 and redis.call('ZCARD', KEYS[1]) >= limit then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[3]))
return 1
"""

# A live session's lease moves its expiry on (and comes back if Redis lost it: it is still open).
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[2]))
return 1
"""

# The key's bucket: refill since its last use (at most a minute's allowance), charge, read back.
_AUDIO = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local rate = tonumber(ARGV[1])
local level = tonumber(redis.call('HGET', KEYS[1], 'level') or ARGV[1])
local at = tonumber(redis.call('HGET', KEYS[1], 'at') or now)
level = math.min(rate, level + math.max(0, now - at) * rate / 60) - tonumber(ARGV[2])
redis.call('HSET', KEYS[1], 'level', tostring(level), 'at', tostring(now))
redis.call('EXPIRE', KEYS[1], 120)
return tostring(level)
"""


def sessions_key(principal_id: str) -> str:
    return f"{PREFIX}:{principal_id}:sessions"


def audio_key(principal_id: str) -> str:
    return f"{PREFIX}:{principal_id}:audio"


@dataclass
class _AudioView:
    """What this replica knows of one key's fleet-wide audio bucket."""

    rate: float
    level: float | None = None  # seconds left when last read from Redis (None: not read yet)
    read_at: float = 0.0  # monotonic time of that read
    unflushed: float = 0.0  # charged here since, not yet in Redis
    flushing: bool = False
    scheduled: bool = False  # a flush is set for when the last one is SYNC_S old
    flushed_at: float = -1e9

    def left(self, now: float) -> float | None:
        if self.level is None:
            return None
        return min(self.rate, self.level + (now - self.read_at) * self.rate / 60.0) - self.unflushed


class FleetLimits:
    """The Redis side of the per-key limits (see the module docstring); called from the event loop."""

    def __init__(self, url: str, *, lease_s: float = LEASE_S, clock: Callable[[], float] = time.monotonic) -> None:
        from stream_server.bus import LoopClients, require_redis

        require_redis()
        self.url = url
        self.lease_s = lease_s
        self._clock = clock
        self._replica = f"{socket.gethostname()}:{os.getpid()}"
        self._clients = LoopClients(url, socket_connect_timeout=TIMEOUT_S, socket_timeout=2.0)
        self._renewals: dict[str, asyncio.Task[None]] = {}  # lease -> its renewal task
        self._audio: dict[str, _AudioView] = {}
        self._tasks: set[asyncio.Task[Any]] = set()  # flushes and releases in flight
        self._warned_at = -1e9

    def _client(self) -> redis.asyncio.Redis:
        return self._clients.get()

    def _warn(self, what: str, exc: BaseException) -> None:
        now = self._clock()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("per-key limits: %s through Redis failed (%s: %s); each replica enforces its own limits until it is back",
                        what, type(exc).__name__, exc)

    def _spawn(self, coro: Any) -> None:
        try:
            task = asyncio.get_running_loop().create_task(coro)
        except RuntimeError:  # no running loop (shutdown): the lease expires by itself
            coro.close()
            return
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---------------------------------------------------------------- session slots

    async def take_session(self, principal: Principal) -> str | bool | None:
        """A lease on one of the key's fleet-wide slots: its id; False when the key is at its
        limit over all replicas; None when Redis did not answer (the replica's own count decides)."""
        lease = f"{self._replica}:{uuid.uuid4().hex}"
        key = sessions_key(principal.id)
        try:
            taken = await asyncio.wait_for(
                self._client().eval(_TAKE, 1, key, principal.limits.max_sessions, lease, int(self.lease_s * 1000)),
                TIMEOUT_S,
            )
        except Exception as exc:  # noqa: BLE001 - Redis down or slow: fail open to the local limit
            self._warn("taking a session slot", exc)
            return None
        if not int(taken):
            return False
        self._renewals[lease] = asyncio.get_running_loop().create_task(self._renew(key, lease))
        return lease

    async def _renew(self, key: str, lease: str) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                await self._client().eval(_RENEW, 1, key, lease, int(self.lease_s * 1000))
            except Exception as exc:  # noqa: BLE001 - retried at the next interval
                self._warn("renewing a session lease", exc)

    def give_back_session(self, principal: Principal, lease: str) -> None:
        """The session ended: stop renewing its lease and remove it (in the background)."""
        renewal = self._renewals.pop(lease, None)
        if renewal is not None:
            renewal.cancel()
        self._spawn(self._release(sessions_key(principal.id), lease))

    async def _release(self, key: str, lease: str) -> None:
        try:
            await self._client().zrem(key, lease)
        except Exception as exc:  # noqa: BLE001 - the lease expires by itself
            self._warn("giving a session slot back", exc)

    # ---------------------------------------------------------------- audio allowance

    def audio_left(self, principal: Principal) -> float | None:
        """The key's fleet-wide audio seconds left as this replica knows them now (None: not
        known yet); starts a flush when the last one is older than :data:`SYNC_S`."""
        view = self._view(principal)
        self._maybe_flush(principal.id, view)
        return view.left(self._clock())

    def charge_audio(self, principal: Principal, seconds: float) -> None:
        view = self._view(principal)
        view.unflushed += seconds
        self._maybe_flush(principal.id, view)

    def forget(self, principal: Principal) -> None:
        """The key has no session here any more: flush what is left and drop its view."""
        view = self._audio.pop(principal.id, None)
        if view is not None and view.unflushed > 0:
            self._spawn(self._flush(principal.id, view))

    def _view(self, principal: Principal) -> _AudioView:
        rate = float(principal.limits.audio_s_per_min)
        view = self._audio.get(principal.id)
        if view is None or view.rate != rate:  # first use, or the keys file changed the limit
            view = self._audio[principal.id] = _AudioView(rate)
        return view

    def _maybe_flush(self, principal_id: str, view: _AudioView) -> None:
        """Flush now when the last flush is :data:`SYNC_S` old; else, with charges waiting, once
        it is (so a session's last charges reach Redis without another message to carry them)."""
        if view.flushing or view.scheduled or self._audio.get(principal_id) is not view:  # busy, or forgotten
            return
        wait = view.flushed_at + SYNC_S - self._clock()
        if wait <= 0:
            view.flushing = True
            view.flushed_at = self._clock()
            self._spawn(self._flush(principal_id, view))
        elif view.unflushed > 0:
            with contextlib.suppress(RuntimeError):  # no running loop: the next charge flushes
                asyncio.get_running_loop().call_later(wait, self._scheduled_flush, principal_id, view)
                view.scheduled = True

    def _scheduled_flush(self, principal_id: str, view: _AudioView) -> None:
        view.scheduled = False
        self._maybe_flush(principal_id, view)

    async def _flush(self, principal_id: str, view: _AudioView) -> None:
        charge = view.unflushed
        try:
            level = await self._client().eval(_AUDIO, 1, audio_key(principal_id), view.rate, charge)
        except Exception as exc:  # noqa: BLE001 - kept unflushed: the next flush sends it
            self._warn("charging audio", exc)
        else:
            view.unflushed -= charge
            view.level = float(level)
            view.read_at = self._clock()
        finally:
            view.flushing = False
        if view.unflushed > 0:  # charged meanwhile, or this flush failed: once more, in SYNC_S
            self._maybe_flush(principal_id, view)

    # ---------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Stop renewing (a lease still held then expires by itself), let flushes and releases
        finish, and close the clients. Sessions have drained by now, so their leases are gone."""
        for task in list(self._renewals.values()):
            task.cancel()
        self._renewals.clear()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        await self._clients.aclose()
