"""One keep-alive connection to the upstream and the response in flight on it: llhttp
(through ``httptools``) parses the bytes, and the body is handed over as it arrives.

What HTTP/1.1 (RFC 9112) asks of a recipient, and what this glue does about it:

- the body ends where its framing says: ``Transfer-Encoding`` is a case-insensitive list
  whose last coding must be ``chunked`` for a chunked body; with ``Content-Length`` beside
  it, the coding wins and the connection is not reused; without either, the body runs to
  the connection's clean end. A framed body cut short is an error, never a short success;
- fields after the last chunk are trailers, never header fields;
- ``1xx`` responses are skipped; ``HEAD``, ``204`` and ``304`` have no body;
- ``Keep-Alive: timeout=N`` from the upstream shortens how long an idle connection is kept,
  so it is not reused just as the upstream closes it.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, cast

import httptools
from multidict import CIMultiDict

if TYPE_CHECKING:
    from proxy.upstream.client import Pool

_HIGH_WATER = 256 * 1024  # unread body bytes before reading pauses
_KEEP_ALIVE_TIMEOUT = re.compile(r"(?:^|[,\s])timeout\s*=\s*(\d+)", re.IGNORECASE)


class UpstreamError(Exception):
    """The connection failed or the response broke its framing."""


class UpstreamDisconnected(UpstreamError):
    """The connection closed before the response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The upstream sent bytes that are not HTTP/1.1 (RFC 9112)."""


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection; ``response`` is the exchange in flight, if any."""

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.response: UpstreamResponse | None = None
        self.lost = False
        self.idle_since = 0.0
        self.keepalive_s = pool.keepalive_s  # shortened by the upstream's Keep-Alive field
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
            self._drain.exception()  # retrieved: whoever waits on it reports it

    def pause_writing(self) -> None:
        self._drain = self.pool.loop.create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    @property
    def drained(self) -> asyncio.Future[None] | None:
        """Set while the socket's send buffer is full: done when it has room again."""
        if self.lost:
            raise UpstreamDisconnected("the upstream closed the connection")
        return self._drain

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
        "_deadline",
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
        "request_sent",
        "status",
    )

    def __init__(self, connection: UpstreamConnection, *, head_only: bool) -> None:
        self._connection: UpstreamConnection | None = connection
        self.parser = httptools.HttpResponseParser(self)
        # RFC 9112 section 6.3: with both Transfer-Encoding and Content-Length, the coding
        # wins (and the connection is not reused); llhttp refuses that unless told.
        self.parser.set_dangerous_leniencies(lenient_chunked_length=True)
        self.head_only = head_only  # a HEAD request: no body follows the headers
        self.status = 0
        self.reason = ""
        self.raw_headers: list[tuple[str, str]] = []
        self.headers: CIMultiDict[str] = CIMultiDict()
        self.headers_done: asyncio.Future[None] = connection.pool.loop.create_future()
        self.framed = False  # Content-Length or chunked: the end is not the connection's end
        self.keep_alive = False  # known with the headers (llhttp forgets it at the end)
        self.request_sent = True  # False when an early answer cut the request body short
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
        self._deadline: asyncio.TimerHandle | None = None

    # what the relay uses
    @property
    def content_type(self) -> str:
        value = self.headers.get("Content-Type", "application/octet-stream")
        return value.partition(";")[0].strip().lower()

    @property
    def content_encoding(self) -> str:
        """The body's content coding, lowercased; ``identity`` when none."""
        value = self.headers.get("Content-Encoding", "").strip().lower()
        return value or "identity"

    @property
    def content_length(self) -> int | None:
        """The body's length, when it says so (never when a transfer coding overrides it)."""
        value = self.headers.get("Content-Length")
        if value is None or "Transfer-Encoding" in self.headers:
            return None
        return int(value) if value.isdigit() else None

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
            # The silence the idle timer measures is the upstream's: it starts again now.
            self._last_data = self._connection_loop().time()
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

    def set_deadline(self, when: float, total_s: float) -> None:
        """Fail the response if it is not complete by ``when`` (the loop's clock), silent
        upstream or not."""
        if self.complete or self._error is not None:
            return
        self._deadline = self._connection_loop().call_at(when, self._deadline_passed, total_s)

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
        self._stop_timers()
        connection, self._connection = self._connection, None
        if connection is None:
            return
        connection.response = None
        if self.complete and self._error is None and self.keep_alive and self.request_sent:
            connection.pool.put(connection)
        else:
            connection.close()

    def close(self) -> None:
        """Done with it, finished or not: the connection is closed, never reused. A read
        waiting for the body fails."""
        if not self.complete and self._error is None:
            self._error = UpstreamDisconnected("the response was closed")
            self._wake()
        self._stop_timers()
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
            self.fail(UpstreamProtocolError(f"the upstream broke HTTP framing: {exc}"))
            if self._connection is not None:
                self._connection.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.complete:
            return
        if self.headers_done.done() and not self.framed and exc is None:
            self.on_message_complete()  # a body delimited by the connection's clean end
            return
        detail = f" ({type(exc).__name__})" if exc is not None else ""
        self.fail(UpstreamDisconnected(f"the upstream closed the connection{detail}"))

    def fail(self, error: BaseException) -> None:
        if self._error is not None or self.complete:
            return
        self._error = error
        self._stop_timers()
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
        # Once the final response's headers are complete, fields are trailers: dropped.
        if not self.status and not self.complete:
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
        self.headers = headers = CIMultiDict(self.raw_headers)
        codings = _codings(headers.getall("Transfer-Encoding", ()))
        if self.head_only or status in (204, 304):
            # No body, whatever the framing says (RFC 9112 section 6.3 rule 1). llhttp does
            # not know the request was HEAD, so the connection's fate is read here.
            self.framed = True
            self.keep_alive = _persistent(self.parser.get_http_version(), headers)
        elif codings:
            self.framed = codings[-1] == "chunked"
            self.keep_alive = self.framed and "Content-Length" not in headers
        else:
            self.framed = "Content-Length" in headers
            self.keep_alive = self.framed
        if not self.head_only:
            self.keep_alive = self.keep_alive and self.parser.should_keep_alive()
        if self.keep_alive and self._connection is not None:
            self._honour_keep_alive(self._connection, headers.get("Keep-Alive"))
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
        self._stop_timers()
        self._wake()

    # internals
    @staticmethod
    def _honour_keep_alive(connection: UpstreamConnection, field: str | None) -> None:
        """Keep an idle connection for less than the upstream says it will: a second less."""
        match = _KEEP_ALIVE_TIMEOUT.search(field) if field else None
        if match is not None:
            connection.keepalive_s = min(connection.keepalive_s, max(0.0, int(match[1]) - 1.0))

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
        if self._paused:
            # The gateway stopped reading (its client reads slowly): not the upstream's
            # silence. readany() restarts the count when it resumes.
            self._arm(loop.time() + limit)
            return
        due = self._last_data + limit
        if loop.time() < due:
            self._arm(due)
            return
        self._give_up(TimeoutError(f"the upstream sent nothing for {limit:g} s"))

    def _deadline_passed(self, total_s: float) -> None:
        self._deadline = None
        if not self.complete:
            message = f"the response took longer than the total timeout of {total_s:g} s"
            self._give_up(TimeoutError(message))

    def _give_up(self, error: BaseException) -> None:
        self.fail(error)
        if self._connection is not None:
            self._connection.close()

    def _stop_timers(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _connection_loop(self) -> asyncio.AbstractEventLoop:
        return self.headers_done.get_loop()


def _persistent(version: str, headers: CIMultiDict[str]) -> bool:
    """Whether a connection persists after this response (RFC 9112 section 9.3)."""
    options = {o.strip().lower() for v in headers.getall("Connection", ()) for o in v.split(",")}
    if version == "1.1":
        return "close" not in options
    return "keep-alive" in options


def _codings(values: list[str] | tuple[()]) -> list[str]:
    """The transfer codings a ``Transfer-Encoding`` field lists, in order, lowercased."""
    return [c.strip().lower() for value in values for c in value.split(",") if c.strip()]
