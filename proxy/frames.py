"""The two stream framings, read the way a client reads them: Ollama's NDJSON lines and the
``data:`` payload of each SSE event. The gateway's ``/chat``, the terminal chat and the load
test all read streams through here; the relay's scanners are the fast path that must agree.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol

import orjson


def json_object(raw: bytes) -> dict[str, Any] | None:
    """``raw`` parsed as JSON, if it is an object; None for anything else."""
    try:
        obj = orjson.loads(raw)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


class FrameSplitter:
    """Fed a body chunk by chunk, whatever the chunking; gives the payload of each complete
    frame: an NDJSON line, or the ``data:`` lines of an SSE event (``\\n\\n`` or
    sse-starlette's ``\\r\\n\\r\\n`` between events). Empty payloads are skipped."""

    __slots__ = ("_pending", "_sep", "_sse")

    def __init__(self, *, sse: bool) -> None:
        self._sse = sse
        self._sep = b"\n\n" if sse else b"\n"
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        pending = self._pending + chunk
        if self._sse:
            pending = pending.replace(b"\r\n", b"\n")
        *frames, self._pending = pending.split(self._sep)
        return [data for frame in frames if (data := self._payload(frame))]

    def finish(self) -> list[bytes]:
        """The body ended: the payload of what is left (a last line without its newline)."""
        rest, self._pending = self._pending, b""
        data = self._payload(rest)
        return [data] if data else []

    def _payload(self, frame: bytes) -> bytes:
        if not self._sse:
            return frame.strip()
        lines = frame.split(b"\n")
        return b"".join(line[5:].strip() for line in lines if line.startswith(b"data:"))


class Readable(Protocol):
    """A body read as it arrives: aiohttp's ``StreamReader``, the upstream's response."""

    async def readany(self) -> bytes: ...


async def iter_frames(content: Readable, *, sse: bool) -> AsyncIterator[bytes]:
    """The payload of each frame of a streamed body, as it arrives."""
    splitter = FrameSplitter(sse=sse)
    while chunk := await content.readany():
        for data in splitter.feed(chunk):
            yield data
    for data in splitter.finish():
        yield data
