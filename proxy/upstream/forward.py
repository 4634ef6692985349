"""Forwarding a request: the one connection pool to the upstream, opening a request on it,
and handing the answer to the relay.

Opening means: send the request with the client's headers filtered, wait for the response
headers, retry only where it is safe (the connection failed, so the upstream never saw the
request; or it answered 503 "server busy" before any byte went to the client), and map the
client's exceptions to the gateway's error types by their type, never their text.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from aiohttp import web
from yarl import URL

from proxy.config import BackendConfig, UpstreamConfig
from proxy.errors import (
    ShuttingDownError,
    UpstreamConnectError,
    UpstreamTimeoutError,
    UpstreamUnreachableError,
)
from proxy.exchange import Exchange
from proxy.upstream.client import (
    Body,
    ConnectFailed,
    Interrupted,
    Pool,
    UploadStalled,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamResponse,
    header_block,
)
from proxy.upstream.headers import Pairs, forward_request_headers
from proxy.upstream.relay import relay

log = structlog.get_logger("proxy.upstream")


@dataclass(slots=True)
class Attempts:
    """How opening went, for the log line and the retries counter."""

    retries: int = 0


class Upstream:
    """Owns the connection pool to the upstream server."""

    # Connections beyond the gate's slots, so listing and info routes, which take no slot,
    # always have some.
    SPARE_CONNECTIONS = 16

    def __init__(
        self, config: UpstreamConfig, backend: BackendConfig, on_retry: Callable[[], None]
    ) -> None:
        self.config = config  # the timeouts and retries, shared by every backend
        self.name = backend.name
        self.kind = backend.kind
        self.api_key = backend.api_key
        self.max_connections = max(config.max_connections, backend.slots + self.SPARE_CONNECTIONS)
        self.base = URL(backend.url.rstrip("/"))
        self._prefix = self.base.raw_path.rstrip("/")  # an upstream mounted under a path
        self._on_retry = on_retry
        self._pool: Pool | None = None
        # Set while the background probe (or the last request) found the upstream down: a
        # request then tries once, without the retries' backoff, and fails fast.
        self.known_down = False

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
            keepalive_s=self.config.keepalive_s,
            max_connections=self.max_connections,
        )

    def interrupt(self, error: UpstreamError) -> None:
        """End every upstream exchange in flight with ``error`` (see ``Pool.interrupt``)."""
        if self._pool is not None:
            self._pool.interrupt(error)

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
        *,
        alone: bool = True,
    ) -> UpstreamResponse:
        """Send the request and return the response once its headers arrived.

        ``alone``: no other backend could take the request, so a refused connection or a
        503 busy is retried here with backoff; otherwise it is tried once, and the caller
        moves the request elsewhere (an unreachable backend raises
        ``UpstreamUnreachableError``, a busy one's 503 comes back as the response).
        """
        cfg = self.config
        target = self._prefix + path
        head = header_block(headers)
        # A streamed body (a model blob) can be sent once only; an upstream known to be
        # down gets one try, so the client hears at once instead of after the backoff.
        once = isinstance(body, AsyncIterable) or self.known_down or not alone
        tries = 1 if once else cfg.max_retries + 1

        def resent() -> None:  # the pool sent an idempotent request again, on a new connection
            attempts.retries += 1
            self._on_retry()

        for attempt in range(tries):
            last = attempt == tries - 1
            try:
                # Waiting for headers allows headers_timeout_s (a cold model load can take
                # minutes); from then on the limit is the gap between two chunks.
                response = await self.pool.request(
                    method, target, head, body,
                    headers_timeout_s=cfg.headers_timeout_s, idle_timeout_s=cfg.idle_timeout_s,
                    on_resend=resent,
                )  # fmt: skip
            except ConnectFailed as exc:
                # Connect failed: the upstream never saw this request, so retrying is safe.
                if last:
                    self.known_down = True
                    log.warning(
                        "upstream_connect_failed",
                        backend=self.name,
                        url=str(self.base),
                        attempts=attempt + 1,
                    )
                    raise UpstreamUnreachableError(
                        f"cannot connect to the upstream at {self.base}: {exc}"
                    ) from exc
            except UploadStalled as exc:
                log.warning("upstream_upload_stalled", timeout_s=cfg.idle_timeout_s)
                raise UpstreamTimeoutError(str(exc)) from exc
            except TimeoutError as exc:
                log.warning("upstream_headers_timed_out", timeout_s=cfg.headers_timeout_s)
                raise UpstreamTimeoutError(
                    f"the upstream sent no response headers within {cfg.headers_timeout_s:g} s"
                ) from exc
            except Interrupted as exc:
                raise ShuttingDownError(f"{exc}; retry later") from exc
            except UpstreamDisconnected as exc:
                # The request may have reached the upstream (a POST is never sent twice).
                log.warning("upstream_request_failed", error=type(exc).__name__)
                raise UpstreamConnectError(
                    f"the upstream closed the connection before answering ({exc})"
                ) from exc
            except UpstreamError as exc:
                log.warning("upstream_request_failed", error=type(exc).__name__)
                raise UpstreamConnectError(str(exc)) from exc
            else:
                self.known_down = False
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


class Place(Protocol):
    """Where a request goes: a backend, and whether (and how) it may move before it has
    reached an upstream. The admission step's ``Gated`` is one; ``Fixed`` never moves."""

    @property
    def backend(self) -> Any: ...  # a Backend: its ``upstream`` is what is used here

    def can_move(self) -> bool: ...

    async def fail_over(self, reason: str) -> Any: ...


class Fixed:
    """A request that goes to one backend and nowhere else (listing, model management)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend

    def can_move(self) -> bool:
        return False

    async def fail_over(self, reason: str) -> None:
        return None


Build = Callable[[Upstream], tuple[str, Body]]  # the path and body for this backend


async def open_placed(
    request: web.Request,
    place: Place,
    exchange: Exchange,
    *,
    method: str,
    build: Build,
    is_json: bool = False,
) -> tuple[Upstream, UpstreamResponse]:
    """Open the request on ``place``'s backend, moving it to another backend while it has
    not reached an upstream: the backend could not be reached, or answered 503 busy before
    any byte. The backend used, and its response (headers received)."""
    while True:
        upstream: Upstream = place.backend.upstream
        path, body = build(upstream)
        alone = not place.can_move()
        try:
            response = await open_upstream(
                request, upstream, exchange, method=method, path=path, body=body,
                is_json=is_json, alone=alone,
            )  # fmt: skip
        except UpstreamUnreachableError as exc:
            if alone or await place.fail_over(str(exc)) is None:
                raise
            continue
        if response.status != 503 or alone:
            return upstream, response
        if await place.fail_over(f"{upstream.name} answered 503 busy") is None:
            return upstream, response  # nowhere else to go: the busy answer is the answer
        response.close()


async def forward(
    request: web.Request,
    place: Place,
    exchange: Exchange,
    body: Body,
    *,
    strip_usage: bool = False,
    inference: bool = False,
    generates: bool = False,
) -> web.StreamResponse:
    """Open the upstream request on ``place`` and relay its response."""
    upstream, response = await open_placed(
        request,
        place,
        exchange,
        method=request.method,
        build=lambda _: (request.path_qs, body),
        is_json=inference,
    )
    with response:
        if response.status >= 400:
            exchange.fail("UpstreamStatus", f"the upstream answered {response.status}")
        return await relay(
            request,
            response,
            exchange,
            strip_usage=strip_usage,
            counts_usage=inference,
            count_chunks=upstream.kind != "ollama",
            require_end=generates,
        )


async def open_upstream(
    request: web.Request,
    upstream: Upstream,
    exchange: Exchange,
    *,
    method: str,
    path: str,
    body: Body,
    is_json: bool = False,
    alone: bool = True,
) -> UpstreamResponse:
    """The upstream's response (headers received); use it as ``with`` to release it.

    The client's headers go along, filtered; a finished body keeps its connection for the
    next request, while an unfinished one (the client left, the stream broke) closes it
    at once so that Ollama stops generating. ``upstream.total_timeout_s``, counted from
    here, bounds the whole response: the retries, the headers and the body.
    """
    cfg = upstream.config
    headers = forward_request_headers(
        request.headers,
        peer=request.remote,
        request_id=exchange.request_id,
        api_key=upstream.api_key,
        # Validated JSON: say so, whatever the client sent (curl -d says form-urlencoded,
        # which Ollama ignores but OpenAI-compatible servers may not).
        content_type="application/json" if is_json else None,
    )
    attempts = Attempts()
    opening = upstream.open(method, path, headers, body, attempts, alone=alone)
    total_s = cfg.total_timeout_s
    try:
        if not total_s:
            return await opening
        deadline = asyncio.get_running_loop().time() + total_s
        try:
            async with asyncio.timeout_at(deadline):
                response = await opening
        except TimeoutError:
            raise UpstreamTimeoutError(
                f"the upstream did not answer within the total timeout of {total_s:g} s"
            ) from None
    finally:
        exchange.retries += attempts.retries
    response.set_deadline(deadline, total_s)
    return response
