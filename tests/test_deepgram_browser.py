"""A browser's own Deepgram client, in real Chromium: ``getUserMedia`` → ``MediaRecorder`` (WebM/Opus,
a blob every 250 ms) → ``new WebSocket(".../v1/listen", ["token", key])``, as Deepgram's browser
guides write it, with no ``encoding``: the server decodes the WebM stream as it arrives.

Chromium's fake microphone plays real speech (``--use-file-for-fake-audio-capture``); the page is
any page of the server's origin (``/healthz``: a secure context, so the microphone is allowed).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import ServerProcess, require_speech, start_server, wer
from tests.test_web_app import CHROMIUM, concatenated, launch, playwright  # playwright: the web app's fixture

__all__ = ["playwright"]

pytestmark = pytest.mark.slow

CLIPS = ["ljspeech_LJ001-0001", "ljspeech_LJ001-0014"]

#: The page's client: what a web developer writes from Deepgram's browser examples.
CLIENT = """
async ([url, key]) => {
  const log = window.deepgramLog = {messages: [], closed: null, sentBytes: 0, mime: null, start: performance.now()};
  const stream = await navigator.mediaDevices.getUserMedia({audio: true});
  const recorder = new MediaRecorder(stream, {mimeType: "audio/webm;codecs=opus"});
  log.mime = recorder.mimeType;
  const socket = new WebSocket(url, ["token", key]);
  socket.onmessage = (event) => log.messages.push({at: (performance.now() - log.start) / 1000, ...JSON.parse(event.data)});
  socket.onclose = (event) => { log.closed = {code: event.code, reason: event.reason}; };
  await new Promise((resolve, reject) => { socket.onopen = resolve; socket.onerror = reject; });
  recorder.ondataavailable = (event) => {
    if (event.data.size > 0 && socket.readyState === WebSocket.OPEN) { log.sentBytes += event.data.size; socket.send(event.data); }
  };
  recorder.onstop = () => setTimeout(() => socket.send(JSON.stringify({type: "CloseStream"})), 100);
  recorder.start(250);
  window.stopRecording = () => recorder.stop();
}
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_speech()
    srv = start_server(tmp_path_factory.mktemp("deepgram-browser"), timeout=180)
    yield srv
    srv.stop()


def test_a_browsers_mediarecorder_stream_is_transcribed_live(playwright: Any, server: ServerProcess, tmp_path: Path) -> None:
    assert CHROMIUM.is_file()
    wav, reference, duration = concatenated(tmp_path / "speech.wav", CLIPS)
    browser = launch(playwright, wav)
    try:
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{server.http_url}/healthz")
        url = f"{server.ws_url.rsplit('/v1/', 1)[0]}/v1/listen?model=nova-3&interim_results=true&smart_format=true"
        page.evaluate(CLIENT, [url, "browser-key"])
        time.sleep(duration + 0.5)
        live = page.evaluate("window.deepgramLog.messages.filter(m => m.type === 'Results' && m.is_final).length")
        page.evaluate("window.stopRecording()")
        deadline = time.monotonic() + 30
        while page.evaluate("window.deepgramLog.closed") is None and time.monotonic() < deadline:
            time.sleep(0.2)
        log: dict[str, Any] = page.evaluate("window.deepgramLog")
    finally:
        browser.close()
    assert not errors, errors
    assert log["mime"].startswith("audio/webm"), log["mime"]
    assert log["closed"]["code"] == 1000, log["closed"]
    messages = log["messages"]
    assert not [m for m in messages if m["type"] == "Error"], messages
    text = " ".join(m["channel"]["alternatives"][0]["transcript"] for m in messages if m["type"] == "Results" and m["is_final"]).strip()
    error = wer([reference], [text])
    print(f"MediaRecorder WebM/Opus, {log['sentBytes']} bytes: WER {error:.3f}: {text}")
    assert error <= 0.15, (text, reference)
    assert live >= 2, "finals came while the browser was still recording"
    assert any(m["type"] == "Results" and not m["is_final"] for m in messages), "interim results"
    [metadata] = [m for m in messages if m["type"] == "Metadata"]
    assert metadata["duration"] == pytest.approx(duration, abs=1.5), json.dumps(metadata)
