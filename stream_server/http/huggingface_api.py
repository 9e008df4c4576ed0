"""Hugging Face Inference's ``automatic-speech-recognition`` task: ``POST /models/{model_id}``.

``InferenceClient(model="http://HOST:PORT/models/tiny.en")`` posts the raw audio bytes, or JSON
with base64 ``inputs`` and ``parameters``; the answer is ``{"text", "chunks"}``.
``x-wait-for-model``: models load on demand and the request waits, so both values work;
``x-use-cache``: nothing is cached, every request is transcribed afresh.
"""

from __future__ import annotations

import base64
import binascii
import json
import tempfile
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stream_server import formats
from stream_server import protocol as p
from stream_server.engine import Engine, FileTranscript
from stream_server.http.common import (
    FORM_OVERHEAD_BYTES,
    ApiError,
    api_endpoint,
    ensure_loaded,
    invalid,
    new_spool,
    parse_number,
    read_body,
    require_api_key,
    resolve_model,
    session_config,
    too_large,
    transcribe_upload,
)

ReturnTimestamps = bool | str  # False/True (segments) or "word"
_GENERATION = "parameters.generation_parameters"
_INTEGER_GENERATION = (
    "num_beams", "max_new_tokens", "max_length", "min_length", "min_new_tokens", "top_k", "no_repeat_ngram_size", "num_beam_groups",
)
_BOOLEAN_GENERATION = ("do_sample", "early_stopping", "use_cache")


# ------------------------------------------------------------------------------- parameters


def _check_generation(gen: Any) -> None:
    """Type-check ``generation_parameters``; they are otherwise ignored.

    The decoder is greedy (one beam, temperature 0) whatever a client asks, which is what
    streaming uses too; a badly typed value is still refused, as the hosted API would.
    """
    if not isinstance(gen, dict):
        raise invalid(_GENERATION, "expected an object")
    for key, value in gen.items():
        name = f"{_GENERATION}.{key}"
        if key == "temperature":
            parse_number(name, value, 0.0, 2.0)
        elif key in _INTEGER_GENERATION:
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise invalid(name, f"expected a non-negative integer, got {value!r}")
        elif key in _BOOLEAN_GENERATION and not isinstance(value, bool) and value != "never":
            raise invalid(name, f"expected a boolean, got {value!r}")


def _return_timestamps(raw: Any) -> ReturnTimestamps:
    """Validate ``parameters``; what they decide is only whether chunks are segments or words."""
    if raw is None:
        return False
    if not isinstance(raw, dict):
        raise invalid("parameters", "expected an object")
    stamps = raw.get("return_timestamps", False)
    if stamps not in (True, False, None, "word", "char"):
        raise invalid("parameters.return_timestamps", f"expected a boolean or 'word', got {stamps!r}")
    _check_generation(raw.get("generation_parameters") or raw.get("generate_kwargs") or {})
    return stamps or False


# ------------------------------------------------------------------------------------- body


def _json_object(raw: tempfile.SpooledTemporaryFile[bytes]) -> dict[str, Any]:
    """The JSON body as an object; the spool is closed whatever it held."""
    try:
        data = p.loads_json(raw.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApiError(400, "invalid_json", "the body is not valid JSON") from None
    finally:
        raw.close()
    if not isinstance(data, dict):
        raise ApiError(400, "invalid_json", "the body must be a JSON object")
    return data


def _base64_audio(inputs: Any) -> bytes:
    """The audio bytes of ``inputs``: plain base64 or a ``data:`` URL."""
    if inputs is None or inputs == "":
        raise ApiError(400, "missing_file", "the JSON body has no 'inputs' (base64 audio)", param="inputs")
    if not isinstance(inputs, str):
        raise invalid("inputs", "expected base64-encoded audio")
    if inputs.startswith("data:") and "," in inputs:
        inputs = inputs.split(",", 1)[1]
    try:
        return base64.b64decode(inputs, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("inputs", "not valid base64") from None


async def _read_json_audio(request: Request, limit: int) -> tuple[tempfile.SpooledTemporaryFile[bytes], ReturnTimestamps]:
    """The audio of a JSON request, spooled like a raw body, and its ``return_timestamps``."""
    # base64 grows the audio by 4/3: bound the JSON body accordingly.
    data = _json_object(await read_body(request, limit * 4 // 3 + 4 + FORM_OVERHEAD_BYTES))
    audio_bytes = _base64_audio(data.pop("inputs", None))
    if len(audio_bytes) > limit:
        raise too_large(limit)
    return_timestamps = _return_timestamps(data.get("parameters"))
    spool = new_spool()
    spool.write(audio_bytes)
    spool.seek(0)
    return spool, return_timestamps


async def _read_audio(request: Request, limit: int) -> tuple[tempfile.SpooledTemporaryFile[bytes], ReturnTimestamps]:
    """The request's audio, refused when there is none: raw bytes unless the body is JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        spool, return_timestamps = await _read_json_audio(request, limit)
    else:
        spool, return_timestamps = await read_body(request, limit), False
    if spool.seek(0, 2) == 0:
        spool.close()
        raise ApiError(400, "missing_file", "the request body holds no audio", param="inputs")
    spool.seek(0)
    return spool, return_timestamps


# ------------------------------------------------------------------------------------ answer


def _chunks(result: FileTranscript, return_timestamps: ReturnTimestamps) -> list[dict[str, Any]]:
    """Words with ``return_timestamps="word"``, otherwise the spoken segments."""
    if return_timestamps == "word":
        return [{"text": w["word"], "timestamp": [w["start"], w["end"]]} for w in formats.words_json(result.segments)]
    return [{"text": s.text.strip(), "timestamp": [s.start, s.end]} for s in formats.spoken(result.segments)]


@api_endpoint
async def hf_transcribe(request: Request) -> Response:
    """``POST /models/{model_id}``: the model is checked before the body is read."""
    require_api_key(request)
    engine: Engine = request.app.state.engine
    model = resolve_model(engine, request.path_params["model_id"], param="model_id")
    spool, return_timestamps = await _read_audio(request, engine.settings.max_file_bytes)
    try:
        await ensure_loaded(engine, model, param="model_id")
        result = await transcribe_upload(request, spool, session_config(model))
        return JSONResponse({"text": result.text, "chunks": _chunks(result, return_timestamps)})
    finally:
        spool.close()
