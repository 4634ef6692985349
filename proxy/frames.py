"""The two stream framings, read the way a client reads them: Ollama's NDJSON lines, and
Server-Sent Events as the WHATWG HTML standard parses them ("Parsing an event stream").

SSE, in short: lines end with CRLF, LF or a lone CR; a line starting with ``:`` is a
comment; ``data`` lines of one event are joined with ``\\n``; ``event``, ``id``, ``retry``
and unknown fields carry nothing the gateway reads; an empty line ends the event. A last
event the stream ends without an empty line is taken as ended too, as the OpenAI SDK does
with a final ``data: [DONE]``.

The gateway's ``/chat``, the terminal chat and the load test read streams through here; the
relay's scanners use the same event parser behind their fast path.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

_LINE_END = re.compile(rb"\r\n|\r|\n")


def json_object(raw: bytes) -> dict[str, Any] | None:
    """``raw`` parsed as JSON, if it is an object; None for anything else.

    orjson refuses some JSON that Python's ``json`` (under the ``ollama`` and ``openai``
    SDKs) reads: a lone surrogate escape such as ``"\\ud83d"`` (half an emoji; RFC 8259
    section 8.2 allows it), a number beyond a double. What orjson refuses is parsed again
    by ``json``, so the gateway reads what a client reads; only text that is not JSON at
    all pays for two parses."""
    try:
        obj = orjson.loads(raw)
    except ValueError:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError):  # not JSON, or nested past Python's stack
            return None
    return obj if isinstance(obj, dict) else None


def json_bytes(obj: dict[str, Any]) -> bytes:
    """``obj`` as compact JSON; a lone surrogate (which orjson will not write) as the
    ``\\uXXXX`` escape it came as."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        return json.dumps(obj, separators=(",", ":")).encode()


@dataclass(slots=True)
class SseEvent:
    """One event: where its bytes lie in the parsed region, and its data (None when the
    event had no ``data`` line: nothing a client acts on)."""

    start: int
    end: int
    data: bytes | None


_PAIRS = (b"\n\n", b"\r\r", b"\n\r")


def last_boundary(data: bytes | bytearray, start: int = 0, end: int | None = None) -> int:
    """Where the last complete event in ``data[start:end]`` ends (just after the empty line
    that ends it), or -1. Two line ends in a row make an empty line, and every such pair
    contains ``\n\n``, ``\r\r`` or ``\n\r``; a CR that ends ``data`` may be half of a
    CRLF whose LF comes next: the caller handles that LF (``is_open_cr``)."""
    stop = len(data) if end is None else end
    found = max(
        data.rfind(b"\n\n", start, stop),
        data.rfind(b"\r\r", start, stop),
        data.rfind(b"\n\r", start, stop),
    )
    return _after_pair(data, found, stop)


def first_boundary(data: bytes | bytearray, start: int = 0) -> int:
    """Where the first complete event in ``data[start:]`` ends, or -1."""
    found = [i for pair in _PAIRS if (i := data.find(pair, start)) >= 0]
    return _after_pair(data, min(found), len(data)) if found else -1


def _after_pair(data: bytes | bytearray, found: int, stop: int) -> int:
    if found < 0:
        return -1
    after = found + 2
    if data[found + 1] == 0x0D and after < stop and data[after] == 0x0A:
        after += 1  # the second line end is a CRLF
    return after


def is_open_cr(region: bytes | bytearray) -> bool:
    """``region`` ends with a CR that the next byte may turn into a CRLF."""
    return region[-1:] == b"\r"


def parse_events(region: bytes | bytearray, *, final: bool = False) -> list[SseEvent]:
    """The events in ``region``, which ends at an event boundary (``last_boundary``), or at
    the end of the stream when ``final``. Positions are offsets into ``region``."""
    events: list[SseEvent] = []
    start = 0
    data: list[bytes] | None = None
    pos = 0
    size = len(region)
    while pos < size:
        match = _LINE_END.search(region, pos)
        line_end, next_pos = (match.start(), match.end()) if match else (size, size)
        if line_end == pos:  # an empty line: the event ends here
            events.append(SseEvent(start, next_pos, b"\n".join(data) if data is not None else None))
            start, data = next_pos, None
        else:
            line = bytes(region[pos:line_end])
            if not line.startswith(b":"):
                name, colon, value = line.partition(b":")
                if name == b"data":
                    if colon and value.startswith(b" "):
                        value = value[1:]
                    (data := data if data is not None else []).append(value)
        pos = next_pos
    if start < size and final:
        events.append(SseEvent(start, size, b"\n".join(data) if data is not None else None))
    return events


class FrameSplitter:
    """Fed a body chunk by chunk, whatever the chunking; gives the payload of each complete
    frame: an NDJSON line (stripped), or an SSE event's data. Empty payloads are skipped."""

    __slots__ = ("_pending", "_scanned", "_sse")

    def __init__(self, *, sse: bool) -> None:
        self._sse = sse
        self._pending = bytearray()
        self._scanned = 0  # how much of _pending was searched for an end already

    def feed(self, chunk: bytes) -> list[bytes]:
        pending = self._pending
        pending += chunk
        if self._sse:
            end = last_boundary(pending, max(0, self._scanned - 2))
        else:
            newline = pending.rfind(b"\n", self._scanned)
            end = newline + 1 if newline >= 0 else -1
        if end < 0:
            self._scanned = len(pending)
            return []
        region = bytes(pending[:end])
        del pending[:end]
        self._scanned = 0
        return self._payloads(region, final=False)

    def finish(self) -> list[bytes]:
        """The body ended: the payload of what is left (a last frame without its end)."""
        region = bytes(self._pending)
        self._pending.clear()
        self._scanned = 0
        return self._payloads(region, final=True) if region else []

    def _payloads(self, region: bytes, *, final: bool) -> list[bytes]:
        if self._sse:
            events = parse_events(region, final=final)
            return [event.data for event in events if event.data]
        return [line for raw in region.split(b"\n") if (line := raw.strip())]


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
