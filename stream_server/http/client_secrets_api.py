"""``POST /v1/realtime/client_secrets``: an API key exchanged for a short-lived browser token.

The name and the request/response shape follow OpenAI's Realtime client secrets (``expires_after``
in, ``value`` and ``expires_at`` out), so code written for that flow works here; ``scope`` and
``session_id`` are this server's. See ``stream_server/tokens.py`` and ``docs/browser.md``.

Request (JSON, every field optional)::

    {"scope": "stream" | "watch",          # default "stream"
     "session_id": "...",                  # watch only: the one session the token may watch
     "expires_after": {"anchor": "created_at", "seconds": 60},   # 1-600, default 60
     "session": {...}}                     # accepted and ignored (OpenAI clients send it)

Response ``200``::

    {"value": "ek_...", "expires_at": 1767225600, "scope": "stream", "session_id": null}

With API keys configured (``--api-keys``, ``--api-keys-file``) the request needs
``Authorization: Bearer <key>``, and the token's sessions count against that key's limits;
without keys tokens are still issued (the server ignores them), so an embedding site works the
same either way.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from stream_server import keys, tokens
from stream_server import protocol as p
from stream_server.http.common import ApiError, api_endpoint, bearer_principal, invalid

MAX_BODY_BYTES = 16 * 1024
_FIELDS = {"scope", "session_id", "expires_after", "session"}


def _authorize(request: Request) -> keys.Principal:
    """The key minting the token (anonymous without keys configured): the token's sessions
    count against that key's limits, and end with it (``keys.KeyRing.principal``)."""
    principal = bearer_principal(request)
    if principal is None:
        raise ApiError(401, "invalid_api_key", "missing or unknown API key; send Authorization: Bearer <key>")
    return principal


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise ApiError(413, "request_too_large", f"the request body exceeds {MAX_BODY_BYTES} bytes")
    if not raw.strip():
        return {}
    try:
        body = p.loads_json(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the request body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "invalid_json", "the request body must be a JSON object")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise invalid(unknown[0], f"unknown field; expected any of {', '.join(sorted(_FIELDS))}")
    return body


def _ttl(body: dict[str, Any]) -> float:
    after = body.get("expires_after")
    if after is None:
        return tokens.DEFAULT_TTL_S
    if not isinstance(after, dict):
        raise invalid("expires_after", "expected an object {anchor, seconds}")
    if after.get("anchor", "created_at") != "created_at":
        raise invalid("expires_after.anchor", "only 'created_at' is supported")
    seconds = after.get("seconds", tokens.DEFAULT_TTL_S)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds):
        raise invalid("expires_after.seconds", "expected a number of seconds")
    if not tokens.MIN_TTL_S <= seconds <= tokens.MAX_TTL_S:
        raise invalid("expires_after.seconds", f"must be between {tokens.MIN_TTL_S} and {tokens.MAX_TTL_S}")
    return float(seconds)


@api_endpoint
async def client_secrets(request: Request) -> Response:
    owner = _authorize(request)
    body = await _body(request)
    scope = body.get("scope", "stream")
    if scope not in tokens.SCOPES:
        raise invalid("scope", f"expected one of {', '.join(tokens.SCOPES)}, got {scope!r}")
    session_id = body.get("session_id")
    if session_id is not None and (not isinstance(session_id, str) or not session_id or len(session_id) > 200):
        raise invalid("session_id", "expected a session id (a non-empty string)")
    if session_id is not None and scope != "watch":
        raise invalid("session_id", "only a watch token is bound to a session")
    token, grant = tokens.store_of(request.app.state).issue(scope, _ttl(body), session_id, owner=owner.id)
    answer = {"value": token, "expires_at": math.floor(grant.expires_at), "scope": grant.scope, "session_id": grant.session_id}
    return JSONResponse(answer, headers={"Cache-Control": "no-store"})


def routes() -> list[Route]:
    # Tokens travel in query strings (EventSource): keep them out of the access log.
    tokens.install_log_redaction()
    return [Route("/v1/realtime/client_secrets", client_secrets, methods=["POST"])]


__all__ = ["client_secrets", "routes"]
