"""Client connections, before a request reaches the app: how many may be open, how long a
request head may take to arrive, and what a request the HTTP parser refuses gets.

aiohttp's server has none of the first two, and answers a malformed request (an overlong
header, a bad ``Content-Length``, ``Content-Length`` with ``Transfer-Encoding``, broken
chunking, an HTTP/2 preface) with ``text/plain`` and a traceback in the log that quotes the
offending header line, a client's key included. Here:

- at most ``server.max_connections`` are open; one more gets a ``503`` and is closed, as
  nginx's ``worker_connections`` bounds it;
- a request head must arrive within ``server.header_timeout_s`` of its first byte (nginx's
  ``client_header_timeout``), or the connection gets a ``408`` and is closed, so slow
  clients cannot hold connections one byte at a time;
- every refusal is a JSON error with an ``X-Request-ID``, in the OpenAI shape the gateway
  uses for its own errors, and one ``request_refused`` log line that names the reason
  without repeating any byte of the request.

The body's own inactivity limit (``server.body_timeout_s``) is enforced where the body is
read (``admission.body``).
"""

from __future__ import annotations

import asyncio
import random
import re
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from proxy.config import ServerConfig
from proxy.dialects import OPENAI
from proxy.metrics import Metrics

log = structlog.get_logger("proxy.connections")

# The first line of aiohttp's parser messages, up to the colon after which it quotes the
# request's bytes: "Invalid header value char", "Got more than 8190 bytes when reading".
_SAFE_REASON = re.compile(r"[A-Za-z0-9 ,.'/-]{1,80}")
_CODES = {400: "invalid_request", 408: "request_timeout", 503: "too_many_connections"}


def request_id() -> str:
    """A new request id (as the middleware makes one)."""
    return f"{random.getrandbits(128):032x}"


def refusal_reason(exc: BaseException | None) -> str:
    """Why the parser refused a request, in words that quote none of its bytes."""
    if isinstance(exc, HttpProcessingError):
        first = str(exc.message).split("\n", 1)[0].split(":", 1)[0].strip()
        if _SAFE_REASON.fullmatch(first):
            if first.startswith("Pause on PRI"):
                return "malformed HTTP/1.1 request (an HTTP/2 preface?)"
            return f"malformed HTTP/1.1 request: {first}"
    return "malformed HTTP/1.1 request"


def raw_error(status: int, reason: str, message: str, rid: str) -> bytes:
    """A whole JSON error response, for a connection the app never sees; it closes."""
    body = OPENAI.error_body(status, message, _CODES.get(status, "invalid_request"))
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nX-Request-ID: {rid}\r\nConnection: close\r\n"
    )
    if status == 503:
        head += "Retry-After: 1\r\n"
    return head.encode() + b"\r\n" + body


class GatewayServer(web.Server):
    """aiohttp's server, making ``GatewayProtocol`` connections and counting them."""

    settings: ServerConfig
    metrics: Metrics
    open_connections: int

    @classmethod
    def adopt(cls, server: web.Server, settings: ServerConfig, metrics: Metrics) -> GatewayServer:
        """Make aiohttp's server for the app this class: the app builds it itself."""
        server.__class__ = cls
        adopted = cast(GatewayServer, server)
        adopted.settings, adopted.metrics, adopted.open_connections = settings, metrics, 0
        return adopted

    def __call__(self) -> GatewayProtocol:
        return GatewayProtocol(self, loop=self._loop, **self._kwargs)

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self.open_connections += 1

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open_connections -= 1
        super().connection_lost(handler, exc)

    def refused(self, reason: str) -> None:
        self.metrics.count(self.metrics.rejected, {"reason": reason})


class GatewayProtocol(RequestHandler):
    """One client connection, with the head timeout and JSON refusals."""

    def __init__(self, manager: GatewayServer, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._gateway_server = manager
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_request = False  # a head was parsed and its response is not finished

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._gateway_server
        if server.open_connections > server.settings.max_connections:
            self._refuse(503, "Service Unavailable", "too_many_connections",
                         "the gateway has too many open connections; retry later")  # fmt: skip
            return
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._in_request:
            self._arm_head_timer()  # the first byte of the next request on this connection
        super().data_received(data)
        if self._messages:  # a whole head was parsed
            self._in_request = True
            self._stop_head_timer()

    def log_access(
        self, request: BaseRequest, response: web.StreamResponse, time: float | None
    ) -> None:
        super().log_access(request, response, time)
        self._in_request = False  # the response is finished; the connection may idle

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """A request the parser refused (or, rarely, one the app failed on outside its
        middleware): one log line, a JSON answer, the connection closed."""
        rid = request_id()
        if status == 500:
            reason = "internal gateway error"
            log.error("request_failed", request_id=rid, exc_info=exc)
        else:
            reason = refusal_reason(exc)
            log.warning("request_refused", request_id=rid, status=status, reason=reason)
            self._gateway_server.refused("invalid")
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already: the connection is closed")
        code = _CODES.get(status, "internal_error" if status == 500 else "invalid_request")
        response = web.Response(
            status=status,
            body=OPENAI.error_body(status, reason, code),
            content_type="application/json",
            headers={"X-Request-ID": rid},
        )
        response.force_close()
        return response

    # internals
    def _arm_head_timer(self) -> None:
        timeout_s = self._gateway_server.settings.header_timeout_s
        if timeout_s > 0:
            self._head_timer = self._loop.call_later(timeout_s, self._head_timed_out)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._messages or self._in_request:
            return
        timeout_s = self._gateway_server.settings.header_timeout_s
        self._refuse(408, "Request Timeout", "slow_client",
                     f"the request head did not arrive within {timeout_s:g} s")  # fmt: skip

    def _refuse(self, status: int, reason: str, label: str, message: str) -> None:
        """Answer a connection the app will not see, and close it."""
        rid = request_id()
        log.warning("request_refused", request_id=rid, status=status, reason=message)
        self._gateway_server.refused(label)
        if self.transport is not None:
            self.transport.write(raw_error(status, reason, message, rid))
        self.force_close()
        if self.transport is not None:
            self.transport.close()


class GatewayRunner(web.AppRunner):
    """An ``AppRunner`` whose server makes ``GatewayProtocol`` connections."""

    def __init__(
        self, app: web.Application, settings: ServerConfig, metrics: Metrics, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self._settings = settings
        self._metrics = metrics

    async def _make_server(self) -> web.Server:
        return GatewayServer.adopt(await super()._make_server(), self._settings, self._metrics)
