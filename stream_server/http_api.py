"""HTTP transcription APIs: OpenAI-compatible, AI-Refinery-compatible and Hugging-Face-style.

All of them run through the same :class:`~stream_server.engine.Engine` as the WebSocket endpoint
(same VAD, commit policy, decoder and shared scheduler): a file is one session fed as fast as the
VAD runs, with every utterance's final decode batched.

Routes
    POST /v1/audio/transcriptions   OpenAI ``audio.transcriptions.create`` (multipart), also the
                                    form encoding of AI Refinery's ``audio.transcriptions.create``
    POST /models/{model_id}         Hugging Face Inference ``automatic-speech-recognition``
    GET  /v1/models[/{id}]          the models this server can serve
    POST /authentication/validate   AI Refinery's client calls it when it is constructed; this server
                                    has no accounts, so any key is accepted

Every error is ``{"error": {"message", "type", "param", "code"}}`` with the status listed in
``docs/http-api.md``. Uploads are streamed to a spooled temporary file through a byte counter, so a
body over the limit is refused (413) without being held in memory; ``Content-Length`` is checked
before a byte is read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import re
import tempfile
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from pydantic import ValidationError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from stream_server import formats
from stream_server import protocol as p
from stream_server.audio_files import AudioDecodeError, AudioTooLong, UnsupportedMedia, decode_file
from stream_server.engine import Engine, FileTranscript

log = logging.getLogger(__name__)

# OpenAI's transcription model names; each one means "this server's default model".
OPENAI_MODEL_ALIASES = (
    "whisper-1",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-03-20",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-4o-transcribe-diarize",
)
RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
GRANULARITIES = ("word", "segment")
# ``logprobs`` is OpenAI's; ``confidence`` and ``segment`` are what AI Refinery's client sends (word
# confidences and segment ids in verbose_json); ``words`` mirrors the WebSocket option.
INCLUDES = ("logprobs", "confidence", "segment", "words")
FORM_OVERHEAD_BYTES = 256 * 1024  # multipart headers and text fields allowed on top of the file
MAX_FIELD_BYTES = 64 * 1024  # one text field (prompt, JSON options)
MAX_AUDIO_SECONDS = 4 * 3600  # decoded length bound (a 25 MB low-bitrate file can hold hours)
CONCURRENT_FILES = 4  # files decoded/transcribed at once; more requests wait their turn
CHUNK_BYTES = 1 << 16


# ------------------------------------------------------------------------------------ errors


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, *, param: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"Connection": "close"} if self.status == 413 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, "invalid_value", f"{param}: {message}", param=param)


# ------------------------------------------------------------------------------ body reading


class _TooLarge(Exception):
    pass


def _check_length(request: Request, limit: int) -> None:
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            size = int(declared)
        except ValueError:
            raise ApiError(400, "invalid_content_length", "Content-Length is not a number") from None
        if size > limit:
            raise ApiError(
                413, "file_too_large", f"the request body of {size} bytes exceeds the limit of {limit} bytes", param="file"
            )


async def _counted(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body, failing as soon as more than ``limit`` bytes have arrived."""
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise _TooLarge(seen)
        yield chunk


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "file_too_large", f"the upload exceeds the limit of {limit} bytes", param="file")


async def _read_multipart(request: Request, file_limit: int) -> list[tuple[str, str | UploadFile]]:
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(
            400,
            "missing_file",
            "send the audio as multipart/form-data with a 'file' part",
            param="file",
        )
    limit = file_limit + FORM_OVERHEAD_BYTES
    _check_length(request, limit)
    parser = MultiPartParser(request.headers, _counted(request, limit), max_files=4, max_fields=200, max_part_size=MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except _TooLarge:
        raise _too_large(file_limit) from None
    except MultiPartException as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc.message}") from None
    except ClientDisconnect:
        raise
    return list(form.multi_items())


async def _read_raw(request: Request, limit: int) -> tempfile.SpooledTemporaryFile:
    _check_length(request, limit)
    spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)
    try:
        async for chunk in _counted(request, limit):
            spool.write(chunk)
    except _TooLarge:
        spool.close()
        raise _too_large(limit) from None
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


# --------------------------------------------------------------------------- parameter parsing

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "", "none", "null"}


def _bool(param: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise invalid(param, f"expected true or false, got {value!r}")


def _number(param: str, value: Any, lo: float | None = None, hi: float | None = None, *, optional: bool = False) -> float | None:
    if optional and (value is None or str(value).strip().lower() in ("", "none", "null")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise invalid(param, f"expected a number, got {value!r}") from None
    if number != number or (lo is not None and number < lo) or (hi is not None and number > hi):
        raise invalid(param, f"must be between {lo:g} and {hi:g}" if hi is not None else f"must be at least {lo:g}")
    return number


def _string_list(param: str, values: list[Any], allowed: tuple[str, ...]) -> list[str]:
    """Values as repeated fields (OpenAI: ``include[]``), JSON arrays (AI Refinery) or commas."""
    out: list[str] = []
    for value in values:
        if isinstance(value, list):
            items = value
        else:
            text = str(value).strip()
            if text.startswith("["):
                try:
                    items = json.loads(text)
                except json.JSONDecodeError:
                    raise invalid(param, f"not a JSON array: {text[:60]!r}") from None
                if not isinstance(items, list):
                    raise invalid(param, "expected an array")
            else:
                items = [part for part in text.split(",") if part.strip()]
        for item in items:
            if not isinstance(item, str) or item.strip() not in allowed:
                raise invalid(param, f"unsupported value {item!r}; expected any of {', '.join(allowed)}")
            if item.strip() not in out:
                out.append(item.strip())
    return out


_TD_FIELDS = {"type": str, "threshold": float, "prefix_padding_ms": int, "silence_duration_ms": int}


def _chunking(value: Any) -> p.TurnDetection:
    """``"auto"``, a JSON ``server_vad`` object, or the object in bracket form (OpenAI SDK)."""
    param = "chunking_strategy"
    if value is None:
        return p.TurnDetection()
    if isinstance(value, str):
        text = value.strip()
        if text in ("", "auto", '"auto"'):
            return p.TurnDetection()
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise invalid(param, 'expected "auto" or a JSON server_vad object') from None
        if value == "auto":
            return p.TurnDetection()
    if not isinstance(value, dict):
        raise invalid(param, 'expected "auto" or a JSON server_vad object')
    fields: dict[str, Any] = {}
    for key, raw in value.items():
        if key not in _TD_FIELDS:
            raise invalid(f"{param}.{key}", "unknown field")
        kind = _TD_FIELDS[key]
        if kind is str:
            fields[key] = raw
            continue
        if isinstance(raw, bool):
            raise invalid(f"{param}.{key}", f"expected a number, got {raw!r}")
        try:
            number = float(raw)
        except (TypeError, ValueError):
            raise invalid(f"{param}.{key}", f"expected a number, got {raw!r}") from None
        if kind is int:
            if number != int(number):
                raise invalid(f"{param}.{key}", f"expected an integer, got {raw!r}")
            fields[key] = int(number)
        else:
            fields[key] = number
    try:
        return p.TurnDetection.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise invalid(f"{param}.{loc}" if loc else param, first["msg"]) from None


class FileOptions:
    """The validated options of one transcription request (any of the three front ends)."""

    def __init__(self) -> None:
        self.model_name: str | None = None
        self.language: str | None = None
        self.language_given: str | None = None
        self.prompt = ""
        self.response_format = "json"
        self.granularities: list[str] = ["segment"]
        self.include: list[str] = []
        self.temperature = 0.0
        self.turn_detection = p.TurnDetection()
        self.stream = False
        self.timeout: float | None = None

    def apply(self, fields: dict[str, list[Any]]) -> None:
        """Validate and apply form fields (each a list of its values, in order)."""
        handlers: dict[str, Callable[[list[Any]], None]] = {
            "model": lambda v: setattr(self, "model_name", str(v[-1]).strip()),
            "language": self._set_language,
            "prompt": lambda v: setattr(self, "prompt", str(v[-1])[-1000:]),
            "response_format": self._set_format,
            "timestamp_granularities": lambda v: setattr(
                self, "granularities", _string_list("timestamp_granularities", v, GRANULARITIES)
            ),
            "include": lambda v: setattr(self, "include", _string_list("include", v, INCLUDES)),
            "temperature": lambda v: setattr(self, "temperature", _number("temperature", v[-1], 0.0, 1.0)),
            "chunking_strategy": lambda v: setattr(self, "turn_detection", _chunking(v[-1])),
            "stream": lambda v: setattr(self, "stream", _bool("stream", v[-1])),
            "timeout": lambda v: setattr(self, "timeout", _number("timeout", v[-1], 0.0, optional=True)),
        }
        for name, values in fields.items():
            if name in handlers and values:
                handlers[name](values)
            # Other fields (OpenAI's ``known_speaker_names[]``, SDK extras) are ignored, as
            # OpenAI-compatible servers commonly do, so newer clients keep working.

    def _set_language(self, values: list[Any]) -> None:
        value = values[-1]
        if value is None or str(value).strip().lower() in ("", "auto", "none", "null"):
            self.language = self.language_given = None
            return
        try:
            self.language = p.SessionConfig(language=str(value)).language
        except ValidationError:
            raise invalid("language", f"{value!r} is not an ISO-639-1 code (en) or a locale (en-US)") from None
        self.language_given = str(value).strip()

    def _set_format(self, values: list[Any]) -> None:
        value = str(values[-1]).strip()
        if value not in RESPONSE_FORMATS:
            raise invalid("response_format", f"unsupported value {value!r}; expected one of {', '.join(RESPONSE_FORMATS)}")
        self.response_format = value

    @property
    def wants_words(self) -> bool:
        return "word" in self.granularities or "confidence" in self.include or "segment" in self.include or "words" in self.include

    @property
    def reported_language(self) -> str:
        """OpenAI writes ``english``; AI Refinery's clients send and expect locales (``en-US``)."""
        given = self.language_given or ""
        parts = re.split(r"[-_]", given)
        if len(parts) == 2 and len(parts[0]) == 2 and len(parts[1]) == 2:
            return f"{parts[0].lower()}-{parts[1].upper()}"
        return formats.language_name(self.language or "en")


def _collect_fields(items: list[tuple[str, str | UploadFile]]) -> tuple[UploadFile | None, bool, dict[str, list[Any]]]:
    """Group multipart items by field name; ``a[]`` joins ``a`` and ``a[k]`` builds an object."""
    upload: UploadFile | None = None
    file_as_text = False
    fields: dict[str, list[Any]] = {}
    for name, value in items:
        if name == "file":
            if isinstance(value, UploadFile):
                upload = upload or value
            else:
                file_as_text = True
            continue
        if isinstance(value, UploadFile):
            continue  # stray file parts are ignored
        match = re.fullmatch(r"([A-Za-z_]+)\[([A-Za-z_]*)\]", name)
        if match and match.group(2):
            base, key = match.groups()
            holder = fields.setdefault(base, [{}])
            if not isinstance(holder[-1], dict):
                holder.append({})
            holder[-1][key] = value
        else:
            base = match.group(1) if match else name
            fields.setdefault(base, []).append(value)
    extra = fields.pop("extra_body", None)
    if extra:
        overrides = _json_object("extra_body", extra[-1])
        for key, value in overrides.items():
            fields[key] = [value]
    return upload, file_as_text, fields


def _json_object(param: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    text = str(value).strip()
    if not text:
        return {}
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        raise invalid(param, "expected a JSON object") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise invalid(param, "expected a JSON object")
    return data


# ----------------------------------------------------------------------------- models


def resolve_model(engine: Engine, name: str | None, *, param: str = "model") -> str:
    """The registry name for a requested model; OpenAI's names mean the server default."""
    default = engine.settings.model
    if not name or name in OPENAI_MODEL_ALIASES:
        return default
    listed = {info.id for info in engine.registry.listing()}
    if name in listed:
        return name
    hf = re.fullmatch(r"openai/whisper-(.+)", name)  # Hugging Face ids of the same checkpoints
    if hf and hf.group(1) in listed:
        return hf.group(1)
    # Hub names of faster-whisper models are fine; local paths are not for HTTP clients to probe.
    if not name.startswith(("/", ".", "~")) and "\\" not in name and ".." not in name and engine.registry.exists(name):
        return name
    raise ApiError(404, "model_not_found", f"model {name!r} is not known to this server; see GET /v1/models", param=param)


async def _ensure_loaded(engine: Engine, model: str, *, param: str = "model") -> None:
    if model in engine.registry.loaded():
        return
    try:
        await asyncio.to_thread(engine.registry.get, model)
    except LookupError as exc:
        raise ApiError(404, "model_not_found", str(exc), param=param) from None
    except Exception as exc:  # noqa: BLE001 - offline hub name, broken directory, ...
        raise ApiError(502, "model_unavailable", f"model {model!r} could not be loaded: {exc}", param=param) from None


def _model_card(engine: Engine, info) -> dict[str, Any]:
    from faster_whisper.tokenizer import _LANGUAGE_CODES

    multilingual = info.multilingual if info.multilingual is not None else not info.id.endswith(".en")
    card = {
        "id": info.id,
        "object": "model",
        "created": 0,
        "owned_by": "stream-server",
        "source": getattr(info, "source", "alias"),
        "default": info.id == engine.settings.model,
        "languages": sorted(_LANGUAGE_CODES) if multilingual else ["en"],
        "timestamps": ["segment", "word"],
        "logprobs": True,
        "response_formats": list(RESPONSE_FORMATS),
        "streaming": True,
    }
    return card


def model_list(engine: Engine) -> list[dict[str, Any]]:
    cards = [_model_card(engine, info) for info in engine.registry.listing()]
    default = next((c for c in cards if c["id"] == engine.settings.model), None)
    if default is None:
        from stream_server.models import ModelInfo

        default = _model_card(engine, ModelInfo(engine.settings.model, "configured", None))
        cards.insert(0, default)
    for alias in OPENAI_MODEL_ALIASES:
        cards.append({**default, "id": alias, "source": "alias", "alias_of": engine.settings.model, "default": False})
    return cards


async def list_models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": model_list(request.app.state.engine)})


async def get_model(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    model_id = request.path_params["model_id"]
    for card in model_list(engine):
        if card["id"] == model_id:
            return JSONResponse(card)
    return ApiError(404, "model_not_found", f"model {model_id!r} is not known to this server", param="model").response()


async def validate_key(request: Request) -> Response:
    # AI Refinery's client validates its key when constructed; this server has no accounts.
    return JSONResponse({"organization_id": "stream-server", "valid": True})


# -------------------------------------------------------------------------- transcription


class FileJobs:
    """Bounds how many uploads are decoded and transcribed at once (each holds its audio)."""

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)


def _jobs(request: Request) -> FileJobs:
    state = request.app.state
    if getattr(state, "file_jobs", None) is None:
        state.file_jobs = FileJobs(CONCURRENT_FILES)
    return state.file_jobs


async def _decode_upload(fileobj) -> np.ndarray:
    try:
        return await asyncio.to_thread(decode_file, fileobj, max_seconds=MAX_AUDIO_SECONDS)
    except UnsupportedMedia as exc:
        raise ApiError(415, "unsupported_media_type", f"{exc}. Supported: wav, mp3, m4a, flac, ogg, webm and other audio FFmpeg decodes", param="file") from None
    except AudioTooLong as exc:
        raise ApiError(413, "audio_too_long", str(exc), param="file") from None
    except AudioDecodeError as exc:
        raise ApiError(500, "audio_decode_failed", f"the audio could not be decoded: {exc}", param="file") from None


def _session_config(engine: Engine, model: str, opts: FileOptions) -> p.SessionConfig:
    return p.SessionConfig(
        model=model,
        language=opts.language,
        prompt=opts.prompt,
        turn_detection=opts.turn_detection,
        include=["logprobs", "words"],  # always: confidence and word timings are derived from them
    )


def _raise_engine_errors(result: FileTranscript) -> None:
    for event in result.errors:
        if event.error.code == "model_unavailable":
            raise ApiError(502, "model_unavailable", event.error.message, param="model")
    for event in result.errors:
        if event.error.code == "decode_failed":
            raise ApiError(500, "decode_failed", f"the speech decoder failed: {event.error.message}")


def _json_body(result: FileTranscript, opts: FileOptions, verbose: bool) -> dict[str, Any]:
    done = result.done
    body: dict[str, Any] = {}
    if verbose:
        body.update(
            task="transcribe",
            language=opts.reported_language,
            duration=done.usage.seconds,
            text=done.text,
            segments=formats.segments_json(result.segments),
        )
        if opts.wants_words:
            body["words"] = formats.words_json(result.segments)
    else:
        body["text"] = done.text
    if "logprobs" in opts.include:
        body["logprobs"] = formats.logprobs_json(done.logprobs)
    body["usage"] = formats.usage_json(done)
    body.update(success=True, error=None, confidence=formats.confidence(done.logprobs))
    return body


def _render(result: FileTranscript, opts: FileOptions) -> Response:
    fmt = opts.response_format
    if fmt == "text":
        return PlainTextResponse(formats.to_text(result.text))
    if fmt == "srt":
        return PlainTextResponse(formats.to_srt(result.segments), media_type="application/x-subrip")
    if fmt == "vtt":
        return PlainTextResponse(formats.to_vtt(result.segments), media_type="text/vtt")
    return JSONResponse(_json_body(result, opts, verbose=fmt == "verbose_json"))


def _sse(data: dict[str, Any] | str) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


async def _event_stream(engine: Engine, audio: np.ndarray, config: p.SessionConfig, opts: FileOptions, jobs: FileJobs) -> AsyncIterator[bytes]:
    """OpenAI's transcription stream: deltas as text becomes final, then done, then [DONE].

    The slot is taken inside the generator, so a response abandoned before it starts holds none.
    """
    wants_lp = "logprobs" in opts.include
    async with jobs.semaphore:
        async for event in engine.transcribe_events(audio, config):
            if isinstance(event, p.TranscriptDelta):
                yield _sse(
                    {
                        "type": "transcript.text.delta",
                        "delta": event.delta,
                        "text": event.delta,  # AI Refinery's delta event names the field ``text``
                        "logprobs": formats.logprobs_json(event.logprobs) if wants_lp else None,
                    }
                )
            elif isinstance(event, p.TranscriptDone):
                yield _sse(
                    {
                        "type": "transcript.text.done",
                        "text": event.text,
                        "logprobs": formats.logprobs_json(event.logprobs) if wants_lp else None,
                        "usage": formats.usage_json(event),
                        "confidence": formats.confidence(event.logprobs),
                    }
                )
                engine.metrics.audio_seconds.inc(event.usage.seconds)
            elif isinstance(event, p.Error) and event.error.code in ("model_unavailable", "decode_failed"):
                yield _sse({"type": "error", "error": {"message": event.error.message, "type": "server_error", "param": event.error.param, "code": event.error.code}})
        yield _sse("[DONE]")


async def transcriptions(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    limit = engine.settings.max_file_bytes
    upload: UploadFile | None = None
    try:
        items = await _read_multipart(request, limit)
        upload, file_as_text, fields = _collect_fields(items)
        if upload is None:
            hint = " (it was sent as a text field, not a file)" if file_as_text else ""
            raise ApiError(400, "missing_file", f"the request has no 'file' part{hint}", param="file")
        if upload.size is not None and upload.size > limit:
            raise _too_large(limit)
        if not upload.size:
            raise ApiError(400, "empty_file", "the uploaded file is empty (0 bytes)", param="file")
        opts = FileOptions()
        opts.apply(fields)
        model = resolve_model(engine, opts.model_name)
        await _ensure_loaded(engine, model)
        config = _session_config(engine, model, opts)
        jobs = _jobs(request)
        if opts.stream:
            async with jobs.semaphore:
                audio = await _decode_upload(upload.file)
            await upload.close()
            return StreamingResponse(
                _event_stream(engine, audio, config, opts, jobs),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        async with jobs.semaphore:
            audio = await _decode_upload(upload.file)
            await upload.close()
            result = await engine.transcribe(audio, config)
        engine.metrics.audio_seconds.inc(result.done.usage.seconds)
        _raise_engine_errors(result)
        return _render(result, opts)
    except ApiError as exc:
        if exc.status >= 500:
            log.warning("transcription failed: %s", exc.message)
        return exc.response()
    except ClientDisconnect:
        return Response(status_code=499)
    finally:
        if upload is not None:
            with contextlib.suppress(Exception):
                await upload.close()


# ------------------------------------------------------------------- Hugging Face style


def _hf_parameters(raw: Any) -> tuple[bool | str, float]:
    """Validate ``parameters``: ``return_timestamps`` and ``generation_parameters``.

    Generation parameters are checked for type and otherwise ignored: the decoder is greedy
    (one beam, temperature 0) whatever a client asks, which is what streaming uses too.
    """
    if raw is None:
        return False, 0.0
    if not isinstance(raw, dict):
        raise invalid("parameters", "expected an object")
    stamps = raw.get("return_timestamps", False)
    if stamps not in (True, False, None, "word", "char"):
        raise invalid("parameters.return_timestamps", f"expected a boolean or 'word', got {stamps!r}")
    gen = raw.get("generation_parameters") or raw.get("generate_kwargs") or {}
    if not isinstance(gen, dict):
        raise invalid("parameters.generation_parameters", "expected an object")
    temperature = 0.0
    for key, value in gen.items():
        name = f"parameters.generation_parameters.{key}"
        if key == "temperature":
            temperature = _number(name, value, 0.0, 2.0) or 0.0
        elif key in ("num_beams", "max_new_tokens", "max_length", "min_length", "min_new_tokens", "top_k", "no_repeat_ngram_size", "num_beam_groups"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise invalid(name, f"expected a non-negative integer, got {value!r}")
        elif key in ("do_sample", "early_stopping", "use_cache"):
            if not isinstance(value, bool) and value not in ("never",):
                raise invalid(name, f"expected a boolean, got {value!r}")
    return (stamps or False), temperature


async def hf_transcribe(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    limit = engine.settings.max_file_bytes
    spool = None
    try:
        model = resolve_model(engine, request.path_params["model_id"], param="model_id")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        return_timestamps: bool | str = False
        if content_type == "application/json":
            # base64 grows the audio by 4/3: bound the JSON body accordingly.
            body_limit = limit * 4 // 3 + 4 + FORM_OVERHEAD_BYTES
            raw = await _read_raw(request, body_limit)
            try:
                data = json.loads(raw.read())
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
            finally:
                raw.close()
            if not isinstance(data, dict):
                raise ApiError(400, "invalid_json", "the body must be a JSON object")
            inputs = data.get("inputs")
            if inputs is None or inputs == "":
                raise ApiError(400, "missing_file", "the JSON body has no 'inputs' (base64 audio)", param="inputs")
            if not isinstance(inputs, str):
                raise invalid("inputs", "expected base64-encoded audio")
            if inputs.startswith("data:") and "," in inputs:
                inputs = inputs.split(",", 1)[1]  # data URLs
            try:
                audio_bytes = base64.b64decode(inputs, validate=True)
            except (binascii.Error, ValueError):
                raise invalid("inputs", "not valid base64") from None
            del data["inputs"]
            if len(audio_bytes) > limit:
                raise _too_large(limit)
            return_timestamps, _ = _hf_parameters(data.get("parameters"))
            spool = tempfile.SpooledTemporaryFile(max_size=1 << 20)
            spool.write(audio_bytes)
            del audio_bytes, inputs
            spool.seek(0)
        else:
            spool = await _read_raw(request, limit)
        if spool.seek(0, 2) == 0:
            raise ApiError(400, "missing_file", "the request body holds no audio", param="inputs")
        spool.seek(0)
        await _ensure_loaded(engine, model, param="model_id")
        # x-wait-for-model: models load on demand and the request waits, so both values work;
        # x-use-cache: nothing is cached, every request is transcribed afresh.
        jobs = _jobs(request)
        async with jobs.semaphore:
            audio = await _decode_upload(spool)
            result = await engine.transcribe(audio, p.SessionConfig(model=model, include=["logprobs", "words"]))
        engine.metrics.audio_seconds.inc(result.done.usage.seconds)
        _raise_engine_errors(result)
        body: dict[str, Any] = {"text": result.text}
        if return_timestamps == "word":
            body["chunks"] = [
                {"text": w["word"], "timestamp": [w["start"], w["end"]]} for w in formats.words_json(result.segments)
            ]
        else:
            body["chunks"] = [
                {"text": s.text.strip(), "timestamp": [s.start, s.end]} for s in formats.spoken(result.segments)
            ]
        return JSONResponse(body)
    except ApiError as exc:
        if exc.status >= 500:
            log.warning("transcription failed: %s", exc.message)
        return exc.response()
    except ClientDisconnect:
        return Response(status_code=499)
    finally:
        if spool is not None:
            spool.close()


# ------------------------------------------------------------------------------- routes


def routes() -> list[Route]:
    return [
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/models/{model_id:path}", hf_transcribe, methods=["POST"]),
        Route("/authentication/validate", validate_key, methods=["POST"]),
    ]
