"""Requests answered later, at a callback URL (Deepgram's ``callback=``): run in the background.

A contact center sends its stored calls by the thousand and does not hold a connection open for
each one: with ``callback=URL`` the request is answered at once with its ``request_id``, the
transcription runs as any file's does, and its response (or its error, in the same shape the
request would have been answered with) is sent to the URL: ``POST``, or ``PUT`` with
``callback_method=put``. As Deepgram does, a delivery that fails (a network error or a status
outside 2xx) is tried again, ``--callback-retries`` times ``--callback-retry-s`` apart, and the
request carries ``dg-token`` (the API key's name, when the server has keys) so the receiver knows
whose it is; with ``--webhook-secret`` it is also signed as the webhooks are
(``X-Stream-Server-Signature``). Which URLs may be named is ``--request-urls``' choice, checked
again before each attempt. The jobs are tasks on the event loop: a shutdown's drain waits for
them like for open sessions (:meth:`CallbackJobs.close`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from stream_server.request_urls import UrlPolicy, UrlRefused
from stream_server.webhooks import SIGNATURE_HEADER, sign

log = logging.getLogger(__name__)

METHODS = ("POST", "PUT")
#: Jobs held at once (each holds its upload, up to ``--max-file-bytes``, until it is transcribed);
#: more are refused with 429, as Deepgram refuses requests over its concurrency limit.
MAX_PENDING = 100
#: Makes a job's result: the HTTP status the request would have been answered with, and its body.
Producer = Callable[[], Awaitable[tuple[int, dict[str, Any]]]]


@dataclasses.dataclass(frozen=True)
class Callback:
    """Where and how one job's result goes."""

    url: httpx.URL
    method: str = "POST"
    token: str | None = None  # ``dg-token``: the requesting key's name (None: no keys)


class CallbackJobs:
    """The server's background jobs with a callback; one per server (``Engine.callbacks``)."""

    def __init__(
        self, policy: UrlPolicy, *, retries: int = 10, retry_s: float = 30.0, secret: str = "", max_pending: int = MAX_PENDING
    ) -> None:
        self.policy = policy
        self.max_pending = max_pending
        self.retries = max(0, retries)
        self.retry_s = retry_s
        self.secret = secret
        self._tasks: set[asyncio.Task[None]] = set()
        self.delivered = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        """Jobs not yet delivered or given up (running, or waiting to retry)."""
        return len(self._tasks)

    @property
    def full(self) -> bool:
        """Whether a new job would be one too many (the request is refused instead)."""
        return self.pending >= self.max_pending

    def start(self, request_id: str, callback: Callback, produce: Producer) -> None:
        """Run ``produce`` in the background, then deliver what it made to ``callback``."""
        task = asyncio.get_running_loop().create_task(self._run(request_id, callback, produce), name=f"callback-{request_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, request_id: str, callback: Callback, produce: Producer) -> None:
        try:
            status, body = await produce()
        except Exception:  # a bug, not bad input: the receiver still hears of the request
            log.exception("callback %s: the transcription failed", request_id)
            status, body = 500, {"err_code": "INTERNAL_SERVER_ERROR", "err_msg": "the transcription failed", "request_id": request_id}
        log.info("callback %s: result ready (status %d); delivering to %s", request_id, status, callback.url.host)
        if await self._deliver(request_id, callback, json.dumps(body, ensure_ascii=False).encode()):
            self.delivered += 1
        else:
            self.failed += 1

    async def _deliver(self, request_id: str, callback: Callback, body: bytes) -> bool:
        """Send ``body``, trying again after failures; False when it was given up."""
        headers = {"Content-Type": "application/json", "User-Agent": "stream-server-callbacks/1", "dg-request-id": request_id}
        if callback.token:
            headers["dg-token"] = callback.token
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, body)
        async with self.policy.client() as client:
            for attempt in range(1, self.retries + 2):
                outcome = await self._attempt(client, callback, body, headers)
                if outcome is None:
                    log.info("callback %s: delivered (attempt %d)", request_id, attempt)
                    return True
                if attempt > self.retries:
                    log.warning("callback %s: gave up after %d attempt(s): %s", request_id, attempt, outcome)
                    return False
                log.info("callback %s: attempt %d failed (%s); again in %g s", request_id, attempt, outcome, self.retry_s)
                await asyncio.sleep(self.retry_s)
        return False

    async def _attempt(self, client: httpx.AsyncClient, callback: Callback, body: bytes, headers: dict[str, str]) -> str | None:
        """One request: None on 2xx, else what went wrong."""
        try:
            await self.policy.check_host(callback.url)
            response = await client.request(callback.method, callback.url, content=body, headers=headers)
        except UrlRefused as exc:
            return exc.message
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if 200 <= response.status_code < 300:
            return None
        return f"HTTP {response.status_code}"

    async def close(self, grace_s: float) -> None:
        """Give running jobs ``grace_s`` to finish and deliver, then cancel the rest (logged)."""
        if not self._tasks:
            return
        _, left = await asyncio.wait(set(self._tasks), timeout=grace_s)
        for task in left:
            log.warning("callback %s: shutting down before it was delivered", task.get_name().removeprefix("callback-"))
            task.cancel()
        if left:
            await asyncio.wait(left, timeout=1.0)


__all__ = ["MAX_PENDING", "METHODS", "Callback", "CallbackJobs", "Producer"]
