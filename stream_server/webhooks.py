"""Webhooks: a signed JSON POST per final segment and per session end, delivered in the background.

CRM and QA systems want each final segment as it happens and the whole conversation when the
call ends, without holding a connection open. Deliveries must never cost transcription anything,
so the event loop only puts a payload on a bounded queue (dropping it, logged, when the queue is
full) and one worker thread posts them in order with the standard library's ``urllib``: a
timeout per attempt, retries with exponential backoff on network errors, timeouts, 408, 429 and
5xx, and a log line when a delivery is given up.

Every request carries

* ``X-Stream-Server-Signature: sha256=<hex>``: HMAC-SHA256 of the exact body bytes with
  ``--webhook-secret`` (absent when no secret is configured);
* ``X-Stream-Server-Timestamp``: Unix seconds when the payload was made (also ``timestamp`` in
  the body, so it is covered by the signature; refuse old ones to stop replays);
* ``X-Stream-Server-Event`` (``transcript.segment`` or ``session.ended``) and
  ``X-Stream-Server-Delivery`` (a unique id, the same on every retry of one payload).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any

from stream_server.hub import TranscriptRecord, transcript_json

log = logging.getLogger(__name__)

QUEUE_LIMIT = 1000  # payloads waiting for delivery; newer ones are dropped beyond this
SIGNATURE_HEADER = "X-Stream-Server-Signature"
TIMESTAMP_HEADER = "X-Stream-Server-Timestamp"
EVENT_HEADER = "X-Stream-Server-Event"
DELIVERY_HEADER = "X-Stream-Server-Delivery"


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for ``body``: ``sha256=`` and the hex HMAC-SHA256."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    """What a receiver does with the header (constant-time comparison)."""
    return hmac.compare_digest(sign(secret, body), header)


@dataclasses.dataclass(frozen=True)
class Delivery:
    event: str
    body: bytes
    timestamp: int
    delivery_id: str
    session: str  # for logs


class WebhookSender:
    """Posts hub events to ``url``; one per server, an observer of the :class:`SessionHub`."""

    def __init__(
        self,
        url: str,
        *,
        secret: str = "",
        timeout_s: float = 5.0,
        max_attempts: int = 5,
        backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        queue_limit: int = QUEUE_LIMIT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = url
        self.secret = secret
        self.timeout_s = timeout_s
        self.max_attempts = max(1, max_attempts)
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._clock = clock
        self._queue: queue.Queue[Delivery | None] = queue.Queue(queue_limit)
        self._stop = threading.Event()
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="webhooks", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ observer calls (event loop)

    def started(self, record: TranscriptRecord) -> None:
        """Nothing is posted for a start: the first segment or the end says the call exists."""

    def aliased(self, record: TranscriptRecord) -> None:
        """Later payloads carry the alias as their ``id``."""

    def segment(self, record: TranscriptRecord, index: int) -> None:
        self._enqueue(record, "transcript.segment", {"sequence": index, "segment": record.segments[index]})

    def ended(self, record: TranscriptRecord) -> None:
        self._enqueue(record, "session.ended", {"transcript": transcript_json(record)})

    def _enqueue(self, record: TranscriptRecord, event: str, fields: dict[str, Any]) -> None:
        timestamp = int(self._clock())
        payload = {"type": event, "id": record.public_id, "session_id": record.session_id, "timestamp": timestamp, **fields}
        body = json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode()
        delivery = Delivery(event, body, timestamp, "whd_" + uuid.uuid4().hex, record.public_id)
        try:
            self._queue.put_nowait(delivery)
        except queue.Full:
            self.dropped += 1
            log.warning("webhook: queue full (%d waiting); dropped %s of session %s", self._queue.maxsize, event, record.public_id)

    # ------------------------------------------------------------ the delivery thread

    def _run(self) -> None:
        while True:
            delivery = self._queue.get()
            try:
                if delivery is None:
                    return
                if self._stop.is_set():
                    self.dropped += 1
                elif self._deliver(delivery):
                    self.delivered += 1
                else:
                    self.failed += 1
            finally:
                self._queue.task_done()

    def _deliver(self, delivery: Delivery) -> bool:
        """Post one payload, retrying transient failures; False when it was given up."""
        for attempt in range(1, self.max_attempts + 1):
            outcome, retry = self._attempt(delivery)
            if outcome is None:
                return True
            if not retry or attempt == self.max_attempts or self._stop.is_set():
                log.warning(
                    "webhook: gave up %s %s of session %s after %d attempt(s): %s",
                    delivery.event, delivery.delivery_id, delivery.session, attempt, outcome,
                )
                return False
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1))
            log.info("webhook: %s of session %s failed (%s); retry %d in %.1f s", delivery.event, delivery.session, outcome, attempt, delay)
            if self._stop.wait(delay):
                log.warning("webhook: shutting down; dropped %s of session %s", delivery.event, delivery.session)
                return False
        return False

    def _attempt(self, delivery: Delivery) -> tuple[str | None, bool]:
        """One POST: (None, _) on 2xx, else (what went wrong, whether retrying may help)."""
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "stream-server-webhooks/1",
            TIMESTAMP_HEADER: str(delivery.timestamp),
            EVENT_HEADER: delivery.event,
            DELIVERY_HEADER: delivery.delivery_id,
        }
        if self.secret:
            headers[SIGNATURE_HEADER] = sign(self.secret, delivery.body)
        request = urllib.request.Request(self.url, data=delivery.body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                response.read()
                return None, False
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}", exc.code in (408, 425, 429) or exc.code >= 500
        except (urllib.error.URLError, OSError, ValueError) as exc:  # refused, reset, timed out, bad URL
            reason = getattr(exc, "reason", exc)
            return f"{type(exc).__name__}: {reason}", not isinstance(exc, ValueError)

    # ------------------------------------------------------------ shutdown

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for every queued payload to be delivered or given up."""
        deadline = time.monotonic() + timeout
        with self._queue.all_tasks_done:
            while self._queue.unfinished_tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._queue.all_tasks_done.wait(remaining)
        return True

    def close(self, grace_s: float = 2.0) -> None:
        """Give queued deliveries ``grace_s`` to go out, then stop: what is left is dropped, logged."""
        self.flush(grace_s)
        self._stop.set()
        left = self._queue.qsize()
        if left:
            log.warning("webhook: shutting down with %d payload(s) undelivered", left)
        # When the queue is full the worker drops the rest (stop is set); its daemon thread ends with the process.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self._thread.join(1.0)


__all__ = ["DELIVERY_HEADER", "EVENT_HEADER", "SIGNATURE_HEADER", "TIMESTAMP_HEADER", "WebhookSender", "sign", "verify"]
