"""Browser tokens: issue and redeem rules (``stream_server/tokens.py``), the
``POST /v1/realtime/client_secrets`` exchange, and tokens on the WebSocket and SSE endpoints of a
real server with ``--api-keys`` (never in its log)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from stream_server import tokens
from stream_server.tokens import TokenStore
from tests.support import start_server


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_token_is_single_use_scoped_and_expires() -> None:
    clock = Clock()
    store = TokenStore(clock)
    token, grant = store.issue("stream", ttl_s=30)
    assert token.startswith("ek_") and len(token) > 30 and grant.expires_at == 1030.0
    assert store.redeem(token, "watch") is None, "wrong scope"
    assert store.redeem(token, "stream") == grant
    assert store.redeem(token, "stream") is None, "used up"

    late, _ = store.issue("stream", ttl_s=30)
    clock.now += 30
    assert store.redeem(late, "stream") is None, "expired"

    bound, _ = store.issue("watch", session_id="sess_a")
    assert store.redeem(bound, "watch", ["sess_b"]) is None
    assert store.redeem(bound, "watch", ["sess_b", "sess_a"]) is not None
    free, _ = store.issue("watch")
    assert store.redeem(free, "watch", ["anything"]) is not None
    for bad in (None, "", "not-a-token", "ek_unknown"):
        assert store.redeem(bad, "stream") is None


def test_issue_limits_and_memory_bound() -> None:
    store = TokenStore(Clock())
    with pytest.raises(ValueError):
        store.issue("admin")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        store.issue("stream", ttl_s=tokens.MAX_TTL_S + 1)
    with pytest.raises(ValueError):
        store.issue("stream", ttl_s=0)
    first, _ = store.issue("stream")
    for _ in range(tokens.MAX_OUTSTANDING):
        store.issue("stream")
    assert len(store) == tokens.MAX_OUTSTANDING
    assert store.redeem(first, "stream") is None, "the oldest token gave way"


def test_tokens_are_kept_only_as_digests() -> None:
    store = TokenStore()
    token, _ = store.issue("stream")
    assert token not in repr(store.__dict__)


def test_redaction_of_log_lines() -> None:
    assert tokens.redact("GET /v1/sessions/s/events?token=ek_abc-DEF_1 HTTP/1.1") == "GET /v1/sessions/s/events?token=[redacted] HTTP/1.1"
    assert tokens.redact("/x?a=1&token=zzz&b=2") == "/x?a=1&token=[redacted]&b=2"
    assert tokens.redact("offered stream-server.token.ek_secretvalue") == "offered stream-server.token.[redacted]"
    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d', ("1.2.3.4", "GET", "/e?token=ek_x1", "1.1", 200), None)
    tokens.RedactTokens().filter(record)
    assert "ek_x1" not in record.getMessage() and "token=[redacted]" in record.getMessage()


def test_offered_subprotocol_token() -> None:
    assert tokens.offered_token(["stream-server", "stream-server.token.ek_abc"]) == "ek_abc"
    assert tokens.offered_token(["realtime"]) is None


# ---------------------------------------------------------------------------- a real server


def test_client_secrets_and_tokens_on_a_server_with_api_keys(tmp_path: Path) -> None:
    key = "token-test-key-987"
    srv = start_server(tmp_path, "--api-keys", key)
    base = srv.http_url
    auth = {"Authorization": f"Bearer {key}"}
    issued: list[str] = []

    def mint(**body: object) -> str:
        answer = httpx.post(f"{base}/v1/realtime/client_secrets", json=body, headers=auth)
        assert answer.status_code == 200, answer.text
        assert answer.headers["cache-control"] == "no-store"
        issued.append(answer.json()["value"])
        return issued[-1]

    async def stream(token: str, subprotocols: list[str] | None = None) -> tuple[str | None, dict]:
        offered = subprotocols or ["stream-server", f"stream-server.token.{token}"]
        async with websockets.connect(srv.ws_url, subprotocols=offered) as ws:  # type: ignore[arg-type]
            return ws.subprotocol, json.loads(await ws.recv())

    async def refused(token: str) -> int:
        with pytest.raises(InvalidStatus) as info:
            await stream(token)
        return info.value.response.status_code

    try:
        # The exchange: key required; OpenAI's request shape; our scope and session binding.
        assert httpx.post(f"{base}/v1/realtime/client_secrets").status_code == 401
        assert httpx.post(f"{base}/v1/realtime/client_secrets", headers={"Authorization": "Bearer nope"}).status_code == 401
        answer = httpx.post(
            f"{base}/v1/realtime/client_secrets",
            json={"expires_after": {"anchor": "created_at", "seconds": 120}, "session": {"type": "transcription"}},
            headers=auth,
        ).json()
        assert answer["scope"] == "stream" and answer["session_id"] is None and answer["value"].startswith("ek_")
        issued.append(answer["value"])
        for body, param in [
            ({"scope": "admin"}, "scope"),
            ({"expires_after": {"seconds": 10_000}}, "expires_after.seconds"),
            ({"expires_after": {"anchor": "now"}}, "expires_after.anchor"),
            ({"session_id": "sess_x"}, "session_id"),
            ({"colour": "red"}, "colour"),
        ]:
            bad = httpx.post(f"{base}/v1/realtime/client_secrets", json=body, headers=auth)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, bad.text
        assert httpx.post(f"{base}/v1/realtime/client_secrets", content=b"[1]", headers=auth).json()["error"]["code"] == "invalid_json"

        async def go() -> str:
            # A stream token opens one WebSocket; the server selects "stream-server", never the token.
            selected, created = await stream(answer["value"])
            assert selected == "stream-server" and created["type"] == "session.created"
            assert await refused(answer["value"]) == 401, "single use"
            assert await refused(mint(scope="watch")) == 401, "wrong scope"
            assert await refused("ek_forged") == 401
            short = mint(expires_after={"seconds": 1})
            await asyncio.sleep(1.2)
            assert await refused(short) == 401, "expired"
            # OpenAI's browser flow: the token as its insecure-api-key subprotocol on /v1/realtime.
            url = srv.ws_url.replace("/v1/stream", "/v1/realtime?intent=transcription")
            async with websockets.connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{mint()}"]) as ws:  # type: ignore[list-item]
                assert ws.subprotocol == "realtime"
                first = json.loads(await ws.recv())
                assert first["type"].startswith(("session.", "transcription_session."))
            return str(created["session"]["id"])

        session_id = asyncio.run(go())

        # SSE and transcript: a watch token as ?token=, bound to the session or not; used up.
        transcript = f"{base}/v1/sessions/{session_id}/transcript"
        assert httpx.get(transcript).status_code == 401
        token = mint(scope="watch", session_id=session_id)
        assert httpx.get(transcript, params={"token": token}).status_code == 200
        assert httpx.get(transcript, params={"token": token}).status_code == 401
        assert httpx.get(transcript, params={"token": mint(scope="watch", session_id="sess_other")}).status_code == 401
        assert httpx.get(transcript, params={"token": mint(scope="stream")}).status_code == 401
        with httpx.stream("GET", f"{base}/v1/sessions/{session_id}/events", params={"token": mint(scope="watch")}) as events:
            assert events.status_code == 200 and events.headers["content-type"].startswith("text/event-stream")
    finally:
        srv.stop()
    log = srv.log_path.read_text(encoding="utf-8").split("\n", 1)[1]
    assert key not in log and not [t for t in issued if t in log]
    assert "token=[redacted]" in log


def test_without_api_keys_tokens_are_issued_and_offering_one_still_connects(tmp_path: Path) -> None:
    srv = start_server(tmp_path)
    try:
        answer = httpx.post(f"{srv.http_url}/v1/realtime/client_secrets", json={"scope": "stream"})
        assert answer.status_code == 200
        token = answer.json()["value"]

        async def go() -> None:
            async with websockets.connect(srv.ws_url, subprotocols=["stream-server", f"stream-server.token.{token}"]) as ws:  # type: ignore[list-item]
                assert ws.subprotocol == "stream-server"
                assert json.loads(await ws.recv())["type"] == "session.created"

        asyncio.run(go())
    finally:
        srv.stop()
