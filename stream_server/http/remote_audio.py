"""Audio fetched from the URL a request names instead of sending it (Deepgram's ``{"url": ...}``).

Stored calls usually sit in object storage, and Deepgram's SDK sends their (pre-signed) URL rather
than the bytes (``transcribe_url``). The server downloads the audio into the same spool an upload
goes to, with an upload's size limit, and then transcribes it like one. Which hosts may be
reached is :mod:`stream_server.request_urls`' policy, checked on every redirect hop and on the
address each connection reached before any of the body is read.
"""

from __future__ import annotations

import asyncio
from typing import IO

import httpx

from stream_server.http.common import TooLarge, spool_limited
from stream_server.request_urls import UrlPolicy, UrlRefused

MAX_REDIRECTS = 5


async def fetch_audio(url: str, policy: UrlPolicy, *, max_bytes: int, total_s: float) -> IO[bytes]:
    """The body at ``url`` in a spool (rewound); :class:`UrlRefused` with the status to answer
    when the URL may not be reached, cannot be, answers with an error, is empty, is larger than
    ``max_bytes`` (413) or takes longer than ``total_s`` in all."""
    target = policy.parse(url, "audio")
    try:
        async with asyncio.timeout(total_s), policy.client() as client:
            for _ in range(MAX_REDIRECTS + 1):
                await policy.check_host(target)
                async with client.stream("GET", target) as response:
                    policy.check_peer(response)
                    if response.is_redirect:
                        target = policy.parse(str(response.url.join(response.headers["location"])), "audio")
                        continue
                    return await _body(response, max_bytes)
    except TimeoutError:
        raise UrlRefused(400, f"fetching the audio from {target.host} took longer than {total_s:g} s") from None
    except httpx.HTTPError as exc:
        raise UrlRefused(400, f"could not fetch the audio from {target.host}: {exc or type(exc).__name__}") from None
    raise UrlRefused(400, f"the audio URL redirected more than {MAX_REDIRECTS} times")


async def _body(response: httpx.Response, max_bytes: int) -> IO[bytes]:
    if response.status_code >= 400:
        side = "client" if response.status_code < 500 else "server"
        raise UrlRefused(400, f"The remote server hosting the media returned a {side} error: {response.status_code} {response.reason_phrase}.")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise UrlRefused(413, f"the audio at the URL is {int(declared)} bytes; the limit is {max_bytes} bytes")
    try:
        spool = await spool_limited(response.aiter_bytes(), max_bytes)
    except TooLarge:
        raise UrlRefused(413, f"the audio at the URL is over the limit of {max_bytes} bytes") from None
    if not spool.read(1):
        spool.close()
        raise UrlRefused(400, "the URL's response has no content: there is no audio to transcribe")
    spool.seek(0)
    return spool


__all__ = ["MAX_REDIRECTS", "fetch_audio"]
