"""Routes of the browser app: the pages, their static files and the favicon.

``/`` and ``/watch/{session_id}`` serve the one page (``static/index.html``) with its mode filled in
(``speaker``, ``overlay`` or ``watch``); the script reads the rest from the query string. Static
files are the package's own, so the app works without any network beyond this server.
"""

from __future__ import annotations

import functools
import html
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).parent / "static"

#: Only this server's own scripts and styles; connections to this server (WebSocket, SSE, the
#: HTTP API) and, for ``?token_endpoint=``, to the embedding site's token URL.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "media-src 'self' blob:; connect-src 'self' ws: wss: http: https:; object-src 'none'; base-uri 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-cache",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
}


@functools.cache
def _template() -> str:
    return (STATIC / "index.html").read_text(encoding="utf-8")


def page(mode: str, session_id: str = "") -> HTMLResponse:
    body = _template().replace("__MODE__", mode).replace("__SESSION__", html.escape(session_id, quote=True))
    return HTMLResponse(body, headers=_PAGE_HEADERS)


async def speaker_page(request: Request) -> Response:
    return page("overlay" if request.query_params.get("mode") == "overlay" else "speaker")


async def watch_page(request: Request) -> Response:
    return page("watch", request.path_params["session_id"])


async def favicon(request: Request) -> Response:
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"})


def routes() -> list[BaseRoute]:
    return [
        Route("/", speaker_page, methods=["GET", "HEAD"]),
        Route("/watch/{session_id:str}", watch_page, methods=["GET", "HEAD"]),
        Route("/favicon.ico", favicon, methods=["GET", "HEAD"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


__all__ = ["routes"]
