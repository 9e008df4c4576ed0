"""The protocol loop: one WebSocket session that streams a source and collects events.

Sequence (protocol.md):

1. connect to ``ws://HOST:PORT/v1/stream``;
2. send ``session.update`` (interim results on, the language if given, the source's sample rate
   when it is not 16 kHz, its channel count and labels when it has several channels) before any
   audio, so that every frame is read with the right settings;
3. send the source's frames as binary WebSocket frames while a receiver task hands every event to
   ``on_event``;
4. when the source ends (end of file, or :meth:`StreamClient.request_stop` after Ctrl-C) send
   ``session.close``: the server finalizes every pending utterance, sends
   ``transcript.text.done`` and closes with code 1000;
5. wait for that close, then report what happened in a :class:`SessionResult`.

The loop knows nothing about terminals or files; the CLI plugs those in through ``on_event``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from mic_client.audio_source import SAMPLE_RATE, AudioSource

DEFAULT_URL = "ws://127.0.0.1:8000/v1/stream"

#: After ``session.close``, give up when the server has sent nothing for this long. It is an idle
#: limit, not a total one: flushing a long file sent with ``--speed 0`` can legitimately take
#: minutes, during which segments keep arriving.
DEFAULT_CLOSE_TIMEOUT_S = 120.0

#: Once ``transcript.text.done`` has arrived the server should close at once; if it does not, we
#: close ourselves after this long (nothing more is expected).
CLOSE_AFTER_DONE_S = 5.0

EventCallback = Callable[[dict[str, Any], float], None]


class ConnectError(Exception):
    """No session could be opened (refused, bad URL, handshake rejected, server busy)."""


@dataclass
class SessionResult:
    """What a finished session produced; the CLI turns it into an exit code."""

    done: dict[str, Any] | None = None
    close_code: int | None = None
    close_reason: str = ""
    errors: list[dict[str, Any]] = field(default_factory=list)
    segments: list[dict[str, Any]] = field(default_factory=list)
    events: int = 0
    close_sent: bool = False
    timed_out: bool = False
    audio_seconds_sent: float = 0.0
    #: The server's ``error`` refusing the settings (``--language``, ``--model``, ...): nothing
    #: was streamed, since the audio would have been read with settings the user did not ask for.
    refused: dict[str, Any] | None = None

    @property
    def complete(self) -> bool:
        """The server confirmed the whole transcript (``transcript.text.done`` arrived)."""
        return self.done is not None


def session_config(
    *,
    sample_rate: int = SAMPLE_RATE,
    language: str | None = None,
    model: str | None = None,
    interim_results: bool = True,
    channels: int = 1,
    channel_labels: list[str] | None = None,
    prompt: str | None = None,
    translate: bool = False,
) -> dict[str, Any]:
    """The ``session`` object of the first ``session.update``.

    Only fields that differ from the server's defaults are sent (plus ``interim_results``, which is
    what live captions need): a client that restates defaults would override a server operator's
    choices, e.g. its default model.
    """
    config: dict[str, Any] = {"interim_results": interim_results}
    if language:
        config["language"] = language
    if model:
        config["model"] = model
    if sample_rate != SAMPLE_RATE:
        config["sample_rate"] = sample_rate
    if channels != 1:
        config["channels"] = channels  # frames are interleaved: each channel is its own speaker
    if channel_labels:
        config["channel_labels"] = list(channel_labels)
    if prompt:
        config["prompt"] = prompt  # names and vocabulary the decoder should know
    if translate:
        config["task"] = "translate"  # English text of any speech (a multilingual model)
    return config


def describe_error(event: dict[str, Any]) -> str:
    """One line for stderr from an ``error`` event: code, message and the offending field."""
    info = event.get("error") or {}
    code = info.get("code") or "error"
    message = info.get("message") or "(no message)"
    param = info.get("param")
    kind = info.get("type")
    text = f"server error [{code}]: {message}"
    if param and str(param) not in message:
        text += f" (field: {param})"
    if kind == "server_error":
        text += " [server side]"
    return text


class StreamClient:
    """Streams one :class:`AudioSource` through one WebSocket session.

    ``source`` must already be started (so its sample rate is known and device errors surface
    before any connection is made). ``on_event`` is called for every event, in order, with the
    wall-clock time it was received; ``on_error`` additionally for ``error`` events; ``on_open``
    once the connection is up (so "streaming..." is only announced when it is true).
    ``channel_labels`` names the source's channels (echoed by the server as ``speaker``).
    """

    def __init__(
        self,
        url: str,
        source: AudioSource,
        *,
        language: str | None = None,
        model: str | None = None,
        channel_labels: list[str] | None = None,
        prompt: str | None = None,
        translate: bool = False,
        on_event: EventCallback | None = None,
        on_error: Callable[[dict[str, Any]], None] | None = None,
        on_open: Callable[[], None] | None = None,
        close_timeout: float = DEFAULT_CLOSE_TIMEOUT_S,
        open_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.source = source
        self.language = language
        self.model = model
        self.channel_labels = channel_labels
        self.prompt = prompt
        self.translate = translate
        self.on_event = on_event
        self.on_error = on_error
        self.on_open = on_open
        self.close_timeout = close_timeout
        self.open_timeout = open_timeout
        self.result = SessionResult()
        self._last_rx = time.monotonic()
        self._answered = asyncio.Event()  # the server answered the settings (updated or error)

    def request_stop(self) -> None:
        """Finish gracefully: stop the source; the loop then sends ``session.close``.

        Safe to call from a signal handler installed with ``loop.add_signal_handler``.
        """
        self.source.stop()

    async def run(self) -> SessionResult:
        """Run the whole session; raises :class:`ConnectError` when none could be opened."""
        ws = await self._connect()
        if self.on_open is not None:
            self.on_open()
        try:
            await self._session(ws)
        finally:
            # Sends a close frame if the server has not closed yet; bounded by close_timeout.
            await ws.close()
            self.result.close_code = ws.close_code
            self.result.close_reason = ws.close_reason or ""
        if self.result.close_code == 1013 and not self.result.complete:
            # server_busy: the session never started; to a user that is "could not connect".
            raise ConnectError(self._busy_message())
        return self.result

    # -- connection ------------------------------------------------------------------------------

    async def _connect(self) -> ClientConnection:
        try:
            return await connect(
                self.url,
                # Audio is incompressible noise to deflate; compressing it costs CPU on both ends.
                compression=None,
                # The server is trusted: transcript.text.done carries every token's logprob of the
                # session and outgrows the default 1 MiB limit in long sessions.
                max_size=None,
                open_timeout=self.open_timeout,
                close_timeout=5,
            )
        except InvalidURI as exc:
            raise ConnectError(f"invalid --url {self.url!r}: {exc}") from exc
        except InvalidStatus as exc:
            status = exc.response.status_code
            hint = " (is the path /v1/stream?)" if status == 404 else ""
            raise ConnectError(f"{self.url} refused the WebSocket upgrade with HTTP {status}{hint}") from exc
        except InvalidHandshake as exc:
            raise ConnectError(f"WebSocket handshake with {self.url} failed: {exc}") from exc
        except ConnectionRefusedError as exc:
            raise ConnectError(
                f"cannot connect to {self.url}: connection refused -- is stream-server running "
                "there? (start it with 'stream-server', or point --url at it)"
            ) from exc
        except socket.gaierror as exc:
            raise ConnectError(f"cannot connect to {self.url}: unknown host ({exc})") from exc
        except TimeoutError as exc:
            raise ConnectError(
                f"cannot connect to {self.url}: no answer within {self.open_timeout:g} s"
            ) from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self.url}: {exc.strerror or exc}") from exc

    def _busy_message(self) -> str:
        for event in self.result.errors:
            info = event.get("error") or {}
            if info.get("code") == "server_busy":
                return f"server at {self.url} is busy: {info.get('message', '')} (try again later)"
        return f"server at {self.url} is busy (close code 1013); try again later"

    # -- the session -----------------------------------------------------------------------------

    async def _session(self, ws: ClientConnection) -> None:
        receiver = asyncio.create_task(self._receive(ws), name="mic-client-receive")
        sender = asyncio.create_task(self._send(ws), name="mic-client-send")
        try:
            done, _ = await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if sender in done:
                sender.result()  # re-raise a source failure (e.g. the device vanished)
                if not receiver.done():
                    await self._close_session(ws)
                    await self._wait_for_close(receiver)
            else:
                # The server ended the session while we were still streaming (error, size limit,
                # idle timeout). Stop capturing; there is nobody to send to.
                self.source.stop()
            if receiver.done():
                receiver.result()
        finally:
            for task in (sender, receiver):
                if not task.done():
                    task.cancel()
            for task in (sender, receiver):
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _send(self, ws: ClientConnection) -> None:
        config = session_config(
            sample_rate=self.source.sample_rate,
            language=self.language,
            model=self.model,
            channels=self.source.channels,
            channel_labels=self.channel_labels,
            prompt=self.prompt,
            translate=self.translate,
        )
        bytes_per_second = self.source.sample_rate * 2 * self.source.channels
        try:
            await ws.send(json.dumps({"type": "session.update", "session": config}))
            # Audio waits for the answer (one round trip; the source buffers meanwhile): if the
            # settings are refused, audio sent at once would be transcribed with the old ones.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._answered.wait(), self.open_timeout)
            if self.result.refused is not None:
                self.source.stop()
                return
            async for frame in self.source:
                await ws.send(frame)
                self.result.audio_seconds_sent += len(frame) / bytes_per_second
        except ConnectionClosed:
            # The receiver sees the same close and reports it; nothing more to send.
            self.source.stop()

    async def _close_session(self, ws: ClientConnection) -> None:
        try:
            await ws.send(json.dumps({"type": "session.close"}))
            self.result.close_sent = True
        except ConnectionClosed:
            pass
        self._last_rx = time.monotonic()

    async def _wait_for_close(self, receiver: asyncio.Task[None]) -> None:
        """Wait for the server to finish, but not forever on a server that went silent."""
        while not receiver.done():
            limit = CLOSE_AFTER_DONE_S if self.result.complete else self.close_timeout
            remaining = limit - (time.monotonic() - self._last_rx)
            if remaining <= 0:
                self.result.timed_out = not self.result.complete
                return
            await asyncio.wait({receiver}, timeout=remaining)

    async def _receive(self, ws: ClientConnection) -> None:
        try:
            async for message in ws:
                received_at = time.time()
                self._last_rx = time.monotonic()
                if isinstance(message, bytes):
                    continue  # the protocol has no binary server frames; ignore, don't crash
                try:
                    event = json.loads(message)
                except json.JSONDecodeError:
                    continue
                if not isinstance(event, dict):
                    continue
                self._handle(event, received_at)
        except ConnectionClosed:
            pass  # an abnormal close; its code is read from the connection afterwards

    def _handle(self, event: dict[str, Any], received_at: float) -> None:
        self.result.events += 1
        kind = event.get("type")
        if kind == "transcript.segment":
            self.result.segments.append(event)
        elif kind == "transcript.text.done":
            self.result.done = event
        elif kind == "session.updated":
            self._answered.set()
        elif kind == "error":
            self.result.errors.append(event)
            param = str((event.get("error") or {}).get("param") or "")
            if not self._answered.is_set() and param.startswith("session"):
                self.result.refused = event
                self._answered.set()
        if self.on_event is not None:
            self.on_event(event, received_at)
        if kind == "error" and self.on_error is not None:
            self.on_error(event)
