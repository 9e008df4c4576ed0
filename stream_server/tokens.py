"""Short-lived, single-use, scoped tokens for browsers (``docs/browser.md``).

A browser must not hold a long-lived API key, and it cannot set an ``Authorization`` header on a
WebSocket or an ``EventSource``. A site's backend (which holds the key) exchanges it at
``POST /v1/realtime/client_secrets`` for a token and hands that to the page, which presents it

* on a WebSocket (``/v1/stream`` and the other dialects) as the subprotocol
  ``stream-server.token.<token>``, next to ``stream-server`` (the one the server selects; the
  token itself is never echoed), or, for OpenAI's browser flow, as its
  ``openai-insecure-api-key.<token>`` subprotocol;
* on ``GET /v1/sessions/{id}/events`` and ``/transcript`` as the query parameter ``?token=``.

A token is good for one connection of its scope (``stream`` or ``watch``; a watch token may be bound
to one session) and only until it expires (60 s by default, at most 600 s); the connection it
opened then lives on as long as it likes. Tokens live in this process's memory only, stored as
SHA-256 digests; they are never logged: :func:`install_log_redaction` blanks ``token=`` values in
uvicorn's access log lines.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, Literal

Scope = Literal["stream", "watch"]
SCOPES: tuple[Scope, ...] = ("stream", "watch")

TOKEN_PREFIX = "ek_"
DEFAULT_TTL_S = 60
MIN_TTL_S = 1
MAX_TTL_S = 600
#: Unredeemed tokens kept at once; the oldest go first beyond this (bounds memory against a
#: key holder minting in a loop).
MAX_OUTSTANDING = 10_000

#: The WebSocket subprotocol a browser offers next to its token, and the one the server selects.
SUBPROTOCOL = "stream-server"
TOKEN_SUBPROTOCOL_PREFIX = "stream-server.token."
QUERY_PARAMETER = "token"


@dataclasses.dataclass(frozen=True)
class Grant:
    scope: Scope
    expires_at: float  # wall clock, seconds since the epoch
    session_id: str | None  # a watch token bound to one session, or None
    #: The key that minted it (``keys.Principal.id``): the token's sessions count against that
    #: key's limits, and removing the key ends the tokens it minted. None: minted without keys.
    owner: str | None = None


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class TokenStore:
    """Issued tokens by digest; redeeming one removes it."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._grants: dict[str, Grant] = {}
        self._lock = threading.Lock()
        self._purged_at = float("-inf")

    def __len__(self) -> int:
        return len(self._grants)

    def issue(
        self, scope: Scope, ttl_s: float = DEFAULT_TTL_S, session_id: str | None = None, *, owner: str | None = None
    ) -> tuple[str, Grant]:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}")
        if not MIN_TTL_S <= ttl_s <= MAX_TTL_S:
            raise ValueError(f"a token lives {MIN_TTL_S}-{MAX_TTL_S} s")
        token = TOKEN_PREFIX + secrets.token_urlsafe(24)
        grant = Grant(scope, self._clock() + ttl_s, session_id, owner)
        with self._lock:
            self._purge()
            while len(self._grants) >= MAX_OUTSTANDING:
                self._grants.pop(next(iter(self._grants)))
            self._grants[_digest(token)] = grant
        return token, grant

    def redeem(self, token: str | None, scope: Scope, session_ids: Iterable[str] = ()) -> Grant | None:
        """The token's grant if it is known, unexpired, of ``scope`` and (for a bound token) for
        one of ``session_ids``; it is then used up. Anything else: None, and nothing changes."""
        if not token or not token.startswith(TOKEN_PREFIX):
            return None
        key = _digest(token)
        with self._lock:
            grant = self._grants.get(key)
            if grant is None:
                return None
            if grant.expires_at <= self._clock():
                del self._grants[key]
                return None
            if grant.scope != scope or (grant.session_id is not None and grant.session_id not in set(session_ids)):
                return None
            del self._grants[key]
            return grant

    def _purge(self) -> None:
        """Drop expired grants (at most once a second: a scan of every grant)."""
        now = self._clock()
        if now - self._purged_at < 1.0:
            return
        self._purged_at = now
        for key in [k for k, g in self._grants.items() if g.expires_at <= now]:
            del self._grants[key]


def store_of(state: Any) -> TokenStore:
    """The app's one store (``app.state.tokens``), made on first use."""
    store = getattr(state, "tokens", None)
    if store is None:
        store = TokenStore()
        state.tokens = store
    assert isinstance(store, TokenStore)
    return store


# -------------------------------------------------------------------------------- WebSocket


def offered_token(subprotocols: Iterable[str]) -> str | None:
    """The token a browser offered as ``stream-server.token.<token>``, if any."""
    for offered in subprotocols:
        if offered.startswith(TOKEN_SUBPROTOCOL_PREFIX):
            return offered[len(TOKEN_SUBPROTOCOL_PREFIX) :]
    return None


def admit_websocket(state: Any, subprotocols: Iterable[str], dialect: Any) -> Grant | None:
    """The grant of a valid stream token the WebSocket upgrade carries (used up), or None:
    offered as our subprotocol, or as the key a dialect read from its own scheme (OpenAI's
    browser subprotocol). A token offered beside ``stream-server`` gets that subprotocol
    selected (browsers fail a connection whose offered subprotocols are all ignored)."""
    offered = tuple(subprotocols)
    candidates = [offered_token(offered), getattr(dialect, "api_key", None)]
    store = store_of(state)
    for token in candidates:
        grant = store.redeem(token, "stream") if token else None
        if grant is not None:
            select_subprotocol(offered, dialect)
            return grant
    return None


def select_subprotocol(subprotocols: Iterable[str], dialect: Any) -> None:
    """Select ``stream-server`` when the client offered it and the dialect selects nothing itself."""
    if SUBPROTOCOL in tuple(subprotocols) and getattr(dialect, "subprotocol", None) is None:
        dialect.subprotocol = SUBPROTOCOL


# -------------------------------------------------------------------------------------- logs

_TOKEN_IN_TEXT = re.compile(r"((?:^|[?&])" + QUERY_PARAMETER + r"=)[^&\s\"]*|" + re.escape(TOKEN_PREFIX) + r"[A-Za-z0-9_\-]+")


def redact(text: str) -> str:
    """``text`` with token values (``?token=...`` and anything that looks like a token) blanked."""
    return _TOKEN_IN_TEXT.sub(lambda m: (m.group(1) + "[redacted]") if m.group(1) else "[redacted]", text)


class RedactTokens(logging.Filter):
    """Blanks tokens in a record's message arguments (uvicorn's access log puts the request's
    path and query there)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install_log_redaction() -> None:
    """Add :class:`RedactTokens` to uvicorn's loggers once (it survives uvicorn's logging setup)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(RedactTokens())


__all__ = [
    "QUERY_PARAMETER",
    "SCOPES",
    "SUBPROTOCOL",
    "TOKEN_SUBPROTOCOL_PREFIX",
    "Grant",
    "RedactTokens",
    "TokenStore",
    "admit_websocket",
    "install_log_redaction",
    "offered_token",
    "redact",
    "select_subprotocol",
    "store_of",
]
