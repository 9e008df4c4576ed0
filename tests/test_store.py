"""The SQLite transcript store without a server: round trips, crash recovery, retention, WAL, and
writes that never wait on the disk."""

from __future__ import annotations

import sqlite3
import threading
import time
from pathlib import Path

import pytest

from stream_server import protocol as p
from stream_server.hub import SessionHub, TranscriptRecord
from stream_server.store import TranscriptStore

DAY = 86400.0


def seg(n: int, text: str, start: float, end: float, channel: int = 0, speaker: str | None = None) -> p.TranscriptSegment:
    words = [p.WordTiming(text.split()[0], start, start + 0.2, 0.9)] if text else None
    return p.TranscriptSegment(f"item_{n}", start, end, text, [p.TokenLogprob.of(" " + text, -0.1)], words, -0.1, 0.02, channel, speaker)


def run_call(store: TranscriptStore, sid: str = "sess_1", *, alias: str | None = None, finish: bool = True) -> SessionHub:
    """A two-leg call through the hub, with the store as its observer."""
    hub = SessionHub([store])
    hub.open(sid, duration=lambda: 3.0)
    hub.publish(sid, p.SessionCreated({"id": sid, "channels": 2, "channel_labels": ["agent", "customer"]}))
    if alias:
        hub.alias(sid, alias)
    hub.publish(sid, seg(1, "Hello there", 0.1, 1.0, 0, "agent"))
    hub.publish(sid, seg(2, "Hi", 0.8, 1.2, 1, "customer"))
    if finish:
        hub.publish(sid, p.TranscriptDone("Hello there Hi", None, p.Usage(2.5), [p.ChannelText(0, "agent", "Hello there"), p.ChannelText(1, "customer", "Hi")], []))
        hub.close(sid)
    return hub


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "sub" / "transcripts.sqlite3"


def test_a_finished_call_reads_back_whole_by_id_and_alias(db: Path) -> None:
    store = TranscriptStore(db)
    run_call(store, alias="CA42")
    record = store.get_now("sess_1")
    assert record is not None
    assert (record.session_id, record.alias, record.status, record.duration) == ("sess_1", "CA42", "completed", 2.5)
    assert record.ended_at is not None and record.ended_at >= record.created_at
    assert record.session["channel_labels"] == ["agent", "customer"]
    assert record.segments == [p.event_to_dict(seg(1, "Hello there", 0.1, 1.0, 0, "agent")), p.event_to_dict(seg(2, "Hi", 0.8, 1.2, 1, "customer"))]
    assert record.done is not None and record.done["channels"][1]["text"] == "Hi"
    by_alias = store.get_now("CA42")
    assert by_alias is not None and by_alias.session_id == "sess_1"
    assert store.get_now("nobody") is None
    store.close()


async def test_reads_from_the_event_loop_see_every_write_queued_before_them(db: Path) -> None:
    store = TranscriptStore(db)
    run_call(store)
    record = await store.get("sess_1")
    assert record is not None and len(record.segments) == 2 and record.status == "completed"
    store.close()


def test_a_restart_keeps_finished_calls_and_the_segments_of_an_interrupted_one(db: Path) -> None:
    store = TranscriptStore(db)
    run_call(store, "sess_done")
    run_call(store, "sess_cut", finish=False)  # the server stops during this call
    store.close()
    reopened = TranscriptStore(db)
    done = reopened.get_now("sess_done")
    cut = reopened.get_now("sess_cut")
    assert done is not None and done.status == "completed" and len(done.segments) == 2
    assert cut is not None and cut.status == "disconnected" and cut.ended_at is None
    assert [s["text"] for s in cut.segments] == ["Hello there", "Hi"]
    assert cut.duration == 1.2, "an interrupted call's duration is its last segment's end"
    reopened.close()


def test_a_discarded_session_leaves_no_row_and_no_end(db: Path) -> None:
    # An AudioHook connection probe: started (the store wrote its row), then found to be no call.
    class Ends:
        def __init__(self) -> None:
            self.ended: list[str] = []

        def started(self, record: TranscriptRecord) -> None: ...
        def aliased(self, record: TranscriptRecord) -> None: ...
        def segment(self, record: TranscriptRecord, index: int) -> None: ...

        def ended(self, record: TranscriptRecord) -> None:
            self.ended.append(record.session_id)

    store, ends = TranscriptStore(db), Ends()
    run_call(store, "sess_call")
    hub = SessionHub([store, ends])
    hub.open("sess_probe")
    hub.publish("sess_probe", p.SessionCreated({"id": "sess_probe", "channels": 2}))
    hub.publish("sess_probe", seg(1, "Hello", 0.1, 0.5))
    assert store.get_now("sess_probe") is not None  # kept while it was a session like any other
    hub.discard("sess_probe")
    hub.publish("sess_probe", seg(2, "late", 0.6, 0.9))  # later events of it are unknown ids
    hub.close("sess_probe")
    assert store.get_now("sess_probe") is None and ends.ended == []
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM segments WHERE session_id = 'sess_probe'").fetchone() == (0,)
    kept = store.get_now("sess_call")
    assert kept is not None and len(kept.segments) == 2  # the other call is untouched
    store.close()


def test_the_latest_call_with_an_alias_wins(db: Path) -> None:
    store = TranscriptStore(db)
    for sid in ("sess_a", "sess_b"):
        run_call(store, sid, alias="conv-1")
        time.sleep(0.01)  # created_at orders them
    record = store.get_now("conv-1")
    assert record is not None and record.session_id == "sess_b"
    store.close()


def test_retention_purges_old_calls_on_start(db: Path) -> None:
    store = TranscriptStore(db, retention_days=30)
    run_call(store, "sess_old")
    run_call(store, "sess_new")
    store.flush()
    store.submit(lambda conn: conn.execute("UPDATE sessions SET ended_at = ? WHERE id = 'sess_old'", (time.time() - 31 * DAY,))).result()
    store.close()
    kept_forever = TranscriptStore(db, retention_days=0)
    assert kept_forever.get_now("sess_old") is not None
    kept_forever.close()
    reopened = TranscriptStore(db, retention_days=30)
    assert reopened.get_now("sess_old") is None
    assert reopened.get_now("sess_new") is not None
    leftover = reopened.submit(lambda conn: conn.execute("SELECT count(*) FROM segments WHERE session_id = 'sess_old'").fetchone()[0])
    assert leftover.result() == 0, "the purged call's segments went with it"
    reopened.close()


def test_retention_is_checked_against_the_clock_it_is_given(db: Path) -> None:
    clock = [time.time()]
    store = TranscriptStore(db, retention_days=1, clock=lambda: clock[0])
    run_call(store)
    store.flush()
    assert store.get_now("sess_1") is not None
    clock[0] += 2 * DAY
    assert store.submit(lambda conn: store.purge()).result() == 1
    assert store.get_now("sess_1") is None
    store.close()


def test_the_database_is_in_wal_mode_and_readable_while_open(db: Path) -> None:
    store = TranscriptStore(db)
    run_call(store)
    store.flush()
    other = sqlite3.connect(db)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert Path(str(db) + "-wal").exists()
    assert other.execute("SELECT status FROM sessions WHERE id = 'sess_1'").fetchone()[0] == "completed"
    other.close()
    store.close()


def test_writes_never_wait_for_the_disk(db: Path) -> None:
    store = TranscriptStore(db)
    gate = threading.Event()
    store.submit(lambda conn: gate.wait(10))  # the writer thread is stuck (a slow disk)
    hub = SessionHub([store])
    hub.open("sess_1")
    started = time.perf_counter()
    hub.publish("sess_1", p.SessionCreated({"id": "sess_1"}))
    for n in range(2000):
        hub.publish("sess_1", seg(n, f"word{n}", n, n + 0.5))
    hub.close("sess_1")
    assert time.perf_counter() - started < 2.0
    gate.set()
    store.flush(10)
    record = store.get_now("sess_1")
    assert record is not None and len(record.segments) == 2000 and record.status == "disconnected"
    store.close()


def test_a_failing_write_is_logged_and_the_rest_still_commit(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = TranscriptStore(db)
    store._write(lambda conn: conn.execute("INSERT INTO no_such_table VALUES (1)"))
    run_call(store)
    assert store.get_now("sess_1") is not None
    assert "database operation failed" in caplog.text
    store.close()
    with pytest.raises(RuntimeError):
        store.get_now("sess_1")


def test_records_replay_as_a_subscriber_would_have_seen_them(db: Path) -> None:
    store = TranscriptStore(db)
    run_call(store, "sess_done")
    run_call(store, "sess_cut", finish=False)
    done, cut = store.get_now("sess_done"), store.get_now("sess_cut")
    assert isinstance(done, TranscriptRecord) and isinstance(cut, TranscriptRecord)
    assert [e.type for e in done.replay()] == ["session.created", "transcript.segment", "transcript.segment", "transcript.text.done"]
    assert [e.type for e in cut.replay()][-1] == "session.ended"
    assert cut.replay()[-1].data["status"] == "disconnected"
    store.close()
