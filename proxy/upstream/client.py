"""A lean HTTP/1.1 client for one upstream host: a bounded pool of keep-alive connections
(``connection.py`` parses what comes back), one write per request.

Why not ``aiohttp.ClientSession``: it is a general client (cookies, redirects, proxies,
tracing, URL handling), and py-spy put it at a fifth of the gateway's CPU per request.
This one does what a reverse proxy to one host needs and nothing else:

- at most ``max_connections`` connections, reused most recently used first; a request that
  finds them all busy waits for one at most ``connect_timeout_s``;
- an idle connection is kept for ``keepalive_s`` at most (less when the upstream's
  ``Keep-Alive`` says so), below common server idle timeouts, so it is rarely reused just
  as the upstream closes it;
- a request is sent again only when that is safe (RFC 9110 section 9.2.2): an idempotent
  method on a reused connection that closed before any response byte. A POST the upstream
  may have read (an inference) is never sent twice; each re-send is reported;
- a streamed request body stops when the upstream answers early, and fails when the
  upstream reads none of it for the idle timeout;
- backpressure both ways: reading pauses while unread body piles up, and a streamed
  request body waits while the socket's buffer is full.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable

from proxy.upstream.connection import (
    UpstreamConnection,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
)

__all__ = [
    "Body",
    "ConnectFailed",
    "Interrupted",
    "Pool",
    "UploadStalled",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "header_block",
]

# RFC 9110 section 9.2.2: a request with these methods may be repeated without harm.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

Body = bytes | AsyncIterable[bytes] | None


class ConnectFailed(Exception):
    """No connection could be made: nothing was sent, so trying again is safe."""


class Interrupted(UpstreamError):
    """The gateway ended the exchange itself (it is shutting down)."""


class UploadStalled(TimeoutError):
    """The upstream read none of a streamed request body for the idle timeout."""


class _Stale(Exception):
    """A pooled connection was found closed before the upstream answered a byte."""


class Pool:
    """Keep-alive connections to one ``host:port``, the most recently used first."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        tls: ssl.SSLContext | None,
        connect_timeout_s: float,
        keepalive_s: float = 4.0,
        max_connections: int = 64,
    ) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self.connect_timeout_s = connect_timeout_s
        self.keepalive_s = keepalive_s
        self.max_connections = max_connections
        self.loop = asyncio.get_running_loop()
        self._idle: list[UpstreamConnection] = []
        self._busy: set[UpstreamConnection] = set()
        self._connecting = 0
        self._room: deque[asyncio.Future[None]] = deque()
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
        on_resend: Callable[[], None] | None = None,
    ) -> UpstreamResponse:
        """Send ``method target`` with the header block ``head`` (``Name: value\\r\\n``
        lines, no Host, no framing) and wait for the response headers.

        Raises ``ConnectFailed`` when no connection could be made (nothing was sent),
        ``UpstreamError`` when the connection failed after the request went out,
        ``TimeoutError`` when the headers did not come in time. Reading the body raises
        ``TimeoutError`` after ``idle_timeout_s`` without a byte (0: no limit).
        ``on_resend`` is called each time the request is sent again.
        """
        replayable = method in IDEMPOTENT and not isinstance(body, AsyncIterable)
        start = f"{method} {target} HTTP/1.1\r\nHost: {self.authority}\r\n".encode()
        while True:
            connection, reused = await self._acquire()
            try:
                return await self._exchange(
                    connection, method, start + head, body,
                    timeouts=(headers_timeout_s, idle_timeout_s),
                    retry_stale=reused and replayable,
                )  # fmt: skip
            except _Stale:
                # The upstream had closed it while idle; the method allows sending again.
                if on_resend is not None:
                    on_resend()

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
                await self._upload(connection, response, head, body, idle_s=timeouts[1])
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

    @staticmethod
    async def _upload(
        connection: UpstreamConnection,
        response: UpstreamResponse,
        head: bytes,
        body: AsyncIterable[bytes],
        *,
        idle_s: float,
    ) -> None:
        """Send a streamed body, chunked, until it ends or the upstream answers early."""
        connection.write(head + b"Transfer-Encoding: chunked\r\n\r\n")
        answered = response.headers_done
        async for chunk in body:
            if answered.done():
                response.request_sent = False  # the rest was not sent: never reuse
                return
            if not chunk:
                continue
            connection.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            drained = connection.drained
            if drained is None:
                continue
            done, _ = await asyncio.wait(
                (drained, answered), timeout=idle_s or None, return_when=asyncio.FIRST_COMPLETED
            )
            if not done:
                raise UploadStalled(f"the upstream read none of the request body for {idle_s:g} s")
            if drained in done:
                drained.result()  # the connection's failure, if that is what happened
        if not answered.done():
            connection.write(b"0\r\n\r\n")

    @property
    def authority(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.tls is not None else 80
        return host if self.port == default else f"{host}:{self.port}"

    async def _acquire(self) -> tuple[UpstreamConnection, bool]:
        """A connection and whether it was reused: an idle one, a new one while under the
        limit, or else the first to become free within the connect timeout."""
        try:
            async with asyncio.timeout(self.connect_timeout_s or None):
                while True:
                    connection = self._take()
                    if connection is not None:
                        return connection, True
                    if len(self._busy) + len(self._idle) + self._connecting < self.max_connections:
                        break
                    await self._wait_for_room()
        except TimeoutError:
            raise ConnectFailed(
                f"all {self.max_connections} connections to the upstream stayed busy for "
                f"{self.connect_timeout_s:g} s"
            ) from None
        return await self._connect(), False

    async def _wait_for_room(self) -> None:
        room = self.loop.create_future()
        self._room.append(room)
        try:
            await room
        except BaseException:
            if room in self._room:
                self._room.remove(room)
            elif room.done() and not room.cancelled():
                self._make_room()  # woken as it gave up: the next in line goes instead
            raise

    def _take(self) -> UpstreamConnection | None:
        now = self.loop.time()
        while self._idle:
            connection = self._idle.pop()
            if connection.usable and now - connection.idle_since < connection.keepalive_s:
                return connection
            connection.close()
        return None

    async def _connect(self) -> UpstreamConnection:
        self._connecting += 1
        try:
            async with asyncio.timeout(self.connect_timeout_s or None):
                _, protocol = await self.loop.create_connection(
                    lambda: UpstreamConnection(self), self.host, self.port, ssl=self.tls
                )
        except BaseException as exc:
            self._connecting -= 1
            self._make_room()
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(f"no connection within {self.connect_timeout_s:g} s") from None
            if isinstance(exc, OSError):
                raise ConnectFailed(_connect_failure(exc)) from exc
            raise
        self._busy.add(protocol)  # counted before the connecting count drops
        self._connecting -= 1
        return protocol

    def put(self, connection: UpstreamConnection) -> None:
        self._busy.discard(connection)
        if connection.usable and connection.keepalive_s > 0:
            connection.idle_since = self.loop.time()
            self._idle.append(connection)
            if self._sweeper is None:
                self._sweeper = self.loop.call_later(self.keepalive_s, self._sweep)
        else:
            connection.close()
        self._make_room()

    def forget(self, connection: UpstreamConnection) -> None:
        self._busy.discard(connection)
        if connection in self._idle:
            self._idle.remove(connection)
        self._make_room()

    def _make_room(self) -> None:
        """A connection was returned or closed: the first request waiting for one goes on."""
        while self._room:
            room = self._room.popleft()
            if not room.done():
                room.set_result(None)
                return

    def _sweep(self) -> None:
        """Close what idled past its keep-alive time."""
        self._sweeper = None
        now = self.loop.time()
        for connection in [c for c in self._idle if now - c.idle_since >= c.keepalive_s]:
            self._idle.remove(connection)
            connection.close()
        if self._idle:
            self._sweeper = self.loop.call_later(self.keepalive_s, self._sweep)

    def interrupt(self, error: UpstreamError) -> None:
        """End every exchange in flight with ``error``, and close its connection: the
        upstream stops working on it."""
        for connection in list(self._busy):
            if connection.response is not None:
                connection.response.fail(error)
            connection.close()

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


def _connect_failure(exc: OSError) -> str:
    """asyncio's message names the address; the errno's says what went wrong (a DNS
    failure's errno is the resolver's, negative, with its own message; a TLS failure's is
    OpenSSL's, which os.strerror does not know)."""
    if isinstance(exc, ssl.SSLError):
        detail = getattr(exc, "verify_message", None) or exc.reason or str(exc)
        return f"TLS handshake failed: {detail}"
    if exc.errno and exc.errno > 0:
        return os.strerror(exc.errno)
    return exc.strerror or str(exc) or type(exc).__name__


def header_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """``Name: value\\r\\n`` lines of (name, value) pairs; a line break in a value is refused."""
    lines = []
    for name, value in headers:
        if "\r" in value or "\n" in value:
            raise ValueError(f"header {name!r} contains a line break")
        lines.append(f"{name}: {value}\r\n")
    # Values came in as UTF-8 with surrogate escapes at worst: they leave as they came.
    return "".join(lines).encode("utf-8", "surrogateescape")
