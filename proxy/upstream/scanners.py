"""Reading a relayed body for its statistics without slowing it down.

A scanner sees every upstream chunk on its way to the client. It returns the bytes to
forward (unchanged, except for the usage frames the gateway asked for on the client's
behalf), and it learns how the body ended: the final statistics, a proper end of stream
(``done: true`` or ``data: [DONE]``), or an in-stream error. Only the few lines that can
hold those facts are parsed; the rest is searched with ``bytes.find``, which runs in C.
"""

from __future__ import annotations

import orjson

from proxy.dialects import Usage, error_text, usage_from_native, usage_from_openai
from proxy.frames import json_object

# A final Ollama line with a large ``context`` array can be hundreds of KB; Ollama's own Go
# client allows 8 MB. Beyond this, the gateway keeps relaying but stops looking.
MAX_SCAN_BYTES = 8 * 1024 * 1024


class Scanner:
    """Base: forward everything, learn nothing. Subclasses look for statistics."""

    def __init__(self) -> None:
        self.usage: Usage | None = None
        self.error: str | None = None
        self.complete = False
        self.content_chunks = 0

    def feed(self, chunk: bytes) -> bytes:
        return chunk

    def finish(self) -> bytes:
        """Called at upstream EOF; returns any bytes still held back."""
        self.complete = True
        return b""


class JsonScanner(Scanner):
    """A single JSON document (non-streamed answers and errors), read at EOF.

    The body is still forwarded chunk by chunk; a copy is kept to parse at the end.
    """

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
        self.error = error_text(obj)
        if self.error is None:
            self.usage = usage_from_openai(obj) if self._openai else usage_from_native(obj)
        return b""


class NdjsonScanner(Scanner):
    """Ollama's native stream: one JSON object per line, statistics on the ``done`` line."""

    def __init__(self) -> None:
        super().__init__()
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._hold(data)
            return chunk
        self.content_chunks += data.count(b"\n", 0, end + 1)
        if data.find(b'"done":true', 0, end) >= 0 or data.find(b'"error"', 0, end) >= 0:
            for line in data[:end].split(b"\n"):
                self._inspect(line)
        self._hold(data[end + 1 :])
        return chunk

    def _hold(self, tail: bytes) -> None:
        self._pending = tail if len(tail) <= MAX_SCAN_BYTES else b""

    def _inspect(self, line: bytes) -> None:
        if b'"done":true' not in line and b'"error"' not in line:
            return
        obj = json_object(line)
        if obj is None:
            return
        error = error_text(obj)
        if error is not None:
            self.error = error
        elif obj.get("done") is True:
            self.complete = True
            self.content_chunks -= 1  # the statistics line carries no new token
            self.usage = usage_from_native(obj)

    def finish(self) -> bytes:
        if self._pending.strip():
            self._inspect(self._pending)
        self._pending = b""
        return b""


_CONTENT_KEYS = (b'"content":', b'"text":')


_MARKERS = (b'"usage"', b'"error"', b"[DONE]")


def count_content(data: bytes, end: int) -> int:
    """Frames' worth of non-empty ``content``/``text`` values in ``data[:end]``.

    Inside a JSON string a quote is always escaped, so a bare ``"content":`` is a key.
    Python servers write ``": "`` with a space, Go servers without.
    """
    count = 0
    for key in _CONTENT_KEYS:
        i = data.find(key, 0, end)
        while i >= 0:
            j = i + len(key)
            if data[j : j + 1] == b" ":
                j += 1
            if data[j : j + 1] == b'"' and data[j + 1 : j + 2] not in (b'"', b""):
                count += 1
            i = data.find(key, j, end)
    return count


class SseScanner(Scanner):
    """OpenAI-style SSE: ``data: {json}`` frames ending with ``data: [DONE]``.

    With ``strip_usage`` the gateway asked for ``stream_options.include_usage`` on the
    client's behalf, so it drops the usage-only chunk (``choices: []``) and the zeroed
    per-chunk ``usage`` of ``/v1/completions`` before they reach the client. Frames end in
    a blank line, ``\n\n`` from Go servers and ``\r\n\r\n`` from sse-starlette.
    """

    def __init__(self, *, strip_usage: bool, count_chunks: bool = True) -> None:
        super().__init__()
        self._strip = strip_usage
        # Counting content chunks is the fallback for servers that send no usage; Ollama
        # always does when asked, so its streams skip the count.
        self._count = count_chunks
        self._pending = b""
        self._sep = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        if not self._sep:
            if b"\r\n\r\n" in data:
                self._sep = b"\r\n\r\n"
            elif b"\n\n" in data:
                self._sep = b"\n\n"
            else:
                self._hold(data)
                return b""
        sep = self._sep
        if data.endswith(sep):
            # Whole frames, the usual read: no tail to hold, no slicing.
            end = len(data)
            self._pending = b""
        else:
            end = data.rfind(sep)
            if end < 0:
                self._hold(data)
                return b""
            end += len(sep)
            self._hold(data[end:])
        # Frames before the first that can say something (usage, an error, the end) pass
        # through as they are; only from that frame on is the data split and looked at.
        cut = self._plain_prefix(data, end, sep)
        if self._count and cut:
            self.content_chunks += count_content(data, cut)
        if cut == len(data):
            return data  # nothing to look at, nothing held back
        out = [data[:cut]] if cut else []
        if cut < end:
            for frame in data[cut : end - len(sep)].split(sep):
                kept = self._filter(frame)
                if kept is not None:
                    out.append(kept + sep)
        return b"".join(out)

    def _hold(self, tail: bytes) -> None:
        self._pending = tail if len(tail) <= MAX_SCAN_BYTES else b""

    @staticmethod
    def _plain_prefix(data: bytes, end: int, sep: bytes) -> int:
        """Where the first frame that mentions usage, an error or [DONE] starts (or end)."""
        find = data.find
        no_usage = find(b'"usage"', 0, end) < 0
        if no_usage and find(b'"error"', 0, end) < 0 and find(b"[DONE]", 0, end) < 0:
            return end  # most chunks: three finds, no list
        marks = [i for marker in _MARKERS if (i := find(marker, 0, end)) >= 0]
        boundary = data.rfind(sep, 0, min(marks))
        return boundary + len(sep) if boundary >= 0 else 0

    def _filter(self, frame: bytes) -> bytes | None:
        """The frame to forward, rewritten or dropped where usage must not reach the client."""
        start = frame.find(b"{")
        if start < 0:
            if frame.startswith(b"data:") and frame[5:].strip() == b"[DONE]":
                self.complete = True
            return frame
        if self._count:
            self.content_chunks += count_content(frame, len(frame))
        obj = json_object(frame[start:]) if b'"usage"' in frame or b'"error"' in frame else None
        if obj is None:
            return frame
        self.error = error_text(obj) or self.error
        usage = usage_from_openai(obj)
        if usage is not None and obj.get("choices") == []:
            self.usage = usage
            return None if self._strip else frame
        if usage is not None and self._strip:
            # /v1/completions repeats a zeroed usage on every chunk when usage was asked for.
            del obj["usage"]
            return frame[:start] + orjson.dumps(obj)
        return frame

    def finish(self) -> bytes:
        rest, self._pending = self._pending, b""
        return rest
