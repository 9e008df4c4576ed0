"""The asyncio shell: Starlette routes around the engine, served by uvicorn.

The WebSocket handler only moves bytes: frames go into the Sans-I/O :class:`Session`, its outputs
go out (events), to the scheduler (decode tickets) or to the socket (close). One sender task per
connection keeps events in the order the session produced them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from stream_server import protocol as p
from stream_server.engine import Engine
from stream_server.session import CloseConnection, DecodeTicket, Output, Session
from stream_server.settings import Settings

log = logging.getLogger(__name__)


class Connection:
    """One WebSocket session: reader loop, decode callbacks, ordered sender."""

    def __init__(self, ws: WebSocket, engine: Engine, session: Session) -> None:
        self.ws = ws
        self.engine = engine
        self.session = session
        self.settings = engine.settings
        self._outbox: asyncio.Queue[p.ServerEvent | CloseConnection] = asyncio.Queue()
        self._tasks: set[asyncio.Task] = set()
        self._event_ids = 0
        self._stopped_at: dict[str, float] = {}
        self._closed = asyncio.Event()

    # ---------------------------------------------------------------- outputs

    def route(self, outputs: list[Output]) -> None:
        for out in outputs:
            if isinstance(out, DecodeTicket):
                task = asyncio.create_task(self._decode(out))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                self._outbox.put_nowait(out)

    async def _decode(self, ticket: DecodeTicket) -> None:
        self.route(await self.engine.decode(self.session, ticket))

    async def _sender(self) -> None:
        while True:
            item = await self._outbox.get()
            if isinstance(item, CloseConnection):
                with contextlib.suppress(Exception):
                    await self.ws.close(item.code, item.reason)
                self._closed.set()
                return
            self._observe(item)
            self._event_ids += 1
            try:
                await self.ws.send_text(p.event_to_json(item, f"evt_{self._event_ids}"))
            except Exception:  # noqa: BLE001 - the peer is gone; the reader notices too
                self._closed.set()
                return

    def _observe(self, event: p.ServerEvent) -> None:
        metrics = self.engine.metrics
        if isinstance(event, p.SpeechStopped):
            self._stopped_at[event.item_id] = time.monotonic()
        elif isinstance(event, p.TranscriptSegment):
            stopped = self._stopped_at.pop(event.item_id, None)
            if stopped is not None:
                metrics.finalization_latency.observe(time.monotonic() - stopped)

    # ---------------------------------------------------------------- reader

    async def run(self) -> None:
        sender = asyncio.create_task(self._sender())
        self.route(self.session.start())
        try:
            await self._read_loop()
            # session.close or idle timeout: wait for the flush to go out (finals may be decoding).
            await asyncio.wait_for(self._closed.wait(), timeout=120)
        except (WebSocketDisconnect, asyncio.TimeoutError, RuntimeError):
            pass
        finally:
            self.engine.scheduler.cancel(self.session.pending_tickets())
            for task in list(self._tasks):
                task.cancel()
            sender.cancel()
            self.engine.metrics.audio_seconds.inc(self.session.audio_seconds)

    async def _read_loop(self) -> None:
        idle = self.settings.idle_timeout_s or None
        limit = self.settings.max_message_bytes
        while not self.session.closing and not self._closed.is_set():
            try:
                message = await asyncio.wait_for(self.ws.receive(), timeout=idle)
            except asyncio.TimeoutError:
                self.route([p.Error.invalid("idle_timeout", f"no message for {idle:g} s; closing")])
                self.route(self.session.close())
                return
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect(message.get("code", 1000))
            data = message.get("bytes")
            text = message.get("text")
            size = len(data) if data is not None else len((text or "").encode())
            if size > limit:
                self.route(
                    [
                        p.Error.invalid("message_too_large", f"message of {size} bytes exceeds the limit of {limit} bytes"),
                        CloseConnection(1009, "message too large"),
                    ]
                )
                return
            if data is not None:
                self.route(self.session.receive_bytes(data))
            elif text is not None:
                self.route(self.session.receive_text(text))


async def stream_endpoint(ws: WebSocket) -> None:
    engine: Engine = ws.app.state.engine
    await ws.accept()
    if engine.active_sessions >= engine.settings.max_sessions:
        engine.metrics.sessions_rejected.inc()
        error = p.Error.server("server_busy", f"the server is at its limit of {engine.settings.max_sessions} sessions; try again later")
        with contextlib.suppress(Exception):
            await ws.send_text(p.event_to_json(error, "evt_1"))
            await ws.close(1013, "server busy")
        return
    engine.active_sessions += 1
    engine.metrics.sessions_total.inc()
    engine.metrics.active_sessions.set(engine.active_sessions)
    try:
        await Connection(ws, engine, engine.new_session()).run()
    finally:
        engine.active_sessions -= 1
        engine.metrics.active_sessions.set(engine.active_sessions)
        if ws.application_state != WebSocketState.DISCONNECTED:
            with contextlib.suppress(Exception):
                await ws.close(1000)


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = request.app.state.engine.metrics.render()
    return Response(body, media_type=content_type)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    if engine.ready:
        return JSONResponse({"status": "ready", "model": engine.settings.model})
    return JSONResponse({"status": "loading", "model": engine.settings.model}, status_code=503)


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    engine = engine or Engine(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        if not engine.ready:
            await asyncio.to_thread(engine.load_default_model)
        log.info("ready: model %s on %s (%s)", settings.model, settings.resolved_device(), settings.resolved_compute_type())
        yield
        engine.close()

    routes = [
        WebSocketRoute("/v1/stream", stream_endpoint),
        Route("/metrics", metrics_endpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]
    try:
        from stream_server.http_api import routes as http_routes
    except ImportError:
        http_routes = None
    if http_routes is not None:
        routes += http_routes()
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    return app


def serve(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # The protocol layer refuses frames over twice our limit outright (1009, bounding memory);
        # frames between the limit and that get our explanatory error event first.
        ws_max_size=2 * settings.max_message_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
    )
