"""Deepgram's pre-recorded API with a URL instead of the audio, and with a callback, through the
real ``deepgram-sdk``: ``transcribe_url`` against a real local file server, ``callback=`` against a
real local receiver (``request_urls.py``, ``http/remote_audio.py``, ``callbacks.py``).

The server under test is started with ``--request-urls any`` (the file server and the receiver
are on loopback); the default policy, public addresses only, is checked on its own below and in
``test_deepgram_e2e.py``.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import threading
import time
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from deepgram.types.listen_v1response import ListenV1Response

from stream_server.callbacks import Callback, CallbackJobs
from stream_server.http.remote_audio import fetch_audio
from stream_server.request_urls import UrlPolicy, UrlRefused, is_public
from stream_server.webhooks import SIGNATURE_HEADER, verify
from tests.http_api_support import write_wav
from tests.local_services import Receiver
from tests.support import ServerProcess, english_references, free_port, load_clip, require_speech, start_server, wer
from tests.test_deepgram_e2e import environment

KEY = "callback-test-key"
KEY_NAME = "stored-calls"
SECRET = "callback-secret"
CLIP = "arctic_slt_arctic_a0003"
MAX_FILE_BYTES = 2_000_000


# --------------------------------------------------------------------------------------------
# Real local services: a file server (with a redirect) and a callback receiver
# --------------------------------------------------------------------------------------------


class FileServer:
    """``http.server`` serving ``folder``; ``/moved/NAME`` answers 302 to ``/NAME``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.startswith("/moved/"):
                    self.send_response(302)
                    self.send_header("Location", self.path.removeprefix("/moved"))
                    self.end_headers()
                    return
                super().do_GET()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), functools.partial(Handler, directory=str(folder)))
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def delivery(receiver: Receiver, request_id: str, timeout: float = 60.0) -> tuple[str, dict[str, str], dict[str, Any]]:
    """The callback whose ``dg-request-id`` is ``request_id``: method, headers, body."""
    receiver.wait_for(lambda _: any(h.get("dg-request-id") == request_id for _, h, _ in receiver.requests), timeout)
    with receiver.lock:
        [(method, headers, body)] = [r for r in receiver.requests if r[1].get("dg-request-id") == request_id]
    return method, headers, json.loads(body)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FileServer]:
    require_speech()
    folder = tmp_path_factory.mktemp("files")
    write_wav(load_clip(CLIP), folder / "clip.wav")
    (folder / "empty.wav").write_bytes(b"")
    (folder / "large.bin").write_bytes(b"\0" * (MAX_FILE_BYTES + 1))
    server = FileServer(folder)
    yield server
    server.close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    rx = Receiver(fail_first=1, path="/deepgram/results")
    yield rx
    rx.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_speech()
    srv = start_server(
        tmp_path_factory.mktemp("deepgram-callbacks"),
        "--request-urls", "any",
        "--api-keys", f"{KEY}",
        "--callback-retry-s", "0.3",
        "--max-file-bytes", str(MAX_FILE_BYTES),
        "--webhook-secret", SECRET,
    )
    yield srv
    srv.stop()


def client(server: ServerProcess) -> Any:
    from deepgram import DeepgramClient

    return DeepgramClient(api_key=KEY, environment=environment(server))


def reference() -> str:
    return next(r["text"] for r in english_references() if r["id"] == CLIP)


# --------------------------------------------------------------------------------------------
# The policy on its own
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.9", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata services
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),  # IPv4-mapped loopback
        ("::ffff:8.8.8.8", True),
        ("224.0.0.1", False),
    ],
)
def test_which_addresses_are_public(address: str, public: bool) -> None:
    assert is_public(address) is public


async def _resolves_to(address: str, host: str, port: int) -> list[str]:
    return [address]


def test_the_policy_refuses_by_form_and_by_address() -> None:
    public = UrlPolicy("public", resolve=functools.partial(_resolves_to, "10.0.0.5"))
    for url in ("ftp://example.com/a.wav", "file:///etc/passwd", "http:///nohost", "not a url"):
        with pytest.raises(UrlRefused) as caught:
            public.parse(url, "audio")
        assert caught.value.status == 400 and "http" in caught.value.message
    with pytest.raises(UrlRefused) as caught:
        asyncio.run(public.check_host(public.parse("https://storage.internal/a.wav", "audio")))
    assert "10.0.0.5" in caught.value.message and "--request-urls any" in caught.value.message
    asyncio.run(UrlPolicy("public", resolve=functools.partial(_resolves_to, "93.184.215.14")).check_host(public.parse("https://example.com/a.wav", "audio")))
    asyncio.run(UrlPolicy("any", resolve=functools.partial(_resolves_to, "10.0.0.5")).check_host(public.parse("https://storage.internal/a.wav", "audio")))
    with pytest.raises(UrlRefused) as caught:
        UrlPolicy("off").parse("https://example.com/a.wav", "audio")
    assert "--request-urls off" in caught.value.message


def test_a_name_that_resolves_differently_the_second_time_gets_nothing(files: FileServer) -> None:
    """DNS rebinding: the check before the request saw a public address, the connection reached
    loopback. The connection's own address is checked before any of the body is read."""
    rebinding = UrlPolicy("public", resolve=functools.partial(_resolves_to, "93.184.215.14"))
    with pytest.raises(UrlRefused) as caught:
        asyncio.run(fetch_audio(files.url("clip.wav"), rebinding, max_bytes=MAX_FILE_BYTES, total_s=10))
    assert "127.0.0.1" in caught.value.message and "not a public address" in caught.value.message
    spool = asyncio.run(fetch_audio(files.url("moved/clip.wav"), UrlPolicy("any"), max_bytes=MAX_FILE_BYTES, total_s=10))
    assert spool.read() == (files.folder / "clip.wav").read_bytes()  # its sha256 in the response: the SDK test below


def test_a_delivery_is_retried_then_given_up_and_a_shutdown_cancels_what_is_left() -> None:
    receiver = Receiver(fail_first=1000)
    jobs = CallbackJobs(UrlPolicy("any"), retries=2, retry_s=0.01, max_pending=2)
    started = asyncio.Event()

    async def answer() -> tuple[int, dict[str, Any]]:
        return 200, {"metadata": {"request_id": "r1"}}

    async def never() -> tuple[int, dict[str, Any]]:
        started.set()
        await asyncio.sleep(3600)
        raise AssertionError("cancelled before")

    async def run() -> None:
        callback = Callback(UrlPolicy("any").parse(receiver.url, "callback"))
        jobs.start("r1", callback, answer)
        jobs.start("r2", callback, never)
        assert jobs.full, "two jobs held: a third request would be refused (429)"
        await started.wait()
        while jobs.pending > 1:
            await asyncio.sleep(0.01)
        assert not jobs.full
        assert (jobs.delivered, jobs.failed) == (0, 1)
        await jobs.close(grace_s=0.05)
        assert jobs.pending == 0

    try:
        asyncio.run(run())
        assert receiver.failures_left == 1000 - 3, "the first attempt and two retries"
    finally:
        receiver.close()


# --------------------------------------------------------------------------------------------
# Through the SDK
# --------------------------------------------------------------------------------------------


def test_transcribe_url_fetches_the_audio_and_follows_a_redirect(server: ServerProcess, files: FileServer) -> None:
    for path in ("clip.wav", "moved/clip.wav"):
        response = client(server).listen.v1.media.transcribe_url(url=files.url(path), model="nova-3", smart_format=True)
        assert isinstance(response, ListenV1Response)
        transcript = response.results.channels[0].alternatives[0].transcript
        assert wer([reference()], [transcript]) <= 0.2, transcript
        assert response.metadata.sha256 == hashlib.sha256((files.folder / "clip.wav").read_bytes()).hexdigest()


def test_a_url_that_cannot_be_had_is_refused_in_deepgrams_shape(server: ServerProcess, files: FileServer) -> None:
    from deepgram.core.api_error import ApiError as DeepgramApiError

    cases = (
        (files.url("missing.wav"), 400, "REMOTE_CONTENT_ERROR", "404"),
        (files.url("empty.wav"), 400, "REMOTE_CONTENT_ERROR", "no content"),
        (files.url("large.bin"), 413, "PAYLOAD_TOO_LARGE", "limit"),
        (f"http://127.0.0.1:{free_port()}/closed.wav", 400, "REMOTE_CONTENT_ERROR", "could not fetch"),
        ("ftp://127.0.0.1/clip.wav", 400, "Bad Request", "http:// or https://"),
    )
    for url, status, code, needle in cases:
        with pytest.raises(DeepgramApiError) as caught:
            client(server).listen.v1.media.transcribe_url(url=url, model="nova-3")
        body = caught.value.body
        assert caught.value.status_code == status and body["err_code"] == code and needle in body["err_msg"], (url, body)
    headers = {"Authorization": f"Token {KEY}"}
    listen = server.http_url + "/v1/listen"
    for content, needle in ((b"{not json", "not valid JSON"), (b'{"uri": "x"}', '{"url"'), (b'["http://a"]', '{"url"')):
        resp = httpx.post(listen, content=content, headers={**headers, "Content-Type": "application/json"}, timeout=10)
        assert resp.status_code == 400 and needle in resp.json()["err_msg"], resp.text
    resp = httpx.post(listen, params={"callback": "http://127.0.0.1:9/x", "callback_method": "get"}, content=b"x", headers=headers, timeout=10)
    assert resp.status_code == 400 and "callback_method" in resp.json()["err_msg"], resp.text


def test_a_callback_request_is_answered_at_once_and_its_result_put_at_the_callback(
    server: ServerProcess, files: FileServer, receiver: Receiver
) -> None:
    """The SDK's ``transcribe_file`` with ``callback`` and ``callback_method=put``: the answer is
    the ``request_id`` alone; the receiver's first answer is 503, so the result comes on the retry,
    with ``dg-token`` (the key's name) and the webhook signature."""
    audio = (files.folder / "clip.wav").read_bytes()
    started = time.monotonic()
    with_credentials = receiver.url.replace("http://", "http://dg:s3cret@")  # Deepgram's basic-auth callbacks
    accepted = client(server).listen.v1.media.transcribe_file(
        request=audio, model="nova-3", punctuate=True, callback=with_credentials, callback_method="PUT", extra=["call:4711", "queue:billing"]
    )
    answered_s = time.monotonic() - started
    assert type(accepted).__name__ == "ListenV1AcceptedResponse" and accepted.request_id, accepted
    method, headers, body = delivery(receiver, accepted.request_id)
    assert method == "PUT" and headers["dg-token"] == f"key:{hashlib.sha256(KEY.encode()).hexdigest()[:8]}"
    assert headers["authorization"] == "Basic " + base64.b64encode(b"dg:s3cret").decode()
    assert "s3cret" not in server.log_path.read_text(), "the access log hides the callback's password"
    assert verify(SECRET, json.dumps(body, ensure_ascii=False).encode(), headers[SIGNATURE_HEADER.lower()])
    assert body["metadata"]["request_id"] == accepted.request_id
    assert body["metadata"]["extra"] == {"call": "4711", "queue": "billing"}, "the receiver tells its calls apart"
    ListenV1Response.model_validate(body)  # as the SDK reads its own response
    transcript = body["results"]["channels"][0]["alternatives"][0]["transcript"]
    assert wer([reference()], [transcript]) <= 0.2, transcript
    print(f"callback: answered in {answered_s:.2f} s; result delivered on the retry")


def test_a_callback_for_a_url_that_fails_delivers_the_error(server: ServerProcess, files: FileServer, receiver: Receiver) -> None:
    accepted = client(server).listen.v1.media.transcribe_url(url=files.url("missing.wav"), model="nova-3", callback=receiver.url)
    method, _, body = delivery(receiver, accepted.request_id)
    assert method == "POST"
    assert body["err_code"] == "REMOTE_CONTENT_ERROR" and "404" in body["err_msg"] and body["request_id"] == accepted.request_id


def test_a_shutdown_delivers_the_callbacks_it_has_taken(tmp_path: Path, files: FileServer) -> None:
    """SIGTERM right after a callback request was answered: the drain waits for the job, so the
    receiver gets the result before the server exits."""
    receiver = Receiver()
    srv = start_server(tmp_path, "--request-urls", "any")
    try:
        resp = httpx.post(
            srv.http_url + "/v1/listen",
            params={"callback": receiver.url, "model": "nova-3"},
            content=(files.folder / "clip.wav").read_bytes(),
            headers={"Content-Type": "audio/wav"},
            timeout=10,
        )
        assert resp.status_code == 200, resp.text
        request_id = resp.json()["request_id"]
        srv.stop()
        _, headers, body = delivery(receiver, request_id, timeout=1.0)
        assert "dg-token" not in headers, "no keys: no key to name"
        assert wer([reference()], [body["results"]["channels"][0]["alternatives"][0]["transcript"]]) <= 0.2
    finally:
        srv.stop()
        receiver.close()


def test_by_default_requests_reach_only_public_addresses(tmp_path: Path, files: FileServer, receiver: Receiver) -> None:
    srv = start_server(tmp_path)
    try:
        listen = srv.http_url + "/v1/listen"
        resp = httpx.post(listen, json={"url": files.url("clip.wav")}, timeout=10)
        assert resp.status_code == 400 and "--request-urls any" in resp.json()["err_msg"], resp.text
        resp = httpx.post(listen, params={"callback": receiver.url}, content=b"RIFF", timeout=10)
        assert resp.status_code == 400 and "not a public address" in resp.json()["err_msg"], resp.text
    finally:
        srv.stop()
