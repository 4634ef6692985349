"""Reading a relayed body for its statistics without slowing it down.

A scanner sees every upstream chunk on its way to the client. It returns the bytes to
forward, unchanged except for the usage the gateway asked for on the client's behalf, and
it learns what a client's parser learns from the same bytes: the final statistics, the end
of the stream (``done: true`` or ``data: [DONE]``), or an in-stream error.

The decisions are made by real parses (``orjson``; for SSE, in ``proxy.upstream.sse``, the
WHATWG event parser in ``proxy.frames``). Byte searches, which run in C, only skip what
cannot matter: a stretch without any of the markers a deciding line or event must contain
(its key, ``[DONE]``, or a ``\\u00XX`` escape that could spell a key in disguise) is never
parsed.
"""

from __future__ import annotations

import zlib

from proxy.dialects import Usage, error_text, usage_from_native, usage_from_openai
from proxy.frames import json_object
from proxy.upstream.encodings import Decompressor

# A final Ollama line with a large ``context`` array can be hundreds of KB; Ollama's own Go
# client allows 8 MB. A line or event beyond this is relayed, but not read.
MAX_SCAN_BYTES = 8 * 1024 * 1024
_ESCAPE = b"\\u00"
_LETTER_HIGH_NIBBLES = b"4567"  # \u0040-\u007f: every ASCII letter, escaped


def has_marker(data: bytes | bytearray, markers: tuple[bytes, ...], start: int = 0) -> int:
    """Where the first of ``markers``, or an escaped ASCII letter, is in ``data[start:]``;
    -1 when there is none. A key can only hide from a plain search behind an escape."""
    first = -1
    for marker in markers:
        i = data.find(marker, start)
        if i >= 0 and (first < 0 or i < first):
            first = i
    i = data.find(_ESCAPE, start)
    while i >= 0 and (first < 0 or i < first):
        if data[i + 4 : i + 5] and data[i + 4] in _LETTER_HIGH_NIBBLES:
            return i
        i = data.find(_ESCAPE, i + 4)
    return first


class Scanner:
    """Base: forward everything, learn nothing (a body it cannot read)."""

    readable = False  # whether the body could be read at all (false: usage unknown)

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.error: str | None = None
        self.complete = False
        self.content_chunks = 0

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        """Called at upstream EOF; returns any bytes still held back."""
        return b""

    def _error(self, obj: dict[str, object]) -> None:
        if self.error is None:  # the first error is the one a client raises
            self.error = error_text(obj)


class JsonScanner(Scanner):
    """A single JSON document (non-streamed answers and errors), read at EOF.

    The body is still forwarded chunk by chunk; a copy is kept to parse at the end.
    """

    readable = True

    def __init__(self, *, openai: bool) -> None:
        super().__init__()
        self._openai = openai
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> bytes:
        if self._size <= MAX_SCAN_BYTES:
            self._parts.append(chunk)
            self._size += len(chunk)
        return chunk

    def finish(self) -> bytes:
        self.complete = True
        if self._size > MAX_SCAN_BYTES:
            return b""
        obj = json_object(b"".join(self._parts))
        self._parts.clear()
        if obj is None:
            return b""
        self._error(obj)
        if self.error is None:
            self.usage = usage_from_openai(obj) if self._openai else usage_from_native(obj)
        return b""


# A line that can decide something holds the literal true (done: true; a literal cannot be
# escaped, so any spelling of the key is caught) or the key "error" (or an escape).
_NDJSON_MARKERS = (b"true", b'"error"')


class NdjsonScanner(Scanner):
    """Ollama's native stream: one JSON object per line, statistics on the ``done`` line.

    Whole lines go out as they complete; a line in progress is held back (up to
    ``MAX_SCAN_BYTES``, each byte copied once however the line is split), so that an error
    line the gateway may have to add never lands in the middle of one.
    """

    readable = True

    def __init__(self) -> None:
        super().__init__()
        self._line = bytearray()  # the line in progress
        self._too_long = False  # relaying a line too long to read, until its newline

    def feed(self, chunk: bytes) -> bytes:
        if not self._line and not self._too_long and chunk.endswith(b"\n"):
            # Whole lines, the usual read: forwarded as they are.
            if has_marker(chunk, _NDJSON_MARKERS) >= 0:
                self._inspect_lines(chunk[:-1])
            self.content_chunks += chunk.count(b"\n")
            return chunk
        if self._too_long:
            newline = chunk.find(b"\n")
            if newline < 0:
                return chunk
            self._too_long = False
            rest = chunk[newline + 1 :]
            return chunk[: newline + 1] + self.feed(rest) if rest else chunk
        last = chunk.rfind(b"\n")
        if last < 0:
            return self._hold(chunk)
        line = self._line
        if line:
            first = chunk.find(b"\n")
            line += chunk[:first]
            self._inspect(bytes(line))
            if first < last and has_marker(chunk, _NDJSON_MARKERS, first + 1) >= 0:
                self._inspect_lines(chunk[first + 1 : last])
            out = bytes(line) + chunk[first : last + 1]
            line.clear()
        else:
            if has_marker(chunk, _NDJSON_MARKERS) >= 0:
                self._inspect_lines(chunk[:last])
            out = chunk[: last + 1]
        if last < len(chunk) - 1:
            line += chunk[last + 1 :]
        self.content_chunks += out.count(b"\n")
        return out

    def finish(self) -> bytes:
        last = bytes(self._line)  # a last line without its newline
        self._line.clear()
        self.content_chunks += bool(last.strip())
        self._inspect(last)
        return last

    def _hold(self, part: bytes) -> bytes:
        self._line += part
        if len(self._line) <= MAX_SCAN_BYTES:
            return b""
        # Too long to hold or read: relay it unread, up to its newline.
        out = bytes(self._line)
        self._line.clear()
        self._too_long = True
        return out

    def _inspect_lines(self, lines: bytes) -> None:
        for line in lines.split(b"\n"):
            self._inspect(line)

    def _inspect(self, line: bytes) -> None:
        if has_marker(line, _NDJSON_MARKERS) < 0:
            return
        obj = json_object(line)
        if obj is None:
            return
        self._error(obj)
        if obj.get("done") is True:
            self.complete = True
            self.content_chunks -= 1  # the statistics line carries no new token
            self.usage = usage_from_native(obj)


_MAX_DECODED = 64 * 1024 * 1024  # read no further than this into a compressed body
_DECODE_STEP = 1024 * 1024


class DecodingScanner(Scanner):
    """A body in a content coding the gateway can read (gzip, deflate): the original bytes
    are relayed as they are, and a decoded copy goes to ``inner``, which only reads."""

    def __init__(self, inner: Scanner, decompressor: Decompressor) -> None:
        super().__init__()
        self._inner = inner
        self._decompressor: Decompressor | None = decompressor
        self._decoded = 0
        self.readable = True

    def feed(self, chunk: bytes) -> bytes:
        self._decode(chunk)
        self._learn()
        return chunk

    def finish(self) -> bytes:
        if self._decompressor is not None:
            self._pass(self._decompressor.flush())
        self._inner.finish()
        self._learn()
        return b""

    @property
    def content_chunks(self) -> int:
        return self._inner.content_chunks  # (read when needed: the inner may defer it)

    @content_chunks.setter
    def content_chunks(self, value: int) -> None:
        pass  # always the inner scanner's

    def _learn(self) -> None:
        inner = self._inner
        self.usage, self.error, self.complete = inner.usage, inner.error, inner.complete

    def _decode(self, chunk: bytes) -> None:
        decompressor = self._decompressor
        while decompressor is not None and chunk:
            try:
                part = decompressor.decompress(chunk, _DECODE_STEP)
            except zlib.error:
                self._give_up()
                return
            self._pass(part)
            chunk = decompressor.unconsumed_tail
            if self._decoded > _MAX_DECODED:
                self._give_up()
                return

    def _pass(self, part: bytes) -> None:
        if part:
            self._decoded += len(part)
            self._inner.feed(part)

    def _give_up(self) -> None:
        """Not readable after all (broken, or too large): usage unknown."""
        self._decompressor = None
        self._inner = Scanner()
        self.readable = False
