"""Reference readers of the upstream's bytes, written without the gateway's code (issue #13):
HTTP/1.1 framing by ``h11``; NDJSON by ``json.loads`` per line, as the ``ollama`` SDK reads
it; SSE by the ``openai`` SDK's own decoder. What the gateway relays and records is compared
with what these read from the same bytes."""

from __future__ import annotations

import gzip
import json
import re
import zlib
from dataclasses import dataclass, field
from typing import Any

import h11
from openai._streaming import SSEDecoder, _SSELineDecoder


@dataclass
class Reading:
    """What a client's parser learns from a stream or a document."""

    complete: bool = False  # done: true / [DONE]
    error: str | None = None  # the first error a client raises
    usage: tuple[int, int] | None = None  # (prompt, completion) tokens
    content_chunks: int = 0
    text: str = ""  # the generated text, concatenated


def error_text(error: Any) -> str:
    """An error's message as a client shows it: Ollama's string, OpenAI's ``message``."""
    if isinstance(error, dict):
        return str(error.get("message")) if error.get("message") else json.dumps(error)
    return str(error)


def count(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _content(message: Any) -> str:
    content = message.get("content") if isinstance(message, dict) else None
    return content if isinstance(content, str) else ""


def read_ndjson(body: bytes) -> Reading:
    """What the ``ollama`` SDK reads: ``json.loads`` on each line (it splits on line ends
    and parses every line; blank lines are skipped here, as no legal server sends one)."""
    seen = Reading()
    for line in body.split(b"\n"):
        if not line.strip():
            continue
        obj = json.loads(line)
        if obj.get("error") and seen.error is None:
            seen.error = error_text(obj["error"])
        seen.text += _content(obj.get("message"))
        if obj.get("done") is True:
            seen.complete = True
            seen.usage = (count(obj.get("prompt_eval_count")), count(obj.get("eval_count")))
        else:
            seen.content_chunks += 1
    return seen


def sse_events(body: bytes) -> list[tuple[str, str]]:
    """The openai SDK's decoder on ``body``: (event name, data) of each event it dispatches,
    plus a last event the body ends without an empty line (a final ``data: [DONE]`` line
    counts: the gateway's documented rule, http-relay.md section 3). Events without data are
    not dispatched (WHATWG; the SDK would hand them on with empty data)."""
    decoder = SSEDecoder()
    lines = _SSELineDecoder()
    events: list[tuple[str, str]] = []
    for line in [*lines.feed(body), *lines.finish(), b""]:
        event = decoder.decode(line.decode("utf-8"))
        if event is not None and event.data:
            events.append((event.event or "message", event.data))
    return events


def has_content(obj: dict[str, Any]) -> bool:
    for choice in obj.get("choices") or []:
        delta = choice.get("delta") or {}
        if delta.get("content") or choice.get("text"):
            return True
    return False


def read_sse(body: bytes, *, count_chunks: bool = True) -> Reading:
    """What the ``openai`` SDK's stream reads: events until ``[DONE]`` (``startswith``, as
    the SDK tests it); an event whose data has a truthy ``error`` raises; the last
    ``usage`` is the count."""
    seen = Reading()
    for _, data in sse_events(body):
        if data.startswith("[DONE]"):
            seen.complete = True
            break
        obj = json.loads(data)
        if obj.get("error") and seen.error is None:
            seen.error = error_text(obj["error"])
        if isinstance(obj.get("usage"), dict):
            usage = obj["usage"]
            seen.usage = (count(usage.get("prompt_tokens")), count(usage.get("completion_tokens")))
        for choice in obj.get("choices") or []:
            seen.text += _content(choice.get("delta"))
        if count_chunks and has_content(obj):
            seen.content_chunks += 1
    return seen


def read_document(body: bytes, *, openai: bool) -> Reading:
    """A non-streamed answer: ``json.loads`` of the whole body."""
    obj = json.loads(body)
    seen = Reading(complete=True)
    if obj.get("error"):
        seen.error = error_text(obj["error"])
        return seen
    if openai:
        usage = obj.get("usage")
        if isinstance(usage, dict):
            seen.usage = (count(usage.get("prompt_tokens")), count(usage.get("completion_tokens")))
        choices = obj.get("choices") or [{}]
        seen.text = _content(choices[0].get("message"))
    else:
        seen.usage = (count(obj.get("prompt_eval_count")), count(obj.get("eval_count")))
        seen.text = _content(obj.get("message"))
    return seen


_SSE_LINE = re.compile(rb"\r\n|\r|\n")


def raw_events(body: bytes) -> list[bytes]:
    """``body`` cut into the raw bytes of its events, each with the empty line that ends it
    (the last one to the end of the body), by the WHATWG line rules."""
    events, start, pos = [], 0, 0
    while pos < len(body):
        match = _SSE_LINE.search(body, pos)
        end, after = (match.start(), match.end()) if match else (len(body), len(body))
        if end == pos:  # an empty line
            events.append(body[start:after])
            start = after
        pos = after
    if start < len(body):
        events.append(body[start:])
    return events


def event_object(raw: bytes) -> dict[str, Any] | None:
    """The JSON object of one raw event's data; None for [DONE] or no data."""
    found = sse_events(raw)
    if not found or found[0][1].startswith("[DONE]"):
        return None
    obj = json.loads(found[0][1])
    return obj if isinstance(obj, dict) else None


def check_stripped(body: bytes, out: bytes) -> None:
    """``out`` is ``body`` without the usage-only event, and with each per-chunk usage
    removed from its event (the rest of that event's data unchanged); every other event's
    bytes are the same."""
    sent, got = raw_events(body), raw_events(out)
    expected: list[tuple[bytes, dict[str, Any] | None]] = []
    done = False
    for raw in sent:
        obj = None if done else event_object(raw)
        done = done or any(data and data.startswith("[DONE]") for _, data in sse_events(raw))
        if obj is None or not isinstance(obj.get("usage"), dict):
            expected.append((raw, None))
        elif obj.get("choices") != []:
            del obj["usage"]
            expected.append((raw, obj))
        # else: the usage-only event, which the gateway asked for: dropped
    assert len(got) == len(expected), f"{len(got)} events where {len(expected)} were expected"
    for raw, (want_raw, want_obj) in zip(got, expected, strict=True):
        if want_obj is None:
            assert raw == want_raw
        else:
            assert event_object(raw) == want_obj


def decode(body: bytes, coding: str) -> bytes | None:
    """A body's bytes decoded from its content coding; None for one Python cannot read."""
    if coding == "identity":
        return body
    if coding in ("gzip", "x-gzip"):
        return gzip.decompress(body)  # every member (RFC 1952: a series of members)
    if coding == "deflate":
        return zlib.decompress(body)  # the zlib format (RFC 9110 section 8.4.1.2)
    return None


@dataclass
class Message:
    """A response as ``h11`` reads it off the wire."""

    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)  # lowercased names
    body: bytes = b""
    trailers: dict[str, str] = field(default_factory=dict)
    interim: list[int] = field(default_factory=list)  # 1xx statuses seen first
    complete: bool = False  # the framing says the body ended (False: cut short)

    @property
    def coding(self) -> str:
        return self.headers.get("content-encoding", "identity").strip().lower() or "identity"


class MessageReader:
    """An HTTP/1.1 response read by ``h11``, fed bytes as they come."""

    def __init__(self, method: str) -> None:
        self.connection = h11.Connection(h11.CLIENT, max_incomplete_event_size=1 << 20)
        self.connection.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
        self.connection.send(h11.EndOfMessage())
        self.message = Message()
        self._body = bytearray()
        self.done = False

    def feed(self, data: bytes) -> None:
        """Bytes off the wire; ``b""`` when the connection closed."""
        if self.done:
            return
        self.connection.receive_data(data)
        while not self.done:
            try:
                event = self.connection.next_event()
            except h11.RemoteProtocolError:  # cut short: no more to read
                self.done = True
                break
            if event is h11.NEED_DATA:
                break
            self._take(event)
        self.message.body = bytes(self._body)

    def _take(self, event: object) -> None:
        message = self.message
        if isinstance(event, h11.InformationalResponse):
            message.interim.append(event.status_code)
        elif isinstance(event, h11.Response):
            message.status = event.status_code
            message.headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
        elif isinstance(event, h11.Data):
            self._body += event.data
        elif isinstance(event, h11.EndOfMessage):
            message.trailers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
            message.complete = True
            self.done = True
        else:  # ConnectionClosed, PAUSED
            self.done = True


def read_message(raw: bytes, method: str = "GET") -> Message:
    """The response in ``raw``, the bytes one connection received (EOF after them)."""
    reader = MessageReader(method)
    reader.feed(raw)
    reader.feed(b"")
    return reader.message
