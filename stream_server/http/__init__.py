"""HTTP transcription APIs: OpenAI-compatible, AI-Refinery-compatible and Hugging-Face-style.

All of them run through the same :class:`~stream_server.engine.Engine` as the WebSocket endpoint
(same VAD, commit policy, decoder and shared scheduler): a file is one session fed as fast as the
VAD runs, with every utterance's final decode batched.

Routes
    POST /v1/audio/transcriptions   OpenAI ``audio.transcriptions.create`` (multipart), also the
                                    form encoding of AI Refinery's ``audio.transcriptions.create``
    POST /models/{model_id}         Hugging Face Inference ``automatic-speech-recognition``
    POST /v1/listen                 Deepgram's pre-recorded transcription (``listen.v1.media.transcribe_file``)
    GET  /v1/models[/{id}]          the models this server can serve
    POST /authentication/validate   AI Refinery's client calls it when it is constructed; this server
                                    has no accounts, so any key is accepted
    GET  /v1/sessions/{id}/events   a WebSocket session's events as Server-Sent Events (live, or replayed)
    GET  /v1/sessions/{id}/transcript  a session's conversation, live or stored (json, txt, srt, vtt)
    POST /v1/realtime/client_secrets   an API key exchanged for a short-lived, single-use browser token

Every error (but Deepgram's route's, which answers as Deepgram) is ``{"error": {"message", "type", "param", "code"}}`` with the status listed in
``docs/http-api.md``. Uploads are streamed to a spooled temporary file through a byte counter, so a
body over the limit is refused (413) without being held in memory; ``Content-Length`` is checked
before a byte is read.

Modules
    common            the error contract, limits, body reading, field values, model resolution,
                      decoding and transcribing an upload
    openai_form       the transcription form's fields and their validation
    openai_api        the OpenAI routes: transcription and translation (json, text, srt, vtt, SSE) and models
    airefinery_api    AI Refinery's encoding of the OpenAI form, and its key check
    huggingface_api   the Hugging Face Inference route
    deepgram_api      Deepgram's pre-recorded route (its errors in Deepgram's shape)
    sessions_api      live and stored session transcripts (the hub and the SQLite store)
    client_secrets_api  browser tokens (``stream_server/tokens.py``, ``docs/browser.md``)
"""

from __future__ import annotations

from starlette.routing import Route

from stream_server.http.airefinery_api import validate_key
from stream_server.http.client_secrets_api import routes as client_secret_routes
from stream_server.http.deepgram_api import listen
from stream_server.http.huggingface_api import hf_transcribe
from stream_server.http.openai_api import get_model, list_models, transcriptions, translations
from stream_server.http.sessions_api import routes as session_routes


def routes() -> list[Route]:
    """The HTTP API's routes, for the server to mount beside its WebSocket and health routes."""
    return [
        Route("/v1/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/audio/transcriptions", transcriptions, methods=["POST"]),
        Route("/v1/audio/translations", translations, methods=["POST"]),
        Route("/audio/translations", translations, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/models/{model_id:path}", hf_transcribe, methods=["POST"]),
        Route("/authentication/validate", validate_key, methods=["POST"]),
        Route("/v1/listen", listen, methods=["POST"]),
        *session_routes(),
        *client_secret_routes(),
    ]


__all__ = ["routes"]
