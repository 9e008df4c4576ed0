"""API keys on the WebSocket endpoints, as each dialect's clients present them."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from tests.support import start_server


def test_keys_are_required_when_configured_and_each_dialect_reads_its_own_scheme(tmp_path: Path) -> None:
    srv = start_server(tmp_path, "--api-keys", "key-one, key-two")
    base = f"ws://127.0.0.1:{srv.port}"

    async def first_message(url: str, **kwargs: object) -> dict:
        async with websockets.connect(url, **kwargs) as ws:  # type: ignore[arg-type]
            return json.loads(await ws.recv())

    async def refused_status(url: str, **kwargs: object) -> int:
        with pytest.raises(InvalidStatus) as info:
            async with websockets.connect(url, **kwargs):  # type: ignore[arg-type]
                pass
        return info.value.response.status_code

    async def go() -> None:
        stream = base + "/v1/stream"
        assert await refused_status(stream) == 401
        assert await refused_status(stream, additional_headers={"Authorization": "Bearer wrong"}) == 403
        created = await first_message(stream, additional_headers={"Authorization": "Bearer key-two"})
        assert created["type"] == "session.created"
        realtime = base + "/v1/realtime?intent=transcription"
        assert await refused_status(realtime) == 401
        created = await first_message(realtime, subprotocols=["realtime", "openai-insecure-api-key.key-one"])
        assert created["type"] == "session.created"
        listen = base + "/v1/listen?encoding=linear16&sample_rate=16000"
        assert await refused_status(listen, additional_headers={"Authorization": "Token nope"}) == 403
        async with websockets.connect(listen, additional_headers={"Authorization": "Token key-one"}) as ws:
            await ws.send(json.dumps({"type": "CloseStream"}))
            messages = [json.loads(m) async for m in ws]
        assert messages[-1]["type"] == "Metadata"

    try:
        asyncio.run(go())
        server_output = srv.log_path.read_text().split("\n", 1)[1]  # after the launcher's "$ command" line
        assert "key-one" not in server_output and "key-two" not in server_output
    finally:
        srv.stop()


def test_the_http_api_requires_a_key_when_configured(tmp_path: Path) -> None:
    """The real openai SDK with the server's key transcribes; without one it gets 401, with a
    wrong one 403 (OpenAI's error shape either way). A key from ``--api-keys-file`` is as good
    as one from ``--api-keys``; a browser token works once, and not after its key is removed."""
    import httpx
    import openai

    from tests.support import english_references, load_clip

    row = english_references()[0]
    wav = tmp_path / "clip.wav"
    import soundfile

    soundfile.write(wav, load_clip(row["id"]), 16000, subtype="PCM_16")
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("file-key-three name=three\n")
    srv = start_server(tmp_path, "--api-keys", "key-one", "--api-keys-file", str(keys_file))
    minted: list[str] = []
    try:
        good = openai.OpenAI(base_url=srv.http_url + "/v1", api_key="key-one")
        with wav.open("rb") as f:
            assert good.audio.transcriptions.create(model="whisper-1", file=f).text.strip()
        from_file = httpx.post(srv.http_url + "/models/tiny.en", content=wav.read_bytes(),
                               headers={"Content-Type": "audio/wav", "Authorization": "Bearer file-key-three"})
        assert from_file.status_code == 200 and from_file.json()["text"].strip()
        minted += [httpx.post(srv.http_url + "/v1/realtime/client_secrets", headers={"Authorization": "Bearer file-key-three"}).json()["value"] for _ in range(2)]
        as_token = {"Content-Type": "audio/wav", "Authorization": f"Bearer {minted[0]}"}
        assert httpx.post(srv.http_url + "/models/tiny.en", content=wav.read_bytes(), headers=as_token).status_code == 200
        assert httpx.post(srv.http_url + "/models/tiny.en", content=wav.read_bytes(), headers=as_token).status_code == 403, "single use"
        keys_file.write_text("# file-key-three revoked\n")
        assert srv.process is not None
        srv.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "API keys reloaded" not in srv.log_path.read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        revoked = {"Content-Type": "audio/wav", "Authorization": f"Bearer {minted[1]}"}
        assert httpx.post(srv.http_url + "/models/tiny.en", content=wav.read_bytes(), headers=revoked).status_code == 403, "its key is gone"
        with wav.open("rb") as f:
            with pytest.raises(openai.PermissionDeniedError) as wrong:
                openai.OpenAI(base_url=srv.http_url + "/v1", api_key="nope").audio.transcriptions.create(model="whisper-1", file=f)
        assert wrong.value.status_code == 403
        missing = httpx.post(srv.http_url + "/v1/audio/transcriptions", files={"file": wav.read_bytes()}, data={"model": "whisper-1"})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        hf = httpx.post(srv.http_url + "/models/tiny.en", content=wav.read_bytes(), headers={"Content-Type": "audio/wav"})
        assert hf.status_code == 401
        # Deepgram's pre-recorded route reads the SDK's `Token <key>` and answers as Deepgram does.
        listen = srv.http_url + "/v1/listen?model=nova-3"
        dg = httpx.post(listen, content=wav.read_bytes(), headers={"Content-Type": "audio/wav", "Authorization": "Token key-one"}, timeout=60)
        assert dg.status_code == 200 and dg.json()["results"]["channels"][0]["alternatives"][0]["transcript"].strip()
        for headers in ({}, {"Authorization": "Token nope"}):
            refused = httpx.post(listen, content=wav.read_bytes(), headers={"Content-Type": "audio/wav", **headers})
            assert refused.status_code == 401 and refused.json()["err_code"] == "INVALID_AUTH", refused.text
    finally:
        srv.stop()
    server_output = srv.log_path.read_text().split("\n", 1)[1]
    assert not [secret for secret in ["key-one", "file-key-three", *minted] if secret in server_output]
