"""What the fake saw of each request, and the per-request context its handlers write through."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aiohttp import web


class HeaderDict(dict[str, str]):
    """Header names as received, looked up case-insensitively (HTTP names are)."""

    def __init__(self, items: Iterable[tuple[str, str]] = ()) -> None:
        super().__init__(items)
        self._names = {k.lower(): k for k in self}

    def _key(self, key: object) -> object:
        return self._names.get(key.lower(), key) if isinstance(key, str) else key

    def __getitem__(self, key: str) -> str:
        return super().__getitem__(str(self._key(key)))

    def __contains__(self, key: object) -> bool:
        return super().__contains__(self._key(key))

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(str(self._key(key)), default)


@dataclass(eq=False)
class SeenRequest:
    """One request as received, and how handling it ended."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any | None
    started: float
    # When handling ended for any reason (also on disconnect), time.monotonic().
    finished: float | None = None
    disconnected: bool = False
    chunks_sent: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class _GoStream(web.StreamResponse):
    _send_headers_immediately = False  # aiohttp's switch: headers wait for the first write


class Exchange:
    """One request in flight: its record, its (lazily prepared) stream, its start time."""

    __slots__ = ("_notify", "request", "response", "seen", "t0_ns")

    def __init__(
        self, request: web.Request, seen: SeenRequest, t0_ns: int, notify: Callable[[], None]
    ) -> None:
        self.request = request
        self.seen = seen
        self.t0_ns = t0_ns
        self.response: web.StreamResponse | None = None
        self._notify = notify

    @property
    def body(self) -> Any | None:
        return self.seen.json

    async def stream(self, content_type: str) -> web.StreamResponse:
        """Start a chunked 200 response; its status line and headers leave with the first
        chunk, as Go's net/http sends them at Ollama's first flush."""
        resp = _GoStream(headers={"Content-Type": content_type})
        await resp.prepare(self.request)
        self.response = resp
        return resp

    async def send(self, data: bytes) -> None:
        """Write one chunk; aiohttp hands it to the transport at once (a flush per chunk)."""
        assert self.response is not None
        await self.response.write(data)
        self.seen.chunks_sent += 1
        self._notify()

    def abort(self) -> web.StreamResponse:
        """Drop the TCP connection mid-response, as a crashed server would."""
        transport = self.request.transport
        if transport is not None:
            transport.abort()
        return self.response if self.response is not None else web.Response()

    async def hang(self) -> NoReturn:
        """Never answer; only a disconnect (handler cancellation) or shutdown ends this."""
        await asyncio.get_running_loop().create_future()
        raise AssertionError("unreachable: the future is never resolved")
