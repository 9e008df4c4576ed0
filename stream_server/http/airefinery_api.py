"""AI Refinery's encoding of OpenAI's transcription request, and its key check.

AI Refinery's client posts to the same ``/v1/audio/transcriptions`` route as OpenAI's SDK, but
sends its options differently: an ``extra_body`` JSON object whose keys override the form fields,
list fields as JSON arrays (handled by :func:`~stream_server.http.common.parse_string_list`),
``timeout=None``, ``include`` values of its own, and locales (``en-US``) it expects echoed back.
This module holds those differences so the OpenAI module reads as OpenAI's API.
"""

from __future__ import annotations

import json
import re
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from stream_server import protocol as p
from stream_server.http.common import invalid

# ``include`` values AI Refinery's client sends: word confidences and segment ids in verbose_json.
AIREFINERY_INCLUDES = ("confidence", "segment")


def _json_object(param: str, value: Any) -> dict[str, Any]:
    """A JSON object field; empty text and ``null`` mean no overrides."""
    if isinstance(value, dict):
        return value
    text = str(value).strip()
    if not text:
        return {}
    try:
        data = p.loads_json(text)
    except json.JSONDecodeError:
        raise invalid(param, "expected a JSON object") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise invalid(param, "expected a JSON object")
    return data


def apply_extra_body(fields: dict[str, list[Any]]) -> None:
    """Fold ``extra_body`` (its last value) into ``fields``: each of its keys replaces that field."""
    extra = fields.pop("extra_body", None)
    if not extra:
        return
    for key, value in _json_object("extra_body", extra[-1]).items():
        fields[key] = [value]


def locale(given: str | None) -> str | None:
    """``given`` as a normalised locale (``en_us`` -> ``en-US``), or None when it is not one.

    AI Refinery's clients send locales and expect the same back as ``language``, where OpenAI
    would write the language's name.
    """
    parts = re.split(r"[-_]", given or "")
    if len(parts) == 2 and len(parts[0]) == 2 and len(parts[1]) == 2:
        return f"{parts[0].lower()}-{parts[1].upper()}"
    return None


async def validate_key(request: Request) -> Response:
    """AI Refinery's client validates its key when constructed; this server has no accounts."""
    return JSONResponse({"organization_id": "stream-server", "valid": True})
