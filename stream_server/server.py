"""The asyncio shell: Starlette routes around the engine, served by uvicorn.

WebSocket endpoints (one per wire dialect) live in ``ws.py``; the HTTP APIs in ``http/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from types import FrameType
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stream_server.allocator import limit_malloc_arenas
from stream_server.engine import Engine
from stream_server.http import routes as http_routes
from stream_server.keys import KeyFileError, KeyRing, install_reload_on_sighup, without_plaintext
from stream_server.settings import Settings
from stream_server.web.routes import routes as web_routes
from stream_server.ws import websocket_routes

log = logging.getLogger(__name__)


async def metrics_endpoint(request: Request) -> Response:
    body, content_type = request.app.state.engine.metrics.render()
    return Response(body, media_type=content_type)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    if engine.draining:
        return JSONResponse({"status": "draining", "model": engine.settings.model}, status_code=503)
    if engine.ready and not engine.scheduler.healthy():
        # Sessions would wait forever for decodes: take this replica out of rotation.
        return JSONResponse({"status": "decoder_down", "model": engine.settings.model}, status_code=503)
    if engine.ready:
        return JSONResponse({"status": "ready", "model": engine.settings.model})
    return JSONResponse({"status": "loading", "model": engine.settings.model}, status_code=503)


def create_app(settings: Settings, engine: Engine | None = None) -> Starlette:
    ring = KeyRing.from_settings(settings)  # the keys as digests; the app keeps no plaintext copy
    settings = without_plaintext(settings)
    engine = engine or Engine(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not engine.ready:
            await asyncio.to_thread(engine.load_default_model)
        log.info("ready: model %s on %s (%s)", settings.model, settings.resolved_device(), settings.resolved_compute_type())
        lag_meter = asyncio.create_task(engine.loop_lag.run(), name="loop-lag")
        yield
        lag_meter.cancel()
        await engine.callbacks.close(grace_s=1.0)  # the drain already waited for them
        engine.close()
        if ring.usage.fleet is not None:
            await ring.usage.fleet.close()

    routes = [
        *websocket_routes(),
        *http_routes(),
        Route("/metrics", metrics_endpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        *web_routes(),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    app.state.keys = ring
    return app


def serve(settings: Settings) -> None:
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request's whole URL at INFO: a callback's may hold credentials (user:password@).
    logging.getLogger("httpx").setLevel(max(logging.WARNING, logging.getLogger().level))
    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise SystemExit("--ssl-keyfile needs --ssl-certfile (the certificate that key belongs to)")
    try:
        settings.redact_names()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    # Before create_app: the decode threads it starts must find the limit in place.
    if limit_malloc_arenas(settings.malloc_arenas):
        log.info("malloc arenas limited to %d (--malloc-arenas)", settings.malloc_arenas)
    try:
        app = create_app(settings)
    except KeyFileError as exc:
        raise SystemExit(f"--api-keys-file: {exc}") from None
    if not app.state.keys.configured and settings.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without API keys: anyone who can reach this address can use the server (--api-keys)", settings.host)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level.lower(),
        # The protocol layer refuses frames over twice our limit outright (1009, bounding memory);
        # frames between the limit and that get our explanatory error event first.
        ws_max_size=2 * settings.max_message_bytes,
        ws_ping_interval=20,
        ws_ping_timeout=20,
        # Twilio (and browsers on https pages) only connect to wss://: with a certificate the
        # server speaks TLS itself; without one, a reverse proxy terminates TLS (docs/twilio.md).
        ssl_certfile=settings.ssl_certfile or None,
        ssl_keyfile=settings.ssl_keyfile or None,
    )
    logging.getLogger("uvicorn.access").addFilter(RedactUrlCredentials())  # after uvicorn configured its logging
    DrainingServer(config, app.state.engine, keys=app.state.keys).run()


#: The ``user:password@`` of a URL, plain or percent-encoded inside a query string.
_URL_CREDENTIALS = re.compile(r"(://|%3A%2F%2F)[^/\s&@]+(@|%40)", re.IGNORECASE)


class RedactUrlCredentials(logging.Filter):
    """Access-log lines without the credentials of URLs in query strings: Deepgram's callback
    URLs carry a receiver's basic-auth password (``callback=https://user:pass@host/...``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_URL_CREDENTIALS.sub(r"\1***\2", arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


#: How often an idle server wakes to look at its exit flag and refresh its Date header (uvicorn's
#: own loop: ten times a second). Each wakeup of an idle asyncio loop cost ~0.15 ms of CPU on the
#: benchmark VM; an exit signal still ends the wait at once (:meth:`QuietServer.handle_exit`).
TICK_S = 1.0


class QuietServer(uvicorn.Server):
    """uvicorn's server, ticking once a second instead of ten times: an idle server uses no CPU
    to speak of (``test_server``), and a signal still reaches it at once."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self._exit_asked: Callable[[], None] | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._exit_asked is not None:
            self._exit_asked()

    async def main_loop(self) -> None:
        loop = asyncio.get_running_loop()
        asked = asyncio.Event()

        def ask() -> None:  # from a signal handler or any thread
            loop.call_soon_threadsafe(asked.set)

        self._exit_asked = ask
        counter = 0  # on_tick refreshes the Date header when counter % 10 == 0: every tick here
        should_exit = await self.on_tick(counter)
        while not should_exit:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(TICK_S):
                    await asked.wait()
            counter = (counter + 10) % 864000
            should_exit = await self.on_tick(counter)


class DrainingServer:
    """uvicorn's server with a graceful drain in front of its shutdown.

    On the first SIGTERM/SIGINT the server stops taking sessions (``/readyz`` 503, new WebSockets
    refused with ``server_busy``/1013), every open session is flushed — each open utterance
    finalized, ``transcript.text.done`` sent — and closed with 1001; only then, or after
    ``--drain-timeout-s``, does uvicorn shut down. A second signal skips the wait. (uvicorn alone
    closes every WebSocket with 1012 at once, losing every open utterance.)
    """

    def __init__(self, config: Any, engine: Engine, *, keys: KeyRing | None = None) -> None:
        self.engine = engine
        self.keys = keys  # reloaded from --api-keys-file on SIGHUP
        self.server = QuietServer(config)
        self._plain_exit = self.server.handle_exit
        self._loop: asyncio.AbstractEventLoop | None = None
        self.server.handle_exit = self._handle_exit  # type: ignore[method-assign]

    def run(self) -> None:
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.keys is not None:
            install_reload_on_sighup(self._loop, self.keys)
        await self.server.serve()

    def _handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.engine.draining or self._loop is None:
            self._plain_exit(sig, frame)
            return
        self.engine.draining = True
        self._loop.call_soon_threadsafe(lambda: self._loop.create_task(self._drain(sig, frame)) if self._loop else None)

    async def _drain(self, sig: int, frame: FrameType | None) -> None:
        started = time.monotonic()
        connections = list(self.engine.connections)
        log.info("draining %d session(s) (timeout %g s)", len(connections), self.engine.settings.drain_timeout_s)
        for connection in connections:
            connection.drain()
        deadline = started + self.engine.settings.drain_timeout_s
        while (self.engine.connections or self.engine.callbacks.pending) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        left = len(self.engine.connections)
        log.info(
            "drain finished in %.2f s (%d session(s) still open, %d callback(s) not delivered)",
            time.monotonic() - started, left, self.engine.callbacks.pending,
        )
        self._plain_exit(sig, frame)
