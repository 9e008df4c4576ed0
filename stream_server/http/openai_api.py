"""OpenAI's transcription API: ``POST /v1/audio/transcriptions`` and ``GET /v1/models``.

A file runs as one engine session; the answer is rendered in the requested ``response_format``
or, with ``stream=true``, sent as OpenAI's Server-Sent Events as the text becomes final. The form
itself (including AI Refinery's encoding of it) is parsed in :mod:`stream_server.http.openai_form`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.responses import (
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)

from stream_server import formats
from stream_server import protocol as p
from stream_server.engine import Engine, FileTranscript
from stream_server.http.common import (
    OPENAI_MODEL_ALIASES,
    ApiError,
    FileJobs,
    api_endpoint,
    check_language,
    decode_upload,
    ensure_loaded,
    file_jobs,
    invalid,
    read_multipart,
    require_api_key,
    resolve_model,
    session_config,
    too_large,
    transcribe_upload,
    with_channels,
)
from stream_server.http.openai_form import (
    RESPONSE_FORMATS,
    FileOptions,
    FormFields,
    collect_fields,
)
from stream_server.models import ModelInfo

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering of events


# ----------------------------------------------------------------------------------- models


def _whisper_languages() -> list[str]:
    """Whisper's language codes; faster-whisper is imported late, as everywhere in the server."""
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    return sorted(_LANGUAGE_CODES)


def _model_card(engine: Engine, info: ModelInfo) -> dict[str, Any]:
    """OpenAI's model object, plus what a client needs to choose a model (languages, features)."""
    multilingual = info.multilingual if info.multilingual is not None else not info.id.endswith(".en")
    return {
        "id": info.id,
        "object": "model",
        "created": 0,
        "owned_by": "stream-server",
        "source": info.source,
        "default": info.id == engine.settings.model,
        "languages": _whisper_languages() if multilingual else ["en"],
        "timestamps": ["segment", "word"],
        "logprobs": True,
        "response_formats": list(RESPONSE_FORMATS),
        "streaming": True,
    }


def model_list(engine: Engine) -> list[dict[str, Any]]:
    """The registry's models, the configured default first if unlisted, then OpenAI's aliases of it."""
    cards = [_model_card(engine, info) for info in engine.registry.listing()]
    default = next((c for c in cards if c["id"] == engine.settings.model), None)
    if default is None:
        default = _model_card(engine, ModelInfo(engine.settings.model, "configured", None))
        cards.insert(0, default)
    for alias in OPENAI_MODEL_ALIASES:
        cards.append({**default, "id": alias, "source": "alias", "alias_of": engine.settings.model, "default": False})
    return cards


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": model_list(request.app.state.engine)})


async def get_model(request: Request) -> Response:
    model_id = request.path_params["model_id"]
    for card in model_list(request.app.state.engine):
        if card["id"] == model_id:
            return JSONResponse(card)
    return ApiError(404, "model_not_found", f"model {model_id!r} is not known to this server", param="model").response()


# -------------------------------------------------------------------------------- rendering


def _logprobs(logprobs: list[p.TokenLogprob] | None, opts: FileOptions) -> list[dict[str, Any]] | None:
    """Token logprobs only when ``include[]=logprobs`` asked for them (they are large)."""
    return formats.logprobs_json(logprobs) if opts.wants_logprobs else None


def _json_body(result: FileTranscript, opts: FileOptions, verbose: bool) -> dict[str, Any]:
    """``json`` / ``verbose_json``: OpenAI's object plus AI Refinery's success/error/confidence."""
    done = result.done
    body: dict[str, Any] = {}
    split = opts.split_channels
    if verbose:
        body.update(
            task=opts.task,
            language=opts.reported_language(formats.file_language(result.segments)),
            duration=done.usage.seconds,
            text=done.text,
            segments=formats.segments_json(result.segments, channels=split),
        )
        if opts.wants_words:
            body["words"] = formats.words_json(result.segments, channels=split)
    else:
        body["text"] = done.text
    if split:
        body.update(formats.channels_json(done))
    if opts.wants_logprobs:
        body["logprobs"] = formats.logprobs_json(done.logprobs)
    body["usage"] = formats.usage_json(done)
    body.update(success=True, error=None, confidence=formats.confidence(done.logprobs))
    return body


def _diarized_speaker(label: str | None, channel: int) -> str:
    """A channel's speaker in ``diarized_json``: its label, else ``A``, ``B``, ... in channel order
    (as OpenAI names speakers it was given no names for)."""
    return label or chr(ord("A") + channel)


def _diarized_body(result: FileTranscript) -> dict[str, Any]:
    """OpenAI's ``diarized_json`` for a recording split by channel: one speaker per channel."""
    done = result.done
    segments = [
        {
            "type": "transcript.text.segment",
            "id": f"seg_{index}",
            "start": turn.start,
            "end": turn.end,
            "speaker": _diarized_speaker(turn.speaker, turn.channel),
            "text": turn.text.strip(),
        }
        for index, turn in enumerate(done.turns)
    ]
    text = " ".join(turn.text.strip() for turn in done.turns)
    return {"task": "transcribe", "duration": done.usage.seconds, "text": text, "segments": segments, "usage": formats.usage_json(done)}


def _render(result: FileTranscript, opts: FileOptions) -> Response:
    fmt = opts.response_format
    if fmt == "diarized_json":
        return JSONResponse(_diarized_body(result))
    if fmt == "text":
        return PlainTextResponse(formats.to_text(result.text))
    if fmt in ("srt", "vtt"):
        voices = opts.split_channels and (len(result.done.channels) > 1 or opts.channel_labels is not None)
        cues = formats.conversation_cues(result.segments) if voices else formats.cues_of(result.segments)
        if fmt == "srt":
            return PlainTextResponse(formats.render_srt(cues), media_type="application/x-subrip")
        return PlainTextResponse(formats.render_vtt(cues), media_type="text/vtt")
    return JSONResponse(_json_body(result, opts, verbose=fmt == "verbose_json"))


# -------------------------------------------------------------------------------- streaming


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


def _stream_event(event: p.ServerEvent, opts: FileOptions) -> dict[str, Any] | None:
    """The stream event for one engine event, or None for events the stream does not carry."""
    if isinstance(event, p.TranscriptDelta):
        delta: dict[str, Any] = {
            "type": "transcript.text.delta",
            "delta": event.delta,
            "text": event.delta,  # AI Refinery's delta event names the field ``text``
            "logprobs": _logprobs(event.logprobs, opts),
        }
        if opts.split_channels:  # the channels' deltas interleave: each says whose words it adds
            delta.update(channel=event.channel, speaker=event.speaker)
        return delta
    if isinstance(event, p.TranscriptSegment) and opts.by_speaker and event.text.strip():
        # OpenAI's diarized stream: each finished turn with its speaker (here, its channel's).
        speaker = _diarized_speaker(event.speaker, event.channel)
        return {"type": "transcript.text.segment", "id": event.item_id, "start": event.start, "end": event.end, "speaker": speaker, "text": event.text.strip()}
    if isinstance(event, p.TranscriptDone):
        done: dict[str, Any] = {
            "type": "transcript.text.done",
            "text": event.text,
            "logprobs": _logprobs(event.logprobs, opts),
            "usage": formats.usage_json(event),
            "confidence": formats.confidence(event.logprobs),
        }
        if opts.split_channels:
            done.update(formats.channels_json(event))
        return done
    if isinstance(event, p.Error) and event.error.code in ("model_unavailable", "decode_failed"):
        error = {"message": event.error.message, "type": "server_error", "param": event.error.param, "code": event.error.code}
        return {"type": "error", "error": error}
    return None


async def _event_stream(engine: Engine, audio: np.ndarray, config: p.SessionConfig, opts: FileOptions, jobs: FileJobs) -> AsyncIterator[bytes]:
    """OpenAI's transcription stream: deltas as text becomes final, then done, then [DONE].

    The slot is taken inside the generator, so a response abandoned before it starts holds none.
    """
    async with jobs.semaphore:
        async for event in engine.transcribe_events(audio, config):
            payload = _stream_event(event, opts)
            if payload is not None:
                yield _sse(payload)
            if isinstance(event, p.TranscriptDone):
                engine.metrics.audio_seconds.inc(event.usage.seconds)
        yield _sse("[DONE]")


async def _stream_response(request: Request, upload: UploadFile, config: p.SessionConfig, opts: FileOptions) -> Response:
    """Decode now (so decoding errors still get a status), then stream the transcription."""
    jobs = file_jobs(request)
    async with jobs.semaphore:
        audio = await decode_upload(upload.file, split_channels=opts.split_channels)
    config = with_channels(config, audio, opts.channel_labels, by_speaker=opts.by_speaker)
    engine: Engine = request.app.state.engine
    return StreamingResponse(_event_stream(engine, audio, config, opts, jobs), media_type="text/event-stream", headers=_SSE_HEADERS)


# ---------------------------------------------------------------------------- transcription


def _checked_upload(form: FormFields, limit: int) -> UploadFile:
    """The ``file`` part, refused when missing, over the limit or empty."""
    upload = form.upload
    if upload is None:
        hint = " (it was sent as a text field, not a file)" if form.file_as_text else ""
        raise ApiError(400, "missing_file", f"the request has no 'file' part{hint}", param="file")
    if upload.size is not None and upload.size > limit:
        raise too_large(limit)
    if not upload.size:
        raise ApiError(400, "empty_file", "the uploaded file is empty (0 bytes)", param="file")
    return upload


async def _transcribe(request: Request, upload: UploadFile, opts: FileOptions) -> Response:
    engine: Engine = request.app.state.engine
    model = resolve_model(engine, opts.model_name)
    await ensure_loaded(engine, model)
    check_language(engine, model, opts.language_given)
    config = session_config(model, **opts.session_options())
    if opts.stream:
        return await _stream_response(request, upload, config, opts)
    result = await transcribe_upload(
        request, upload.file, config, split_channels=opts.split_channels, labels=opts.channel_labels, by_speaker=opts.by_speaker
    )
    return _render(result, opts)


async def _file_request(request: Request, task: str) -> Response:
    """One upload, transcribed or translated: everything is validated before any audio is decoded."""
    require_api_key(request)
    limit = request.app.state.engine.settings.max_file_bytes
    form = collect_fields(await read_multipart(request, limit))
    try:
        upload = _checked_upload(form, limit)
        opts = FileOptions.from_fields(form.fields)
        opts.task = task
        if task == "translate" and opts.by_speaker:
            raise invalid("response_format", "diarized_json is a transcription format; translations answer json, text, srt, verbose_json or vtt")
        return await _transcribe(request, upload, opts)
    finally:
        if form.upload is not None:
            with contextlib.suppress(Exception):
                await form.upload.close()


@api_endpoint
async def transcriptions(request: Request) -> Response:
    """``POST /v1/audio/transcriptions``."""
    return await _file_request(request, "transcribe")


@api_endpoint
async def translations(request: Request) -> Response:
    """``POST /v1/audio/translations``: English text of speech in any language (Whisper's translate
    task, which needs a multilingual model for speech that is not English). The same form as a
    transcription; ``language``, which OpenAI's translations do not take, names the speech's."""
    return await _file_request(request, "translate")
