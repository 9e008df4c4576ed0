"""Redis as the session hub's shared bus, so any replica can serve any session's events.

With ``--redis-url`` the hub (``hub.py``) mirrors every live session here; a replica asked for a
session it does not hold reads it from Redis. The embedded default (no URL) never imports this.

Keys, per core session id ``sid`` (one Redis database; not Redis Cluster — a publish batch is one
``MULTI``/``EXEC`` across a session's keys):

``stream-server:s:{sid}:meta``  hash: ``session_id``, ``alias``, ``status``, ``created_at``,
                                ``ended_at``, ``duration``, ``session`` (the configuration JSON,
                                once ``session.created`` came), ``done`` (``transcript.text.done``),
                                ``replica`` (``hostname:pid`` of the process holding the audio)
``stream-server:s:{sid}:seg``   list: the final segments so far (the late joiner's backlog)
``stream-server:s:{sid}:ev``    stream: every event as published (fields ``n``, a per-session
                                sequence number from 1, and ``e``, its JSON), then an end marker
                                (``end``); capped near :data:`STREAM_MAXLEN` entries
``stream-server:alias:{alias}`` string: the ``sid`` a call id (Twilio ``callSid``, AudioHook
                                ``conversationId``) names now

A live session's keys expire :data:`ACTIVE_TTL_S` after its replica last refreshed them (every
:data:`HEARTBEAT_S`), so a replica that dies leaves nothing behind for long; a finished session's
keys live :data:`ENDED_TTL_S` (after that, only the replica that held it has it, in its SQLite
store).

Publishing never waits on Redis: the hub hands each change to :meth:`RedisBus.put`, which only
appends to a bounded buffer; one thread (``redis-bus``) writes the buffer in batches, each batch
one transaction, so a reader's snapshot (meta + segments + the stream's last id, read in one
``MULTI``) is always consistent with the stream it then tails. When Redis is down the thread logs,
backs off and retries; past :data:`BUFFER_LIMIT` waiting changes new ones are dropped (counted and
logged), and a reader that then finds a gap in the sequence numbers is told it lost events.

Readers run on the event loop with ``redis.asyncio``: :meth:`RedisBus.record` (the transcript) and
:meth:`RedisBus.subscribe` (backlog, then ``XREAD BLOCK`` on the stream).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from stream_server.hub import Dropped, Ended, Published, Subscription, TranscriptRecord

if TYPE_CHECKING:
    import redis
    import redis.asyncio

log = logging.getLogger(__name__)

PREFIX = "stream-server"
#: Changes waiting for Redis before new ones are dropped (about a minute of 64 busy sessions).
BUFFER_LIMIT = 50_000
#: Changes written in one transaction.
BATCH = 500
#: Events kept in a session's stream for live readers (segments are kept apart, all of them).
STREAM_MAXLEN = 5000
#: A live session's keys outlive their last refresh by this long (a replica that died).
ACTIVE_TTL_S = 120
#: How often the publishing thread refreshes its live sessions' keys.
HEARTBEAT_S = 30.0
#: A finished session stays readable from every replica this long.
ENDED_TTL_S = 3600
#: Longest single ``XREAD BLOCK`` (a subscriber's wait is cut into pieces of at most this).
BLOCK_S = 15.0


def meta_key(sid: str) -> str:
    return f"{PREFIX}:s:{sid}:meta"


def segments_key(sid: str) -> str:
    return f"{PREFIX}:s:{sid}:seg"


def events_key(sid: str) -> str:
    return f"{PREFIX}:s:{sid}:ev"


def alias_key(alias: str) -> str:
    return f"{PREFIX}:alias:{alias}"


@dataclass(frozen=True)
class Change:
    """One change of one session, as the hub hands it over (already serialised, on the loop)."""

    kind: str  # open, event, alias, close
    sid: str
    fields: dict[str, str]  # meta fields to set
    n: int = 0  # event/close: the sequence number
    event: str = ""  # event: its JSON; close: the session.ended JSON
    segment: str = ""  # a final segment's JSON, appended to the backlog
    alias: str = ""


def require_redis() -> None:
    try:
        import redis  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise SystemExit("--redis-url needs the redis package: pip install 'stream-server[redis]'") from exc


class LoopClients:
    """One ``redis.asyncio`` client per event loop, made on first use.

    An asyncio client's connections belong to the loop that opened them, and tests (and
    ``TestClient``) run several loops over one process; a client made on another loop would
    fail there. A new loop replaces the old client (which that loop can no longer close).
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.url = url
        self._options = options
        self._clients: dict[int, redis.asyncio.Redis] = {}

    def get(self) -> redis.asyncio.Redis:
        import redis.asyncio

        loop = asyncio.get_running_loop()
        client = self._clients.get(id(loop))
        if client is None:
            client = redis.asyncio.Redis.from_url(self.url, **self._options)
            self._clients = {id(loop): client}
        return client

    async def aclose(self) -> None:
        """Close the running loop's client, if it has one."""
        client = self._clients.pop(id(asyncio.get_running_loop()), None)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()


class RedisBus:
    """The writer thread and the async readers of one Redis database."""

    def __init__(self, url: str) -> None:
        require_redis()
        import redis

        self.url = url
        #: Which process holds a session (``meta``'s ``replica``): for operators and tests.
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self._writer: redis.Redis = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3)
        # No socket timeout: XREAD BLOCK waits up to BLOCK_S by itself.
        self._readers = LoopClients(url, socket_connect_timeout=3, decode_responses=True)
        self._buffer: collections.deque[Change] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._live: dict[str, str] = {}  # sid -> alias ("" for none): the writer's heartbeat list
        self.dropped = 0  # changes dropped because the buffer was full
        self.written = 0  # changes written
        self._overflowing = False
        self._thread = threading.Thread(target=self._run, name="redis-bus", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ publishing side

    def put(self, change: Change) -> None:
        """Queue a change for the writer thread; never waits. Dropped (and counted) when full."""
        with self._cond:
            if len(self._buffer) >= BUFFER_LIMIT:
                self.dropped += 1
                if not self._overflowing:
                    self._overflowing = True
                    log.warning("redis bus: %d changes waiting for %s; dropping new ones until it catches up", BUFFER_LIMIT, _safe(self.url))
                return
            self._buffer.append(change)
            self._cond.notify()

    @property
    def pending(self) -> int:
        return len(self._buffer)

    def close(self, timeout: float = 3.0) -> None:
        """Write what is buffered (for at most ``timeout``), then stop the writer."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("redis bus: %d changes not written at shutdown", len(self._buffer))

    def _run(self) -> None:
        import redis

        delay = 0.2
        failing_since: float | None = None
        next_heartbeat = time.monotonic() + HEARTBEAT_S
        batch: list[Change] = []
        while True:
            with self._cond:
                if not batch:
                    while not self._buffer and not self._stopping and time.monotonic() < next_heartbeat:
                        self._cond.wait(timeout=max(0.05, next_heartbeat - time.monotonic()))
                    if not self._buffer and self._stopping:
                        return
                    while self._buffer and len(batch) < BATCH:
                        batch.append(self._buffer.popleft())
                    if len(self._buffer) < BUFFER_LIMIT // 2:
                        self._overflowing = False
            heartbeat = time.monotonic() >= next_heartbeat
            try:
                self._write(batch, heartbeat)
            except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:  # Redis down: log, back off, retry
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("redis bus: writing to %s failed (%s); retrying, transcription goes on", _safe(self.url), exc)
                if self._stopping:
                    log.warning("redis bus: shutting down with %d changes not written", len(batch) + len(self._buffer))
                    return
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception:  # Redis refused a command (a server we cannot use): skip the batch
                log.exception("redis bus: Redis refused a batch of %d changes; they are dropped", len(batch))
                self.dropped += len(batch)
                batch = []
                continue
            if failing_since is not None:
                log.info("redis bus: %s reachable again after %.1f s", _safe(self.url), time.monotonic() - failing_since)
                failing_since = None
            delay = 0.2
            self.written += len(batch)
            batch = []
            if heartbeat:
                next_heartbeat = time.monotonic() + HEARTBEAT_S

    def _write(self, batch: list[Change], heartbeat: bool) -> None:
        pipe = self._writer.pipeline(transaction=True)
        live = dict(self._live)
        for change in batch:
            meta, seg, ev = meta_key(change.sid), segments_key(change.sid), events_key(change.sid)
            if change.fields:
                pipe.hset(meta, mapping=dict(change.fields))  # type: ignore[arg-type]  # redis-py's Mapping is invariant
            if change.kind == "open":
                live[change.sid] = ""
                pipe.hset(meta, "replica", self.replica)
            elif change.kind == "alias":
                live[change.sid] = change.alias
                pipe.set(alias_key(change.alias), change.sid, ex=ENDED_TTL_S)
            elif change.kind == "event":
                pipe.xadd(ev, {"n": change.n, "e": change.event}, maxlen=STREAM_MAXLEN, approximate=True)
                if change.segment:
                    pipe.rpush(seg, change.segment)
            elif change.kind == "close":
                pipe.xadd(ev, {"n": change.n, "e": change.event, "end": 1}, maxlen=STREAM_MAXLEN, approximate=True)
                live.pop(change.sid, None)
            ttl = ENDED_TTL_S if change.kind == "close" else ACTIVE_TTL_S
            for key in (meta, seg, ev):
                pipe.expire(key, ttl)
        if heartbeat:
            for sid, alias in live.items():
                for key in (meta_key(sid), segments_key(sid), events_key(sid)):
                    pipe.expire(key, ACTIVE_TTL_S)
                if alias:
                    pipe.expire(alias_key(alias), ENDED_TTL_S)
        pipe.execute()
        self._live = live

    # ------------------------------------------------------------------ reading side

    def _reader(self) -> redis.asyncio.Redis:
        return self._readers.get()

    async def _snapshot(self, session_id: str) -> tuple[TranscriptRecord, str, int] | None:
        """A session's record and the id and sequence number of its stream's last entry, read
        in one transaction; None when Redis does not know the id (as core id or alias)."""
        client = self._reader()
        sid = session_id
        if not await client.exists(meta_key(sid)):
            found = await client.get(alias_key(session_id))
            if not found:
                return None
            sid = str(found)
        pipe = client.pipeline(transaction=True)
        pipe.hgetall(meta_key(sid))
        pipe.lrange(segments_key(sid), 0, -1)
        pipe.xrevrange(events_key(sid), "+", "-", count=1)
        meta, segments, last = await pipe.execute()
        if not meta:
            return None
        record = TranscriptRecord(
            session_id=str(meta.get("session_id", sid)),
            alias=meta.get("alias") or None,
            status=meta.get("status", "active"),
            created_at=float(meta.get("created_at", 0.0)),
            ended_at=float(meta["ended_at"]) if meta.get("ended_at") else None,
            duration=float(meta.get("duration", 0.0)),
            session=json.loads(meta["session"]) if meta.get("session") else {},
            segments=[json.loads(s) for s in segments],
            done=json.loads(meta["done"]) if meta.get("done") else None,
        )
        if last:
            entry_id, fields = last[0]
            return record, str(entry_id), int(fields.get("n", 0))
        return record, "0-0", 0

    async def record(self, session_id: str) -> TranscriptRecord | None:
        """The session's transcript as Redis has it (live or finished), or None."""
        try:
            snapshot = await self._snapshot(session_id)
        except Exception as exc:  # noqa: BLE001 - Redis down: the caller falls back to its own store
            log.warning("redis bus: reading session %s failed: %s", session_id, exc)
            return None
        return snapshot[0] if snapshot is not None else None

    async def subscribe(self, session_id: str, limit: int) -> RemoteSubscription | None:
        """Follow a session another replica holds: its backlog, then its stream. None when Redis
        does not know it as live (the caller then replays a finished one from :meth:`record`)."""
        try:
            snapshot = await self._snapshot(session_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("redis bus: subscribing to session %s failed: %s", session_id, exc)
            return None
        if snapshot is None or snapshot[0].status != "active":
            return None
        record, last_id, last_n = snapshot
        return RemoteSubscription(self, record, last_id, last_n, limit)


class RemoteSubscription(Subscription):
    """A :class:`~stream_server.hub.Subscription` fed from a session's Redis stream."""

    def __init__(self, bus: RedisBus, record: TranscriptRecord, last_id: str, last_n: int, limit: int) -> None:
        super().__init__(record.replay() if record.session else [], limit)
        self._bus = bus
        self._record = record
        self._key = events_key(record.session_id)
        self._last_id = last_id
        self._next_n = last_n + 1
        self._ready: collections.deque[Published] = collections.deque()

    async def next(self, timeout: float | None = None) -> Published | Dropped | Ended | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if self.dropped is not None:
                return self.dropped
            if self.ended is not None:
                return self.ended
            wait = BLOCK_S if deadline is None else min(BLOCK_S, deadline - time.monotonic())
            if wait <= 0:
                await self._quiet()
                return None
            try:
                reply = await self._bus._reader().xread({self._key: self._last_id}, count=self.limit, block=max(1, int(wait * 1000)))
            except Exception as exc:  # noqa: BLE001 - Redis went away: end this reader, clearly
                log.warning("redis bus: reading session %s failed: %s", self._record.public_id, exc)
                self.dropped = Dropped("bus_unavailable", f"the session bus is unreachable ({type(exc).__name__}); subscribe again")
                continue
            streams = cast("list[tuple[str, list[tuple[str, dict[str, str]]]]]", reply or [])  # RESP2 replies
            for _key, entries in streams:
                for entry_id, fields in entries:
                    self._last_id = str(entry_id)
                    self._take(fields)
        return self._ready.popleft()

    def _take(self, fields: dict[str, str]) -> None:
        if self.dropped is not None or self.ended is not None:
            return
        n = int(fields.get("n", 0))
        if n != self._next_n:
            self.dropped = Dropped(
                "slow_subscriber", f"{n - self._next_n} events of this session were lost on the session bus; subscribe again"
            )
            return
        self._next_n = n + 1
        data = json.loads(fields["e"])
        if fields.get("end"):
            record = self._record
            record.status = data.get("status", "disconnected")
            record.duration = float(data.get("duration", record.duration))
            self.ended = Ended(record)
            return
        self._ready.append(Published(str(data["type"]), data, fields["e"]))

    async def _quiet(self) -> None:
        """Nothing came within the wait: if the session's keys are gone (its replica died and
        they expired), the session is over for this reader."""
        try:
            gone = not await self._bus._reader().exists(meta_key(self._record.session_id))
        except Exception:  # noqa: BLE001 - the next read reports it
            gone = False
        if gone:
            self._record.status = "disconnected"
            self.ended = Ended(self._record)
        return None

    def cancel(self) -> None:
        """Nothing to undo: the reader holds no state in Redis."""


def _safe(url: str) -> str:
    """The URL without its password, for logs."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = "***@" + rest.split("@", 1)[1]
    return scheme + sep + rest


__all__ = ["Change", "RedisBus", "RemoteSubscription"]
