"""The one client session to the upstream, and opening a request on it.

Opening means: send the request, wait for the response headers, retry only where it is
safe (the connection failed, so the upstream never saw the request; or it answered 503
"server busy" before any byte went to the client), and map client exceptions to the
gateway's error types by their type, never their text.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import aiohttp
import structlog
from aiohttp.streams import StreamReader
from multidict import CIMultiDict
from yarl import URL

from proxy.config import UpstreamConfig
from proxy.errors import UpstreamConnectError, UpstreamTimeoutError

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
}
_DROP_RESPONSE = HOP_BY_HOP | {"content-length", "date", "server"}


def _connection_listed(headers: Mapping[str, str]) -> set[str]:
    listed = headers.get("Connection", "")
    return {name.strip().lower() for name in listed.split(",") if name.strip()}


def forward_request_headers(
    headers: Mapping[str, str], *, peer: str | None, request_id: str, api_key: str
) -> CIMultiDict[str]:
    """The client's fields minus hop-by-hop and gateway-only ones, plus forwarding facts."""
    dropped = _DROP_REQUEST | _connection_listed(headers)
    out: CIMultiDict[str] = CIMultiDict(
        (name, value) for name, value in headers.items() if name.lower() not in dropped
    )
    # Identity: the gateway never decompresses, and it must read statistics in the body.
    out["Accept-Encoding"] = "identity"
    out["X-Request-ID"] = request_id
    if peer:
        prior = headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {peer}" if prior else peer
    if api_key:
        out["Authorization"] = f"Bearer {api_key}"
    return out


def forward_response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    dropped = _DROP_RESPONSE | _connection_listed(headers)
    return CIMultiDict(
        (name, value) for name, value in headers.items() if name.lower() not in dropped
    )


@dataclass(slots=True)
class Attempts:
    """How opening went, for the log line and the retries counter."""

    retries: int = 0


class Upstream:
    """Owns the ``ClientSession`` to the upstream server."""

    def __init__(self, config: UpstreamConfig, on_retry: Callable[[], None]) -> None:
        self.config = config
        self.base = URL(config.url.rstrip("/"))
        self._on_retry = on_retry
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("upstream session used outside the app's lifetime")
        return self._session

    async def start(self) -> None:
        cfg = self.config
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=cfg.connect_timeout_s, sock_read=cfg.headers_timeout_s
            ),
            auto_decompress=False,
            # Large header fields from some servers; bodies are read with readany(), which
            # has no line limit, so Ollama's big final line needs nothing here.
            max_line_size=64 * 1024,
            max_field_size=64 * 1024,
            read_bufsize=256 * 1024,
            skip_auto_headers=("User-Agent", "Content-Type"),
            # Cookies are the client's business, not the gateway's: no jar to keep or consult.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def url(self, path: str) -> URL:
        return URL(str(self.base) + path, encoded=True)

    async def open(
        self,
        method: str,
        path: str,
        headers: Mapping[str, str],
        body: bytes | StreamReader | None,
        attempts: Attempts,
    ) -> aiohttp.ClientResponse:
        """Send the request and return the response once its headers arrived."""
        cfg = self.config
        url = self.url(path)
        # A streamed body (a model blob) can be sent once only.
        tries = 1 if isinstance(body, StreamReader) else cfg.max_retries + 1
        for attempt in range(tries):
            last = attempt == tries - 1
            try:
                response = await self.session.request(
                    method, url, headers=headers, data=body, allow_redirects=False
                )
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
                # Connect failed: the upstream never saw this request, so retrying is safe.
                if last:
                    reason = (
                        exc.os_error.strerror
                        if isinstance(exc, aiohttp.ClientConnectorError)
                        else f"no connection within {cfg.connect_timeout_s:g} s"
                    )
                    log.warning("upstream_connect_failed", url=str(self.base), attempts=attempt + 1)
                    raise UpstreamConnectError(
                        f"cannot connect to the upstream at {self.base}: {reason}"
                    ) from exc
            except TimeoutError as exc:
                log.warning("upstream_headers_timed_out", timeout_s=cfg.headers_timeout_s)
                raise UpstreamTimeoutError(
                    f"the upstream sent no response headers within {cfg.headers_timeout_s:g} s"
                ) from exc
            except aiohttp.ClientError as exc:
                # The request may have reached the upstream: never retried.
                log.warning("upstream_request_failed", error=type(exc).__name__)
                raise UpstreamConnectError(
                    f"the upstream closed the connection before answering ({type(exc).__name__})"
                ) from exc
            else:
                if response.status != 503 or last:
                    self._set_idle_timeout(response)
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

    def _set_idle_timeout(self, response: aiohttp.ClientResponse) -> None:
        # The session's sock_read covered the wait for headers (a cold model load can take
        # minutes); from here on the limit is the gap between two chunks.
        connection = response.connection
        if connection is not None and connection.protocol is not None:
            connection.protocol.read_timeout = self.config.idle_timeout_s
            # The first chunks may have come in with the headers; restart the clock now.
            connection.protocol.start_timeout()
