"""Durable call transcripts in an embedded SQLite database (standard library, WAL mode).

Each session's row is written when it starts, each final segment as it happens and the done event
when it ends, so a crash or restart loses at most what was still in flight, never a finished call.

One connection, owned by one writer thread: the event loop only enqueues (``started``,
``segment``, ``dtmf``, ``aliased``, ``ended`` are the hub's observer calls) and never waits on the disk.
Reads go through the same thread, behind the writes already queued, so a reader always sees every
event published before it asked. Queued writes are committed together, so a busy server pays one
``fsync`` per batch rather than per segment.

A session still marked ``active`` that is not live in this process (the server stopped during the
call) is reported as ``disconnected``; its segments up to the stop are kept. Rows older than the
retention period (by end time, or start time for calls that never ended) are purged at start-up
and then daily.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from stream_server.hub import TranscriptRecord

log = logging.getLogger(__name__)

T = TypeVar("T")
PURGE_INTERVAL_S = 24 * 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY,
    alias TEXT,
    status TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    duration REAL NOT NULL DEFAULT 0,
    session TEXT NOT NULL,
    done TEXT
);
CREATE INDEX IF NOT EXISTS sessions_by_alias ON sessions (alias, created_at);
CREATE INDEX IF NOT EXISTS sessions_by_age ON sessions (coalesce(ended_at, created_at));
CREATE TABLE IF NOT EXISTS segments (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    segment TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dtmf (
    session_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    key TEXT NOT NULL,
    PRIMARY KEY (session_id, seq)
) WITHOUT ROWID;
"""


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _delete_sessions(db: sqlite3.Connection, where: str, params: tuple[object, ...]) -> int:
    """Delete the sessions ``where`` selects (a condition on ``sessions``), with their segments
    and key presses; returns how many sessions went."""
    ids = f"SELECT id FROM sessions WHERE {where}"
    db.execute(f"DELETE FROM segments WHERE session_id IN ({ids})", params)
    db.execute(f"DELETE FROM dtmf WHERE session_id IN ({ids})", params)
    return int(db.execute(f"DELETE FROM sessions WHERE {where}", params).rowcount)


class TranscriptStore:
    """The transcript database at ``path``; ``retention_days`` 0 keeps everything."""

    def __init__(self, path: str | Path, *, retention_days: float = 30.0, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser()
        self.retention_days = retention_days
        self._clock = clock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened here, not in the thread, so a bad path fails the server's start-up loudly.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # one fsync per batch; a committed call survives power loss
        self._db.execute("PRAGMA busy_timeout=5000")
        self._db.executescript(_SCHEMA)
        self._jobs: queue.Queue[Callable[[sqlite3.Connection], object] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="transcript-store", daemon=True)
        self._closed = False
        self._after_commit: list[Callable[[], None]] = []  # futures to answer once the batch is committed
        self.purge()
        self._thread.start()

    # ------------------------------------------------------------ observer calls (event loop)

    def started(self, record: TranscriptRecord) -> None:
        row = (record.session_id, record.alias, record.status, record.created_at, _dumps(record.session))
        self._write(lambda db: db.execute(
            "INSERT OR REPLACE INTO sessions (id, alias, status, created_at, session) VALUES (?, ?, ?, ?, ?)", row
        ))

    def aliased(self, record: TranscriptRecord) -> None:
        row = (record.alias, record.session_id)
        self._write(lambda db: db.execute("UPDATE sessions SET alias = ? WHERE id = ?", row))

    def segment(self, record: TranscriptRecord, index: int) -> None:
        segment = record.segments[index]
        end = float(segment.get("end", 0.0))
        sid = record.session_id

        def write(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO segments (session_id, seq, segment) VALUES (?, ?, ?)", (sid, index, _dumps(segment)))
            db.execute("UPDATE sessions SET duration = max(duration, ?) WHERE id = ?", (end, sid))

        self._write(write)

    def dtmf(self, record: TranscriptRecord, index: int) -> None:
        """A key pressed on the call (``call.dtmf``), kept with its segments."""
        row = (record.session_id, index, _dumps(record.dtmf[index]))
        self._write(lambda db: db.execute("INSERT OR REPLACE INTO dtmf (session_id, seq, key) VALUES (?, ?, ?)", row))

    def ended(self, record: TranscriptRecord) -> None:
        done = _dumps(record.done) if record.done is not None else None
        row = (record.alias, record.status, record.ended_at, record.duration, _dumps(record.session), done, record.session_id)
        self._write(lambda db: db.execute(
            "UPDATE sessions SET alias = ?, status = ?, ended_at = ?, duration = ?, session = ?, done = ? WHERE id = ?", row
        ))

    def discarded(self, record: TranscriptRecord) -> None:
        """A session that was no conversation (a connection probe): its rows go."""
        sid = record.session_id
        self._write(lambda db: _delete_sessions(db, "id = ?", (sid,)))

    # ------------------------------------------------------------ reads

    async def get(self, session_id: str) -> TranscriptRecord | None:
        """The stored session with this id or alias (the latest call with that alias), or None."""
        return await asyncio.wrap_future(self.submit(lambda db: self._load(db, session_id)))

    def get_now(self, session_id: str) -> TranscriptRecord | None:
        """:meth:`get` for threads that may block (tools, tests)."""
        return self.submit(lambda db: self._load(db, session_id)).result()

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything queued so far is committed."""
        self.submit(lambda db: None).result(timeout)

    def submit(self, job: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Run ``job`` on the store's connection, after every write queued before it."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run(db: sqlite3.Connection) -> None:
            # Answered after the batch commits, so a caller who waited sees it on disk too.
            if not future.set_running_or_notify_cancel():
                return
            try:
                result = job(db)
            except Exception as exc:  # noqa: BLE001 - handed to the reader, who decides
                self._after_commit.append(functools.partial(future.set_exception, exc))
            else:
                self._after_commit.append(functools.partial(future.set_result, result))

        if self._closed:
            future.set_exception(RuntimeError("the transcript store is closed"))
        else:
            self._jobs.put(run)
        return future

    @staticmethod
    def _load(db: sqlite3.Connection, session_id: str) -> TranscriptRecord | None:
        row = db.execute(
            "SELECT id, alias, status, created_at, ended_at, duration, session, done FROM sessions "
            "WHERE id = ? OR alias = ? ORDER BY id = ? DESC, created_at DESC LIMIT 1",
            (session_id, session_id, session_id),
        ).fetchone()
        if row is None:
            return None
        sid, alias, status, created_at, ended_at, duration, session, done = row
        segments = [json.loads(text) for (text,) in db.execute("SELECT segment FROM segments WHERE session_id = ? ORDER BY seq", (sid,))]
        keys = [json.loads(text) for (text,) in db.execute("SELECT key FROM dtmf WHERE session_id = ? ORDER BY seq", (sid,))]
        return TranscriptRecord(
            session_id=sid,
            alias=alias,
            # Stored as active but not live here: the server stopped during the call.
            status="disconnected" if status == "active" else status,
            created_at=created_at,
            ended_at=ended_at,
            duration=duration,
            session=json.loads(session),
            segments=segments,
            done=json.loads(done) if done is not None else None,
            dtmf=keys,
        )

    # ------------------------------------------------------------ retention

    def purge(self) -> int:
        """Delete sessions that ended more than ``retention_days`` ago; returns how many.

        Called from the writer thread (daily) and once from ``__init__`` before it starts.
        """
        if self.retention_days <= 0:
            return 0
        cutoff = self._clock() - self.retention_days * 86400
        with contextlib.nullcontext() if self._db.in_transaction else _transaction(self._db):
            count = _delete_sessions(self._db, "coalesce(ended_at, created_at) < ?", (cutoff,))
        if count:
            log.info("transcript store: purged %d sessions older than %g days", count, self.retention_days)
        return int(count)

    # ------------------------------------------------------------ the writer thread

    def _write(self, job: Callable[[sqlite3.Connection], object]) -> None:
        if self._closed:
            log.warning("transcript store closed; a write was dropped")
            return
        self._jobs.put(job)

    def _run(self) -> None:
        """Take every queued job, run them in one transaction, repeat; purge when a day has passed."""
        next_purge = time.monotonic() + PURGE_INTERVAL_S
        while True:
            try:
                batch = [self._jobs.get(timeout=max(1.0, next_purge - time.monotonic()))]
            except queue.Empty:
                batch = []
            while batch and batch[-1] is not None:
                try:
                    batch.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            if batch:
                with _transaction(self._db):
                    for job in batch:
                        if job is not None:
                            self._guarded(job)
                answers, self._after_commit = self._after_commit, []
                for answer in answers:
                    answer()
            if time.monotonic() >= next_purge:
                self._guarded(lambda db: self.purge())
                next_purge = time.monotonic() + PURGE_INTERVAL_S
            if batch and batch[-1] is None:
                return

    def _guarded(self, job: Callable[[sqlite3.Connection], object]) -> None:
        """One job; a failing one is logged and the rest of the batch still commits."""
        try:
            job(self._db)
        except Exception:  # logged with its traceback: one bad write must not stop the store for every call
            log.exception("transcript store: a database operation failed")

    def close(self, timeout: float = 10.0) -> None:
        """Commit what is queued, stop the thread and close the database."""
        if self._closed:
            return
        self._closed = True
        self._jobs.put(None)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._db.close()


class _transaction:
    """BEGIN … COMMIT around a batch (the connection is in autocommit mode otherwise)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


__all__ = ["TranscriptStore"]
