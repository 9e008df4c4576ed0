"""The session hub: every live WebSocket session's events, fanned out to any number of subscribers.

A call-center transcript has more readers than the connection that carries the audio: an
agent-assist screen, a QA recorder, a CRM hook. The WebSocket shell publishes each session's core
events here under the core session id (and, once the dialect learns one, under the call's own id,
e.g. Twilio's ``callSid``); ``GET /v1/sessions/{id}/events`` subscribes, and
``GET /v1/sessions/{id}/transcript`` reads the conversation so far.

Publishing never waits: each subscriber has a bounded queue, and one that falls behind is dropped
(told why) rather than slowing transcription or growing without bound. Everything here runs on
the event loop; observers (the SQLite store, the webhook sender) are called synchronously and only
enqueue work for their own threads.

Two things travel beside the core's events:

* **Call events a dialect reports** (:class:`Dtmf`: a key pressed on a Twilio call). They are not
  audio, so the Sans-I/O core never sees them; the shell hands them to :meth:`SessionHub.dtmf`, and
  they reach subscribers, the stored transcript and its txt/srt/vtt renderings like segments do.
* **Operator controls** (:class:`Control`: pause, resume). The shell registers each live
  connection as the session's :class:`Controller`; ``POST /v1/sessions/{id}/pause`` finds it here
  by id or alias and asks it, on this same event loop, to put its protocol's message on the wire.

With ``--redis-url`` (several replicas behind a load balancer, ``docs/deploy.md``) the hub also
mirrors every session to Redis (``bus.py``: a bounded buffer written by a thread of its own, so
publishing still never waits), and readers use :meth:`SessionHub.find` and
:meth:`SessionHub.watch`, which answer from this replica's memory first and from Redis for a
session another replica holds. Without it nothing here touches the network.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import enum
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol

from stream_server import protocol as p

if TYPE_CHECKING:
    from stream_server.bus import RedisBus

log = logging.getLogger(__name__)

Status = Literal["active", "completed", "disconnected"]

#: Live events a subscriber may have waiting before it is dropped as too slow. The backlog a late
#: joiner starts with is not counted: a long call's segments so far must not get it dropped.
SUBSCRIBER_QUEUE_LIMIT = 1000


# ------------------------------------------------------------------------------------ records


@dataclasses.dataclass(frozen=True)
class Dtmf:
    """A key pressed on a call (Twilio's ``dtmf`` message), as subscribers and the transcript see it.

    ``time`` is seconds into the call on the channel's own timeline (the audio of that leg received
    when the key was reported), so a key press sits between the words around it.
    """

    TYPE: ClassVar[str] = "call.dtmf"
    digit: str
    channel: int
    speaker: str | None
    time: float

    def event(self) -> dict[str, Any]:
        """The native event (``event: call.dtmf`` on the SSE stream; an entry of ``dtmf``)."""
        return {"type": self.TYPE, "digit": self.digit, "channel": self.channel, "speaker": self.speaker, "time": round(self.time, 3)}


#: Events the transcript record keeps, whether or not anyone follows the session.
_RECORDED = (p.SessionCreated, p.SessionUpdated, p.TranscriptSegment, p.TranscriptDone)


@dataclasses.dataclass(frozen=True)
class Published:
    """One event as every subscriber receives it: serialised once, whatever the subscriber count."""

    type: str
    data: dict[str, Any]
    json: str

    @classmethod
    def of(cls, data: dict[str, Any]) -> Published:
        return cls(str(data["type"]), data, json.dumps(data, ensure_ascii=False, separators=(",", ":")))


@dataclasses.dataclass
class TranscriptRecord:
    """A session's transcript as the hub holds it while live and the store keeps it after.

    Events are kept as their wire dicts (``protocol.event_to_dict``), which is what subscribers,
    the store and webhooks all need.
    """

    session_id: str
    alias: str | None
    status: Status
    created_at: float  # wall clock, seconds since the epoch
    ended_at: float | None
    duration: float  # audio seconds heard
    session: dict[str, Any]  # the configuration view of ``session.created``
    segments: list[dict[str, Any]]
    done: dict[str, Any] | None
    dtmf: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # ``call.dtmf`` events, in order

    @property
    def public_id(self) -> str:
        """The id a caller knows the session by: the call's own id when there is one."""
        return self.alias or self.session_id

    def created_event(self) -> dict[str, Any]:
        return {"type": p.SessionCreated.type, "session": self.session}

    def ended_event(self) -> dict[str, Any]:
        """What a subscriber gets when a session ends without ``transcript.text.done``."""
        return {
            "type": "session.ended",
            "id": self.public_id,
            "session_id": self.session_id,
            "status": self.status,
            "duration": round(self.duration, 3),
        }

    def replay(self) -> list[Published]:
        """The events a subscriber to this (finished or running) session starts with: key presses
        go among the segments where they happened (before the first segment that ended after)."""
        events = [self.created_event(), *_with_keys(self.segments, self.dtmf)]
        if self.done is not None:
            events.append(self.done)
        elif self.status != "active":
            events.append(self.ended_event())
        return [Published.of(event) for event in events]


def _with_keys(segments: list[dict[str, Any]], keys: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Segments in their order, each key press placed before the first segment ending after it."""
    pending = sorted(keys, key=lambda key: float(key["time"]))
    out: list[dict[str, Any]] = []
    for seg in segments:
        while pending and float(pending[0]["time"]) <= float(seg.get("end", 0.0)):
            out.append(pending.pop(0))
        out.append(seg)
    return out + pending


def transcript_json(record: TranscriptRecord) -> dict[str, Any]:
    """``GET /v1/sessions/{id}/transcript``: text and segments per channel, and the conversation.

    Once ``transcript.text.done`` has come, its per-channel text is authoritative; before that (a
    running call, or one that dropped) it is assembled from the final segments.
    """
    channel_count = max(1, int(record.session.get("channels") or 1))
    labels = record.session.get("channel_labels") or None
    by_channel: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    for seg in record.segments:
        by_channel[int(seg.get("channel", 0))].append({k: v for k, v in seg.items() if k != "type"})
    done = record.done or {}
    done_text = {int(c["channel"]): str(c["text"]) for c in done.get("channels") or []}
    if record.done is not None and not done_text and channel_count == 1:
        done_text[0] = str(done.get("text", ""))
    channels = []
    for index in range(max([channel_count - 1, *by_channel.keys()]) + 1):
        segments = by_channel.get(index, [])
        text = done_text.get(index, _joined(segments))
        speaker = labels[index] if labels and index < len(labels) else _speaker_of(segments)
        channels.append({"channel": index, "speaker": speaker, "text": text, "segments": segments})
    # Turns are "every spoken segment, in time order" (protocol.md), so they are built from the
    # segments whether or not done has come: one source, the same answer during and after the call.
    turns = _turns(record.segments)
    return {
        "id": record.public_id,
        "session_id": record.session_id,
        "status": record.status,
        "duration": round(record.duration, 3),
        "created_at": _iso(record.created_at),
        "ended_at": _iso(record.ended_at) if record.ended_at is not None else None,
        "channels": channels,
        "turns": [{k: turn[k] for k in ("channel", "speaker", "start", "end", "text")} for turn in turns],
        "dtmf": [{k: key[k] for k in ("channel", "speaker", "digit", "time")} for key in sorted(record.dtmf, key=lambda key: key["time"])],
    }


def conversation(body: dict[str, Any]) -> list[dict[str, Any]]:
    """A transcript's turns and key presses in time order, each ``{channel, speaker, start, end,
    text}`` (a key press reads ``[DTMF 5]``): what the txt, srt and vtt renderings show."""
    keys = [
        {"channel": key["channel"], "speaker": key["speaker"], "start": key["time"], "end": key["time"], "text": f"[DTMF {key['digit']}]"}
        for key in body.get("dtmf") or []
    ]
    return sorted([*body["turns"], *keys], key=lambda entry: (entry["start"], entry["channel"]))


def _joined(segments: list[dict[str, Any]]) -> str:
    return " ".join(str(seg["text"]).strip() for seg in segments if str(seg.get("text", "")).strip())


def _speaker_of(segments: list[dict[str, Any]]) -> str | None:
    return next((seg["speaker"] for seg in segments if seg.get("speaker")), None)


def _turns(segments: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation from final segments: every spoken one, in time order (channel breaks ties)."""
    spoken = [seg for seg in segments if str(seg.get("text", "")).strip()]
    spoken.sort(key=lambda seg: (seg["start"], seg.get("channel", 0)))
    return [
        {"channel": seg.get("channel", 0), "speaker": seg.get("speaker"), "start": seg["start"], "end": seg["end"], "text": seg["text"].strip()}
        for seg in spoken
    ]


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch)) + f".{int(epoch % 1 * 1000):03d}Z"


# -------------------------------------------------------------------------------- subscribers


@dataclasses.dataclass(frozen=True)
class Dropped:
    """The subscriber fell too far behind and was cut off; ``reason`` is for the client."""

    reason: str
    message: str

    def event(self) -> dict[str, Any]:
        return {"type": "subscription.dropped", "reason": self.reason, "message": self.message}


@dataclasses.dataclass(frozen=True)
class Ended:
    """The session is over; what the subscriber is told when no ``transcript.text.done`` came."""

    record: TranscriptRecord


class Subscription:
    """One reader of one session: its backlog, then live events through a bounded queue."""

    def __init__(self, backlog: list[Published], limit: int) -> None:
        self.backlog = backlog
        self.limit = limit
        self._items: collections.deque[Published] = collections.deque()
        self._wake = asyncio.Event()
        self.dropped: Dropped | None = None
        self.ended: Ended | None = None
        self.on_cancel: Callable[[], None] = lambda: None

    def offer(self, item: Published) -> bool:
        """Queue a live event without waiting; False (and the subscription is dropped) when full."""
        if self.dropped is not None:
            return False
        if len(self._items) >= self.limit:
            self.dropped = Dropped(
                "slow_subscriber", f"more than {self.limit} events were waiting for this subscriber; it was disconnected"
            )
            self._wake.set()
            return False
        self._items.append(item)
        self._wake.set()
        return True

    def end(self, ended: Ended) -> None:
        self.ended = ended
        self._wake.set()

    async def next(self, timeout: float | None = None) -> Published | Dropped | Ended | None:
        """The next queued event; then the drop or end notice; None when ``timeout`` passed first."""
        while True:
            if self._items:
                return self._items.popleft()
            if self.dropped is not None:
                return self.dropped
            if self.ended is not None:
                return self.ended
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                return None

    def cancel(self) -> None:
        """The reader went away: stop queueing for it."""
        self.on_cancel()

    @property
    def pending(self) -> int:
        return len(self._items)


# ---------------------------------------------------------------------------------- controls


class Control(enum.Enum):
    """What an operator may ask of a live call (``POST /v1/sessions/{id}/{control}``)."""

    PAUSE = "pause"
    RESUME = "resume"


class ControlRefused(Exception):
    """The session cannot take this control now. ``code``: ``control_unsupported`` (its protocol
    has no such message, e.g. the native one) or ``invalid_state`` (the protocol's state forbids it:
    not open yet, closing, already paused, not paused by the server)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Controller(Protocol):
    """The live connection of a session, as the hub reaches it (``ws.Connection``)."""

    def request(self, control: Control) -> None:
        """Put the control's protocol message on the wire now, or raise :class:`ControlRefused`."""
        ...


# ------------------------------------------------------------------------------------- the hub


class SessionObserver(Protocol):
    """Something that keeps or forwards transcripts (the store, webhooks); called on the event
    loop, so each method must only enqueue. An observer may also have ``dtmf(record, index)``
    (a key press, ``record.dtmf[index]``) and ``discarded(record)`` (a session that was no
    conversation, a connection probe, ends: one that kept its start forgets it); one without them
    is not told of those."""

    def started(self, record: TranscriptRecord) -> None: ...

    def aliased(self, record: TranscriptRecord) -> None: ...

    def segment(self, record: TranscriptRecord, index: int) -> None: ...

    def ended(self, record: TranscriptRecord) -> None: ...


class _Live:
    def __init__(self, record: TranscriptRecord, duration: Callable[[], float], controller: Controller | None) -> None:
        self.record = record
        self.duration = duration
        self.controller = controller
        self.subscribers: set[Subscription] = set()
        self.announced = False  # observers were told of the start (after session.created)
        self.sequence = 0  # events mirrored to the bus so far (its readers find gaps by it)


class SessionHub:
    """Live sessions by id and alias; the fan-out to their subscribers and observers."""

    def __init__(
        self,
        observers: Iterable[SessionObserver] = (),
        *,
        subscriber_limit: int = SUBSCRIBER_QUEUE_LIMIT,
        redis_url: str = "",
        bus: RedisBus | None = None,
    ) -> None:
        self.observers = list(observers)
        self.subscriber_limit = subscriber_limit
        self._live: dict[str, _Live] = {}
        self._aliases: dict[str, str] = {}
        if bus is None and redis_url:
            from stream_server.bus import RedisBus

            bus = RedisBus(redis_url)
        self.bus = bus

    # ------------------------------------------------------------ the publisher's side

    def open(self, session_id: str, *, duration: Callable[[], float] = lambda: 0.0, controller: Controller | None = None) -> None:
        """A session starts; ``duration`` reports the audio it has heard so far; ``controller``
        (its connection) takes operator controls while it is live."""
        record = TranscriptRecord(session_id, None, "active", time.time(), None, 0.0, {}, [], None)
        self._live[session_id] = _Live(record, duration, controller)
        if self.bus is not None:
            self._mirror("open", session_id, {"session_id": session_id, "status": "active", "created_at": repr(record.created_at)})

    def publish(self, session_id: str, event: p.ServerEvent) -> None:
        """One core event of a live session: kept if it is part of the transcript, sent to every
        subscriber without waiting. Unknown ids are ignored (a session the hub was not told of)."""
        live = self._live.get(session_id)
        if live is None or not (live.subscribers or self.bus is not None or isinstance(event, _RECORDED)):
            return  # a delta or interim nobody follows: not even serialised (most events, most sessions)
        item = Published.of(p.event_to_dict(event))
        record = live.record
        if isinstance(event, p.SessionCreated):
            record.session = dict(item.data["session"])
            live.announced = True
            self._notify("started", record)
        elif isinstance(event, p.SessionUpdated):
            record.session = dict(item.data["session"])
        elif isinstance(event, p.TranscriptSegment):
            record.segments.append(item.data)
            self._notify("segment", record, len(record.segments) - 1)
        elif isinstance(event, p.TranscriptDone):
            record.done = item.data
            record.duration = event.usage.seconds
        self._fan_out(live, item)

    def dtmf(self, session_id: str, key: Dtmf) -> None:
        """A key pressed on a live call (reported by its dialect): kept in the transcript and sent
        to every subscriber as a ``call.dtmf`` event. Unknown ids are ignored, as in :meth:`publish`."""
        live = self._live.get(session_id)
        if live is None:
            return
        item = Published.of(key.event())
        live.record.dtmf.append(item.data)
        if live.announced:
            self._notify("dtmf", live.record, len(live.record.dtmf) - 1)
        self._fan_out(live, item)

    def _fan_out(self, live: _Live, item: Published) -> None:
        """One event to every subscriber, without waiting; a full one is dropped."""
        for subscriber in list(live.subscribers):
            if not subscriber.offer(item):
                live.subscribers.discard(subscriber)
                log.warning("session %s: dropped a subscriber that fell %d events behind", live.record.public_id, self.subscriber_limit)
        if self.bus is not None:
            self._mirror_event(live, item)

    def alias(self, session_id: str, alias: str) -> None:
        """The dialect learned the call's own id: the session is also found under it."""
        live = self._live.get(session_id)
        if live is None or live.record.alias == alias:
            return
        previous = live.record.alias
        if previous is not None and self._aliases.get(previous) == session_id:
            del self._aliases[previous]
        live.record.alias = alias
        self._aliases[alias] = session_id
        if live.announced:
            self._notify("aliased", live.record)
        if self.bus is not None:
            self._mirror("alias", session_id, {"alias": alias}, alias=alias)

    def close(self, session_id: str) -> None:
        """The session is over (done sent, or the client vanished): tell subscribers and observers."""
        self._end(session_id, "ended")

    def discard(self, session_id: str) -> None:
        """The session is no conversation (an AudioHook connection probe: Genesys checks that the
        server answers, and asks that such a session be neither transcribed nor logged): it ends
        now, and observers that kept its start are told ``discarded`` (the store forgets it)
        instead of ``ended`` (no webhook posts it). Later events of it are ignored as unknown."""
        self._end(session_id, "discarded")

    def _end(self, session_id: str, what: str) -> None:
        live = self._live.pop(session_id, None)
        if live is None:
            return
        record = live.record
        if record.alias is not None and self._aliases.get(record.alias) == session_id:
            del self._aliases[record.alias]
        record.status = "completed" if record.done is not None else "disconnected"
        record.ended_at = time.time()
        if record.done is None:
            record.duration = self._duration(live)
        for subscriber in live.subscribers:
            subscriber.end(Ended(record))
        live.subscribers.clear()
        if live.announced:
            self._notify(what, record)
        if self.bus is not None:
            live.sequence += 1
            fields = {"status": record.status, "ended_at": repr(record.ended_at), "duration": repr(record.duration)}
            ended = Published.of(record.ended_event()).json
            self._mirror("close", session_id, fields, n=live.sequence, event=ended)

    # ------------------------------------------------------------ the readers' side

    def _find(self, session_id: str) -> _Live | None:
        live = self._live.get(session_id)
        if live is None and session_id in self._aliases:
            live = self._live.get(self._aliases[session_id])
        return live

    def record(self, session_id: str) -> TranscriptRecord | None:
        """A snapshot of a live session's transcript (by id or alias), or None."""
        live = self._find(session_id)
        if live is None:
            return None
        return dataclasses.replace(live.record, duration=self._duration(live), segments=list(live.record.segments), dtmf=list(live.record.dtmf))

    def control(self, session_id: str, control: Control) -> TranscriptRecord | None:
        """Ask a live session (by id or alias) to pause or resume: its connection sends the
        protocol's message now. Returns the session's snapshot, None when it is not live here;
        raises :class:`ControlRefused` when its protocol or state does not allow it."""
        live = self._find(session_id)
        if live is None:
            return None
        if live.controller is None:
            raise ControlRefused("control_unsupported", f"session {live.record.public_id} takes no controls")
        live.controller.request(control)
        return self.record(session_id)

    def subscribe(self, session_id: str) -> Subscription | None:
        """Subscribe to a live session: the backlog (session.created and the segments so far, or
        everything to done) is taken in the same step as the queue is attached, so nothing is
        missed or repeated. None for an id that is not live."""
        live = self._find(session_id)
        if live is None:
            return None
        subscription = Subscription(live.record.replay() if live.announced else [], self.subscriber_limit)
        subscription.on_cancel = lambda: live.subscribers.discard(subscription)
        live.subscribers.add(subscription)
        return subscription

    async def find(self, session_id: str) -> TranscriptRecord | None:
        """:meth:`record`, or with a bus, the session as Redis has it (held by another replica,
        or finished there within the bus's retention); None when neither knows it."""
        record = self.record(session_id)
        if record is None and self.bus is not None:
            record = await self.bus.record(session_id)
        return record

    async def watch(self, session_id: str) -> Subscription | None:
        """:meth:`subscribe`, or with a bus, a subscription to a live session another replica
        holds (backlog from Redis, then its event stream). None when no replica has it live."""
        subscription = self.subscribe(session_id)
        if subscription is None and self.bus is not None:
            subscription = await self.bus.subscribe(session_id, self.subscriber_limit)
        return subscription

    def shutdown(self, timeout: float = 3.0) -> None:
        """Server exit: write what the bus still holds (at most ``timeout``), then stop it."""
        if self.bus is not None:
            self.bus.close(timeout)

    def live_ids(self) -> list[str]:
        return list(self._live)

    def subscriber_count(self, session_id: str) -> int:
        live = self._find(session_id)
        return len(live.subscribers) if live is not None else 0

    # ------------------------------------------------------------ helpers

    def _duration(self, live: _Live) -> float:
        if live.record.done is not None:
            return live.record.duration
        try:
            return float(live.duration())
        except Exception:  # noqa: BLE001 - a duration is informative; never fail a reader over it
            return live.record.duration

    def _mirror_event(self, live: _Live, item: Published) -> None:
        """Hand one published event to the bus, with what it changes in the session's record."""
        record = live.record
        live.sequence += 1
        fields: dict[str, str] = {}
        segment = ""
        if item.type in (p.SessionCreated.type, p.SessionUpdated.type):
            fields["session"] = json.dumps(record.session, ensure_ascii=False, separators=(",", ":"))
        elif item.type == p.TranscriptSegment.type:
            segment = item.json
            fields["duration"] = repr(self._duration(live))
        elif item.type == p.TranscriptDone.type:
            fields["done"] = item.json
            fields["duration"] = repr(record.duration)
        self._mirror("event", record.session_id, fields, n=live.sequence, event=item.json, segment=segment)

    def _mirror(self, kind: str, session_id: str, fields: dict[str, str], **extra: Any) -> None:
        from stream_server.bus import Change

        assert self.bus is not None
        self.bus.put(Change(kind, session_id, fields, **extra))

    def _notify(self, what: str, record: TranscriptRecord, *args: int) -> None:
        """Call every observer that has ``what``; one that fails is logged, never allowed to stop
        transcription."""
        for observer in self.observers:
            method = getattr(observer, what, None)
            if method is None:  # an optional call (``dtmf``) this observer does not take
                continue
            try:
                method(record, *args)
            except Exception:  # logged with its traceback: a storage or webhook bug must not end the call
                log.exception("session %s: %s observer %s failed", record.public_id, what, type(observer).__name__)


__all__ = [
    "SUBSCRIBER_QUEUE_LIMIT",
    "Control",
    "ControlRefused",
    "Controller",
    "Dropped",
    "Dtmf",
    "Ended",
    "Published",
    "SessionHub",
    "SessionObserver",
    "Status",
    "Subscription",
    "TranscriptRecord",
    "conversation",
    "transcript_json",
]
