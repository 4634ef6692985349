"""The one connection pool to the upstream, and opening a request on it.

Opening means: send the request, wait for the response headers, retry only where it is
safe (the connection failed, so the upstream never saw the request; or it answered 503
"server busy" before any byte went to the client), and map the client's exceptions to the
gateway's error types by their type, never their text.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamConnectError, UpstreamTimeoutError
from proxy.upstream.client import (
    Body,
    ConnectFailed,
    Pool,
    UpstreamError,
    UpstreamResponse,
    header_block,
)

log = structlog.get_logger("proxy.upstream")

# RFC 9110 section 7.6.1 hop-by-hop fields, plus what the gateway sets itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
# Request fields never forwarded: the gateway's own credentials, the client's Host (Ollama's
# DNS-rebinding check wants its own), a browser Origin the gateway cannot vouch for, and
# lengths and encodings the gateway recomputes.
_DROP_REQUEST = HOP_BY_HOP | {
    "host",
    "authorization",
    "x-api-key",
    "origin",
    "content-length",
    "accept-encoding",
    "cookie",
    "expect",  # the gateway read the body already; a 100 Continue would confuse the relay
}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}


# Set by the gateway itself on the way up: the client's copies never go along.
_SET_UP = frozenset({"accept-encoding", "x-request-id", "x-forwarded-for"})
Pairs = list[tuple[str, str]]


def _connection_listed(headers: Iterable[tuple[str, str]]) -> set[str]:
    """The names a ``Connection`` field lists: hop-by-hop for this message (RFC 9110 7.6.1)."""
    listed = ",".join(value for name, value in headers if name.lower() == "connection")
    return {name.strip().lower() for name in listed.split(",") if name.strip()}


def forward_request_headers(
    headers: Mapping[str, str],
    *,
    peer: str | None,
    request_id: str,
    api_key: str,
    content_type: str | None = None,
) -> Pairs:
    """The client's fields minus hop-by-hop and gateway-only ones, plus forwarding facts.

    Pairs, not a mapping: a field the client repeated goes along repeated. ``content_type``
    replaces the client's.
    """
    items = list(headers.items())
    dropped = _DROP_REQUEST | _SET_UP
    if "Connection" in headers:
        dropped = dropped | _connection_listed(items)
    if content_type is not None:
        dropped = dropped | {"content-type"}
    out = [(name, value) for name, value in items if name.lower() not in dropped]
    if content_type is not None:
        out.append(("Content-Type", content_type))
    # Identity: the gateway never decompresses, and it must read statistics in the body.
    out.append(("Accept-Encoding", "identity"))
    out.append(("X-Request-ID", request_id))
    if peer:
        prior = ", ".join(value for name, value in items if name.lower() == "x-forwarded-for")
        out.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
    if api_key:
        out.append(("Authorization", f"Bearer {api_key}"))
    return out


def forward_response_headers(headers: Pairs, own: Mapping[str, str]) -> Pairs:
    """The upstream's fields minus hop-by-hop and framing ones, then the gateway's ``own``
    (which replace any the upstream sent under the same names)."""
    dropped = _DROP_RESPONSE
    if own:
        dropped = dropped | {name.lower() for name in own}
    if any(name.lower() == "connection" for name, _ in headers):
        dropped = dropped | _connection_listed(headers)
    out = [(name, value) for name, value in headers if name.lower() not in dropped]
    out.extend(own.items())
    return out


@dataclass(slots=True)
class Attempts:
    """How opening went, for the log line and the retries counter."""

    retries: int = 0


class Upstream:
    """Owns the connection pool to the upstream server."""

    def __init__(self, config: UpstreamConfig, on_retry: Callable[[], None]) -> None:
        self.config = config
        self.base = URL(config.url.rstrip("/"))
        self._prefix = self.base.raw_path.rstrip("/")  # an upstream mounted under a path
        self._on_retry = on_retry
        self._pool: Pool | None = None

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError("upstream pool used outside the app's lifetime")
        return self._pool

    async def start(self) -> None:
        base = self.base
        assert base.host is not None  # the config checked the URL
        self._pool = Pool(
            base.host,
            base.port or (443 if base.scheme == "https" else 80),
            tls=ssl.create_default_context() if base.scheme == "https" else None,
            connect_timeout_s=self.config.connect_timeout_s,
        )

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def get(self, path: str, headers: Pairs) -> UpstreamResponse:
        """One GET, no retries: the health probe's."""
        try:
            return await self.pool.request(
                "GET", self._prefix + path, header_block(headers), None,
                headers_timeout_s=self.config.headers_timeout_s,
                idle_timeout_s=self.config.idle_timeout_s,
            )  # fmt: skip
        except ConnectFailed as exc:
            raise UpstreamConnectError(f"cannot connect ({exc})") from exc

    async def open(
        self,
        method: str,
        path: str,
        headers: Pairs,
        body: Body,
        attempts: Attempts,
    ) -> UpstreamResponse:
        """Send the request and return the response once its headers arrived."""
        cfg = self.config
        target = self._prefix + path
        head = header_block(headers)
        # A streamed body (a model blob) can be sent once only.
        tries = 1 if isinstance(body, AsyncIterable) else cfg.max_retries + 1
        for attempt in range(tries):
            last = attempt == tries - 1
            try:
                # Waiting for headers allows headers_timeout_s (a cold model load can take
                # minutes); from then on the limit is the gap between two chunks.
                response = await self.pool.request(
                    method, target, head, body,
                    headers_timeout_s=cfg.headers_timeout_s, idle_timeout_s=cfg.idle_timeout_s,
                )  # fmt: skip
            except ConnectFailed as exc:
                # Connect failed: the upstream never saw this request, so retrying is safe.
                if last:
                    log.warning("upstream_connect_failed", url=str(self.base), attempts=attempt + 1)
                    raise UpstreamConnectError(
                        f"cannot connect to the upstream at {self.base}: {exc}"
                    ) from exc
            except TimeoutError as exc:
                log.warning("upstream_headers_timed_out", timeout_s=cfg.headers_timeout_s)
                raise UpstreamTimeoutError(
                    f"the upstream sent no response headers within {cfg.headers_timeout_s:g} s"
                ) from exc
            except UpstreamError as exc:
                # The request may have reached the upstream: never retried.
                log.warning("upstream_request_failed", error=type(exc).__name__)
                raise UpstreamConnectError(
                    f"the upstream closed the connection before answering ({exc})"
                ) from exc
            else:
                if response.status != 503 or last:
                    return response
                response.close()  # Ollama's "server busy": refused before any work began
            attempts.retries += 1
            self._on_retry()
            await asyncio.sleep(self.backoff_s(attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def backoff_s(self, attempt: int) -> float:
        """Exponential backoff with jitter, capped: 'equal jitter' keeps at least half the delay."""
        cfg = self.config
        delay = min(cfg.retry_max_delay_s, cfg.retry_delay_s * 2.0**attempt)
        return delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter, not crypto
