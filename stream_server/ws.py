"""The WebSocket shell: one endpoint function for every dialect.

A connection is a dialect (wire protocol ↔ core commands and events), a :class:`SessionRunner`
(session ↔ scheduler) and two loops: the reader feeds client frames through the dialect into the
runner; one sender task writes the dialect's messages in the order they were produced. Limits that
belong to the transport (message size, idle time, session count) live here, API keys and per-key
limits in ``keys.py`` (asked here), and their errors are rendered by the dialect in the shape its
clients expect.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import importlib
import logging
import time
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from stream_server import keys, tokens
from stream_server import protocol as p
from stream_server.dialects.base import (
    Action,
    Close,
    Dialect,
    Handshake,
    HandshakeRejected,
    Send,
)
from stream_server.engine import Engine
from stream_server.hub import Control, ControlRefused
from stream_server.runner import SessionRunner
from stream_server.session import CloseConnection

log = logging.getLogger(__name__)

#: WebSocket path → dialect module in ``stream_server.dialects`` (each exposes ``create``).
DIALECTS: dict[str, str] = {
    "/v1/stream": "native",
    "/v1/realtime": "openai_realtime",
    "/v1/listen": "deepgram",
    "/v2/listen": "deepgram_flux",
    "/v1/twilio": "twilio",
    "/v1/audiohook": "audiohook",
}

# How long a flushed session may take to send its last finals before the socket is closed anyway.
FLUSH_TIMEOUT_S = 120.0
# On a drain the reader goes on for this long before the session is flushed: audio the client
# sent before SIGTERM may still sit unread in the socket (a busy server's reader runs behind), and
# closing at once lost 1.4-1.9 s of every session's speech with 8 sessions on a loaded machine.
DRAIN_READ_S = 2.0
# The longest a backlogged session's next message stays unread (flow control, only for a client
# ahead of real time). One final back clears a backlog, so a client sending a file at full speed
# waits a fraction of this; the bound keeps its controls (close, a commit) readable on an
# overloaded server.
CATCH_UP_WAIT_S = 2.0
# Audio messages larger than this are fed to the core in slices of it, with the flow control
# between them (1 s of pcm16 at 16 kHz).
AUDIO_SLICE_BYTES = 32 * 1024

DialectFactory = Callable[[Handshake], Dialect]


def websocket_routes() -> list[WebSocketRoute]:
    routes = []
    for path, module_name in DIALECTS.items():
        module = importlib.import_module(f"stream_server.dialects.{module_name}")
        routes.append(WebSocketRoute(path, functools.partial(dialect_endpoint, module.create)))
    return routes


def handshake_of(ws: WebSocket, engine: Engine) -> Handshake:
    return Handshake(
        path=ws.url.path,
        query=dict(ws.query_params),
        headers={k.lower(): v for k, v in ws.headers.items()},
        subprotocols=tuple(ws.scope.get("subprotocols") or ()),
        default_model=engine.settings.model,
        model_exists=engine.registry.exists,
        model_speaks=engine.registry.speaks,
        settings=engine.settings,
        query_lists={name: tuple(ws.query_params.getlist(name)) for name in ws.query_params},
    )


async def dialect_endpoint(create: DialectFactory, ws: WebSocket) -> None:
    engine: Engine = ws.app.state.engine
    origin = ws.headers.get("origin")
    if not keys.origin_allowed(engine.settings.allowed_origins, origin, ws.headers.get("host")):
        log.info("WebSocket upgrade from origin %.100r refused (--allowed-origins)", origin)
        refusal = keys.origin_refused()
        await _deny(ws, refusal.status, refusal.body())
        return
    try:
        dialect = create(handshake_of(ws, engine))
    except HandshakeRejected as exc:
        await _deny(ws, exc.status, dict(exc.body))
        return
    access = await _admit(ws, dialect)
    if isinstance(access, keys.Refusal):
        await _deny(ws, access.status, access.body(), access.headers())
        return
    try:
        await _session(ws, engine, dialect, access)
    finally:
        access.release()


async def _admit(ws: WebSocket, dialect: Dialect) -> keys.Access | keys.Refusal:
    """The key check and the key's session limit, before the upgrade (401 missing, 403 wrong,
    429 at the limit; with ``--redis-url`` the limit counts the key's sessions on every replica).
    Twilio cannot send headers: its key arrives in the first message (``api_key_after_upgrade``)
    and :meth:`Connection._identify_late_key` checks it there. Browsers cannot
    either: they offer a short-lived token as a subprotocol (``tokens.py``), whose session
    counts against the key that minted it."""
    ring = keys.ring_of(ws.app.state)
    offered = tuple(ws.scope.get("subprotocols") or ())
    tokens.select_subprotocol(offered, dialect)
    if getattr(dialect, "api_key_after_upgrade", False):
        return ring.pending_access()
    principal = ring.identify(dialect.api_key)
    if principal is None:
        grant = tokens.admit_websocket(ws.app.state, offered, dialect)
        principal = ring.principal(grant.owner) if grant is not None else None
    if principal is None:
        return keys.key_refused(missing=dialect.api_key is None)
    access = ring.access(principal)
    if isinstance(access, keys.Access):
        return await access.hold_fleet_slot() or access
    return access


async def _session(ws: WebSocket, engine: Engine, dialect: Dialect, access: keys.Access) -> None:
    # Optional per dialect, like ``session_alias``: response headers its clients read (Deepgram's
    # ``dg-request-id``).
    extra = getattr(dialect, "accept_headers", None) or {}
    await ws.accept(subprotocol=dialect.subprotocol, headers=[(k.encode(), v.encode()) for k, v in extra.items()])
    reason = engine.refusal()
    if reason is not None:
        engine.metrics.sessions_rejected.inc()
        busy = p.Error.server("server_busy", f"{reason}; try again later")
        connection = Connection(ws, engine, dialect)
        await connection.send_now([*dialect.error(busy), Close(1013, "server busy")])
        return
    engine.active_sessions += 1
    engine.metrics.sessions_total.inc()
    engine.metrics.active_sessions.set(engine.active_sessions)
    try:
        await Connection(ws, engine, dialect, access).run()
    finally:
        engine.active_sessions -= 1
        engine.metrics.active_sessions.set(engine.active_sessions)
        if ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(1000)


async def _deny(ws: WebSocket, status: int, body: dict[str, object], headers: dict[str, str] | None = None) -> None:
    """Refuse the upgrade with an HTTP response (clients show its status and body), or, where
    the ASGI server cannot send one, accept and close with a policy-violation code."""
    try:
        await ws.send_denial_response(JSONResponse(body, status_code=status, headers=headers))
    except RuntimeError:
        await ws.accept()
        await ws.close(1008, str(body)[:120])


class Connection:
    """One WebSocket session in one dialect."""

    def __init__(self, ws: WebSocket, engine: Engine, dialect: Dialect, access: keys.Access | None = None) -> None:
        self.ws = ws
        self.access = access or keys.Access.unlimited()  # the key's session slot and audio meter
        self._quota_error: p.Error | None = None  # the key's audio allowance ran out: sent before the close
        self.engine = engine
        self.dialect = dialect
        self.settings = engine.settings
        self._outbox: asyncio.Queue[Send | Close] = asyncio.Queue()
        self._closed = asyncio.Event()
        self._close_code: int | None = None  # overrides the session's 1000 (drain: 1001)
        self._overflowed = False
        self._abort = asyncio.Event()  # set when the client must be dropped (stalled reader)
        self._tokens = 2 * self.settings.max_messages_per_s  # message-rate bucket (bursts of 2 s)
        self._tokens_at = time.monotonic()
        self.runner: SessionRunner | None = None
        self._alias: str | None = None  # the dialect's session_alias, once registered with the hub
        self._discarded = False  # the hub was told the session is no conversation (``recorded``)
        self._started = time.monotonic()  # the wall clock a client's audio is measured against (flow control)
        # A client message and audio a dialect's decoder made later (``pending``) reach the core
        # one after the other, in the order the dialect handed them out.
        self._dialect_turn = asyncio.Lock()
        self._woken = False  # the dialect has something to collect
        self._collector: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- outputs

    def _queue(self, actions: list[Action]) -> None:
        """Apply a dialect's actions in order: commands to the core, messages to the client."""
        for action in actions:
            if isinstance(action, (Send, Close)):
                self._put(action)
            elif self.runner is not None and not self._closed.is_set():
                self._command(self.runner, action)
        self._register_alias()
        self._discard_unrecorded()
        self._publish_call_events()

    async def _identify_late_key(self, actions: list[Action]) -> list[Action]:
        """A key that arrives after the upgrade (Twilio's ``customParameters.api_key``) is checked
        before its dialect's first command reaches the core: on a refusal that frame's commands
        are dropped and the client gets the error and the close instead."""
        access = self.access
        if access.principal is not None or access.refused or all(isinstance(a, (Send, Close)) for a in actions):
            return actions
        refusal = await access.identify(self.dialect.api_key)
        if refusal is None:
            return actions
        return [*self.dialect.error(refusal.error), Close(refusal.close_code, refusal.reason)]

    def _command(self, runner: SessionRunner, command: p.ClientMessage) -> None:
        """One command for the core, within the key's limits: audio is charged to the key's
        meter as the core takes it (the seconds the session actually received). Once the
        allowance is spent the session is flushed, so the audio accepted so far still gets its
        finals, and ``_on_close`` then sends ``rate_limited`` and closes with 1008. Nothing
        reaches the core before the key is known (``_identify_late_key``) or after a refusal."""
        access = self.access
        if access.refused or access.principal is None:
            return
        if not isinstance(command, p.AudioAppend):
            runner.apply(command)
            return
        if not access.audio_allowed():
            self._quota_error = access.spend_out()
            runner.close()
            return
        before = runner.session.audio_seconds
        runner.apply(command)
        access.charge(runner.session.audio_seconds - before)

    def _put(self, item: Send | Close) -> None:
        """Queue a message for the sender; a client that stops reading must not pin memory: past
        ``--max-send-queue`` it is dropped (1008) instead of queueing without bound."""
        if self._overflowed:
            return
        if isinstance(item, Send) and self._outbox.qsize() >= self.settings.max_send_queue:
            self._overflowed = True
            session = self.runner.session.id if self.runner else "?"
            log.warning("session %s: client is not reading (%d messages queued); closing 1008", session, self._outbox.qsize())
            self.engine.metrics.sessions_rejected.inc()
            self._abort.set()
            return
        self._outbox.put_nowait(item)

    def drain(self) -> None:
        """Server shutdown: read on for ``DRAIN_READ_S`` (audio already sent is transcribed), then
        finalize every open utterance, send done, close with 1001. A dialect
        that can move its client to another replica (AudioHook's ``reconnect``: its ``drain()``
        returns actions) does that instead, and gets the plain drain if the client has not closed
        within half of ``--drain-timeout-s``."""
        self._close_code = 1001
        handover = getattr(self.dialect, "drain", None)
        actions = handover() if callable(handover) else None
        if actions is None:
            # Keep reading what the client already sent, then finalize; a client that has gone
            # quiet gets its finals at the same moment (the drain's deadline is far longer).
            read_s = min(DRAIN_READ_S, self.settings.drain_timeout_s / 4)
            try:
                asyncio.get_running_loop().call_later(read_s, self._flush_for_shutdown)
            except RuntimeError:  # no running loop: flush now
                self._flush_for_shutdown()
            return
        self._queue(actions)
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to fall back on later
            asyncio.get_running_loop().call_later(self.settings.drain_timeout_s / 2, self._flush_for_shutdown)

    def _flush_for_shutdown(self) -> None:
        if self in self.engine.connections and self.runner is not None and not self.runner.session.closing:
            self.runner.close()

    def request(self, control: Control) -> None:
        """An operator's control (``POST /v1/sessions/{id}/pause``), from the hub: the dialect turns
        it into its protocol's message, queued at once. The HTTP route and this connection share the
        server's one event loop, so this runs between two client frames, never inside the core."""
        handler = getattr(self.dialect, "control", None)
        if not callable(handler):
            raise ControlRefused("control_unsupported", f"the {self.dialect.name} protocol has no {control.value} message")
        if self._closed.is_set() or self.runner is None or self.runner.session.closing:
            raise ControlRefused("invalid_state", "the session is closing")
        self._queue(handler(control))

    def _publish_call_events(self) -> None:
        """Call events a dialect reports beside the audio (Twilio's DTMF digits) go to the hub."""
        take = getattr(self.dialect, "call_events", None)
        if callable(take) and self.runner is not None:
            for key in take():
                self.engine.hub.dtmf(self.runner.session.id, key)

    def _register_alias(self) -> None:
        """Publish the session under the call's own id once the dialect has learned it (Twilio's
        ``callSid`` arrives in ``start``, AudioHook's ``conversationId`` in ``open``)."""
        alias = getattr(self.dialect, "session_alias", None)
        if alias and self.runner is not None and alias != self._alias:
            self._alias = alias
            self.engine.hub.alias(self.runner.session.id, str(alias))

    def _discard_unrecorded(self) -> None:
        """A session its dialect found to be no conversation (``recorded`` false: an AudioHook
        connection probe) leaves the hub: not stored, not posted, not listed."""
        if self.runner is not None and not self._discarded and getattr(self.dialect, "recorded", True) is False:
            self._discarded = True
            self.engine.hub.discard(self.runner.session.id)

    def _emit(self, event: p.ServerEvent) -> None:
        if self.runner is not None:
            self.engine.hub.publish(self.runner.session.id, event)
        try:
            actions = self.dialect.render(event)
        except Exception:  # the safety net: a rendering bug costs one event, not the session
            log.exception("%s dialect failed to render %s (session %s)", self.dialect.name, event.type,
                          self.runner.session.id if self.runner else "?")
            actions = self.dialect.error(p.Error.server("internal_error", f"the server could not send a {event.type} event"))
        self._queue(actions)

    def _on_close(self, close: CloseConnection) -> None:
        if self._close_code == 1001:
            self._put(Close(1001, "server shutting down"))
        elif self._quota_error is not None:
            self._queue([*self.dialect.error(self._quota_error), Close(keys.POLICY_VIOLATION, "audio rate limit exceeded")])
        else:
            self._put(Close(close.code, close.reason))

    async def send_now(self, actions: list[Action]) -> None:
        """Send a few messages without a session (refusals)."""
        self._queue(actions)
        self._put(Close(1000))
        await self._sender()

    async def _sender(self) -> None:
        while True:
            item = await self._outbox.get()
            if isinstance(item, Close):
                with contextlib.suppress(Exception):
                    await self.ws.close(item.code, item.reason)
                self._closed.set()
                return
            try:
                if isinstance(item.message, bytes):
                    await self.ws.send_bytes(item.message)
                else:
                    await self.ws.send_text(item.message)
            except Exception:  # noqa: BLE001 - the peer is gone; the reader notices too
                self._closed.set()
                return

    # ---------------------------------------------------------------- reader

    async def run(self) -> None:
        config = p.SessionConfig(model=self.settings.model).updated(self.dialect.initial_config())
        session = self.engine.new_session(config)
        runner = SessionRunner(
            session,
            self.engine.scheduler,
            emit=self._emit,
            on_close=self._on_close,
            metrics=self.engine.metrics,
            elapsed_s=self._elapsed_s,
            load_intake_step_ms=self.engine.load_intake_step_ms,
        )
        self.runner = runner
        self._listen_to_the_dialect()
        self.engine.hub.open(session.id, duration=lambda: session.audio_seconds, controller=self)
        self.engine.connections.add(self)
        self.engine.loop_lag.watch()
        sender = asyncio.create_task(self._sender())
        runner.start()
        reader = asyncio.create_task(self._read_and_flush(runner))
        aborted = asyncio.create_task(self._abort.wait())
        try:
            await asyncio.wait({reader, aborted}, return_when=asyncio.FIRST_COMPLETED)
            if self._abort.is_set():
                await self._close_stalled(sender)
        finally:
            for task in (reader, aborted):
                task.cancel()
            self.engine.connections.discard(self)
            self.engine.loop_lag.unwatch()
            runner.cancel()
            if self._collector is not None:
                self._collector.cancel()
            release = getattr(self.dialect, "release", None)
            if release is not None:
                release()
            self.engine.hub.close(session.id)
            if not self._closed.is_set() and not self._abort.is_set():
                # Give already-queued messages (a refusal, the last segment) a moment to leave.
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(sender), timeout=0.5)
            sender.cancel()
            # The runner calls back into this connection (emit, on_close) and this connection
            # holds the runner: a cycle that only the cyclic GC frees. A session's audio buffer
            # (up to a few MB) then outlived it until the next full collection; the soak saw
            # ~20 closed sessions' buffers (40 MB) held at any time. Without the cycle they go
            # when the connection does.
            self.runner = None

    async def _read_and_flush(self, runner: SessionRunner) -> None:
        try:
            await self._read_loop(runner)
            # A flush (close message, idle timeout, drain): wait for its last finals to go out.
            await asyncio.wait_for(self._closed.wait(), timeout=FLUSH_TIMEOUT_S)
        except (TimeoutError, WebSocketDisconnect, RuntimeError):
            pass

    async def _close_stalled(self, sender: asyncio.Task[None]) -> None:
        """Close a client that stopped reading. Its close frame would wait behind everything
        queued in the socket, so the close gets a moment and the connection is then dropped."""
        sender.cancel()
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(self.ws.close(1008, "client is not reading; send queue full"), timeout=1.0)

    def _idle_timeout(self) -> float | None:
        configured = self.dialect.idle_timeout_s
        if configured is not None:
            return configured or None
        return self.settings.idle_timeout_s or None

    async def _read_loop(self, runner: SessionRunner) -> None:
        idle = self._idle_timeout()
        limit = self.settings.max_message_bytes
        while not runner.session.closing and not self._closed.is_set():
            await self._let_the_decoder_catch_up(runner)
            try:
                async with asyncio.timeout(idle):
                    message = await self.ws.receive()
            except TimeoutError:
                if getattr(self.dialect, "closing", False) or runner.session.closing:
                    return  # the client asked to close; its last audio is still being decoded
                self._queue(self.dialect.error(p.Error.invalid("idle_timeout", f"no message for {idle:g} s; closing")))
                runner.close()
                return
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            data = message.get("bytes")
            text = message.get("text")
            size = len(data) if data is not None else len((text or "").encode())
            if not self._within_rate() and not await self._slowed_to_rate(runner):
                rate = self.settings.max_messages_per_s
                error = p.Error.invalid("rate_limited", f"more than {rate:g} messages per second; closing")
                self._queue([*self.dialect.error(error), Close(1008, "message rate limit exceeded")])
                return
            if size > limit:
                error = p.Error.invalid("message_too_large", f"message of {size} bytes exceeds the limit of {limit} bytes")
                self._queue([*self.dialect.error(error), Close(1009, "message too large")])
                return
            async with self._dialect_turn:
                await self._queue_paced(runner, await self._identify_late_key(self._translate(data, text)))

    def _listen_to_the_dialect(self) -> None:
        """A dialect that decodes in the background (Deepgram's compressed audio) calls back from
        its thread when it has audio for the core; the loop then collects it (``pending``)."""
        set_wakeup = getattr(self.dialect, "set_wakeup", None)
        if set_wakeup is None:
            return
        loop = asyncio.get_running_loop()
        set_wakeup(lambda: loop.call_soon_threadsafe(self._dialect_woke))

    def _dialect_woke(self) -> None:
        if self.runner is None or self._closed.is_set():
            return
        self._woken = True
        if self._collector is None or self._collector.done():
            self._collector = asyncio.create_task(self._collect_from_the_dialect(self.runner))

    async def _collect_from_the_dialect(self, runner: SessionRunner) -> None:
        while self._woken and not self._closed.is_set():
            self._woken = False
            async with self._dialect_turn:
                try:
                    actions = self.dialect.pending()  # type: ignore[attr-defined]
                except Exception:
                    log.exception("%s dialect failed to hand over decoded audio (session %s)", self.dialect.name, runner.session.id)
                    actions = self.dialect.error(p.Error.server("internal_error", "the server could not decode this audio"))
                await self._queue_paced(runner, actions)

    async def _queue_paced(self, runner: SessionRunner, actions: list[Action]) -> None:
        """A client message's actions, as ``_queue`` applies them, except that a large audio
        message (up to ``--max-message-bytes``: 32 s of pcm16) reaches the core in slices of
        ``AUDIO_SLICE_BYTES`` with the flow control between them: fed at once, the turns it
        holds beyond the pending bound ran into one another (a 480 s file sent in 1 MiB messages
        came out as 41 segments for 82 turns). The core takes audio cut anywhere."""
        for action in actions:
            if not isinstance(action, p.AudioAppend) or len(action.audio) <= AUDIO_SLICE_BYTES:
                self._queue([action])
                continue
            for offset in range(0, len(action.audio), AUDIO_SLICE_BYTES):
                if offset:
                    await self._let_the_decoder_catch_up(runner)
                self._queue([dataclasses.replace(action, audio=action.audio[offset : offset + AUDIO_SLICE_BYTES])])

    async def _let_the_decoder_catch_up(self, runner: SessionRunner) -> None:
        """Flow control: while the session is ``backlogged`` and its client is ahead of real time
        (a file sent at full speed), its next message is not read, so the client's sends wait in
        the transport and its turns keep the ends the VAD gives them. A client that sends live
        audio is always read (``SessionRunner.wait_caught_up``), and the wait is bounded per
        message (``CATCH_UP_WAIT_S``), so controls still get through."""
        waited = await runner.wait_caught_up(CATCH_UP_WAIT_S, elapsed_s=self._elapsed_s())
        if waited:
            self.engine.metrics.read_paused_seconds.inc(waited)

    def _elapsed_s(self) -> float:
        """Wall seconds since the connection opened: what a client's audio is compared with."""
        return time.monotonic() - self._started

    async def _slowed_to_rate(self, runner: SessionRunner) -> bool:
        """A client over the message rate that is sending audio ahead of real time (a file at
        ``mic-client --speed 0``: 50 ms frames as fast as the connection allows are ~1000 a
        second per 50x real time) is read more slowly instead of cut off: its next message waits
        for the bucket, and its transport holds the rest. A flood that carries no more audio
        than real time (tiny frames, control messages) is no such client: False, it is closed."""
        if not runner.ahead_of_real_time(self._elapsed_s()):
            return False
        rate = self.settings.max_messages_per_s
        while not self._within_rate():  # each call refills the bucket for the time slept
            await asyncio.sleep(max(0.0, 1 - self._tokens) / rate)
        return True

    def _within_rate(self) -> bool:
        """A token bucket: ``max_messages_per_s`` sustained, bursts of twice that. Real clients
        send 10-100 audio frames a second; a flood of tiny frames costs a wake-up each."""
        rate = self.settings.max_messages_per_s
        if rate <= 0:
            return True
        now = time.monotonic()
        self._tokens = min(2 * rate, self._tokens + (now - self._tokens_at) * rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def _translate(self, data: bytes | None, text: str | None) -> list[Action]:
        """The dialect's answer to one frame. Dialects answer bad input themselves; anything
        that still escapes one is a server bug, reported in the dialect's error shape, logged,
        and the session goes on."""
        try:
            if data is not None:
                return self.dialect.receive_bytes(data)
            return self.dialect.receive_text(text or "")
        except Exception:
            session = self.runner.session.id if self.runner else "?"
            log.exception("%s dialect failed on a client message (session %s)", self.dialect.name, session)
            return self.dialect.error(p.Error.server("internal_error", "the server could not process this message; the session continues"))
