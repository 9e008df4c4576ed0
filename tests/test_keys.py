"""API keys, per-key limits and the Origin allow-list (``stream_server/keys.py``).

The first half is the key ring on its own (parsing, hashing, reloads, the limit meters with a
clock the test moves); the second half runs the real server in a subprocess, as a client and an
operator meet it: a keys file reloaded by a real SIGHUP, real WebSocket clients against a key's
session limit, real speech streamed faster than real time into a key's audio allowance, and
browser ``Origin`` headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from stream_server import keys, tokens
from stream_server.bench import calls
from stream_server.keys import KeyFileError, KeyLimits, KeyRing
from tests.support import ServerProcess, load_clip, manifest, normalize, start_server, wer

# ------------------------------------------------------------------------------ the ring


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def write(path: Path, text: str) -> Path:
    """Replace the file whole (as an operator's editor or a deploy tool does: write, then rename)."""
    partial = path.with_suffix(".partial")
    partial.write_text(text)
    os.replace(partial, path)
    return path


def test_the_keys_file_format(tmp_path: Path) -> None:
    path = write(
        tmp_path / "keys",
        "# production keys\n"
        "\n"
        "sk-plain-0001\n"
        "   sk-acme-0002   name=acme max_sessions=4 audio_s_per_min=120   # the acme account\n"
        "sk-batch#0003 max_sessions=0\n"  # a '#' inside a key is part of it
        "\t# an indented comment\n",
    )
    ring = KeyRing(path=path, defaults=KeyLimits(max_sessions=2, audio_s_per_min=60))
    assert ring.configured and len(ring) == 3
    plain, acme, batch = (ring.identify(k) for k in ("sk-plain-0001", "sk-acme-0002", "sk-batch#0003"))
    assert plain is not None and plain.limits == KeyLimits(2, 60) and plain.label == f"key:{plain.id[:8]}"
    assert acme is not None and acme.limits == KeyLimits(4, 120) and acme.label == "acme"
    assert batch is not None and batch.limits == KeyLimits(0, 60), "an explicit 0 overrides the default: unlimited"
    assert ring.identify("sk-batch") is None and ring.identify("sk-acme-0002 ") is None and ring.identify(None) is None
    assert plain.id == keys.digest("sk-plain-0001").hex(), "a principal is named by its key's digest, never the key"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("sk-secret-one sk-secret-two", "expected options"),  # two keys on one line
        ("sk-secret-one colour=red", "expected options"),
        ("sk-secret-one max_sessions=-1", "max_sessions= needs a number"),
        ("sk-secret-one audio_s_per_min=nan", "audio_s_per_min= needs a number"),
        ("sk-secret-one max_sessions=", "max_sessions= needs a number"),
    ],
)
def test_a_bad_line_names_its_number_never_a_key(tmp_path: Path, line: str, problem: str) -> None:
    path = write(tmp_path / "keys", "sk-fine\n" + line + "\n")
    with pytest.raises(KeyFileError) as info:
        KeyRing(path=path)
    message = str(info.value)
    assert message.startswith("line 2:") and problem in message
    assert "secret" not in message and "red" not in message


def test_the_ring_holds_digests_only(tmp_path: Path) -> None:
    """Neither the ring nor anything it references (its usage table included) keeps a key."""
    secrets = ["sk-env-aaaa1111", "sk-file-bbbb2222", "sk-file-cccc3333"]
    path = write(tmp_path / "keys", f"{secrets[1]} name=b max_sessions=1\n{secrets[2]}\n")
    ring = KeyRing([secrets[0], " "], path=path)
    for secret in secrets:
        principal = ring.identify(secret)
        assert principal is not None
        access = ring.access(principal)
        assert isinstance(access, keys.Access)
    ring.reload()
    state = pickle.dumps(ring)  # every object reachable from the ring, serialised
    for secret in secrets:
        assert secret.encode() not in state and secret not in repr(vars(ring))
        assert keys.digest(secret) in state


def test_environment_and_file_keys_together(tmp_path: Path) -> None:
    path = write(tmp_path / "keys", "sk-both name=from-file max_sessions=9\nsk-file\n")
    ring = KeyRing(["sk-env", "sk-both"], path=path)
    assert len(ring) == 3
    both = ring.identify("sk-both")
    assert both is not None and both.label == "from-file" and both.limits.max_sessions == 9, "the file's options win"
    assert ring.identify("sk-env") is not None and ring.identify("sk-file") is not None


def test_without_keys_everyone_is_the_one_anonymous_client() -> None:
    ring = KeyRing(defaults=KeyLimits(max_sessions=1))
    assert not ring.configured
    assert ring.identify(None) is ring.anonymous and ring.identify("anything") is ring.anonymous
    first = ring.access(ring.anonymous)
    assert isinstance(first, keys.Access)
    second = ring.access(ring.anonymous)
    assert isinstance(second, keys.Refusal) and second.status == 429, "limits set by the operator bind anonymous clients as one"
    first.release()
    assert isinstance(ring.access(ring.anonymous), keys.Access)


def test_an_empty_keys_file_refuses_everyone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "keys", "# every key revoked\n")
    with caplog.at_level(logging.WARNING, logger="stream_server.keys"):
        ring = KeyRing(path=path)
    assert ring.configured and len(ring) == 0 and ring.identify("anything") is None
    assert "every request will be refused" in caplog.text


def test_a_missing_keys_file_stops_the_server_from_starting(tmp_path: Path) -> None:
    from stream_server.settings import Settings

    with pytest.raises(KeyFileError, match="cannot read"):
        KeyRing.from_settings(Settings(api_keys_file=str(tmp_path / "absent")))


def test_reload_adds_and_removes_and_a_broken_file_keeps_the_old_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path / "keys", "sk-old-1111\n")
    ring = KeyRing(["sk-env-9999"], path=path)
    old = ring.identify("sk-old-1111")
    assert old is not None
    with caplog.at_level(logging.INFO, logger="stream_server.keys"):
        write(path, "sk-new-2222 max_sessions=3\n")
        assert ring.reload()
        assert ring.identify("sk-old-1111") is None and ring.identify("sk-new-2222") is not None
        assert ring.identify("sk-env-9999") is not None, "keys from the environment survive a reload"
        assert ring.principal(old.id) is None, "a removed key's tokens stop working too"
        write(path, "sk-new-2222\nsk-typo-3333 max_sesions=2\n")
        assert not ring.reload()
        path.unlink()
        assert not ring.reload()
    new = ring.identify("sk-new-2222")
    assert new is not None and new.limits.max_sessions == 3, "a failed reload changes nothing"
    assert ring.identify("sk-typo-3333") is None
    assert "1 added, 1 removed" in caplog.text and "line 2: after the key" in caplog.text and "FileNotFoundError" in caplog.text
    for secret in ("sk-old-1111", "sk-new-2222", "sk-typo-3333", "sk-env-9999"):
        assert secret not in caplog.text


def test_the_session_limit_counts_live_sessions_per_key(tmp_path: Path) -> None:
    ring = KeyRing(path=write(tmp_path / "keys", "sk-a max_sessions=2\nsk-b\n"), defaults=KeyLimits(max_sessions=1))
    a, b = ring.identify("sk-a"), ring.identify("sk-b")
    assert a is not None and b is not None
    held = [ring.access(a), ring.access(a)]
    assert all(isinstance(x, keys.Access) for x in held)
    refused = ring.access(a)
    assert isinstance(refused, keys.Refusal)
    assert (refused.status, refused.close_code, refused.error.error.code) == (429, 1013, "rate_limited")
    assert refused.headers() == {"Retry-After": str(keys.RETRY_AFTER_S)} and "2 concurrent" in refused.error.error.message
    assert isinstance(ring.access(b), keys.Access), "another key has slots of its own"
    first = held[0]
    assert isinstance(first, keys.Access)
    first.release()
    first.release()  # idempotent: a slot goes back once
    assert ring.usage.sessions(a.id) == 1
    assert isinstance(ring.access(a), keys.Access)


def test_the_audio_meter_is_a_minute_of_allowance_refilled_continuously(tmp_path: Path) -> None:
    clock = Clock()
    ring = KeyRing(path=write(tmp_path / "keys", "sk-a audio_s_per_min=6\n"), clock=clock)
    a = ring.identify("sk-a")
    assert a is not None
    one, two = ring.access(a), ring.access(a)
    assert isinstance(one, keys.Access) and isinstance(two, keys.Access)
    for _ in range(5):
        assert one.audio_allowed()
        one.charge(1.0)
    assert two.audio_allowed(), "1 s left"
    two.charge(1.5)  # the message that crosses the allowance is accepted whole: 0.5 s of debt
    assert not one.audio_allowed() and not two.audio_allowed(), "one meter per key, shared by its sessions"
    clock.now += 5.0  # refills 6 s a minute = 0.1 s a second: 0.5 s of debt repaid, nothing more
    assert not one.audio_allowed()
    clock.now += 1.0
    assert one.audio_allowed()
    clock.now += 3600
    assert ring.usage.audio_left(a) == pytest.approx(6.0), "never more than a minute's allowance"
    error = one.spend_out()
    assert one.refused and error.error.code == "rate_limited" and "6 audio seconds per minute" in error.error.message


def test_a_late_key_is_checked_like_an_upgrades(tmp_path: Path) -> None:
    """Twilio's key arrives in ``start``: the same checks, answered with close codes."""
    ring = KeyRing(path=write(tmp_path / "keys", "sk-a max_sessions=1\n"))
    missing, unknown, good, full = (ring.pending_access() for _ in range(4))
    assert (r := asyncio.run(missing.identify(None))) is not None and (r.status, r.close_code) == (401, 1008) and missing.refused
    assert (r := asyncio.run(unknown.identify("sk-nope"))) is not None and (r.status, r.close_code) == (403, 1008)
    assert asyncio.run(good.identify("sk-a")) is None and good.principal is not None
    assert (r := asyncio.run(full.identify("sk-a"))) is not None and r.close_code == 1013
    good.release()
    assert ring.usage.sessions(good.principal.id) == 0


def test_tokens_remember_the_key_that_minted_them(tmp_path: Path) -> None:
    path = write(tmp_path / "keys", "sk-a\n")
    ring = KeyRing(path=path)
    store = tokens.TokenStore()
    owner = ring.identify("sk-a")
    assert owner is not None
    token, _ = store.issue("stream", owner=owner.id)
    grant = store.redeem(token, "stream")
    assert grant is not None and ring.principal(grant.owner) == owner
    write(path, "sk-b\n")
    ring.reload()
    assert ring.principal(grant.owner) is None
    assert ring.principal("not hex") is None and ring.principal(None) is None


def test_origin_allow_list() -> None:
    setting = " https://app.example.com/ , http://localhost:5173"
    assert keys.origin_allowed(setting, "https://app.example.com")
    assert keys.origin_allowed(setting, "HTTPS://APP.EXAMPLE.COM")
    assert keys.origin_allowed(setting, "http://localhost:5173")
    assert not keys.origin_allowed(setting, "https://evil.example.com")
    assert not keys.origin_allowed(setting, "http://localhost:5174")
    assert not keys.origin_allowed(setting, "null"), "a sandboxed or file:// page is refused unless listed"
    assert keys.origin_allowed(setting, None), "clients that are not browsers send no Origin"
    assert keys.origin_allowed("", "https://anything.example"), "empty: any origin"
    # The server's own pages (the captions app) come from the host the request was sent to.
    assert keys.origin_allowed(setting, "https://stt.example.com", "stt.example.com"), "behind a proxy's Host $host"
    assert keys.origin_allowed(setting, "http://127.0.0.1:8000", "127.0.0.1:8000")
    assert not keys.origin_allowed(setting, "http://127.0.0.1:8001", "127.0.0.1:8000")
    assert not keys.origin_allowed(setting, "https://stt.example.com.evil.example", "stt.example.com")
    assert not keys.origin_allowed(setting, "http://[::1", "[::1]:8000"), "malformed: refused, not a crash"
    assert not keys.origin_allowed(setting, "null", "stt.example.com")


# ------------------------------------------------------------------------------ a real server


def pcm16(samples: np.ndarray) -> bytes:
    return (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()


async def refusal(url: str, **kwargs: object) -> tuple[int, dict[str, str], dict]:
    """(status, headers, JSON body) of a refused upgrade."""
    with pytest.raises(InvalidStatus) as info:
        async with websockets.connect(url, **kwargs):  # type: ignore[arg-type]
            pass
    response = info.value.response
    return response.status_code, dict(response.headers), json.loads(response.body or b"{}")


async def first_event(url: str, key: str, **kwargs: object) -> dict:
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {key}"}, **kwargs) as ws:  # type: ignore[arg-type]
        return json.loads(await ws.recv())


def silent_call() -> calls.Call:
    """Half a second of μ-law silence on both legs: enough for Twilio's start, media and stop."""
    leg = b"\xff" * (calls.FRAME * 25)
    return calls.Call([], {"inbound": leg, "outbound": leg})


def server_log(server: ServerProcess) -> str:
    return server.log_path.read_text(encoding="utf-8").split("\n", 1)[1]  # after the launcher's "$ command" line


def wait_for_log(server: ServerProcess, text: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server_log(server).count(text) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count} time(s):\n{server.log_tail()}"
        time.sleep(0.05)


def test_sighup_reloads_the_keys_file_and_a_broken_file_keeps_the_old_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "keys", "sk-first-key-0001\n")
    server = start_server(tmp_path, "--api-keys-file", str(path), "--api-keys", "sk-env-key-0009")
    url = server.ws_url
    twilio = f"ws://127.0.0.1:{server.port}/v1/twilio"

    def hup(expected: str, count: int) -> None:
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)
        wait_for_log(server, expected, count)

    async def go() -> None:
        assert (await first_event(url, "sk-first-key-0001"))["type"] == "session.created"
        assert (await first_event(url, "sk-env-key-0009"))["type"] == "session.created"
        assert (await refusal(url, additional_headers={"Authorization": "Bearer sk-second-key-0002"}))[0] == 403
        # Twilio's key arrives after the upgrade, in start: checked against the same ring.
        assert (await calls.replay(twilio, silent_call(), parameters={"api_key": "sk-first-key-0001"})).close_code == 1000

        write(path, "sk-second-key-0002 name=second\n")
        await asyncio.to_thread(hup, "API keys reloaded", 1)
        assert (await first_event(url, "sk-second-key-0002"))["type"] == "session.created", "an added key works at once"
        status, _, body = await refusal(url, additional_headers={"Authorization": "Bearer sk-first-key-0001"})
        assert status == 403 and body["error"]["code"] == "invalid_api_key", "a removed key is refused at once"
        assert (await first_event(url, "sk-env-key-0009"))["type"] == "session.created", "the environment's key stays"
        removed = await calls.replay(twilio, silent_call(), parameters={"api_key": "sk-first-key-0001"})
        assert removed.close_code == 1008 and removed.received == []
        assert (await calls.replay(twilio, silent_call(), parameters={"api_key": "sk-second-key-0002"})).close_code == 1000

        write(path, "sk-second-key-0002\nsk-third-key-0003 max_sessions=two\n")  # a typo
        await asyncio.to_thread(hup, "API keys not reloaded", 1)
        path.unlink()
        await asyncio.to_thread(hup, "API keys not reloaded", 2)
        assert (await first_event(url, "sk-second-key-0002"))["type"] == "session.created", "broken or missing: old keys stay"
        assert (await refusal(url, additional_headers={"Authorization": "Bearer sk-third-key-0003"}))[0] == 403

    try:
        asyncio.run(go())
        # The HTTP API reads the same ring: the reloaded key mints a browser token, the removed one cannot.
        minted = httpx.post(server.http_url + "/v1/realtime/client_secrets", headers={"Authorization": "Bearer sk-second-key-0002"})
        assert minted.status_code == 200
        assert httpx.post(server.http_url + "/v1/realtime/client_secrets", headers={"Authorization": "Bearer sk-first-key-0001"}).status_code == 401
        assert server.process is not None and server.process.poll() is None, "SIGHUP must not stop the server"
    finally:
        server.stop()
    log = server_log(server)
    assert "line 2: max_sessions= needs a number" in log and "FileNotFoundError" in log
    for secret in ("sk-first-key-0001", "sk-second-key-0002", "sk-third-key-0003", "sk-env-key-0009", minted.json()["value"]):
        assert secret not in log


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the limits and origins: ``sk-two`` may hold 2 sessions, every other key 1
    (the server-wide default), ``sk-web`` any number, ``sk-audio`` 6 audio seconds a minute."""
    folder = tmp_path_factory.mktemp("limits")
    path = write(folder / "keys", "sk-two max_sessions=2 name=two\nsk-one\nsk-web max_sessions=0\nsk-audio max_sessions=3 audio_s_per_min=6\n")
    server = start_server(
        folder, "--api-keys-file", str(path), "--key-max-sessions", "1", "--allowed-origins", "https://app.example.com"
    )
    try:
        yield server
    finally:
        server.stop()


def test_a_keys_concurrent_sessions_are_limited(limited: ServerProcess) -> None:
    url = limited.ws_url
    twilio = f"ws://127.0.0.1:{limited.port}/v1/twilio"

    def key(name: str) -> dict[str, dict[str, str]]:
        return {"additional_headers": {"Authorization": f"Bearer {name}"}}

    async def go() -> None:
        a1 = await websockets.connect(url, **key("sk-two"))
        a2 = await websockets.connect(url, **key("sk-two"))
        one = await websockets.connect(url, **key("sk-one"))
        for ws in (a1, a2, one):
            assert json.loads(await ws.recv())["type"] == "session.created"
        status, headers, body = await refusal(url, **key("sk-two"))
        assert status == 429 and headers.get("retry-after") == str(keys.RETRY_AFTER_S)
        assert body["error"]["code"] == "rate_limited" and "limit of 2 concurrent" in body["error"]["message"]
        assert (await refusal(url.replace("/v1/stream", "/v1/listen"), additional_headers={"Authorization": "Token sk-one"}))[0] == 429
        # Twilio learns its key after the upgrade: the same limit, told by close code 1013.
        assert (await calls.replay(twilio, silent_call(), parameters={"api_key": "sk-one"})).close_code == 1013
        # A browser token counts against the key that minted it.
        minted = await asyncio.to_thread(
            httpx.post, limited.http_url + "/v1/realtime/client_secrets", headers={"Authorization": "Bearer sk-one"}
        )
        token = minted.json()["value"]
        assert (await refusal(url, subprotocols=["stream-server", f"stream-server.token.{token}"]))[0] == 429
        await a1.close()
        await one.close()
        a3 = await once_free(lambda: websockets.connect(url, **key("sk-two")))
        assert json.loads(await a3.recv())["type"] == "session.created", "a closed session's slot goes back"
        via_token = await once_free(lambda: mint_and_connect("sk-one"))
        assert json.loads(await via_token.recv())["type"] == "session.created"
        await asyncio.gather(a2.close(), a3.close(), via_token.close())

    async def once_free(connect: Callable[[], Awaitable[ClientConnection]]) -> ClientConnection:
        """Connect as soon as the server has counted a closed session out (it lets a closing
        session's last messages leave first, up to half a second)."""
        deadline = time.monotonic() + 5
        while True:
            try:
                return await connect()
            except InvalidStatus as refused:
                assert refused.response.status_code == 429 and time.monotonic() < deadline
                await asyncio.sleep(0.1)

    async def mint_and_connect(name: str) -> ClientConnection:
        token = await mint(name)
        return await websockets.connect(url, subprotocols=["stream-server", f"stream-server.token.{token}"])  # type: ignore[list-item]

    async def mint(name: str) -> str:
        answer = await asyncio.to_thread(
            httpx.post, limited.http_url + "/v1/realtime/client_secrets", headers={"Authorization": f"Bearer {name}"}
        )
        return str(answer.json()["value"])

    asyncio.run(go())


def test_browser_origins_are_checked_before_the_upgrade(limited: ServerProcess) -> None:
    url = limited.ws_url
    auth = {"Authorization": "Bearer sk-web"}

    async def go() -> None:
        assert (await first_event(url, "sk-web", origin="https://app.example.com"))["type"] == "session.created"
        status, _, body = await refusal(url, additional_headers=auth, origin="https://evil.example.com")
        assert status == 403 and body["error"]["code"] == "origin_not_allowed"
        assert (await refusal(url, origin="https://evil.example.com"))[0] == 403, "refused before the key is even read"
        assert (await first_event(url, "sk-web"))["type"] == "session.created", "no Origin: not a browser, allowed"
        own = f"http://127.0.0.1:{limited.port}"  # the captions page the server serves itself
        assert (await first_event(url, "sk-web", origin=own))["type"] == "session.created"
        realtime = url.replace("/v1/stream", "/v1/realtime?intent=transcription")
        assert (await refusal(realtime, subprotocols=["realtime", "openai-insecure-api-key.sk-web"], origin="https://evil.example.com"))[0] == 403

    asyncio.run(go())


def test_the_audio_allowance_finalizes_what_was_accepted_then_closes_1008(limited: ServerProcess) -> None:
    """6 s a minute, real speech streamed at ~10x real time: the first clip (5.1 s) fits, the
    allowance runs out in the 2 s of silence after it, and the second clip is refused. The client gets the first clip's finals and ``done``, then ``rate_limited``,
    then close 1008; a second session of the same key is cut off at once (one meter per key)."""
    first, second = "ljspeech_LJ001-0004", "ljspeech_LJ001-0001"
    audio = np.concatenate([load_clip(first), np.zeros(32000, np.float32), load_clip(second)])
    chunk = 1600  # 100 ms

    async def stream(samples: np.ndarray) -> tuple[list[dict], int | None, str]:
        async with websockets.connect(limited.ws_url, additional_headers={"Authorization": "Bearer sk-audio"}) as ws:
            events: list[dict] = []

            async def send() -> None:
                try:
                    for i in range(0, len(samples), chunk):
                        await ws.send(pcm16(samples[i : i + chunk]))
                        await asyncio.sleep(0.01)
                    await ws.send(json.dumps({"type": "session.close"}))
                except websockets.ConnectionClosed:
                    pass

            sender = asyncio.create_task(send())
            with contextlib.suppress(websockets.ConnectionClosedError):  # raised for any close but 1000/1001
                async for message in ws:
                    events.append(json.loads(message))
            sender.cancel()
            return events, ws.close_code, ws.close_reason

    events, code, reason = asyncio.run(stream(audio))
    kinds = [e["type"] for e in events]
    assert code == 1008 and reason == "audio rate limit exceeded", (code, reason, kinds)
    assert kinds[-2:] == ["transcript.text.done", "error"], kinds
    error = events[-1]["error"]
    assert error["code"] == "rate_limited" and "6 audio seconds per minute" in error["message"]
    finals = [e for e in events if e["type"] == "transcript.segment"]
    heard = " ".join(e["text"] for e in finals)
    assert wer([manifest()[first]["text"]], [heard]) < 0.3, heard  # the accepted clip, transcribed
    assert "printing" not in normalize(heard), "the refused clip's speech never reached the decoder"
    usage_s = float(events[-2]["usage"]["seconds"])
    # 6 s, plus what refilled while streaming (0.1 s a second) and the message that crossed it.
    assert 5.9 <= usage_s <= 7.0, usage_s

    events, code, _ = asyncio.run(stream(load_clip(second)))
    assert code == 1008 and events[-1]["error"]["code"] == "rate_limited"
    assert float(events[-2]["usage"]["seconds"]) < 1.0, "the key's meter is shared by its sessions"
