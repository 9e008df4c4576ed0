"""The asyncio shell: Starlette routes around the engine, served by uvicorn.

WebSocket endpoints (one per wire dialect) live in ``ws.py``; the HTTP APIs in ``http/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stream_server.engine import Engine
from stream_server.http import routes as http_routes
from stream_server.settings import Settings
from stream_server.ws import websocket_routes

log = logging.getLogger(__name__)


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
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if not engine.ready:
            await asyncio.to_thread(engine.load_default_model)
        log.info("ready: model %s on %s (%s)", settings.model, settings.resolved_device(), settings.resolved_compute_type())
        yield
        engine.close()

    routes = [
        *websocket_routes(),
        *http_routes(),
        Route("/metrics", metrics_endpoint),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.engine = engine
    app.state.settings = settings
    return app


def serve(settings: Settings) -> None:
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if settings.ssl_keyfile and not settings.ssl_certfile:
        raise SystemExit("--ssl-keyfile needs --ssl-certfile (the certificate that key belongs to)")
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
        # Twilio (and browsers on https pages) only connect to wss://: with a certificate the
        # server speaks TLS itself; without one, a reverse proxy terminates TLS (docs/twilio.md).
        ssl_certfile=settings.ssl_certfile or None,
        ssl_keyfile=settings.ssl_keyfile or None,
    )
