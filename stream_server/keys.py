"""Who may use the server and how much: API keys, per-key limits, the browser Origin allow-list.

Keys come from ``--api-keys`` / ``STREAM_SERVER_API_KEYS`` (comma-separated) and from
``--api-keys-file`` (one key a line, reloaded on SIGHUP). A :class:`KeyRing` keeps only their
SHA-256 digests: the plaintext is hashed while the source is read and then dropped, so neither a
heap dump of the ring nor any log line holds a key. Lookups hash what the client presented and
compare it with every digest through :func:`hmac.compare_digest` (no early exit), so the time a
lookup takes says nothing about which key, or how much of one, matched.

The keys file::

    # comments and blank lines are ignored
    sk-live-3f9a...                                   # the server-wide limits apply
    sk-live-77c1...  name=acme max_sessions=4 audio_s_per_min=120
    sk-live-0b2e...  name=batch max_sessions=0        # 0 = unlimited, whatever the default

After the key, ``name=value`` options: ``name`` (a label for logs; default ``key:<first 8 hex
digits of the digest>``), ``max_sessions`` (concurrent WebSocket sessions) and
``audio_s_per_min`` (audio seconds per minute over all of the key's sessions). An option left out
takes the server-wide default (``--key-max-sessions``, ``--key-audio-s-per-min``); 0 means
unlimited. A ``#`` after whitespace starts a comment. A key in both the file and the variable
gets the file's options. Errors name the line and the option, never the key.

Limits are enforced per key (:class:`Usage`, one per ring, keyed by digest, so a reload keeps the
counts): a WebSocket session takes a slot of its key for its lifetime, and the audio a session
actually hands the core is charged to its key's meter, a token bucket holding at most a minute's
allowance and refilled continuously. With ``--redis-url`` both limits hold over every replica
together (``fleet_limits.py``). With no keys configured, every client is one anonymous
"key" with the server-wide limits, which are off (0) unless the operator sets them.

Each WebSocket connection holds an :class:`Access`: the shell (``ws.py``) asks it whether a
command may reach the core and charges audio to it; dialects know nothing of keys or limits.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import hmac
import logging
import math
import signal
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from stream_server import protocol as p
from stream_server.fleet_limits import FleetLimits
from stream_server.settings import Settings

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"
#: Seconds a client refused for its session limit is told to wait (``Retry-After``).
RETRY_AFTER_S = 5
POLICY_VIOLATION = 1008  # a refused key, or the key's audio allowance spent
TRY_AGAIN_LATER = 1013  # the key's session limit (a slot frees when one of its sessions ends)


class KeyFileError(Exception):
    """The keys file cannot be read or parsed; the message names the line, never a key."""


# ------------------------------------------------------------------------------ the keys


@dataclasses.dataclass(frozen=True)
class KeyLimits:
    """What one key may use; 0 means unlimited."""

    max_sessions: int = 0
    audio_s_per_min: float = 0.0


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who a request is, as far as limits go: one key (by digest) or the anonymous client."""

    id: str  # the key's SHA-256 hex digest, or ``anonymous``; stable across reloads
    label: str  # what logs call it: the key's ``name=``, ``key:<8 hex digits>`` or ``anonymous``
    limits: KeyLimits


@dataclasses.dataclass(frozen=True)
class _Entry:
    """One key as the ring keeps it: its digest and the options of its line (None: default)."""

    digest: bytes
    name: str | None = None
    max_sessions: int | None = None
    audio_s_per_min: float | None = None


def digest(key: str) -> bytes:
    """SHA-256 of a key; keys are compared and stored only in this form."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def _count(value: str) -> int:
    number = int(value)
    if number < 0:
        raise ValueError
    return number


def _seconds(value: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise ValueError
    return number


def _label(value: str) -> str:
    if not value or len(value) > 64 or not value.isprintable():
        raise ValueError
    return value


_OPTIONS: dict[str, Callable[[str], object]] = {"name": _label, "max_sessions": _count, "audio_s_per_min": _seconds}


def _strip_comment(line: str) -> str:
    """The line without a ``#`` comment: one at its start, or one after whitespace (a key may
    itself contain ``#``)."""
    if line.lstrip().startswith("#"):
        return ""
    for index, char in enumerate(line):
        if char == "#" and index > 0 and line[index - 1].isspace():
            return line[:index]
    return line


def _parse_line(number: int, line: str) -> _Entry | None:
    fields = _strip_comment(line).split()
    if not fields:
        return None
    options: dict[str, Any] = {}
    for field in fields[1:]:
        name, equals, value = field.partition("=")
        if not equals or name not in _OPTIONS:
            # Never echo the field: a line holding two keys by mistake would print the second.
            raise KeyFileError(f"line {number}: after the key, expected options {', '.join(f'{o}=' for o in _OPTIONS)}")
        try:
            options[name] = _OPTIONS[name](value)
        except ValueError:
            raise KeyFileError(f"line {number}: {name}= needs {'a label' if name == 'name' else 'a number >= 0'}") from None
    return _Entry(digest(fields[0]), **options)


def parse_keys(text: str) -> list[_Entry]:
    """The entries of a keys file's text, in order; :class:`KeyFileError` on a bad line."""
    entries = [_parse_line(number, line) for number, line in enumerate(text.splitlines(), 1)]
    return [entry for entry in entries if entry is not None]


def read_keys_file(path: Path) -> list[_Entry]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"cannot read {path}: {type(exc).__name__}: {getattr(exc, 'strerror', None) or 'not UTF-8'}") from None
    return parse_keys(text)


class KeyRing:
    """The keys this server accepts (as digests), their limits, and what each key is using."""

    def __init__(
        self,
        keys: Iterable[str] = (),
        *,
        path: Path | None = None,
        defaults: KeyLimits = KeyLimits(),
        clock: Callable[[], float] = time.monotonic,
        fleet: FleetLimits | None = None,
    ) -> None:
        self.path = path
        self.defaults = defaults
        self._fixed = {d: _Entry(d) for d in (digest(k.strip()) for k in keys if k.strip())}
        self._entries: dict[bytes, _Entry] = dict(self._fixed)
        self.usage = Usage(clock, fleet)
        self.anonymous = Principal(ANONYMOUS, ANONYMOUS, defaults)
        if path is not None:
            self._install(read_keys_file(path))
            if not self._entries:
                log.warning("no API keys in %s: every request will be refused until keys are added (then SIGHUP)", path)

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """The ring of ``--api-keys`` and ``--api-keys-file``; :class:`KeyFileError` if the file
        cannot be loaded (a server must not start open because its keys file is missing)."""
        path = Path(settings.api_keys_file).expanduser() if settings.api_keys_file.strip() else None
        defaults = KeyLimits(settings.key_max_sessions, settings.key_audio_s_per_min)
        fleet = FleetLimits(settings.redis_url) if settings.redis_url.strip() else None
        return cls(settings.api_keys.split(","), path=path, defaults=defaults, fleet=fleet)

    @property
    def configured(self) -> bool:
        """Whether clients must present a key: keys were given, or a keys file (even an empty one:
        emptying the file revokes every key rather than opening the server)."""
        return bool(self._fixed) or self.path is not None

    def __len__(self) -> int:
        return len(self._entries)

    def _install(self, entries: list[_Entry]) -> None:
        merged = dict(self._fixed)
        for entry in entries:
            merged[entry.digest] = entry  # the file's options win; a repeated key: its last line
        self._entries = merged

    def reload(self) -> bool:
        """Read the keys file again (SIGHUP). A file that cannot be read or parsed changes
        nothing: the keys loaded before stay in force, and the error is logged."""
        if self.path is None:
            log.info("SIGHUP: no --api-keys-file to reload")
            return False
        try:
            entries = read_keys_file(self.path)
        except KeyFileError as exc:
            log.error("API keys not reloaded (the %d loaded before stay in force): %s", len(self), exc)
            return False
        before = set(self._entries)
        self._install(entries)
        after = set(self._entries)
        log.info("API keys reloaded from %s: %d key(s), %d added, %d removed", self.path, len(after), len(after - before), len(before - after))
        return True

    # ---------------------------------------------------------------- lookups

    def _principal(self, entry: _Entry) -> Principal:
        limits = KeyLimits(
            self.defaults.max_sessions if entry.max_sessions is None else entry.max_sessions,
            self.defaults.audio_s_per_min if entry.audio_s_per_min is None else entry.audio_s_per_min,
        )
        hexdigest = entry.digest.hex()
        return Principal(hexdigest, entry.name or f"key:{hexdigest[:8]}", limits)

    def identify(self, key: str | None) -> Principal | None:
        """Who presents ``key``: the anonymous client when no keys are configured (any key is
        then ignored), the key's principal when it is one of ours, else None."""
        if not self.configured:
            return self.anonymous
        if not key:
            return None
        presented = digest(key)
        found: _Entry | None = None
        for entry in list(self._entries.values()):  # every digest, whatever matched (constant time)
            if hmac.compare_digest(entry.digest, presented):
                found = entry
        return self._principal(found) if found is not None else None

    def principal(self, principal_id: str | None) -> Principal | None:
        """The principal of an id handed out before (a browser token's owner), if its key is
        still configured: removing a key also ends the tokens it minted."""
        if not self.configured:
            return self.anonymous
        try:
            wanted = bytes.fromhex(principal_id or "")
        except ValueError:
            return None
        entry = self._entries.get(wanted)
        return self._principal(entry) if entry is not None else None

    def access(self, principal: Principal) -> Access | Refusal:
        """A WebSocket session's standing with ``principal``: a slot taken, or the refusal."""
        access = Access(self, None)
        refusal = access.identify_principal(principal)
        return refusal if refusal is not None else access

    def pending_access(self) -> Access:
        """For a dialect whose key arrives after the upgrade (Twilio): identified later."""
        return Access(self, None)


def ring_of(state: Any) -> KeyRing:
    """The app's one ring (``app.state.keys``, made by ``create_app``); an app assembled some other
    way gets one from its engine's settings on first use."""
    ring = getattr(state, "keys", None)
    if ring is None:
        ring = KeyRing.from_settings(state.engine.settings)
        state.keys = ring
    assert isinstance(ring, KeyRing)
    return ring


def without_plaintext(settings: Settings) -> Settings:
    """``settings`` with ``--api-keys`` blanked, for the server to keep once the ring holds the
    digests: no plaintext copy stays in the app, and the one check of a key is the ring's (Twilio's
    dialect, which reads the settings' keys itself, then leaves its key to the shell)."""
    return dataclasses.replace(settings, api_keys="")


def install_reload_on_sighup(loop: Any, ring: KeyRing) -> None:
    """Reload the keys file when the process gets SIGHUP (from the event loop, so a reload never
    interleaves with a lookup). Without a keys file SIGHUP is logged and otherwise ignored."""
    sighup = getattr(signal, "SIGHUP", None)
    if sighup is None:  # Windows
        return
    loop.add_signal_handler(sighup, ring.reload)


# ------------------------------------------------------------------------------ refusals


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a WebSocket may not go on: an HTTP answer at the upgrade (``status``) or, once
    upgraded, the dialect's error for ``error`` and a close with ``close_code``."""

    status: int
    close_code: int
    error: p.Error
    reason: str  # the close frame's reason (short; no key)
    retry_after_s: int | None = None

    def body(self) -> dict[str, object]:
        info = self.error.error
        return {"error": {"type": info.type, "code": info.code, "message": info.message}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)} if self.retry_after_s is not None else {}


def key_refused(missing: bool) -> Refusal:
    """401 asks for a key; 403 refuses the one given."""
    if missing:
        return Refusal(401, POLICY_VIOLATION, p.Error.invalid("invalid_api_key", "an API key is required"), "missing API key")
    message = "the API key is not valid for this server"
    return Refusal(403, POLICY_VIOLATION, p.Error.invalid("invalid_api_key", message), "unknown API key")


def sessions_refused(principal: Principal) -> Refusal:
    limit = principal.limits.max_sessions
    message = f"this API key is at its limit of {limit} concurrent session(s); close one or try again later"
    return Refusal(429, TRY_AGAIN_LATER, p.Error.invalid("rate_limited", message), "key session limit", RETRY_AFTER_S)


def audio_refused(principal: Principal) -> p.Error:
    rate = principal.limits.audio_s_per_min
    message = f"this API key's limit of {rate:g} audio seconds per minute is spent; the audio sent before was transcribed"
    return p.Error.invalid("rate_limited", message)


# ------------------------------------------------------------------------------ limits


@dataclasses.dataclass
class _Account:
    """One principal's use: sessions open now and its audio allowance (None: full)."""

    sessions: int = 0
    audio_left: float | None = None
    at: float = 0.0


class Usage:
    """What every principal is using now, by principal id; only touched from the event loop."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, fleet: FleetLimits | None = None) -> None:
        self._clock = clock
        self._accounts: dict[str, _Account] = {}
        self.fleet = fleet  # with --redis-url: the same limits over every replica

    def sessions(self, principal_id: str) -> int:
        account = self._accounts.get(principal_id)
        return account.sessions if account is not None else 0

    def take_session(self, principal: Principal) -> bool:
        account = self._accounts.setdefault(principal.id, _Account())
        limit = principal.limits.max_sessions
        if limit and account.sessions >= limit:
            return False
        account.sessions += 1
        return True

    def give_back_session(self, principal: Principal) -> None:
        account = self._accounts.get(principal.id)
        if account is None:
            return
        account.sessions = max(0, account.sessions - 1)
        self._forget_if_idle(principal, account)

    def audio_left(self, principal: Principal) -> float:
        """Audio seconds the principal may still send now (infinite without a limit): this
        replica's own meter, and with a fleet the key's use over every replica as last read."""
        local = self._local_audio_left(principal)
        fleet = self.fleet.audio_left(principal) if self.fleet is not None and local != math.inf else None
        return local if fleet is None else min(local, fleet)

    def _local_audio_left(self, principal: Principal) -> float:
        rate = principal.limits.audio_s_per_min
        if not rate:
            return math.inf
        account = self._accounts.setdefault(principal.id, _Account())
        now = self._clock()
        if account.audio_left is None:
            account.audio_left = rate
        else:
            account.audio_left = min(rate, account.audio_left + (now - account.at) * rate / 60.0)
        account.at = now
        return account.audio_left

    def charge_audio(self, principal: Principal, seconds: float) -> None:
        """Audio the core accepted; the allowance may go below zero by the one message that
        crossed it (it was accepted whole), which the refill then pays back first."""
        if not principal.limits.audio_s_per_min or seconds <= 0:
            return
        self._local_audio_left(principal)
        account = self._accounts[principal.id]
        account.audio_left = (account.audio_left or 0.0) - seconds
        if self.fleet is not None:
            self.fleet.charge_audio(principal, seconds)

    def _forget_if_idle(self, principal: Principal, account: _Account) -> None:
        """Drop an account with no session and a full allowance (bounds the table by the keys in use)."""
        if account.sessions:
            return
        if self.fleet is not None:
            self.fleet.forget(principal)
        if self._local_audio_left(principal) >= principal.limits.audio_s_per_min:
            del self._accounts[principal.id]


class Access:
    """One WebSocket session's standing with its key: the session slot it holds and its share
    of the key's audio meter. The shell asks it before a command reaches the core."""

    def __init__(self, ring: KeyRing, principal: Principal | None) -> None:
        self._ring = ring
        self.principal = principal
        self._holds_slot = False
        self._lease: str | None = None  # the key's fleet-wide slot (--redis-url), while held
        self.refused = False  # set once a refusal ended the session: nothing more reaches the core

    @classmethod
    def unlimited(cls) -> Access:
        """For connections that hold no key's slot (refusals sent without a session)."""
        ring = KeyRing()
        return cls(ring, ring.anonymous)

    def identify_principal(self, principal: Principal) -> Refusal | None:
        """Take a slot of ``principal``'s session limit; the refusal when it is at its limit."""
        self.principal = principal
        if not self._ring.usage.take_session(principal):
            self.refused = True
            log.info("%s: at its limit of %d concurrent session(s); session refused", principal.label, principal.limits.max_sessions)
            return sessions_refused(principal)
        self._holds_slot = True
        return None

    async def hold_fleet_slot(self) -> Refusal | None:
        """With ``--redis-url``, the key's session limit over every replica (after this
        replica's own slot was taken): the refusal when the fleet is at the limit. A Redis that
        does not answer leaves the decision to this replica's count (``fleet_limits.py``)."""
        fleet = self._ring.usage.fleet
        principal = self.principal
        if fleet is None or principal is None or not self._holds_slot or not principal.limits.max_sessions:
            return None
        lease = await fleet.take_session(principal)
        if lease is False:
            self.release()
            self.refused = True
            log.info("%s: at its limit of %d concurrent session(s) over all replicas; session refused",
                     principal.label, principal.limits.max_sessions)
            return sessions_refused(principal)
        if isinstance(lease, str):
            self._lease = lease
        return None

    async def identify(self, key: str | None) -> Refusal | None:
        """A key that arrived after the upgrade (Twilio ``customParameters.api_key``): checked
        as an upgrade's would be, then the session limit."""
        principal = self._ring.identify(key)
        if principal is None:
            self.refused = True
            log.warning("%s API key after the upgrade; closing with %d", "missing" if not key else "unknown", POLICY_VIOLATION)
            return key_refused(missing=not key)
        return self.identify_principal(principal) or await self.hold_fleet_slot()

    def audio_allowed(self) -> bool:
        """Whether the key's audio allowance has anything left for this session's next message."""
        return self.principal is None or self._ring.usage.audio_left(self.principal) > 0

    def charge(self, seconds: float) -> None:
        if self.principal is not None:
            self._ring.usage.charge_audio(self.principal, seconds)

    def spend_out(self) -> p.Error:
        """The allowance is spent: no more commands; the error the client gets before the close."""
        self.refused = True
        assert self.principal is not None
        log.info("%s: audio limit of %g s per minute spent; the session is finalized and closed", self.principal.label,
                 self.principal.limits.audio_s_per_min)
        return audio_refused(self.principal)

    def release(self) -> None:
        """The session ended: its slot goes back (once)."""
        if self._holds_slot and self.principal is not None:
            self._holds_slot = False
            fleet = self._ring.usage.fleet
            if self._lease is not None and fleet is not None:
                fleet.give_back_session(self.principal, self._lease)
                self._lease = None
            self._ring.usage.give_back_session(self.principal)


# ------------------------------------------------------------------------------ Origin


@functools.lru_cache(maxsize=8)
def allowed_origins(raw: str) -> frozenset[str]:
    """``--allowed-origins`` as a set of normalised origins (empty: any origin)."""
    return frozenset(_normalise_origin(o) for o in raw.split(",") if o.strip())


def _normalise_origin(origin: str) -> str:
    return origin.strip().rstrip("/").lower()


def origin_allowed(raw_setting: str, origin: str | None, host: str | None = None) -> bool:
    """Whether a WebSocket upgrade with this ``Origin`` header may go on. Browsers always send
    ``Origin``; other clients (SDKs, telephony platforms) usually do not, and are not what
    this check protects against, so a request without one passes. So does a page of the server
    itself (the captions app): its origin is the request's own ``Host``."""
    allowed = allowed_origins(raw_setting)
    if not allowed or origin is None:
        return True
    return _normalise_origin(origin) in allowed or _same_host(origin, host)


def _same_host(origin: str, host: str | None) -> bool:
    """Whether ``origin`` names the host the request was sent to: host and port when ``Host``
    has a port, the host name alone when it has none (a proxy's ``Host $host`` drops it)."""
    if not host:
        return False
    try:
        netloc = urllib.parse.urlsplit(origin.strip()).netloc.lower()
        if not netloc:
            return False
        if ":" in host.rsplit("]", 1)[-1]:
            return netloc == host.lower()
        return urllib.parse.urlsplit("//" + netloc).hostname == urllib.parse.urlsplit("//" + host.lower()).hostname
    except ValueError:  # a malformed Origin or Host (bad port, bad IPv6 literal)
        return False


def origin_refused() -> Refusal:
    message = "WebSockets from this page's origin are not allowed on this server (--allowed-origins)"
    return Refusal(403, POLICY_VIOLATION, p.Error.invalid("origin_not_allowed", message), "origin not allowed")


__all__ = [
    "ANONYMOUS",
    "Access",
    "KeyFileError",
    "KeyLimits",
    "KeyRing",
    "Principal",
    "Refusal",
    "Usage",
    "allowed_origins",
    "audio_refused",
    "digest",
    "install_reload_on_sighup",
    "key_refused",
    "origin_allowed",
    "origin_refused",
    "parse_keys",
    "read_keys_file",
    "ring_of",
    "sessions_refused",
    "without_plaintext",
]

