"""Two replicas behind real nginx, sharing session events through real Redis (``--redis-url``).

One test, in phases (the processes are expensive to start; the whole runs in about a minute):

1. 8 clients stream real speech through nginx (``deploy/nginx.conf``, least_conn) over the native
   ``/v1/stream``; the sessions are spread over both replicas and every transcript is right.
   Meanwhile one session is followed from the *other* replica (its port directly) and through
   nginx: both followers get the same events as the client, through Redis.
2. One replica is SIGTERMed while its clients' utterances are open: each of them still gets every
   final and ``transcript.text.done`` before close 1001; a follower on the survivor gets them too.
3. New sessions then land on the survivor through nginx.

Skips, with the reason, when nginx or redis-server is not installed (``.ci/run`` installs both).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets

from stream_server import protocol as p
from stream_server.bus import RemoteSubscription
from stream_server.hub import Dropped, Ended, Published, SessionHub
from tests.local_services import NGINX, needs_nginx, needs_redis, running_redis, stop, wait_for_port
from tests.support import REPO, ServerProcess, english_references, free_port, load_clip, start_server, wer

pytestmark = [
    needs_redis,
    pytest.mark.timeout(300),
]

redis = pytest.importorskip("redis", reason="the redis package is not installed (pip install -e '.[dev]')")


# ------------------------------------------------------------------------------ processes


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[str]:
    with running_redis(tmp_path) as url:
        yield url


def nginx_config(tmp_path: Path, listen: int, upstreams: list[int]) -> Path:
    """``deploy/nginx.conf`` pointed at local replicas, with every path in ``tmp_path``."""
    text = (REPO / "deploy" / "nginx.conf").read_text()
    servers = "\n".join(f"        server 127.0.0.1:{port} max_fails=2 fail_timeout=10s;" for port in upstreams)
    text, n_servers = re.subn(r"^ *server stream-server:8000 .*# replicas$", servers, text, flags=re.M)
    text, n_listen = re.subn(r"listen 8080;  # listen", f"listen 127.0.0.1:{listen};", text)
    text, n_log = re.subn(r"access_log /var/log/nginx/access.log upstream;", f"access_log {tmp_path}/access.log upstream;", text)
    assert (n_servers, n_listen, n_log) == (1, 1, 1), "deploy/nginx.conf no longer has the lines this test adapts"
    temp = "\n".join(
        f"    {kind}_temp_path {tmp_path}/{kind}_temp;" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    text = text.replace("http {\n", "http {\n" + temp + "\n", 1)
    head = f"daemon off;\npid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log info;\n"
    if os.geteuid() == 0:
        head += "user root;\n"  # the workers must reach the temp paths under pytest's 0700 tmp dirs
    text = head + text.replace("worker_processes auto;", "worker_processes 1;")
    path = tmp_path / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture
def cluster(tmp_path: Path, redis_server: str) -> Iterator[tuple[list[ServerProcess], int, str]]:
    servers: list[ServerProcess | None] = [None, None]
    errors: list[BaseException] = []

    def start(i: int) -> None:
        try:
            servers[i] = start_server(
                tmp_path, "--redis-url", redis_server, "--drain-timeout-s", "30", "--cpu-threads", "1"
            )
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    nginx: subprocess.Popen[bytes] | None = None
    try:
        if errors:
            raise errors[0]
        ready = [s for s in servers if s is not None]
        port = free_port()
        conf = nginx_config(tmp_path, port, [s.port for s in ready])
        nginx = subprocess.Popen(
            [str(NGINX), "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "error.log")],
            stdout=subprocess.DEVNULL, stderr=(tmp_path / "nginx.stderr").open("wb"),
        )
        wait_for_port(port, nginx, "nginx")
        yield ready, port, redis_server
    finally:
        if nginx is not None:
            stop(nginx)
        for s in servers:
            if s is not None:
                s.stop()


# ------------------------------------------------------------------------------ clients


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


class Client:
    """One native ``/v1/stream`` session: every event it got, and its close code."""

    def __init__(self, url: str, clip_id: str) -> None:
        self.url = url
        self.clip_id = clip_id
        self.events: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.created = asyncio.Event()
        self.speaking = asyncio.Event()

    @property
    def session_id(self) -> str:
        return str(self.events[0]["session"]["id"])

    @property
    def done(self) -> dict[str, Any]:
        assert self.events and self.events[-1]["type"] == "transcript.text.done", [e["type"] for e in self.events][-5:]
        return self.events[-1]

    def segments(self) -> list[str]:
        return [e["text"] for e in self.events if e["type"] == "transcript.segment"]

    async def run(self, *, fraction: float = 1.0, go: asyncio.Event | None = None, finish: asyncio.Event | None = None) -> None:
        """Stream the clip (``fraction`` of it) in 0.5 s chunks once ``go`` is set, then
        ``session.close`` once ``finish`` is set (unless the server closed the session first)."""
        audio = load_clip(self.clip_id)
        audio = audio[: int(len(audio) * fraction)]
        async with websockets.connect(self.url, open_timeout=20) as ws:
            reader = asyncio.create_task(self._read(ws))
            await asyncio.wait_for(self.created.wait(), 20)
            if go is not None:
                await asyncio.wait_for(go.wait(), 20)
            for i in range(0, len(audio), 8000):
                await ws.send(pcm16(audio[i : i + 8000]))
                await asyncio.sleep(0.05)
            if finish is not None:
                waiter = asyncio.create_task(finish.wait())
                await asyncio.wait({reader, waiter}, timeout=90, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
            if not reader.done():
                await ws.send(json.dumps({"type": "session.close"}))
            await asyncio.wait_for(reader, 90)
            self.close_code = ws.close_code

    async def _read(self, ws: Any) -> None:
        async for message in ws:
            event = json.loads(message)
            self.events.append(event)
            if event["type"] == "session.created":
                self.created.set()
            elif event["type"] == "input_audio_buffer.speech_started":
                self.speaking.set()


async def follow(url: str, started: asyncio.Event | None = None) -> list[dict[str, Any]]:
    """``GET .../events`` as Server-Sent Events until the stream ends; returns the events."""
    events: list[dict[str, Any]] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0)) as client:
        async with client.stream("GET", url) as response:
            assert response.status_code == 200, await response.aread()
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(json.loads(line[6:]))
                if events[-1]["type"] == "session.created" and started is not None:
                    started.set()
                if events[-1]["type"] in ("transcript.text.done", "session.ended", "subscription.dropped"):
                    break
    return events


def http_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


def owner(redis_url: str, session_id: str, servers: list[ServerProcess]) -> ServerProcess:
    """The replica holding a session, from the ``replica`` (hostname:pid) the bus records."""
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    try:
        deadline = time.monotonic() + 5  # published by the replica's bus thread a moment after
        while not (replica := client.hget(f"stream-server:s:{session_id}:meta", "replica")) and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        client.close()
    assert replica, f"session {session_id} is not in Redis after 5 s"
    pid = int(str(replica).rsplit(":", 1)[1])
    return next(s for s in servers if s.process is not None and s.process.pid == pid)


def sessions_total(server: ServerProcess) -> int:
    return int(server.metric("stream_sessions_total"))


# ------------------------------------------------------------------------------ the test


@needs_nginx
def test_two_replicas_behind_nginx_share_sessions_through_redis_and_drain(cluster: tuple[list[ServerProcess], int, str]) -> None:
    servers, nginx_port, redis_url = cluster
    front_ws = f"ws://127.0.0.1:{nginx_port}/v1/stream"
    front_http = f"http://127.0.0.1:{nginx_port}"
    rows = sorted(english_references(), key=lambda r: r["duration_s"])
    rows = [r for r in rows if 2.0 <= r["duration_s"] <= 6.0][:14]
    assert len(rows) >= 14, "not enough short English clips in the corpus"
    refs = {r["id"]: r["text"] for r in rows}

    # ---- 1. 8 clients through nginx; one session followed from the other replica and via nginx
    async def phase1() -> tuple[list[Client], list[dict[str, Any]], list[dict[str, Any]], ServerProcess, dict[str, Any]]:
        clients = [Client(front_ws, r["id"]) for r in rows[:8]]
        watched = clients[0]
        go = asyncio.Event()
        tasks = [asyncio.create_task(watched.run(go=go))]
        await asyncio.wait_for(watched.created.wait(), 20)
        holder = owner(redis_url, watched.session_id, servers)
        other = next(s for s in servers if s is not holder)
        direct_started, front_started = asyncio.Event(), asyncio.Event()
        direct = asyncio.create_task(follow(f"{other.http_url}/v1/sessions/{watched.session_id}/events", direct_started))
        front = asyncio.create_task(follow(f"{front_http}/v1/sessions/{watched.session_id}/events", front_started))
        await asyncio.wait_for(asyncio.gather(direct_started.wait(), front_started.wait()), 20)
        go.set()  # the followers are attached before any audio: they see every event live
        tasks += [asyncio.create_task(c.run()) for c in clients[1:]]
        await asyncio.gather(*tasks)
        remote_transcript = await asyncio.to_thread(http_json, f"{other.http_url}/v1/sessions/{watched.session_id}/transcript")
        return clients, await direct, await front, other, remote_transcript

    started = time.monotonic()
    before = [sessions_total(s) for s in servers]
    clients, via_other, via_nginx, other, remote_transcript = asyncio.run(phase1())
    spread = [sessions_total(s) - b for s, b in zip(servers, before)]
    phase1_s = time.monotonic() - started
    assert sum(spread) == 8 and min(spread) >= 2, f"least_conn should spread 8 sessions over both replicas: {spread}"
    for c in clients:
        assert c.close_code == 1000
    error = wer([refs[c.clip_id] for c in clients], [c.done["text"] for c in clients])
    assert error < 0.25, f"WER {error:.2%} through nginx"
    watched = clients[0]
    for seen in (via_other, via_nginx):
        assert [e["type"] for e in seen] == [e["type"] for e in watched.events], "a follower sees exactly the client's events"
        assert seen[-1]["text"] == watched.done["text"]
        assert [e["text"] for e in seen if e["type"] == "transcript.segment"] == watched.segments()
    assert " ".join(ch["text"] for ch in remote_transcript["channels"]).strip() == watched.done["text"].strip()
    assert remote_transcript["session_id"] == watched.session_id

    # ---- 2. SIGTERM one replica while its clients' utterances are open
    victim = other
    survivor = next(s for s in servers if s is not victim)

    async def phase2() -> tuple[list[Client], list[Client], list[dict[str, Any]], float]:
        finish = asyncio.Event()  # survivor's clients: session.close once the victim is gone
        clients = [Client(front_ws, r["id"]) for r in rows[8:12]]
        tasks = [asyncio.create_task(c.run(fraction=0.8, finish=finish)) for c in clients]
        await asyncio.wait_for(asyncio.gather(*(c.created.wait() for c in clients)), 20)
        held = {c.session_id: owner(redis_url, c.session_id, servers) for c in clients}
        on_victim = [c for c in clients if held[c.session_id] is victim]
        on_survivor = [c for c in clients if held[c.session_id] is survivor]
        assert on_victim and on_survivor, f"4 sessions should be spread over both replicas: {[h.port for h in held.values()]}"
        started = asyncio.Event()
        follower = asyncio.create_task(follow(f"{survivor.http_url}/v1/sessions/{on_victim[0].session_id}/events", started))
        await asyncio.wait_for(started.wait(), 20)
        await asyncio.wait_for(asyncio.gather(*(c.speaking.wait() for c in on_victim)), 30)
        await asyncio.sleep(0.5)
        assert victim.process is not None
        t0 = time.monotonic()
        victim.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(victim.process.wait, 40)
        drain_s = time.monotonic() - t0
        finish.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        return on_victim, on_survivor, await asyncio.wait_for(follower, 20), drain_s

    on_victim, on_survivor, followed, drain_s = asyncio.run(phase2())
    assert victim.process is not None and victim.process.returncode in (0, -signal.SIGTERM)
    for c in on_victim:
        types = [e["type"] for e in c.events]
        assert c.close_code == 1001, (c.close_code, types[-3:])
        assert types[-1] == "transcript.text.done" and "transcript.segment" in types
        assert c.done["text"].strip(), "the open utterance was finalized"
        for text in c.segments():
            assert text.strip() in c.done["text"], "every final is in done"
    for c in on_survivor:
        assert c.close_code == 1000 and c.done["text"].strip()
    # The follower on the survivor got the drained session's finals through Redis, to done.
    drained = on_victim[0]
    assert followed and followed[-1]["type"] == "transcript.text.done", [e["type"] for e in followed][-3:]
    assert followed[-1]["text"] == drained.done["text"]
    assert [e["text"] for e in followed if e["type"] == "transcript.segment"] == drained.segments()
    log = victim.log_path.read_text()
    assert f"draining {len(on_victim)} session(s)" in log and "drain finished" in log

    # ---- 3. new sessions land on the survivor through nginx
    before_survivor = sessions_total(survivor)

    async def phase3() -> list[Client]:
        clients = [Client(front_ws, r["id"]) for r in rows[12:14]]
        await asyncio.gather(*(c.run() for c in clients))
        return clients

    late = asyncio.run(phase3())
    assert sessions_total(survivor) - before_survivor == 2
    for c in late:
        assert c.close_code == 1000
    assert wer([refs[c.clip_id] for c in late], [c.done["text"] for c in late]) < 0.25
    # nginx saw both replicas in phase 1 and only the survivor after the drain.
    access = (Path(victim.log_path).parent / "access.log").read_text()
    assert f"upstream=127.0.0.1:{victim.port}" in access and f"upstream=127.0.0.1:{survivor.port}" in access
    total_s = time.monotonic() - started
    print(
        f"\nscale-out: phase 1 {phase1_s:.1f} s, sessions per replica {spread}, WER {error:.2%}; "
        f"drain of {len(on_victim)} open session(s) {drain_s:.2f} s; total {total_s:.1f} s"
    )


# ------------------------------------------------------------------ the bus without servers


async def wait_written(hub: SessionHub, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while hub.bus is not None and (hub.bus.pending or hub.bus.written == 0) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)  # the batch taken last is in flight


async def test_a_session_on_one_hub_is_followed_and_read_from_another(redis_server: str) -> None:
    """Two hubs on one Redis (two replicas in one process): backlog, live events, alias, end."""
    holder, other = SessionHub(redis_url=redis_server), SessionHub(redis_url=redis_server)
    try:
        holder.open("sess_a", duration=lambda: 3.0)
        holder.publish("sess_a", p.SessionCreated({"id": "sess_a", "channels": 1}))
        holder.publish("sess_a", p.TranscriptSegment("item_1", 0.0, 1.0, "hello there", None, None, -0.2, 0.01, 0, None))
        holder.alias("sess_a", "CA123")
        await wait_written(holder)
        assert other.subscribe("sess_a") is None, "not held by this replica"
        subscription = await other.watch("CA123")
        assert isinstance(subscription, RemoteSubscription)
        assert [e.type for e in subscription.backlog] == ["session.created", "transcript.segment"]
        record = await other.find("CA123")
        assert record is not None and record.session_id == "sess_a" and record.alias == "CA123" and record.status == "active"
        holder.publish("sess_a", p.TranscriptDelta("item_2", " more", None))
        holder.publish("sess_a", p.TranscriptSegment("item_2", 1.0, 2.0, "more", None, None, -0.2, 0.01, 0, None))
        holder.publish("sess_a", p.TranscriptDone("hello there more", None, p.Usage(2.0)))
        holder.close("sess_a")
        live = [await subscription.next(5.0) for _ in range(3)]
        assert [e.type for e in live if isinstance(e, Published)] == ["transcript.text.delta", "transcript.segment", "transcript.text.done"]
        await wait_written(holder)
        finished = await other.find("sess_a")
        assert finished is not None and finished.status == "completed" and finished.done is not None
        assert [s["text"] for s in finished.segments] == ["hello there", "more"]
        assert await other.watch("sess_a") is None, "a finished session is replayed, not followed"

        # A session that ends without done ends its followers with session.ended.
        holder.open("sess_b")
        holder.publish("sess_b", p.SessionCreated({"id": "sess_b", "channels": 1}))
        await wait_written(holder)
        follower = await other.watch("sess_b")
        assert follower is not None
        holder.close("sess_b")
        ended = await follower.next(5.0)
        assert isinstance(ended, Ended) and ended.record.ended_event()["status"] == "disconnected"
    finally:
        holder.shutdown()
        other.shutdown()


async def test_a_follower_that_misses_events_is_told_so(redis_server: str) -> None:
    holder, other = SessionHub(redis_url=redis_server), SessionHub(redis_url=redis_server)
    try:
        holder.open("sess_c")
        holder.publish("sess_c", p.SessionCreated({"id": "sess_c", "channels": 1}))
        await wait_written(holder)
        follower = await other.watch("sess_c")
        assert follower is not None
        live = holder._live["sess_c"]
        live.sequence += 3  # as if three changes had been dropped on the way to Redis
        holder.publish("sess_c", p.TranscriptDelta("item_1", " x", None))
        await wait_written(holder)
        item = await follower.next(5.0)
        assert isinstance(item, Dropped) and "lost" in item.message
    finally:
        holder.shutdown()
        other.shutdown()


async def test_publishing_never_waits_when_redis_is_down(caplog: pytest.LogCaptureFixture) -> None:
    """Redis unreachable: publishing stays a buffer append, readers fall back, errors are logged."""
    hub = SessionHub(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    try:
        hub.open("sess_d")
        hub.publish("sess_d", p.SessionCreated({"id": "sess_d", "channels": 1}))
        t0 = time.perf_counter()
        for i in range(2000):
            hub.publish("sess_d", p.TranscriptDelta(f"item_{i}", " x", None))
        elapsed = time.perf_counter() - t0
        assert elapsed < 1.0, f"2000 publishes took {elapsed:.2f} s with Redis down"
        assert hub.subscribe("sess_d") is not None, "this replica's own sessions still work"
        assert await hub.find("sess_other") is None
        assert await hub.watch("sess_other") is None
        hub.close("sess_d")
        deadline = time.monotonic() + 5
        writer_warning = "redis bus: writing to redis://127.0.0.1"
        while writer_warning not in caplog.text and time.monotonic() < deadline:  # the writer thread logs on its own time
            await asyncio.sleep(0.05)
        assert writer_warning in caplog.text
    finally:
        t0 = time.perf_counter()
        hub.shutdown(timeout=1.0)
        assert time.perf_counter() - t0 < 3.0
