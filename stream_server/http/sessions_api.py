"""Live and stored session transcripts over HTTP (``docs/sessions-api.md``).

Routes
    GET /v1/sessions/{id}/events        the session's native events as Server-Sent Events: first
                                        ``session.created`` and the segments so far, then live
                                        events, ending after ``transcript.text.done`` (or with
                                        ``session.ended``); a stored session is replayed
    GET /v1/sessions/{id}/transcript    the conversation so far or as stored: JSON, or
                                        ``?format=txt|srt|vtt``
    POST /v1/sessions/{id}/pause        an operator's control of a live call: its connection sends
    POST /v1/sessions/{id}/resume       the protocol's own message (AudioHook ``pause``/``resume``)

``{id}`` is the core session id (``session.created``) or the call id its dialect knows it by
(Twilio ``callSid``, AudioHook ``conversationId``). Live sessions come from the hub, finished
ones from the SQLite store; anything else is 404. With ``--api-keys`` both need
``Authorization: Bearer <key>``, or a watch token from ``POST /v1/realtime/client_secrets`` as
``?token=`` (for browsers' ``EventSource``; ``docs/browser.md``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from stream_server import formats, keys, tokens
from stream_server import protocol as p
from stream_server.engine import Engine
from stream_server.http.common import ApiError, api_endpoint, bearer_principal
from stream_server.hub import (
    Control,
    ControlRefused,
    Dropped,
    Ended,
    Published,
    Subscription,
    TranscriptRecord,
    conversation,
    transcript_json,
)

#: An SSE comment this often keeps proxies from closing a quiet stream (and finds gone readers).
KEEPALIVE_S = 15.0
FORMATS = ("json", "txt", "srt", "vtt")
DTMF_CUE_S = 0.5  # how long a key press shows as a subtitle cue


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _authorize(request: Request, engine: Engine) -> None:
    """With ``--api-keys``, the request must carry one as ``Authorization: Bearer <key>``, or (a
    browser's ``EventSource`` cannot set headers) a watch token as ``?token=`` (``tokens.py``),
    which it uses up."""
    ring = keys.ring_of(request.app.state)
    if not ring.configured or bearer_principal(request) is not None:
        return
    token = request.query_params.get(tokens.QUERY_PARAMETER)
    session_id = request.path_params["session_id"]
    grant = tokens.store_of(request.app.state).redeem(token, "watch", _known_ids(engine, session_id)) if token else None
    if grant is not None and ring.principal(grant.owner) is not None:
        return
    raise ApiError(401, "invalid_api_key", "missing or unknown API key; send Authorization: Bearer <key> (or ?token=<watch token>)")


def _known_ids(engine: Engine, session_id: str) -> set[str]:
    """The ids a session goes by (core id and call id), for tokens bound to either."""
    ids = {session_id}
    record = engine.hub.record(session_id)
    if record is not None:
        ids.update(i for i in (record.session_id, record.alias) if i)
    return ids


def _not_found(session_id: str) -> ApiError:
    return ApiError(404, "session_not_found", f"no live or stored session {session_id!r}", param="id")


async def _stored(engine: Engine, session_id: str) -> TranscriptRecord | None:
    return await engine.store.get(session_id) if engine.store is not None else None


# ------------------------------------------------------------------------------ transcript


@api_endpoint
async def session_transcript(request: Request) -> Response:
    engine = _engine(request)
    _authorize(request, engine)
    session_id = request.path_params["session_id"]
    kind = request.query_params.get("format", "json").lower()
    if kind not in FORMATS:
        raise ApiError(400, "invalid_value", f"format: expected one of {', '.join(FORMATS)}, got {kind!r}", param="format")
    record = await engine.hub.find(session_id) or await _stored(engine, session_id)
    if record is None:
        raise _not_found(session_id)
    body = transcript_json(record)
    if kind == "json":
        return JSONResponse(body)
    if kind == "txt":
        return PlainTextResponse(render_text(body))
    cues = _cues(record, body)
    if kind == "srt":
        return PlainTextResponse(formats.render_srt(cues), media_type="application/x-subrip")
    return PlainTextResponse(formats.render_vtt(cues), media_type="text/vtt")


def _labelled(body: dict[str, Any]) -> bool:
    """Whether lines need a speaker: a call with several channels or named ones."""
    return len(body["channels"]) > 1 or any(channel["speaker"] for channel in body["channels"])


def _speaker(turn: dict[str, Any]) -> str:
    return formats.speaker_name(turn["speaker"], int(turn["channel"]))


def render_text(body: dict[str, Any]) -> str:
    """Plain text: one line per turn, ``speaker: text`` when the call has more than one voice."""
    if not _labelled(body):
        return "\n".join(turn["text"] for turn in conversation(body)) + "\n"
    return "\n".join(f"{_speaker(turn)}: {turn['text']}" for turn in conversation(body)) + "\n"


def _cues(record: TranscriptRecord, body: dict[str, Any]) -> list[formats.Cue]:
    """The conversation as subtitle cues (``formats.cue_split``'s norms), each utterance cut from
    its word timings when the session asked for them; every cue starts with its speaker when
    there are several."""
    labelled = _labelled(body)
    cues: list[formats.Cue] = []
    for turn, seg in zip(body["turns"], _spoken_segments(record)):
        prefix = f"{_speaker(turn)}:" if labelled else ""
        cues.extend(formats.segment_cues(turn["text"], turn["start"], turn["end"], seg.get("words"), prefix=prefix))
    for key in body["dtmf"]:  # a key press: a short cue of its own, among the words
        label = f"{_speaker(key)}: [DTMF {key['digit']}]" if labelled else f"[DTMF {key['digit']}]"
        cues.append(formats.Cue(key["time"], key["time"] + DTMF_CUE_S, (label,)))
    cues.sort(key=lambda cue: cue.start)
    # One voice's cues never overlap; several voices' may (people talk over each other).
    return cues if len(body["channels"]) > 1 else formats.without_overlaps(cues)


def _spoken_segments(record: TranscriptRecord) -> list[dict[str, Any]]:
    """The record's spoken segments in the order of ``transcript_json``'s turns."""
    spoken = [seg for seg in record.segments if str(seg.get("text", "")).strip()]
    return sorted(spoken, key=lambda seg: (seg["start"], seg.get("channel", 0)))


# ---------------------------------------------------------------------------------- events


@api_endpoint
async def session_events(request: Request) -> Response:
    engine = _engine(request)
    _authorize(request, engine)
    session_id = request.path_params["session_id"]
    subscription = await engine.hub.watch(session_id)
    if subscription is not None:
        body = _live(subscription)
    else:
        record = await engine.hub.find(session_id) or await _stored(engine, session_id)
        if record is None:
            raise _not_found(session_id)
        body = _replay(record)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(body, media_type="text/event-stream", headers=headers)


def sse(event: Published) -> bytes:
    return f"event: {event.type}\ndata: {event.json}\n\n".encode()


async def _live(subscription: Subscription) -> AsyncIterator[bytes]:
    """Backlog, then live events until done, the session's end, or this reader is dropped."""
    try:
        for event in subscription.backlog:
            yield sse(event)
            if event.type == p.TranscriptDone.type:
                return
        while True:
            item = await subscription.next(KEEPALIVE_S)
            if item is None:
                yield b": keepalive\n\n"
            elif isinstance(item, Published):
                yield sse(item)
                if item.type == p.TranscriptDone.type:
                    return
            elif isinstance(item, Dropped):
                yield f": {item.message}\n\n".encode() + sse(Published.of(item.event()))
                return
            elif isinstance(item, Ended):
                yield sse(Published.of(item.record.ended_event()))
                return
    finally:
        subscription.cancel()


async def _replay(record: TranscriptRecord) -> AsyncIterator[bytes]:
    """A finished session: what a subscriber would have seen, ending the same way."""
    for event in record.replay():
        yield sse(event)


# -------------------------------------------------------------------------------- controls


@api_endpoint
async def session_control(request: Request) -> Response:
    """``POST /v1/sessions/{id}/pause|resume``: 202 once the protocol's message is on its way (the
    client answers on its own connection: AudioHook's ``paused``, later ``resumed``)."""
    engine = _engine(request)
    if tokens.QUERY_PARAMETER in request.query_params:
        raise ApiError(401, "invalid_api_key", "a watch token only reads a session; a control takes an API key (Authorization: Bearer <key>)")
    _authorize(request, engine)
    session_id = request.path_params["session_id"]
    control = Control(request.url.path.rsplit("/", 1)[-1])  # the route's last segment names it
    try:
        record = engine.hub.control(session_id, control)
    except ControlRefused as refused:
        raise ApiError(409, refused.code, refused.message, param="id") from None
    if record is None:
        if await engine.hub.find(session_id) is None and await _stored(engine, session_id) is None:
            raise _not_found(session_id)
        raise ApiError(409, "invalid_state", f"session {session_id!r} is not live on this server (finished, or held by another replica)", param="id")
    return JSONResponse({"id": record.public_id, "session_id": record.session_id, "control": control.value, "status": "requested"}, status_code=202)


def routes() -> list[Route]:
    return [
        Route("/v1/sessions/{session_id:str}/events", session_events, methods=["GET"]),
        Route("/v1/sessions/{session_id:str}/transcript", session_transcript, methods=["GET"]),
        *(Route(f"/v1/sessions/{{session_id:str}}/{c.value}", session_control, methods=["POST"]) for c in Control),
    ]


__all__ = ["render_text", "routes", "session_control", "session_events", "session_transcript", "sse"]
