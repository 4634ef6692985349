"""Who is calling: API keys, the admin key, and the client address behind trusted proxies.

Keys are looked up by their SHA-256 digest and confirmed with ``hmac.compare_digest``, so
the time taken does not depend on how much of a guess matched. A key's *name*, never the
key, identifies the client in logs and metrics.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from dataclasses import dataclass

from aiohttp import web

from proxy.admission.ratelimit import Limit
from proxy.config import Config
from proxy.errors import ForbiddenError, UnauthorizedError

ANONYMOUS = "anonymous"
ADMIN_NAME = "admin"  # how the admin key's holder is named in logs and metrics


@dataclass(frozen=True, slots=True)
class Principal:
    name: str  # key name, or "anonymous" when no keys are configured
    bucket: str  # what the rate limiter and the gate's fairness key on
    limit: Limit
    is_admin: bool = False


@dataclass(frozen=True, slots=True)
class _Entry:
    name: str
    key: bytes
    limit: Limit


_KEY_CHARACTERS = re.compile(r"[\x21-\x7e]+")  # visible ASCII, as the config requires of keys


def presented_key(request: web.Request) -> str | None:
    """The key from ``Authorization: Bearer ...`` (both official SDKs) or ``X-API-Key``.

    A key with bytes no configured key can hold (a space, a control or non-ASCII byte) is a
    bad credential, refused whether or not keys are configured.
    """
    key: str | None = None
    auth = request.headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            key = token.strip()
    if key is None:
        key = request.headers.get("X-API-Key") or None
    if key is not None and not _KEY_CHARACTERS.fullmatch(key):
        raise UnauthorizedError("malformed API key: a key is visible ASCII characters only")
    return key


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class Access:
    def __init__(self, config: Config) -> None:
        limits = config.limits
        # Unset (0), a client's own bucket is the global one's size: one application behind
        # the gateway may use all of what the operator allowed.
        self._default = Limit(
            limits.client_requests_per_minute or limits.requests_per_minute,
            limits.client_burst or limits.burst,
            limits.client_tokens_per_minute,
        )
        self._keys: dict[bytes, _Entry] = {}
        for api_key in config.auth.api_keys:
            limit = Limit(
                api_key.requests_per_minute or self._default.per_minute,
                api_key.burst or self._default.burst,
                api_key.tokens_per_minute or self._default.tokens_per_minute,
            )
            self._keys[_digest(api_key.key)] = _Entry(api_key.name, api_key.key.encode(), limit)
        admin = config.auth.admin_key
        self._admin: _Entry | None = (
            _Entry(ADMIN_NAME, admin.encode(), self._default) if admin else None
        )
        self._trusted = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in config.server.trusted_proxies
        )

    def identify(self, request: web.Request) -> Principal:
        """The caller, or ``UnauthorizedError`` when keys are configured and none matched."""
        key = presented_key(request)
        entry = self._match(key) if key is not None else None
        if entry is not None:
            # Admin rights come from the admin key alone, never from a name.
            return Principal(entry.name, entry.name, entry.limit, is_admin=entry is self._admin)
        if self._keys:
            reason = "missing API key" if key is None else "invalid API key"
            raise UnauthorizedError(
                f"{reason}: send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"
            )
        return Principal(ANONYMOUS, self.client_address(request), self._default)

    def require_admin(self, principal: Principal) -> None:
        """Model-management routes: only with the admin key, and closed when there is none."""
        if self._admin is None:
            raise ForbiddenError(
                "model-management routes are disabled on this gateway; "
                "set PROXY_ADMIN_KEY (auth.admin_key) to enable them for holders of that key"
            )
        if not principal.is_admin:
            raise ForbiddenError("this route requires the gateway's admin key")

    def client_address(self, request: web.Request) -> str:
        """The peer address, or the first untrusted hop of X-Forwarded-For from a trusted proxy."""
        peer = request.remote or "unknown"
        forwarded = request.headers.get("X-Forwarded-For")
        if not forwarded or not self._is_trusted(peer):
            return peer
        hops = [hop.strip() for hop in forwarded.split(",") if hop.strip()]
        for hop in reversed(hops):
            if not self._is_trusted(hop):
                return hop
        return hops[0] if hops else peer

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in network for network in self._trusted)

    def _match(self, key: str) -> _Entry | None:
        digest = _digest(key)
        entry = self._keys.get(digest)
        if entry is None and self._admin is not None:
            entry = self._admin
        if entry is not None and hmac.compare_digest(entry.key, key.encode()):
            return entry
        return None
