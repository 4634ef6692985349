"""Reading a relayed OpenAI-style event stream (``/v1/*``, SSE) for its statistics.

The SSE side of ``proxy.upstream.scanners``: whole events go out as they complete, the
ones that can carry usage, an error or ``[DONE]`` are parsed on their way (the WHATWG
event parser in ``proxy.frames``), and the rest pass after one byte search.
"""

from __future__ import annotations

from proxy.dialects import usage_from_openai
from proxy.frames import (
    first_boundary,
    is_open_cr,
    json_bytes,
    json_object,
    last_boundary,
    parse_events,
)
from proxy.upstream.scanners import MAX_SCAN_BYTES, Scanner, has_marker

_SSE_MARKERS = (b"usage", b"error", b"[DONE]")
MAX_UNREAD_BYTES = 64 * 1024  # counted in one go past this: a millisecond or two, not more


class SseScanner(Scanner):
    """OpenAI-style SSE: ``data: {json}`` events ending with ``data: [DONE]``.

    Whole events go out as they complete; an event in progress is held back (up to
    ``MAX_SCAN_BYTES``). With ``strip_usage`` the gateway asked for
    ``stream_options.include_usage`` on the client's behalf, so the usage-only event
    (``choices: []``) is dropped and the zeroed per-chunk ``usage`` of ``/v1/completions``
    removed before they reach the client. ``count_chunks``: count events with content, for
    servers that send no usage in streams.

    Only events that can carry a marker are parsed as they pass. Counting needs the others
    too, but only if the stream ends without usage: their bytes wait (up to
    ``MAX_UNREAD_BYTES``) and are counted together, when ``content_chunks`` is read or the
    wait is full. A stream's tokens then cost one search each on their way, and the
    counting runs once the answer is out, not between the engine's tokens.
    """

    readable = True

    def __init__(self, *, strip_usage: bool, count_chunks: bool = True) -> None:
        super().__init__()
        self._strip = strip_usage
        self._count = count_chunks
        self._pending = bytearray()  # the event in progress
        self._searched = 0  # how much of _pending holds no event boundary
        self._too_long = False  # the event in progress outgrew MAX_SCAN_BYTES: not read
        self._tail = b""  # the last bytes of that event, where its end may have begun
        self._drop_lf = False  # a dropped event ended in a CR: an LF right after is its own
        self._unread: list[bytes] = []  # whole events not parsed yet, to count if needed
        self._unread_bytes = 0

    @property
    def content_chunks(self) -> int:
        if self._unread:
            self._count_unread()
        return self._counted

    @content_chunks.setter
    def content_chunks(self, value: int) -> None:
        self._counted = value

    def feed(self, chunk: bytes) -> bytes:
        if self._drop_lf:
            self._drop_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if self._too_long:
            return self._skip(chunk)
        if not self._pending:
            if chunk.endswith((b"\n\n", b"\r\n\r\n")):
                # Whole events, the usual read: nothing to hold back.
                if has_marker(chunk, _SSE_MARKERS) >= 0:
                    return self._region(chunk, final=False)
                self._defer(chunk)
                return chunk
            data: bytes | bytearray = chunk
            search_from = 0
        else:
            self._pending += chunk
            data = self._pending
            search_from = max(0, self._searched - 2)
        end = last_boundary(data, search_from)
        if end < 0:
            return self._hold(data, chunk)
        out = self._region(bytes(data if end == len(data) else data[:end]), final=False)
        if data is self._pending:
            del self._pending[:end]
        elif end < len(data):
            self._pending += data[end:]
        self._searched = len(self._pending)
        return out

    def finish(self) -> bytes:
        region = bytes(self._pending)
        self._pending.clear()
        return self._region(region, final=True) if region else b""

    def _hold(self, data: bytes | bytearray, chunk: bytes) -> bytes:
        """No event ended in this chunk: keep it for later (and, stripping, hold it back)."""
        if data is not self._pending:
            self._pending += chunk
        self._searched = len(self._pending)
        if len(self._pending) <= MAX_SCAN_BYTES:
            return b""
        # Too long to hold or read: relay it unread (usage unknown if it was the usage).
        held = bytes(self._pending)
        self._tail = bytes(self._pending[-2:])
        self._pending.clear()
        self._searched = 0
        self._too_long = True
        return held

    def _skip(self, chunk: bytes) -> bytes:
        """Relay the rest of an event too long to read; read again from the next one."""
        data = self._tail + chunk
        end = first_boundary(data)
        if end < 0:
            self._tail = data[-2:]
            return chunk
        self._too_long = False
        ends_at = end - len(self._tail)
        self._tail = b""
        rest = chunk[ends_at:]
        return chunk[:ends_at] + self.feed(rest) if rest else chunk[:ends_at]

    def _region(self, region: bytes, *, final: bool) -> bytes:
        """Complete events: read the ones that can matter, and return what the client gets."""
        cut = 0
        if not (final and self._count):  # (a stream's unfinished last event is read now)
            marker = has_marker(region, _SSE_MARKERS)
            if marker < 0:
                self._defer(region)
                return region
            # Events wholly before the first marker pass as they are.
            cut = max(0, last_boundary(region, 0, marker))
        out = [region[:cut]] if cut else []
        if cut:
            self._defer(out[0])
        for event in parse_events(region[cut:], final=final):
            raw = region[cut + event.start : cut + event.end]
            kept = self._event(raw, event.data)
            if kept is not None:
                out.append(kept)
            elif is_open_cr(raw) and cut + event.end == len(region):
                self._drop_lf = True
        return b"".join(out)

    def _event(self, raw: bytes, data: bytes | None) -> bytes | None:
        """Learn from one event; the bytes to forward for it (None: drop it)."""
        if data is not None and data.startswith(b"[DONE]"):  # as the OpenAI SDK tests it
            self.complete = True
        obj = json_object(data) if data is not None and not self.complete else None
        if obj is None:
            return raw
        self._error(obj)
        if self._count and _has_content(obj):
            self._counted += 1
        usage = usage_from_openai(obj)
        if usage is None:
            return raw
        self.usage = usage  # the last one a client would read
        if not self._strip:
            return raw
        if obj.get("choices") == []:
            return None
        # /v1/completions repeats a zeroed usage on every chunk when usage was asked for.
        del obj["usage"]
        return _with_data(raw, json_bytes(obj))

    def _defer(self, events: bytes) -> None:
        """Whole events without a marker, passing unread: kept to count, if counting."""
        if not self._count or self.complete:
            return  # (nothing after [DONE] counts)
        self._unread.append(events)
        self._unread_bytes += len(events)
        if self._unread_bytes > MAX_UNREAD_BYTES:
            self._count_unread()

    def _count_unread(self) -> None:
        """Count the content events among the deferred ones, as ``_event`` would have."""
        for events in self._unread:
            for event in parse_events(events):
                obj = json_object(event.data) if event.data is not None else None
                if obj is not None and _has_content(obj):
                    self._counted += 1
        self._unread.clear()
        self._unread_bytes = 0


def _has_content(obj: dict[str, object]) -> bool:
    choices = obj.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if (isinstance(content, str) and content) or (
            isinstance(choice.get("text"), str) and choice["text"]
        ):
            return True
    return False


def _with_data(raw: bytes, data: bytes) -> bytes:
    """``raw``'s event with its data lines replaced by one ``data: {data}`` line; its other
    lines and its line ends kept.

    The new line takes the place and the line end of the *last* data line: the line after
    it is then the one that followed that line end before. (In the first data line's
    place, a lone CR could meet an empty line's LF and read as one CRLF: the event would
    lose its end and run into the next.)"""
    lines = raw.splitlines(keepends=True)
    is_data = [
        (content := line.rstrip(b"\r\n")).startswith(b"data") and content[4:5] in (b":", b"")
        for line in lines
    ]
    last = len(is_data) - 1 - is_data[::-1].index(True)
    out: list[bytes] = []
    for i, line in enumerate(lines):
        if i == last:
            out.append(b"data: " + data + line[len(line.rstrip(b"\r\n")) :])
        elif not is_data[i]:
            out.append(line)
    return b"".join(out)
