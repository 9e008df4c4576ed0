"""Deepgram's pre-recorded transcription: ``POST /v1/listen`` with the audio as the request body.

The live dialect (``dialects/deepgram.py``) serves the WebSocket on the same path; this is the
other half of what the Deepgram SDK does against a base URL (``client.listen.v1.media
.transcribe_file``), and what contact centers send their stored calls to: a stereo recording with
``multichannel=true`` is transcribed leg by leg (one ``results.channels`` entry per leg, each with
its own turns), ``utterances=true`` adds every turn in time order with its channel.

The query parameters are the live endpoint's, parsed by the same function, so a value Deepgram
refuses is refused the same way here (400 ``{err_code, err_msg, request_id}``); containerised audio
is recognised by content as for the OpenAI route, raw audio needs ``encoding`` and
``sample_rate`` (and ``channels``). The file is transcribed as the OpenAI route transcribes one:
every turn's final decode batched, in the file job slots. Deepgram's ``{"url": ...}`` body has the
audio fetched from there (``http/remote_audio.py``), and ``callback=URL`` answers at once with the
``request_id`` and sends the response to that URL when it is ready (``callbacks.py``); which URLs
a request may name is ``--request-urls``' choice.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import shutil
import uuid
from collections.abc import Sequence
from typing import IO, Any

import httpx
import numpy as np
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stream_server import formats, keys
from stream_server import protocol as p
from stream_server.audio import decode_samples, resample
from stream_server.callbacks import METHODS, Callback
from stream_server.dialects import deepgram
from stream_server.dialects.base import HandshakeRejected
from stream_server.dialects.deepgram_audio import AMR_MAGIC, DECODED_ENCODINGS, RAW_ENCODINGS, SAMPLE_WIDTH
from stream_server.engine import Engine, FileTranscript
from stream_server.http.common import (
    MAX_FIELD_BYTES,
    ApiError,
    FileJobs,
    check_language,
    decode_upload,
    ensure_loaded,
    file_jobs,
    new_spool,
    raise_engine_errors,
    read_body,
    resolve_model,
    session_config,
    with_channels,
)
from stream_server.http.remote_audio import fetch_audio
from stream_server.request_urls import UrlPolicy, UrlRefused

#: Deepgram's ``err_code`` for each status this route answers with.
ERROR_CODES = {400: "Bad Request", 401: "INVALID_AUTH", 413: "PAYLOAD_TOO_LARGE", 429: "TOO_MANY_REQUESTS", 500: "INTERNAL_SERVER_ERROR", 502: "MODEL_UNAVAILABLE"}
MAX_JSON_BYTES = MAX_FIELD_BYTES  # a {"url": ...} body


def _status(status: int) -> int:
    """Content that is not audio is 400, as Deepgram answers it ("corrupt or unsupported data"),
    so the SDK raises its typed ``BadRequestError``, not the 415 of the OpenAI route."""
    return 400 if status == 415 else status


def _error_body(status: int, message: str, request_id: str, code: str | None = None) -> dict[str, Any]:
    return {"err_code": code or ERROR_CODES.get(_status(status), "Bad Request"), "err_msg": message, "request_id": request_id}


def _error(status: int, message: str, request_id: str) -> JSONResponse:
    """An error as Deepgram's REST API answers one (the SDK raises it with this body)."""
    return JSONResponse(_error_body(status, message, request_id), status_code=_status(status), headers={"dg-request-id": request_id})


def _authorize(request: Request) -> str | None:
    """With API keys configured, ``Authorization: Token <key>`` (the SDK's) or ``Bearer <key>``;
    the key's name (what a callback's ``dg-token`` says), or None without keys."""
    ring = keys.ring_of(request.app.state)
    if not ring.configured:
        return None
    scheme, _, key = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() not in ("token", "bearer") or not key.strip():
        raise ApiError(401, "invalid_api_key", "this server requires an API key: send Authorization: Token <key>")
    principal = ring.identify(key.strip())
    if principal is None:
        raise ApiError(401, "invalid_api_key", "Invalid credentials.")
    return principal.label


def _raw_audio(data: bytes, options: deepgram.ListenOptions) -> np.ndarray:
    """Headerless audio in ``encoding`` at ``sample_rate``, ``channels`` interleaved: at 16 kHz,
    one column per channel with ``multichannel``, else averaged into one voice (as Deepgram mixes)."""
    assert options.encoding is not None and options.sample_rate is not None
    audio_format = RAW_ENCODINGS[options.encoding]
    width = SAMPLE_WIDTH[audio_format] * options.channels
    samples, _ = decode_samples(data[: len(data) - len(data) % width], audio_format)
    frames = samples.reshape(-1, options.channels)
    if not options.multichannel or options.channels == 1:
        return resample(frames.mean(axis=1, dtype=np.float32), options.sample_rate)
    return resample(frames, options.sample_rate)


def _prefixed(prefix: bytes, spool: IO[bytes]) -> IO[bytes]:
    """``spool``'s bytes after ``prefix``, in a new spool (AMR frames sent without their file's
    first line, as Deepgram takes ``encoding=amr-nb``)."""
    out = new_spool()
    out.write(prefix)
    spool.seek(0)
    shutil.copyfileobj(spool, out)
    spool.close()
    return out


async def _audio(spool: IO[bytes], options: deepgram.ListenOptions) -> np.ndarray:
    if options.encoding is None or options.encoding in DECODED_ENCODINGS:
        magic = AMR_MAGIC.get(options.encoding or "")
        if magic is not None and not spool.read(5).startswith(b"#!AMR"):
            spool = _prefixed(magic, spool)
        spool.seek(0)
        return await decode_upload(spool, split_channels=options.multichannel)
    try:
        return _raw_audio(spool.read(), options)
    finally:
        spool.close()


def _alternative(segments: Sequence[p.TranscriptSegment], punctuated: bool, language: str | None, *, paragraphs: bool = False) -> dict[str, Any]:
    """One transcript of ``segments`` (a channel's turns, or one turn) as Deepgram's alternative."""
    text = " ".join(seg.text.strip() for seg in segments if seg.text.strip())
    words = [w for seg in segments for w in seg.words or []]
    confidence = sum(w.probability for w in words) / len(words) if words else 0.0
    alternative: dict[str, Any] = {
        "transcript": text if punctuated else deepgram.plain_text(text),
        "confidence": round(confidence, 4),
        "words": deepgram.result_words(words, punctuated=punctuated, language=language),
    }
    if paragraphs:
        alternative["paragraphs"] = paragraphs_of(segments)
    if language is not None:
        alternative["languages"] = [language]
    return alternative


#: A turn that starts this long after the channel's last one opens a new paragraph ...
PARAGRAPH_GAP_S = 2.0
#: ... as does the first turn after a paragraph has reached this many words.
PARAGRAPH_WORDS = 60
SENTENCE_ENDS = (".", "?", "!", "\u2026")


def paragraphs_of(segments: Sequence[p.TranscriptSegment]) -> dict[str, Any]:
    """Deepgram's ``paragraphs`` (``paragraphs=true``): the channel's turns grouped into
    paragraphs, each split into sentences at the decoder's sentence marks, and the transcript
    written as paragraphs (each after a blank line, as Deepgram writes it).

    Deepgram breaks paragraphs on punctuation, speakers and channels by its own model; here a
    paragraph is one or more consecutive turns of a channel (its speaker), and a new one begins
    after a pause of ``PARAGRAPH_GAP_S`` or once one holds ``PARAGRAPH_WORDS`` words."""
    paragraphs: list[dict[str, Any]] = []
    last_end = -math.inf
    for seg in segments:
        sentences = _sentences(seg.words or [])
        if not sentences:
            continue
        if not paragraphs or seg.start - last_end >= PARAGRAPH_GAP_S or paragraphs[-1]["num_words"] >= PARAGRAPH_WORDS:
            paragraphs.append({"sentences": [], "num_words": 0, "start": sentences[0]["start"], "end": sentences[0]["end"]})
        paragraph = paragraphs[-1]
        paragraph["sentences"].extend({k: v for k, v in s.items() if k != "words"} for s in sentences)
        paragraph["num_words"] += sum(s["words"] for s in sentences)
        paragraph["end"] = sentences[-1]["end"]
        last_end = seg.end
    texts = [" ".join(s["text"] for s in paragraph["sentences"]) for paragraph in paragraphs]
    return {"transcript": "\n" + "\n\n".join(texts) if texts else "", "paragraphs": paragraphs}


def _sentences(words: Sequence[p.WordTiming]) -> list[dict[str, Any]]:
    """A turn's words as sentences (text, start, end and word count), split after each word that
    ends a sentence; a mark the decoder sent as a word of its own closes the word before it."""
    sentences: list[dict[str, Any]] = []
    current: list[str] = []
    start = end = 0.0
    count = 0
    for w in words:
        text = w.word.strip()
        if not text:
            continue
        if not deepgram.plain_word(text):  # a lone mark: it belongs to the word before
            if current:
                current[-1] += text
        else:
            if not current:
                start = w.start
            current.append(text)
            count += 1
            end = w.end
        if current and current[-1].endswith(SENTENCE_ENDS):
            sentences.append({"text": " ".join(current), "start": round(start, 3), "end": round(end, 3), "words": count})
            current, count = [], 0
    if current:
        sentences.append({"text": " ".join(current), "start": round(start, 3), "end": round(end, 3), "words": count})
    return sentences


def response_body(
    result: FileTranscript, options: deepgram.ListenOptions, *, model: str, request_id: str, sha256: str, created: datetime.datetime
) -> dict[str, Any]:
    """Deepgram's pre-recorded response: ``metadata`` and ``results.channels`` (one per channel
    of the session), with ``results.utterances`` when asked for."""
    punctuated = options.punctuate or options.smart_format or options.paragraphs  # paragraphs are made of punctuation
    spoken = sorted(formats.spoken(result.segments), key=lambda seg: (seg.start, seg.channel))
    detected = options.language is None
    channels = []
    for index in range(max(1, len(result.done.channels))):
        mine = [seg for seg in spoken if seg.channel == index]
        language = formats.file_language(mine) if detected else None
        entry: dict[str, Any] = {"alternatives": [_alternative(mine, punctuated, language, paragraphs=options.paragraphs)]}
        if language is not None:
            entry["detected_language"] = language
        channels.append(entry)
    model_uuid, info = deepgram.model_info(model)
    body: dict[str, Any] = {
        "metadata": {
            "transaction_key": "deprecated",
            "request_id": request_id,
            "sha256": sha256,
            "created": created.astimezone(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "duration": result.done.usage.seconds,
            "channels": len(channels),
            "models": [model_uuid],
            "model_info": {model_uuid: info},
            **({"extra": dict(options.extra)} if options.extra else {}),
        },
        "results": {"channels": channels},
    }
    if options.utterances:
        body["results"]["utterances"] = [_utterance(seg, punctuated, detected) for seg in spoken]
    return body


def _utterance(seg: p.TranscriptSegment, punctuated: bool, detected: bool) -> dict[str, Any]:
    alternative = _alternative([seg], punctuated, seg.language if detected else None)
    return {
        "start": seg.start,
        "end": seg.end,
        "confidence": alternative["confidence"],
        "channel": seg.channel,
        "transcript": alternative["transcript"],
        "words": alternative["words"],
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"stream-server:utterance:{seg.item_id}")),
    }


def _with_sha256(spool: IO[bytes]) -> tuple[IO[bytes], str]:
    """``spool`` (rewound) and the SHA-256 of its bytes, which Deepgram's metadata reports."""
    digest = hashlib.sha256()
    spool.seek(0)
    for block in iter(lambda: spool.read(1 << 20), b""):
        digest.update(block)
    spool.seek(0)
    return spool, digest.hexdigest()


async def _body(request: Request, engine: Engine) -> tuple[IO[bytes], str]:
    """The request body spooled (the server's upload limit applies) and its SHA-256; 400 when
    it is empty."""
    spool = await read_body(request, engine.settings.max_file_bytes)
    if not spool.read(1):
        spool.close()
        raise ApiError(400, "empty_file", "the request body is empty: send the audio as the body")
    return _with_sha256(spool)


async def _audio_url(request: Request, policy: UrlPolicy) -> str:
    """The URL of a JSON body (``{"url": "https://..."}``, the SDK's ``transcribe_url``), checked
    against the server's ``--request-urls`` policy before the request is answered."""
    spool = await read_body(request, MAX_JSON_BYTES)
    try:
        body = json.loads(spool.read() or b"null")
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the JSON body is not valid JSON: send {\"url\": \"https://...\"} or the audio itself") from None
    finally:
        spool.close()
    url = body.get("url") if isinstance(body, dict) else None
    if not isinstance(url, str) or not url.strip():
        raise ApiError(400, "missing_url", "a JSON body must be {\"url\": \"https://...\"} (the audio's URL); to send audio, send its bytes with its content type")
    await _reachable(policy, url.strip(), "audio")
    return url.strip()


async def _reachable(policy: UrlPolicy, url: str, what: str) -> httpx.URL:
    try:
        parsed = policy.parse(url, what)
        await policy.check_host(parsed)
    except UrlRefused as exc:
        raise ApiError(400, "url_refused", exc.message) from None
    return parsed


async def _callback(request: Request, policy: UrlPolicy, token: str | None) -> Callback | None:
    """``callback`` (and ``callback_method``: post or put) of the query, checked as an audio URL is."""
    url = request.query_params.get("callback", "").strip()
    method = request.query_params.get("callback_method", "post").strip().upper()
    if not url:
        return None
    if method not in METHODS:
        raise ApiError(400, "invalid_callback_method", f"Invalid value for query parameter `callback_method`: expected post or put, got {method.lower()!r}")
    return Callback(await _reachable(policy, url, "callback"), method, token)


@dataclasses.dataclass
class _Job:
    """One pre-recorded request once its parameters are checked: what it transcribes and how."""

    engine: Engine
    jobs: FileJobs
    options: deepgram.ListenOptions
    model: str
    request_id: str
    upload: tuple[IO[bytes], str] | None  # the body and its SHA-256, or None: fetch ``url``
    url: str = ""

    async def answer(self) -> tuple[int, dict[str, Any]]:
        """The status and body Deepgram answers the request with (its error shape on failure)."""
        engine = self.engine
        try:
            if self.upload is None:
                fetched = await fetch_audio(self.url, engine.url_policy, max_bytes=engine.settings.max_file_bytes, total_s=engine.settings.request_url_timeout_s)
                self.upload = _with_sha256(fetched)
            spool, sha256 = self.upload
            config = session_config(self.model, language=self.options.language, prompt=self.options.keyterm or "", redact=list(self.options.redact))
            async with self.jobs.semaphore:
                audio = await _audio(spool, self.options)
                result = await engine.transcribe(audio, with_channels(config, audio, None))
            engine.metrics.audio_seconds.inc(result.done.usage.seconds)
            raise_engine_errors(result)
        except UrlRefused as exc:
            code = ERROR_CODES[413] if exc.status == 413 else "REMOTE_CONTENT_ERROR"
            return exc.status, _error_body(exc.status, exc.message, self.request_id, code)
        except ApiError as exc:
            return _status(exc.status), _error_body(exc.status, exc.message, self.request_id)
        created = datetime.datetime.now(datetime.UTC)
        return 200, response_body(result, self.options, model=self.model, request_id=self.request_id, sha256=sha256, created=created)


async def listen(request: Request) -> Response:
    """``POST /v1/listen``: validate the query, read the body (or the URL it names), transcribe,
    answer as Deepgram: at once, or with ``callback`` at once with the ``request_id`` and later
    at the callback URL."""
    request_id = str(uuid.uuid4())
    engine: Engine = request.app.state.engine
    headers = {"dg-request-id": request_id}
    try:
        token = _authorize(request)
        lists = {name: request.query_params.getlist(name) for name in ("keyterm", "keywords", "extra")}
        options = deepgram.parse_options(dict(request.query_params), engine.registry.exists, request_id, lists)
        policy = engine.url_policy
        callback = await _callback(request, policy, token)
        if callback is not None and engine.callbacks.full:
            raise ApiError(429, "too_many_requests", f"{engine.callbacks.pending} callback requests are waiting: try again later")
        model = resolve_model(engine, options.model)
        await ensure_loaded(engine, model)
        check_language(engine, model, options.language)
        job = _Job(engine, file_jobs(request), options, model, request_id, None)
        if request.headers.get("content-type", "").split(";")[0].strip().lower() == "application/json":
            job.url = await _audio_url(request, policy)
        else:
            job.upload = await _body(request, engine)
    except HandshakeRejected as exc:
        return JSONResponse(dict(exc.body), status_code=exc.status, headers=headers)
    except ApiError as exc:
        return _error(exc.status, exc.message, request_id)
    if callback is not None:
        engine.callbacks.start(request_id, callback, job.answer)
        return JSONResponse({"request_id": request_id}, headers=headers)
    status, body = await job.answer()
    return JSONResponse(body, status_code=status, headers=headers)
