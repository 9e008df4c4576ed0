"""URLs that a request names for the server to reach: audio to fetch and callbacks to post to.

Deepgram's pre-recorded API takes ``{"url": ...}`` instead of audio, and ``callback=URL`` to have
the result posted there later. A server that reaches whatever URL a client names can be made to
read or post to what only it can reach: a metadata service, an admin port, the internal network
(SSRF). So what a request may name is the operator's choice (``--request-urls``):

* ``public`` (default): only hosts whose every address is public. The check is made on the
  names' addresses before each request, and a fetch also checks the address it actually reached
  before reading a byte of the body, so a name that resolves differently the second time (DNS
  rebinding) gets nothing back;
* ``any``: private and loopback addresses too (storage and receivers inside the network);
* ``off``: no URL is reached; such requests are refused.

Only ``http`` and ``https``; no proxies from the environment (the address reached would be the
proxy's).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

REACH = ("public", "any", "off")
#: Resolves a host name to its addresses (injectable: tests make a name resolve as they need).
Resolver = Callable[[str, int], Awaitable[list[str]]]


class UrlRefused(Exception):
    """A URL the server will not reach, or could not: ``status`` is the HTTP status to answer."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


async def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (the event loop's resolver, off the loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def is_public(address: str) -> bool:
    """Whether ``address`` is a public unicast address (an IPv4-mapped IPv6 one is judged as the
    IPv4 it maps: ``::ffff:127.0.0.1`` is loopback)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


@dataclasses.dataclass(frozen=True)
class UrlPolicy:
    """Which URLs requests may name (``reach``, one of :data:`REACH`), and how long reaching one may take."""

    reach: str = "public"
    timeout_s: float = 10.0  # connecting, and each read or write
    resolve: Resolver = resolve_host

    def parse(self, url: str, what: str) -> httpx.URL:
        """``url`` as a URL this server may reach, by its form (scheme, host); else :class:`UrlRefused` (400)."""
        if self.reach == "off":
            raise UrlRefused(400, f"this server does not reach URLs that requests name (--request-urls off): send the {what} itself")
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise UrlRefused(400, f"the {what} URL is not a URL: {exc}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise UrlRefused(400, f"the {what} URL must be an http:// or https:// URL with a host, got {url[:200]!r}")
        return parsed

    async def check_host(self, url: httpx.URL) -> None:
        """With ``public``, refuse a host any of whose addresses is not public (400)."""
        if self.reach != "public":
            return
        host = url.host
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = await self.resolve(host, port)
        except OSError as exc:
            raise UrlRefused(400, f"could not resolve {host}: {exc}") from None
        private = [a for a in addresses if not is_public(a)]
        if private or not addresses:
            raise UrlRefused(400, self._private(host, private[0] if private else "no address"))

    def check_peer(self, response: httpx.Response) -> None:
        """With ``public``, refuse a response from a connection that reached an address that is
        not public (the name resolved differently after :meth:`check_host`)."""
        if self.reach != "public":
            return
        stream: Any = response.extensions.get("network_stream")
        peer = stream.get_extra_info("server_addr") if stream is not None else None
        if not peer or not is_public(str(peer[0])):
            raise UrlRefused(400, self._private(response.url.host, str(peer[0]) if peer else "an unknown address"))

    def client(self) -> httpx.AsyncClient:
        """An HTTP client for these URLs: redirects are the caller's to check, no environment proxies."""
        return httpx.AsyncClient(follow_redirects=False, timeout=self.timeout_s, trust_env=False)

    @staticmethod
    def _private(host: str, address: str) -> str:
        return (
            f"{host} resolves to {address}, which is not a public address: this server reaches only public "
            "addresses for requests (start it with --request-urls any to allow private and loopback ones)"
        )


__all__ = ["REACH", "Resolver", "UrlPolicy", "UrlRefused", "is_public", "resolve_host"]
