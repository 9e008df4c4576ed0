"""What the three HTTP APIs share: the error contract, body limits and reading, field values,
model resolution, and decoding and transcribing an upload.

Everything here exists once so that the OpenAI, AI Refinery and Hugging Face front ends answer
the same mistake with the same status, code and message (``docs/http-api.md``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import re
import tempfile
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable
from typing import IO, Any, Literal

import numpy as np
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from stream_server import keys, tokens
from stream_server import protocol as p
from stream_server.audio_files import (
    AudioDecodeError,
    AudioTooLong,
    TooManyChannels,
    UnsupportedMedia,
    decode_file,
)
from stream_server.engine import Engine, FileTranscript

log = logging.getLogger(__name__)

# OpenAI's transcription model names; each one means "this server's default model" (listed by
# ``GET /v1/models``), as does any other ``gpt-...transcribe...`` name (dated snapshots to come).
OPENAI_MODEL_ALIASES = (
    "whisper-1",
    "gpt-transcribe",
    "gpt-4o-transcribe",
    "gpt-4o-mini-transcribe",
    "gpt-4o-mini-transcribe-2025-03-20",
    "gpt-4o-mini-transcribe-2025-12-15",
    "gpt-4o-transcribe-diarize",
)
FORM_OVERHEAD_BYTES = 256 * 1024  # multipart headers and text fields allowed on top of the file
MAX_FIELD_BYTES = 64 * 1024  # one text field (prompt, JSON options)
MAX_AUDIO_SECONDS = 4 * 3600  # decoded length bound (a 25 MB low-bitrate file can hold hours)
CONCURRENT_FILES = 4  # files decoded/transcribed at once; more requests wait their turn
SPOOL_MEMORY_BYTES = 1 << 20  # uploads larger than this spill from memory to a temporary file
MAX_LABEL_CHARS = 64  # a channel's name (``SessionConfig.channel_labels``)
# Always asked of the engine: confidence and word timings are derived from them.
ENGINE_INCLUDES: tuple[Literal["logprobs", "words"], ...] = ("logprobs", "words")

Endpoint = Callable[[Request], Awaitable[Response]]


# ------------------------------------------------------------------------------------ errors


class ApiError(Exception):
    """A refusal in the contract's shape: ``{"error": {"message", "type", "param", "code"}}``."""

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
        """The JSON answer; a 413 also closes the connection, since the unread body may still be arriving."""
        headers = {"Connection": "close"} if self.status == 413 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def invalid(param: str, message: str) -> ApiError:
    """A bad parameter: 400 ``invalid_value`` whose message and ``param`` name the field."""
    return ApiError(400, "invalid_value", f"{param}: {message}", param=param)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "file_too_large", f"the upload exceeds the limit of {limit} bytes", param="file")


def api_endpoint(handler: Endpoint) -> Endpoint:
    """Turn an :class:`ApiError` into its response and a vanished client into 499.

    Server-side failures (5xx) are logged, since the client is the only other place they appear.
    """

    @functools.wraps(handler)
    async def endpoint(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as exc:
            if exc.status >= 500:
                log.warning("transcription failed: %s", exc.message)
            return exc.response()
        except ClientDisconnect:
            return Response(status_code=499)

    return endpoint


def bearer_key(request: Request) -> str:
    """The key of ``Authorization: Bearer <key>``, or "" without one."""
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    return key.strip() if scheme.lower() == "bearer" else ""


def bearer_principal(request: Request) -> keys.Principal | None:
    """Who the request's bearer key is (the app's key ring, ``keys.py``): the anonymous client
    when no keys are configured, None for a missing or unknown key."""
    return keys.ring_of(request.app.state).identify(bearer_key(request) or None)


def require_api_key(request: Request) -> None:
    """With API keys configured (``--api-keys``, ``--api-keys-file``), transcription requests
    carry ``Authorization: Bearer <key>``, as the OpenAI and Hugging Face clients send it: 401
    without one, 403 with one the server does not know. Keys are never logged."""
    ring = keys.ring_of(request.app.state)
    if not ring.configured:
        return
    key = bearer_key(request)
    if not key:
        raise ApiError(401, "invalid_api_key", "this server requires an API key: send Authorization: Bearer <key>")
    if ring.identify(key) is not None:
        return
    # A browser page has no key, only a short-lived single-use stream token (tokens.py), good
    # while the key that minted it is.
    grant = tokens.store_of(request.app.state).redeem(key, "stream")
    if grant is None or ring.principal(grant.owner) is None:
        raise ApiError(403, "invalid_api_key", "the API key is not valid for this server")


# ------------------------------------------------------------------------------ body reading


class TooLarge(Exception):
    """A body passed its limit while streaming in (raised inside the parser, mapped to 413)."""


def _check_length(request: Request, limit: int) -> None:
    """Refuse an over-limit body from its ``Content-Length`` before reading a byte of it."""
    declared = request.headers.get("content-length")
    if declared is None:
        return
    try:
        size = int(declared)
    except ValueError:
        raise ApiError(400, "invalid_content_length", "Content-Length is not a number") from None
    if size > limit:
        raise ApiError(
            413, "file_too_large", f"the request body of {size} bytes exceeds the limit of {limit} bytes", param="file"
        )


async def _counted(chunks: AsyncIterable[bytes], limit: int) -> AsyncGenerator[bytes, None]:
    """``chunks`` (a body as it streams in), failing as soon as more than ``limit`` bytes have arrived.

    A missing or lying ``Content-Length`` (chunked uploads) must not let a body grow unbounded.
    """
    seen = 0
    async for chunk in chunks:
        seen += len(chunk)
        if seen > limit:
            raise TooLarge(seen)
        yield chunk


async def read_multipart(request: Request, file_limit: int) -> list[tuple[str, str | UploadFile]]:
    """The multipart form's items in order; files are spooled by Starlette, never held whole."""
    content_type = request.headers.get("content-type", "")
    if not content_type.lower().startswith("multipart/form-data"):
        raise ApiError(400, "missing_file", "send the audio as multipart/form-data with a 'file' part", param="file")
    limit = file_limit + FORM_OVERHEAD_BYTES
    _check_length(request, limit)
    parser = MultiPartParser(request.headers, _counted(request.stream(), limit), max_files=4, max_fields=200, max_part_size=MAX_FIELD_BYTES)
    try:
        form = await parser.parse()
    except TooLarge:
        raise too_large(file_limit) from None
    except MultiPartException as exc:
        raise ApiError(400, "invalid_multipart", f"malformed multipart body: {exc.message}") from None
    return list(form.multi_items())


async def read_body(request: Request, limit: int) -> tempfile.SpooledTemporaryFile[bytes]:
    """The raw body in a spooled temporary file, rewound; the caller closes it."""
    _check_length(request, limit)
    try:
        return await spool_limited(request.stream(), limit)
    except TooLarge:
        raise too_large(limit) from None


async def spool_limited(chunks: AsyncIterable[bytes], limit: int) -> tempfile.SpooledTemporaryFile[bytes]:
    """``chunks`` in a spooled temporary file, rewound (the caller closes it); :class:`TooLarge`
    as soon as more than ``limit`` bytes have come, with nothing left open."""
    spool = new_spool()
    try:
        async for chunk in _counted(chunks, limit):
            spool.write(chunk)
    except BaseException:
        spool.close()
        raise
    spool.seek(0)
    return spool


def new_spool() -> tempfile.SpooledTemporaryFile[bytes]:
    """Small uploads stay in memory; large ones go to disk rather than the heap."""
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)


# ------------------------------------------------------------------------------ field values

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", "", "none", "null"}
_NONE = ("", "none", "null")


def parse_bool(param: str, value: Any) -> bool:
    """Form booleans as clients spell them (``true``, ``True``, ``1``, ``on``, ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise invalid(param, f"expected true or false, got {value!r}")


def parse_number(param: str, value: Any, lo: float | None = None, hi: float | None = None) -> float:
    """A number within ``[lo, hi]`` (NaN refused), from a form string or a JSON value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise invalid(param, f"expected a number, got {value!r}") from None
    if math.isnan(number) or (lo is not None and number < lo) or (hi is not None and number > hi):
        raise invalid(param, f"must be between {lo:g} and {hi:g}" if hi is not None else f"must be at least {lo:g}")
    return number


def parse_optional_number(param: str, value: Any, lo: float | None = None, hi: float | None = None) -> float | None:
    """As :func:`parse_number`, but empty, ``None`` and ``null`` (Python clients' ``str(None)``) mean unset."""
    if value is None or str(value).strip().lower() in _NONE:
        return None
    return parse_number(param, value, lo, hi)


def _list_items(param: str, value: Any) -> list[Any]:
    """One field value as a list: already one, a JSON array, or comma-separated text."""
    if isinstance(value, list):
        return value
    text = str(value).strip()
    if not text.startswith("["):
        return [part for part in text.split(",") if part.strip()]
    try:
        items = p.loads_json(text)
    except json.JSONDecodeError:
        raise invalid(param, f"not a JSON array: {text[:60]!r}") from None
    if not isinstance(items, list):
        raise invalid(param, "expected an array")
    return items


def parse_string_list(param: str, values: list[Any], allowed: tuple[str, ...]) -> list[str]:
    """Values as repeated fields (OpenAI: ``include[]``), JSON arrays (AI Refinery) or commas.

    Each item must be one of ``allowed``; duplicates collapse, first occurrence order is kept.
    """
    out: list[str] = []
    for value in values:
        for item in _list_items(param, value):
            if not isinstance(item, str) or item.strip() not in allowed:
                raise invalid(param, f"unsupported value {item!r}; expected any of {', '.join(allowed)}")
            if item.strip() not in out:
                out.append(item.strip())
    return out


def parse_labels(param: str, values: list[Any], most: int) -> list[str]:
    """Names in order, as repeated fields, a JSON array or comma-separated text (``agent,customer``):
    each non-empty, at most ``most`` of them."""
    labels: list[str] = []
    for value in values:
        for item in _list_items(param, value):
            label = str(item).strip() if isinstance(item, (str, int)) else ""
            if not label or len(label) > MAX_LABEL_CHARS:
                raise invalid(param, f"each label must be 1-{MAX_LABEL_CHARS} characters, got {item!r}")
            labels.append(label)
    if len(labels) > most:
        raise invalid(param, f"at most {most} labels, got {len(labels)}")
    return labels


# ----------------------------------------------------------------------------------- models


_OPENAI_TRANSCRIBE = re.compile(r"gpt-[a-z0-9.-]*transcribe[a-z0-9.-]*")


def _is_hub_name(name: str) -> bool:
    """Hub names of faster-whisper models are fine; local paths are not for HTTP clients to probe."""
    return not name.startswith(("/", ".", "~")) and "\\" not in name and ".." not in name


def resolve_model(engine: Engine, name: str | None, *, param: str = "model") -> str:
    """The registry name for a requested model; OpenAI's names mean the server default."""
    default = engine.settings.model
    if not name or name in OPENAI_MODEL_ALIASES or _OPENAI_TRANSCRIBE.fullmatch(name):
        return default
    listed = {info.id for info in engine.registry.listing()}
    if name in listed:
        return name
    hf = re.fullmatch(r"openai/whisper-(.+)", name)  # Hugging Face ids of the same checkpoints
    if hf and hf.group(1) in listed:
        return hf.group(1)
    if _is_hub_name(name) and engine.registry.exists(name):
        return name
    raise ApiError(404, "model_not_found", f"model {name!r} is not known to this server; see GET /v1/models", param=param)


async def ensure_loaded(engine: Engine, model: str, *, param: str = "model") -> None:
    """Load the model before any audio is decoded, so a bad model costs the client no upload work."""
    if model in engine.registry.loaded():
        return
    try:
        await asyncio.to_thread(engine.registry.get, model)
    except LookupError as exc:
        raise ApiError(404, "model_not_found", str(exc), param=param) from None
    except Exception as exc:  # noqa: BLE001 - offline hub name, broken directory, ...
        raise ApiError(502, "model_unavailable", f"model {model!r} could not be loaded: {exc}", param=param) from None


def check_language(engine: Engine, model: str, language: str | None, *, param: str = "language") -> None:
    """Refuse a language the (loaded) model cannot transcribe: an English-only model would read
    the speech as English words, a wrong transcript with no warning."""
    if language is not None and not engine.registry.speaks(model, language):
        raise ApiError(400, "unsupported_language", p.unsupported_language_message(model, language), param=param)


# ---------------------------------------------------------------------------- transcription


class FileJobs:
    """Bounds how many uploads are decoded and transcribed at once (each holds its audio)."""

    def __init__(self, limit: int) -> None:
        self.semaphore = asyncio.Semaphore(limit)


def file_jobs(request: Request) -> FileJobs:
    """The app's one :class:`FileJobs`, made on first use (it needs the running event loop)."""
    state = request.app.state
    if getattr(state, "file_jobs", None) is None:
        state.file_jobs = FileJobs(CONCURRENT_FILES)
    jobs: FileJobs = state.file_jobs
    return jobs


def _decode_and_close(fileobj: IO[bytes], split_channels: bool) -> np.ndarray:
    """Decode, then close the upload: its spool is no longer needed while the audio is transcribed."""
    try:
        return decode_file(fileobj, max_seconds=MAX_AUDIO_SECONDS, split_channels=split_channels)
    finally:
        fileobj.close()


async def decode_upload(fileobj: IO[bytes], *, split_channels: bool = False) -> np.ndarray:
    """16 kHz samples of an upload (off the event loop): mono, or with ``split_channels`` one
    column per channel of a file that has several; else the contract's 400/413/415/500."""
    try:
        return await asyncio.to_thread(_decode_and_close, fileobj, split_channels)
    except UnsupportedMedia as exc:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"{exc}. Supported: wav, mp3, m4a, flac, ogg, webm and other audio FFmpeg decodes",
            param="file",
        ) from None
    except TooManyChannels as exc:
        raise ApiError(400, "too_many_channels", str(exc), param="multichannel") from None
    except AudioTooLong as exc:
        raise ApiError(413, "audio_too_long", str(exc), param="file") from None
    except AudioDecodeError as exc:
        raise ApiError(500, "audio_decode_failed", f"the audio could not be decoded: {exc}", param="file") from None


def with_channels(config: p.SessionConfig, audio: np.ndarray, labels: list[str] | None, *, by_speaker: bool = False) -> p.SessionConfig:
    """The session a decoded file runs as: as many channels as ``audio`` has columns, named by
    ``labels`` (400 when their number is not the file's). ``by_speaker``: the client asked for
    speakers told apart, which this server does by channel only (400 for a file of one)."""
    channels = audio.shape[1] if audio.ndim == 2 else 1
    if labels is not None and len(labels) != channels:
        raise invalid("channel_labels", f"the file has {channels} channel(s) and {len(labels)} label(s) were given: name each channel once")
    if by_speaker and channels < 2:
        raise ApiError(
            400,
            "diarization_unavailable",
            "this server tells speakers apart by channel (a recording with one voice per channel, such as a "
            "call's two legs); this file has one channel: ask for json or verbose_json",
            param="response_format",
        )
    return config.model_copy(update={"channels": channels, "channel_labels": labels})


def session_config(model: str, **options: Any) -> p.SessionConfig:
    """The session a file runs as: the WebSocket session's config, with logprobs and words always on."""
    return p.SessionConfig(model=model, include=list(ENGINE_INCLUDES), **options)


def raise_engine_errors(result: FileTranscript) -> None:
    """A model that failed to load (502) outranks a failed decode (500), whatever came first."""
    for event in result.errors:
        if event.error.code == "model_unavailable":
            raise ApiError(502, "model_unavailable", event.error.message, param="model")
    for event in result.errors:
        if event.error.code == "decode_failed":
            raise ApiError(500, "decode_failed", f"the speech decoder failed: {event.error.message}")


async def transcribe_upload(
    request: Request,
    fileobj: IO[bytes],
    config: p.SessionConfig,
    *,
    split_channels: bool = False,
    labels: list[str] | None = None,
    by_speaker: bool = False,
) -> FileTranscript:
    """Decode and transcribe one upload in a job slot, count its audio, and raise engine errors;
    with ``split_channels``, each channel of the file on its own (named by ``labels``; with
    ``by_speaker``, a file of one channel is refused: see :func:`with_channels`).

    The slot covers decoding too, since decoded audio is what the bound protects memory from.
    """
    engine: Engine = request.app.state.engine
    async with file_jobs(request).semaphore:
        audio = await decode_upload(fileobj, split_channels=split_channels)
        result = await engine.transcribe(audio, with_channels(config, audio, labels, by_speaker=by_speaker))
    engine.metrics.audio_seconds.inc(result.done.usage.seconds)
    raise_engine_errors(result)
    return result
