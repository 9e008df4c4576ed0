"""Live and stored session transcripts over HTTP (``docs/sessions-api.md``).

Routes
    GET /v1/sessions/{id}/events        the session's native events as Server-Sent Events: first
                                        ``session.created`` and the segments so far, then live
                                        events, ending after ``transcript.text.done`` (or with
                                        ``session.ended``); a stored session is replayed
    GET /v1/sessions/{id}/transcript    the conversation so far or as stored: JSON, or
                                        ``?format=txt|srt|vtt``

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

from stream_server import formats, tokens
from stream_server import protocol as p
from stream_server.engine import Engine
from stream_server.http.common import ApiError, api_endpoint
from stream_server.hub import Dropped, Ended, Published, Subscription, TranscriptRecord, transcript_json

#: An SSE comment this often keeps proxies from closing a quiet stream (and finds gone readers).
KEEPALIVE_S = 15.0
FORMATS = ("json", "txt", "srt", "vtt")


def _engine(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def _authorize(request: Request, engine: Engine) -> None:
    """With ``--api-keys``, the request must carry one as ``Authorization: Bearer <key>``, or (a
    browser's ``EventSource`` cannot set headers) a watch token as ``?token=`` (``tokens.py``),
    which it uses up."""
    keys = engine.settings.api_key_set()
    if not keys:
        return
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and key.strip() in keys:
        return
    token = request.query_params.get(tokens.QUERY_PARAMETER)
    session_id = request.path_params["session_id"]
    if token and tokens.store_of(request.app.state).redeem(token, "watch", _known_ids(engine, session_id)):
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
    return str(turn["speaker"] or f"channel {turn['channel']}")


def render_text(body: dict[str, Any]) -> str:
    """Plain text: one line per turn, ``speaker: text`` when the call has more than one voice."""
    if not _labelled(body):
        return "\n".join(turn["text"] for turn in body["turns"]) + "\n"
    return "\n".join(f"{_speaker(turn)}: {turn['text']}" for turn in body["turns"]) + "\n"


def _cues(record: TranscriptRecord, body: dict[str, Any]) -> list[formats.Cue]:
    """The conversation as subtitle cues (``formats.cue_split``'s norms), each utterance cut from
    its word timings when the session asked for them; every cue starts with its speaker when
    there are several."""
    labelled = _labelled(body)
    cues: list[formats.Cue] = []
    for turn, seg in zip(body["turns"], _spoken_segments(record)):
        prefix = f"{_speaker(turn)}:" if labelled else ""
        cues.extend(formats.segment_cues(turn["text"], turn["start"], turn["end"], seg.get("words"), prefix=prefix))
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


def routes() -> list[Route]:
    return [
        Route("/v1/sessions/{session_id:str}/events", session_events, methods=["GET"]),
        Route("/v1/sessions/{session_id:str}/transcript", session_transcript, methods=["GET"]),
    ]


__all__ = ["render_text", "routes", "session_events", "session_transcript", "sse"]
