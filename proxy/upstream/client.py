"""A lean HTTP/1.1 client for the one upstream: pooled keep-alive connections, responses
parsed by llhttp (through ``httptools``), bodies handed over as they arrive.

Why not ``aiohttp.ClientSession``: it is a general client (cookies, redirects, proxies,
tracing, URL handling), and py-spy put it at a fifth of the gateway's CPU per request.
This one does what a reverse proxy to one host needs and nothing else:

- one write per request (head and body together) on a connection from a LIFO pool;
- a reused connection that turns out closed before any response byte is retried once on
  a fresh one (the upstream never saw the request: the stale keep-alive race);
- one inactivity timer per response, rescheduled lazily, for the wait for headers and the
  gaps between body chunks;
- backpressure both ways: reading pauses while unread body piles up, and a streamed
  request body waits while the socket's buffer is full.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import AsyncIterable, Iterable
from typing import cast

import httptools
from multidict import CIMultiDict

_HIGH_WATER = 256 * 1024  # unread body bytes before reading pauses


class UpstreamError(Exception):
    """The connection failed or the response broke its framing."""


class UpstreamDisconnected(UpstreamError):
    """The connection closed before the response was complete."""


class ConnectFailed(Exception):
    """No connection could be made: nothing was sent, so trying again is safe."""


class _Stale(Exception):
    """A pooled connection was found closed before the upstream answered a byte."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; ``response`` is the exchange in flight, if any."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.idle_since = 0.0
        self._drain: asyncio.Future[None] | None = None

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None:  # bytes nobody asked for: the connection cannot be trusted
            self.close()
            return
        response.feed(data)

    def eof_received(self) -> bool:
        return False  # close the transport; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pool.forget(self)
        if self.response is not None:
            self.response.connection_lost(exc)
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(UpstreamDisconnected("the upstream closed the connection"))

    def pause_writing(self) -> None:
        self._drain = self.pool.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    async def drain(self) -> None:
        if self.lost:
            raise UpstreamDisconnected("the upstream closed the connection")
        if self._drain is not None:
            await self._drain

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def usable(self) -> bool:
        return not self.lost and self.transport is not None and not self.transport.is_closing()


class UpstreamResponse:
    """Status, headers and a body to read with ``readany()``/``read()``, as they arrive.

    ``release()`` returns a completely read connection to the pool and closes any other:
    closing is how an unfinished generation is cancelled upstream.
    """

    __slots__ = (
        "_chunks",
        "_connection",
        "_error",
        "_headers_s",
        "_idle_s",
        "_last_data",
        "_paused",
        "_timer",
        "_timer_due",
        "_waiter",
        "buffered",
        "complete",
        "framed",
        "head_only",
        "headers",
        "headers_done",
        "interim",
        "keep_alive",
        "parser",
        "raw_headers",
        "reason",
        "received",
        "status",
    )

    def __init__(self, connection: UpstreamConnection, *, head_only: bool) -> None:
        self._connection: UpstreamConnection | None = connection
        self.parser = httptools.HttpResponseParser(self)
        self.head_only = head_only  # a HEAD request: no body follows the headers
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[str, str]] = []
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.headers_done: asyncio.Future[None] = connection.pool.loop.create_future()
        self.framed = False  # Content-Length or chunked: the end is not the connection's end
        self.keep_alive = False  # known with the headers (llhttp forgets it at the end)
        self.interim = False  # parsing a 1xx response, which the final one follows
        self.received = False
        self.complete = False
        self.buffered = 0
        self._chunks: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._paused = False
        self._headers_s = 0.0
        self._idle_s = 0.0
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_due = 0.0

    # what the relay uses
    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type", "application/octet-stream")
        return value.partition(";")[0].strip().lower()

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def readany(self) -> bytes:
        """What has arrived since the last read, waiting for some; b"" once the body ended."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self.complete:
                return b""
            self._waiter = self._connection_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self._paused:
            self._paused = False
            if self._connection is not None and self._connection.transport is not None:
                self._connection.transport.resume_reading()
        return data

    async def read(self) -> bytes:
        """The whole body."""
        parts = []
        while chunk := await self.readany():
            parts.append(chunk)
        return b"".join(parts)

    def start_timer(self, headers_s: float, idle_s: float) -> None:
        """Fail the response when the upstream sends nothing for ``headers_s`` before the
        headers, or for ``idle_s`` between two body chunks (0: no limit).

        One timer, armed for the nearer limit and re-armed only when it fires early: a
        quick answer costs one timer, whichever phase it is in.
        """
        self._headers_s, self._idle_s = headers_s, idle_s
        limits = [s for s in (headers_s, idle_s) if s > 0]
        if limits and not self.complete and self._error is None:
            self._last_data = self._connection_loop().time()
            self._arm(self._last_data + min(limits))

    def _arm(self, due: float) -> None:
        """Have ``_check_idle`` run by ``due`` (an earlier timer already does)."""
        if self._timer is not None:
            if self._timer_due <= due:
                return
            self._timer.cancel()
        self._timer_due = due
        self._timer = self._connection_loop().call_at(due, self._check_idle)

    def __enter__(self) -> UpstreamResponse:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        """Done with it: a complete response's connection goes back to the pool."""
        self._stop_timer()
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.response = None
        if self.complete and self._error is None and self.keep_alive:
            connection.pool.put(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Done with it, finished or not: the connection is closed, never reused. A read
        waiting for the body fails."""
        if not self.complete and self._error is None:
            self._error = UpstreamDisconnected("the response was closed")
            self._wake()
        self._stop_timer()
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.response = None
            connection.close()

    # fed by the connection
    def feed(self, data: bytes) -> None:
        self.received = True
        if self._timer is not None:
            self._last_data = self._connection_loop().time()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.fail(UpstreamError(f"the upstream broke HTTP framing: {exc}"))
            if self._connection is not None:
                self._connection.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.complete:
            return
        if self.headers_done.done() and not self.framed and exc is None:
            self.on_message_complete()  # a body delimited by the connection's end
            return
        detail = f" ({type(exc).__name__})" if exc is not None else ""
        self.fail(UpstreamDisconnected(f"the upstream closed the connection{detail}"))

    def fail(self, error: BaseException) -> None:
        if self._error is not None or self.complete:
            return
        self._error = error
        self._stop_timer()
        if not self.headers_done.done():
            self.headers_done.set_exception(error)
            self.headers_done.exception()  # retrieved: open() reports it, not the loop
        self._wake()

    # httptools callbacks. After the response's end, llhttp goes on parsing whatever else
    # came (a second response, a body to a HEAD): ignored, and the connection not reused.
    def on_message_begin(self) -> None:
        if self.complete:
            self.keep_alive = False

    def on_status(self, status: bytes) -> None:
        if not self.complete:
            self.reason += status.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.complete:
            self.raw_headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            # An interim response (100 Continue, 103 Early Hints): the real one follows.
            self.raw_headers, self.reason, self.interim = [], "", True
            return
        self.status = status
        self.headers = CIMultiDict(self.raw_headers)
        self.framed = "Content-Length" in self.headers or "chunked" in self.headers.get(
            "Transfer-Encoding", ""
        )
        self.keep_alive = self.framed and self.parser.should_keep_alive()
        if not self.headers_done.done():
            self.headers_done.set_result(None)
        if self._idle_s > 0 and not self.head_only:
            # The body's limit starts now; re-arm only if the timer is set for later.
            loop = self._connection_loop()
            self._last_data = loop.time()
            self._arm(self._last_data + self._idle_s)
        if self.head_only:
            self.on_message_complete()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            self.keep_alive = False
            return
        self._chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER and not self._paused:
            connection = self._connection
            if connection is not None and connection.transport is not None:
                self._paused = True
                connection.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.complete:
            return
        self.complete = True
        self._stop_timer()
        self._wake()

    # internals
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_idle(self) -> None:
        self._timer = None
        if self.complete or self._error is not None:
            return
        limit = self._idle_s if self.headers_done.done() else self._headers_s
        if limit <= 0:
            return  # no limit in this phase (on_headers_complete arms the next one)
        loop = self._connection_loop()
        due = self._last_data + limit
        if loop.time() < due:
            self._arm(due)
            return
        self.fail(TimeoutError(f"the upstream sent nothing for {limit:g} s"))
        if self._connection is not None:
            self._connection.close()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _connection_loop(self) -> asyncio.AbstractEventLoop:
        return self.headers_done.get_loop()


Body = bytes | AsyncIterable[bytes] | None


class Pool:
    """Keep-alive connections to one ``host:port``, the most recently used first."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout_s: float,
        keepalive_s: float = 30.0,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.loop = asyncio.get_running_loop()
        self._idle: list[UpstreamConnection] = []
        self._busy: set[UpstreamConnection] = set()
        self._sweeper: asyncio.TimerHandle | None = None

    async def request(
        self,
        method: str,
        target: str,
        head: bytes,
        body: Body,
        *,
        headers_timeout_s: float,
        idle_timeout_s: float = 0.0,
    ) -> UpstreamResponse:
        """Send ``method target`` with the header block ``head`` (``Name: value\\r\\n``
        lines, no Host, no framing) and wait for the response headers.

        Raises ``ConnectFailed`` when no connection could be made (nothing was sent),
        ``UpstreamError`` when the connection failed after the request went out,
        ``TimeoutError`` when the headers did not come in time. Reading the body raises
        ``TimeoutError`` after ``idle_timeout_s`` without a byte (0: no limit).
        """
        retry_stale = not isinstance(body, AsyncIterable)  # a streamed body goes once
        start = f"{method} {target} HTTP/1.1\r\nHost: {self.authority}\r\n".encode()
        while True:
            connection, reused = self._take()
            if connection is None:
                connection = await self._connect()
            try:
                return await self._exchange(
                    connection, method, start + head, body,
                    timeouts=(headers_timeout_s, idle_timeout_s),
                    retry_stale=reused and retry_stale,
                )  # fmt: skip
            except _Stale:
                continue  # the upstream had closed it while idle: it never saw the request

    async def _exchange(
        self,
        connection: UpstreamConnection,
        method: str,
        head: bytes,
        body: Body,
        *,
        timeouts: tuple[float, float],
        retry_stale: bool,
    ) -> UpstreamResponse:
        response = UpstreamResponse(connection, head_only=method == "HEAD")
        connection.response = response
        self._busy.add(connection)
        try:
            if body is None:
                connection.write(head + b"\r\n")
            elif isinstance(body, bytes):
                connection.write(head + b"Content-Length: %d\r\n\r\n" % len(body) + body)
            else:
                connection.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
                async for chunk in body:
                    if chunk:
                        connection.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        await connection.drain()
                connection.write(b"0\r\n\r\n")
            response.start_timer(*timeouts)
            await response.headers_done
        except UpstreamDisconnected:
            response.close()
            if retry_stale and not response.received:
                raise _Stale from None
            raise
        except BaseException:
            response.close()
            raise
        return response

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls is not None else 80
        return host if self.port == default else f"{host}:{self.port}"

    def _take(self) -> tuple[UpstreamConnection | None, bool]:
        now = self.loop.time()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable and now - connection.idle_since < self.keepalive_s:
                return connection, True
            connection.close()
        return None, False

    async def _connect(self) -> UpstreamConnection:
        try:
            async with asyncio.timeout(self.connect_timeout_s or None):
                _, protocol = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.tls
                )
        except TimeoutError:
            raise ConnectFailed(f"no connection within {self.connect_timeout_s:g} s") from None
        except OSError as exc:
            # asyncio's message names the address; the errno's says what went wrong (a DNS
            # failure's errno is the resolver's, negative, with its own message; a TLS
            # failure's is OpenSSL's, which os.strerror does not know).
            if isinstance(exc, ssl.SSLError):
                detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)
                reason = f"TLS handshake failed: {detail}"
            elif exc.errno and exc.errno > 0:
                reason = os.strerror(exc.errno)
            else:
                reason = exc.strerror or str(exc) or type(exc).__name__
            raise ConnectFailed(reason) from exc
        return protocol

    def put(self, connection: UpstreamConnection) -> None:
        self._busy.discard(connection)
        if not connection.usable:
            return
        connection.idle_since = self.loop.time()
        self._idle.append(connection)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.keepalive_s, self._sweep)

    def forget(self, connection: UpstreamConnection) -> None:
        self._busy.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)

    def _sweep(self) -> None:
        """Close what idled past the keep-alive time (the oldest sit at the front)."""
        self._sweeper = None
        now = self.loop.time()
        while self._idle and now - self._idle[0].idle_since >= self.keepalive_s:
            self._idle.pop(0).close()
        if self._idle:
            self._sweeper = self.loop.call_later(self.keepalive_s, self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for connection in [*self._idle, *self._busy]:
            if connection.response is not None:
                connection.response.close()
            connection.close()
        self._idle.clear()
        self._busy.clear()


def header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """``Name: value\\r\\n`` lines of (name, value) pairs; a line break in a value is refused."""
    lines = []
    for name, value in headers:
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}\r\n")
    # Values came in as UTF-8 with surrogate escapes at worst: they leave as they came.
    return "".join(lines).encode("utf-8", "surrogateescape")
