"""The machinery of the transparency corpus (``test_transparency.py``, issue #13).

- ``Case``: one legal way for an upstream to write its answers (framing, chunking, line
  ends, SSE fields, JSON whitespace, compression, trailers, 1xx, large headers and lines),
  and ``ScriptedUpstream``, a raw-socket server that writes them, a drain between writes;
- ``Family``: a route family, what a client sends the gateway and what the gateway sends up;
- ``read_direct`` (h11 on a raw socket) and ``read_gateway`` (aiohttp, no decompression);
  ``Tap``, a recording TCP relay in front of a real upstream;
- ``check_relayed`` / ``check_chat``: the invariant, against the reference readers of
  ``tests/reference.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import json
import re
import socket
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from multidict import CIMultiDict

from tests.conftest import MODEL
from tests.reference import (
    Message,
    MessageReader,
    Reading,
    check_stripped,
    decode,
    read_document,
    read_message,
    read_ndjson,
    read_sse,
)

# ---- what the upstream says ---------------------------------------------------------------

# Quotes, a backslash, a newline, and two-, three- and four-byte UTF-8.
TEXTS = ("Hé", 'llo, "wörld" \\ ', "😀 \u2013 中\n")
PROMPT_TOKENS, COMPLETION_TOKENS = 11, 3
CREATED_AT = "2026-01-01T00:00:00.123456789Z"
IN_BODY_ERROR = "an error was encountered while running the model: llama runner terminated"
HUGE_CONTEXT = list(range(450_000))  # a ~3 MB final line, as a long /api/generate context
_STATS = {
    "total_duration": 4883583458,
    "load_duration": 1334875,
    "prompt_eval_count": PROMPT_TOKENS,
    "prompt_eval_duration": 342546000,
    "eval_count": COMPLETION_TOKENS,
    "eval_duration": 4535599000,
}
_USAGE = {
    "prompt_tokens": PROMPT_TOKENS,
    "completion_tokens": COMPLETION_TOKENS,
    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
}
_ZERO_USAGE = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
_OPENAI_ERROR = {"message": IN_BODY_ERROR, "type": "api_error", "param": None, "code": None}


def whole(body: bytes) -> list[bytes]:
    return [body]


def every(size: int) -> Callable[[bytes], list[bytes]]:
    def cut(body: bytes) -> list[bytes]:
        return [body[i : i + size] for i in range(0, len(body), size)]

    return cut


def per_line(body: bytes) -> list[bytes]:
    """One piece per line (or event), as Ollama's Go server flushes them."""
    return [line for line in re.split(rb"(?<=\n)", body) if line]


def _cut_at(body: bytes, positions: Iterator[int]) -> list[bytes]:
    bounds = [0, *sorted({p for p in positions if 0 < p < len(body)}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds)]


def mid_utf8(body: bytes) -> list[bytes]:
    """Cut inside every multi-byte UTF-8 character."""
    return _cut_at(body, (i + 1 for i, byte in enumerate(body) if byte >= 0xC0))


def mid_line(body: bytes) -> list[bytes]:
    """Cut inside every line: just after ``data:``, and half-way through each line."""
    starts = [0, *(m.end() for m in re.finditer(rb"\r\n|\r|\n", body))]
    cuts = [s + 5 for s in starts] + [(a + b) // 2 for a, b in itertools.pairwise(starts)]
    return _cut_at(body, iter(cuts))


# Route families (``families()`` says what each sends).
NATIVE_STREAM, NATIVE_ONCE = "native_stream", "native_once"
V1_USAGE, V1_STREAM, V1_ONCE = "v1_usage", "v1_stream", "v1_once"
V1_TEXT_STREAM = "v1_text_stream"  # /v1/completions: a zeroed usage on every chunk
CHAT_STREAM, CHAT_ONCE = "chat_stream", "chat_once"
TAGS, TAGS_HEAD = "tags", "tags_head"
# /chat last: it may stop reading at done (and close that connection), relays never do.
ALL = (NATIVE_STREAM, NATIVE_ONCE, V1_USAGE, V1_STREAM, V1_TEXT_STREAM, V1_ONCE, TAGS, TAGS_HEAD,
       CHAT_STREAM, CHAT_ONCE)  # fmt: skip
BODIES = tuple(f for f in ALL if f != TAGS_HEAD)
STREAMS = (NATIVE_STREAM, V1_USAGE, V1_STREAM, V1_TEXT_STREAM)


@dataclass(frozen=True)
class Case:
    """One legal way for an upstream to write its answers."""

    name: str
    texts: tuple[str, ...] = TEXTS  # what the model says, chunk by chunk
    # the body: JSON style
    separators: tuple[str, str] = (",", ":")  # Go's encoding/json
    indent: int | None = None  # documents (and SSE data, over several data lines)
    ensure_ascii: bool = False
    escape_keys: bool = False  # "\u0064one"
    # the body: NDJSON and SSE
    eol: str = "\n"
    final_newline: bool = True
    sse_eol: str = "\n"  # or "mixed"
    sse_space: bool = True  # "data: x" vs "data:x"
    sse_fields: bool = False  # id, event, retry and comment lines
    done_blank: bool = True  # the empty line after the final data: [DONE]
    media_type_params: str = ""
    error: bool = False  # the upstream reports an error in the body (complete at HTTP level)
    end: bool = True  # done: true / [DONE]
    huge: bool = False
    # the message
    framing: str = "length"  # length | chunked | close
    version: str = "HTTP/1.1"
    reason: str | None = None  # None: the usual phrase
    field_format: str = "{name}: {value}"
    te: str = "chunked"
    te_and_length: bool = False
    chunk_size: bytes = b"%x"
    extensions: bool = False
    trailers: bool = False
    interim: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    close_after: bool = False
    coding: str = "identity"
    cut: Callable[[bytes], list[bytes]] = whole
    wire_every: int = 0  # cut the whole message into writes of this size
    status: int = 200  # metadata answers only: 204, 304
    truncate: bool = False  # the upstream closes the connection mid-body
    check_reuse: bool = True  # whether to check the gateway's keep-alive (see ``reusable``)
    families: tuple[str, ...] = ALL

    def dumps(self, obj: Any, *, indent: int | None = None) -> str:
        text = json.dumps(
            obj, separators=self.separators, ensure_ascii=self.ensure_ascii, indent=indent
        )
        if self.escape_keys:  # a key's first letter as a \u00XX escape
            text = _KEY.sub(lambda m: f'"\\u{ord(m[1][0]):04x}{m[1][1:]}"', text)
        return text

    @property
    def reusable(self) -> bool:
        """Whether the gateway may keep the connection for its next request (RFC 9112
        section 9.3: a framed HTTP/1.1 message, or HTTP/1.0 keep-alive; never with both
        Transfer-Encoding and Content-Length; the upstream's Keep-Alive timeout of 1 s
        leaves nothing of the gateway's own to keep it by)."""
        short = any(name == "Keep-Alive" and "timeout=1" in value for name, value in self.headers)
        return (
            self.framing != "close" and self.persistent and not self.close_after and not short
            and not self.te_and_length and not self.truncate
        )  # fmt: skip

    @property
    def persistent(self) -> bool:
        return self.version == "HTTP/1.1" or ("Connection", "keep-alive") in self.headers

    def line_ends(self) -> Iterator[str]:
        if self.sse_eol != "mixed":
            return itertools.repeat(self.sse_eol)
        return itertools.cycle(["\r\n", "\n", "\r"])


_KEY = re.compile(
    r'"(done|error|usage|choices|content|text|message|prompt_eval_count|eval_count'
    r'|prompt_tokens|completion_tokens|models)"(?=\s*:)'
)


def native_lines(case: Case) -> list[dict[str, Any]]:
    chunks: list[dict[str, Any]] = [
        {"model": MODEL, "created_at": CREATED_AT,
         "message": {"role": "assistant", "content": text}, "done": False}
        for text in case.texts
    ]  # fmt: skip
    if case.error:
        return [*chunks[:1], {"error": IN_BODY_ERROR}]
    if not case.end:
        return chunks
    final = {"model": MODEL, "created_at": CREATED_AT,
             "message": {"role": "assistant", "content": ""}, "done_reason": "stop",
             "done": True, **_STATS}  # fmt: skip
    if case.huge:
        final["context"] = HUGE_CONTEXT
    return [*chunks, final]


def sse_chunks(case: Case, *, text_completion: bool = False) -> list[dict[str, Any]]:
    """Chat chunks, then the usage-only chunk; /v1/completions chunks carry a zeroed usage
    each (Ollama does so when usage was asked for)."""
    head = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1767225600,
            "model": MODEL, "system_fingerprint": "fp_ollama"}  # fmt: skip
    if text_completion:
        head = {**head, "id": "cmpl-7", "object": "text_completion"}

    def chunk(text: str, finish: str | None) -> dict[str, Any]:
        if text_completion:
            choice = {"text": text, "index": 0, "finish_reason": finish}
            return {**head, "choices": [choice], "usage": _ZERO_USAGE}
        choice = {"index": 0, "delta": {"role": "assistant", "content": text},
                  "finish_reason": finish}  # fmt: skip
        return {**head, "choices": [choice]}

    chunks = [chunk(text, None) for text in case.texts]
    if case.error:
        return [*chunks[:1], {"error": _OPENAI_ERROR}]
    usage: dict[str, Any] = {**head, "choices": [], "usage": _USAGE}
    if case.huge:
        usage["context"] = HUGE_CONTEXT
    return [*chunks, chunk("", "stop"), usage]


def document(case: Case, kind: str) -> dict[str, Any]:
    """A non-streamed answer: native, OpenAI or the model list."""
    text = "".join(case.texts)
    if kind == "native":
        answer: dict[str, Any] = {
            "model": MODEL, "created_at": CREATED_AT,
            "message": {"role": "assistant", "content": text}, "done_reason": "stop",
            "done": True, **_STATS,
        }  # fmt: skip
    elif kind == "openai":
        answer = {
            "id": "chatcmpl-7", "object": "chat.completion", "created": 1767225600,
            "model": MODEL, "system_fingerprint": "fp_ollama",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": "stop"}],
            "usage": _USAGE,
        }  # fmt: skip
    else:
        model = {"name": MODEL, "model": MODEL, "modified_at": "2025-08-01T00:00:00.1234Z",
                 "size": 2019377376, "digest": "a80c4f17acd55265feec403c7aef86be0c25983a",
                 "details": {"format": "gguf", "family": "llama", "parameter_size": "3.2B",
                             "quantization_level": "Q4_K_M"}}  # fmt: skip
        answer = {"models": [model]}
    if case.huge:
        answer["context"] = HUGE_CONTEXT
    return answer


def ndjson_body(case: Case) -> bytes:
    lines = [case.dumps(obj) for obj in native_lines(case)]
    return (case.eol.join(lines) + (case.eol if case.final_newline else "")).encode()


def sse_body(case: Case, *, text_completion: bool = False) -> bytes:
    space = " " if case.sse_space else ""
    lines: list[str] = []
    for i, obj in enumerate(sse_chunks(case, text_completion=text_completion)):
        if case.sse_fields:
            lines += [f": keep-alive {i}", f"id: {i}", "event: message"]
            lines += ["retry: 3000"] if i == 0 else []
        data = case.dumps(obj, indent=case.indent)
        lines += [f"data:{space}{part}" for part in data.split("\n")]
        lines.append("")
    if case.end and not case.error:
        lines += ["id: done", "event: message"] if case.sse_fields else []
        lines.append(f"data:{space}[DONE]")
        if case.done_blank:
            lines.append("")
    out, previous = [], ""
    for line, end in zip(lines, case.line_ends(), strict=False):
        # A lone LF right after a lone CR would read as one CRLF: not that combination.
        line_end = "\r" if line == "" and previous == "\r" and end == "\n" else end
        out += [line, line_end]
        previous = line_end
    return "".join(out).encode()


_JSON = "application/json; charset=utf-8"


def answer(case: Case, kind: str) -> tuple[int, str, bytes]:
    """Status, Content-Type and body of the case's answer to one kind of request."""
    params = case.media_type_params
    if kind == "ndjson":
        return 200, "application/x-ndjson" + params, ndjson_body(case)
    if kind in ("sse", "sse_text"):
        return 200, "text/event-stream" + params, sse_body(case, text_completion=kind != "sse")
    if case.error:
        error: Any = _OPENAI_ERROR if kind == "openai" else IN_BODY_ERROR
        return 500, _JSON, case.dumps({"error": error}).encode()
    status = case.status if kind == "tags" else 200
    return status, _JSON, case.dumps(document(case, kind), indent=case.indent).encode()


_REASONS = {200: "OK", 204: "No Content", 304: "Not Modified", 500: "Internal Server Error"}


def encode(body: bytes, coding: str) -> bytes:
    if coding == "gzip":
        return gzip.compress(body, compresslevel=6, mtime=0)
    if coding == "gzip-members":  # one gzip member per line, as a streaming compressor may
        return b"".join(gzip.compress(line, mtime=0) for line in per_line(body))
    if coding == "deflate":
        return zlib.compress(body)  # the zlib format, as RFC 9110 section 8.4.1.2 says
    if coding == "br":
        return b"\xce\xb2\x00opaque:" + body[::-1]  # bytes nothing here can read
    return body


def message(case: Case, kind: str, method: str) -> tuple[list[bytes], bool]:
    """The case's response as socket writes, and whether to close the connection after."""
    status, content_type, plain = answer(case, kind)
    body = encode(plain, case.coding)
    fields = [("Content-Type", content_type), ("Date", "Thu, 01 Jan 2026 00:00:00 GMT"),
              *case.headers]  # fmt: skip
    if case.coding != "identity":
        fields.append(("Content-Encoding", case.coding.removesuffix("-members")))
    bodiless = method == "HEAD" or status in (204, 304)
    pieces = [] if bodiless else [piece for piece in case.cut(body) if piece]
    parts: list[bytes] = pieces
    if status == 304:
        fields += [("ETag", '"v1"'), ("Content-Length", "1234")]  # the representation's
    elif status == 204:
        pass
    elif case.framing == "length":
        fields.append(("Content-Length", str(len(body))))
    elif case.framing == "chunked":
        fields.append(("Transfer-Encoding", case.te))
        if case.te_and_length:  # a wrong length beside it: the transfer coding wins
            fields.append(("Content-Length", str(len(body) // 2)))
        if case.trailers:
            fields.append(("Trailer", "X-Checksum, X-Upstream-Elapsed"))
        extension = b';ext=1;q="a b"' if case.extensions else b""
        parts = [case.chunk_size % len(p) + extension + b"\r\n" + p + b"\r\n" for p in pieces]
        if not bodiless:
            trailer = b"X-Checksum: 9f1c\r\nX-Upstream-Elapsed: 12\r\n" if case.trailers else b""
            parts.append(b"0\r\n" + trailer + b"\r\n")
    elif case.version == "HTTP/1.1":  # delimited by closing the connection
        fields.append(("Connection", "close"))
    reason = _REASONS[status] if case.reason is None else case.reason
    head = f"{case.version} {status} {reason}".rstrip(" ") + ("\r\n" if reason else " \r\n")
    head += "".join(case.field_format.format(name=n, value=v) + "\r\n" for n, v in fields)
    writes = [case.interim + head.encode("latin-1") + b"\r\n", *parts]
    close = case.framing == "close" or case.close_after or not case.persistent
    if case.truncate:
        return _truncated(writes, plain_cut=case.coding == "identity"), True
    if case.wire_every:
        writes = every(case.wire_every)(b"".join(writes))
    return writes, close


def _truncated(writes: list[bytes], *, plain_cut: bool) -> list[bytes]:
    """The message cut inside the second text (inside its chunk, when chunked): a plain
    body keeps its first line or event whole; a compressed one is cut half-way."""
    head, wire = writes[0], b"".join(writes[1:])
    at = wire.find(b"llo") + 3 if plain_cut and b"llo" in wire else len(wire) // 2
    return [head, wire[:at]]


# ---- the scripted upstream ---------------------------------------------------------------


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    connection: int = 0  # which of the server's connections it came on


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    """One request: its head, and its body by Content-Length or chunked; None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, path, _ = lines[0].split(" ", 2)
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if "chunked" in headers.get("transfer-encoding", "").lower():
        body = bytearray()
        while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
            pass
        return Request(method, path, headers, bytes(body))
    length = int(headers.get("content-length", "0"))
    return Request(method, path, headers, await reader.readexactly(length))


def kind_of(request: Request) -> str:
    """What the gateway asked for: an NDJSON or SSE stream, or a document."""
    body = json.loads(request.body) if request.body else {}
    if request.path == "/api/chat":
        return "ndjson" if body.get("stream", True) else "native"
    if request.path == "/v1/chat/completions":
        return "sse" if body.get("stream") else "openai"
    if request.path == "/v1/completions":
        return "sse_text"
    return "tags"


_PROBE_ANSWERS = {
    "/api/version": {"version": "0.33.0"},
    "/api/tags": {"models": [{"name": MODEL, "model": MODEL}]},
    "/api/ps": {"models": []},
}

Reply = Callable[[Request, int], tuple[list[bytes], bool]]


def plain_reply(path: str) -> list[bytes]:
    body = json.dumps(_PROBE_ANSWERS.get(path, {})).encode()
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
    return [head % len(body) + body]


class ScriptedUpstream:
    """A raw-socket server (TCP_NODELAY, a drain between writes) answering the corpus's
    requests (those marked ``X-Corpus``) with ``reply(request, nth on its connection)``;
    anything else, such as the gateway's start-up probe, gets a plain answer. Counts the
    corpus requests it read."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.requests: list[Request] = []
        self.connections = 0

    @classmethod
    async def start(cls, case: Case) -> ScriptedUpstream:
        return await cls(lambda request, _: message(case, kind_of(request), request.method)).run()

    async def run(self) -> ScriptedUpstream:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    def connection_of(self, request_id: str) -> int:
        """The connection the gateway's request ``request_id`` came on."""
        (found,) = [r for r in self.requests if r.headers.get("x-request-id") == request_id]
        return found.connection

    async def close(self) -> None:
        for writer in list(self.writers):
            writer.close()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.connections += 1
        connection, nth = self.connections, 0
        try:
            while (request := await read_request(reader)) is not None:
                request.connection = connection
                if "x-corpus" in request.headers:
                    self.requests.append(request)
                    writes, close = self.reply(request, nth)
                    nth += 1
                else:
                    writes, close = plain_reply(request.path), False
                for data in writes:
                    writer.write(data)
                    await writer.drain()
                if close:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.writers.discard(writer)


# ---- the route families --------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Say hello"}]


@dataclass(frozen=True)
class Family:
    """A route family: what the client sends the gateway, and what the gateway sends up."""

    name: str
    method: str
    path: str
    body: dict[str, Any] | None
    upstream_path: str
    upstream_body: dict[str, Any] | None
    strips: bool = False  # the gateway asked for usage the client did not
    chat: bool = False  # the gateway's own /chat answer, not a relay
    openai: bool = False


def families(kind: str = "ollama") -> dict[str, Family]:
    """The families for an upstream of ``kind``: an OpenAI-compatible one is asked on /v1
    only, ``/chat`` speaks /v1 to it, and its metadata route is /v1/models."""
    chat = {"model": MODEL, "messages": MESSAGES}
    text = {"model": MODEL, "prompt": "Say hello"}
    usage = {"stream_options": {"include_usage": True}}
    chat_path = "/api/chat" if kind == "ollama" else "/v1/chat/completions"
    chat_stream = {**chat, "stream": True, **({} if kind == "ollama" else usage)}
    v1 = "/v1/chat/completions"
    out = [
        Family(V1_USAGE, "POST", v1, {**chat, "stream": True, **usage},
               v1, {**chat, "stream": True, **usage}, openai=True),
        Family(V1_STREAM, "POST", v1, {**chat, "stream": True},
               v1, {**chat, "stream": True, **usage}, strips=True, openai=True),
        Family(V1_TEXT_STREAM, "POST", "/v1/completions", {**text, "stream": True},
               "/v1/completions", {**text, "stream": True, **usage}, strips=True, openai=True),
        Family(V1_ONCE, "POST", v1, {**chat, "stream": False},
               v1, {**chat, "stream": False}, openai=True),
        Family(CHAT_STREAM, "POST", "/chat", {"prompt": "Say hello", "stream": True},
               chat_path, chat_stream, chat=True, openai=kind != "ollama"),
        Family(CHAT_ONCE, "POST", "/chat", {"prompt": "Say hello"},
               chat_path, {**chat, "stream": False}, chat=True, openai=kind != "ollama"),
    ]  # fmt: skip
    if kind == "ollama":
        out += [
            Family(NATIVE_STREAM, "POST", "/api/chat", {**chat, "stream": True},
                   "/api/chat", {**chat, "stream": True}),
            Family(NATIVE_ONCE, "POST", "/api/chat", {**chat, "stream": False},
                   "/api/chat", {**chat, "stream": False}),
            Family(TAGS, "GET", "/api/tags", None, "/api/tags", None),
            Family(TAGS_HEAD, "HEAD", "/api/tags", None, "/api/tags", None),
        ]  # fmt: skip
    else:
        out.append(Family(TAGS, "GET", "/v1/models", None, "/v1/models", None, openai=True))
    return {family.name: family for family in out}


async def each_family(
    names: tuple[str, ...], check: Callable[[Family], Awaitable[None]], kind: str = "ollama"
) -> None:
    """Run ``check`` for each family; report every family that failed, by name."""
    failures = []
    known = families(kind)
    for name in names:
        try:
            await check(known[name])
        except AssertionError as exc:
            failures.append(f"{name}: {exc}")
    assert not failures, "\n".join(failures)


# ---- reading both ways ----------------------------------------------------------------------


async def read_direct(url: str, family: Family) -> Message:
    """The family's upstream request sent straight to ``url``; the answer as h11 reads it."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    payload = json.dumps(family.upstream_body).encode() if family.upstream_body else b""
    head = f"{family.method} {family.upstream_path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    head += "Accept-Encoding: identity\r\nX-Corpus: 1\r\n"
    if family.upstream_body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
    writer.write(head.encode() + b"\r\n" + payload)
    parsed = MessageReader(family.method)
    try:
        while not parsed.done:
            parsed.feed(await reader.read(1 << 16))
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return parsed.message


@dataclass
class Seen:
    """What a client read through the gateway."""

    request_id: str
    status: int = 0
    headers: CIMultiDict[str] = field(default_factory=CIMultiDict)
    body: bytes = b""
    cut: bool = False  # the connection was cut before the body's end


_IDS = itertools.count()


async def read_gateway(session: aiohttp.ClientSession, url: str, family: Family) -> Seen:
    """The family's request through the gateway, with a request id of ours (the log line
    and the tap are found by it even when the gateway cut the connection before its head)."""
    seen = Seen(request_id=f"corpus-{next(_IDS)}")
    body = bytearray()
    headers = {"X-Corpus": "1", "X-Request-ID": seen.request_id}
    try:
        async with session.request(
            family.method, url + family.path, json=family.body, headers=headers
        ) as response:
            seen.status = response.status
            seen.headers = CIMultiDict(response.headers)
            async for chunk in response.content.iter_any():
                body += chunk
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError):
        seen.cut = True
    seen.body = bytes(body)
    return seen


class Finished:
    """The gateway's ``request_finished`` facts, by request id, as the middleware logs them
    (installed in place of ``proxy.middleware.request_finished``)."""

    def __init__(self) -> None:
        self.lines: dict[str, dict[str, Any]] = {}
        self.changed = asyncio.Event()

    def record(self, _level: int, request_id: str, fields: dict[str, Any]) -> None:
        self.lines[request_id] = fields
        self.changed.set()

    async def get(self, request_id: str) -> dict[str, Any]:
        async with asyncio.timeout(5):
            while request_id not in self.lines:
                self.changed.clear()
                await self.changed.wait()
        return self.lines.pop(request_id)


class Tap:
    """A TCP relay between the gateway and a real upstream that records, per connection,
    the upstream's answer: the reference then reads the very bytes the gateway was sent.
    (The gateway is set to keep no idle connection: one connection, one exchange.)"""

    def __init__(self, target: str) -> None:
        host, port = target.removeprefix("http://").rsplit(":", 1)
        self.target = (host, int(port))
        self.server: asyncio.Server | None = None
        self.exchanges: dict[str, tuple[str, bytes]] = {}  # request id -> (method, answer)
        self.changed = asyncio.Event()

    async def start(self) -> Tap:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def answer(self, request_id: str) -> Message:
        """The upstream's answer to the request the gateway sent with ``request_id``."""
        async with asyncio.timeout(5):
            while request_id not in self.exchanges:
                self.changed.clear()
                await self.changed.wait()
        method, raw = self.exchanges.pop(request_id)
        return read_message(raw, method)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        sent, answered = bytearray(), bytearray()

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, seen: bytearray
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(1 << 16):
                    seen += data
                    sink.write(data)
                    await sink.drain()

        pumps = [
            asyncio.ensure_future(pump(reader, up_writer, sent)),
            asyncio.ensure_future(pump(up_reader, writer, answered)),
        ]
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for sink in (writer, up_writer):
            sink.close()
        await asyncio.gather(*pumps, return_exceptions=True)
        found = re.search(rb"(?im)^x-request-id: *(\S+)", bytes(sent))
        if found is not None:
            method = bytes(sent).split(b" ", 1)[0].decode()
            self.exchanges[found[1].decode()] = (method, bytes(answered))
            self.changed.set()


# ---- the expectations ----------------------------------------------------------------------

SSE, NDJSON = "text/event-stream", "application/x-ndjson"


def media_type(message: Message) -> str:
    return message.headers.get("content-type", "").partition(";")[0].strip().lower()


def reference(direct: Message, family: Family, *, count_chunks: bool) -> Reading | None:
    """What a client's parser reads from the direct answer's (decoded) body; None when there
    is nothing to read (metadata, no body) or it cannot be read (a coding nobody decodes)."""
    if direct.status not in (200, 500) or family.method == "HEAD" or family.name == TAGS:
        return None
    plain = decode(direct.body, direct.coding)
    if plain is None:
        return None
    if direct.status == 200 and media_type(direct) == NDJSON:
        return read_ndjson(plain)
    if direct.status == 200 and media_type(direct) == SSE:
        return read_sse(plain, count_chunks=count_chunks)
    return read_document(plain, openai=family.openai)


def expected_record(
    direct: Message, family: Family, *, count_chunks: bool
) -> tuple[str, int | None, int | None]:
    """The outcome and token counts the gateway must record for a relayed answer."""
    if direct.status >= 400:
        return "error", None, None
    reading = reference(direct, family, count_chunks=count_chunks)
    if reading is None:  # metadata, a bodiless answer, or usage unknown
        return "success", None, None
    streamed = media_type(direct) in (SSE, NDJSON)
    outcome = "success" if reading.error is None and (reading.complete or not streamed) else "error"
    if reading.usage is not None:
        return outcome, *reading.usage
    if count_chunks and reading.content_chunks:  # a server that sends no usage
        return outcome, None, reading.content_chunks
    return outcome, None, None


def check_relayed(
    direct: Message, seen: Seen, record: dict[str, Any], family: Family, *, count_chunks: bool
) -> None:
    """Byte-exact body (minus only the usage the gateway asked for), the same status and
    coding, no trailer in the head, and the reference parse's outcome and counts."""
    assert direct.complete, "the direct read was cut short"
    assert not seen.cut, "the gateway cut a complete answer"
    assert seen.status == direct.status
    strips = family.strips and direct.coding == "identity" and media_type(direct) == SSE
    if strips and direct.status == 200:
        check_stripped(direct.body, seen.body)
    else:
        assert seen.body == direct.body
    assert seen.headers.get("Content-Encoding") == direct.headers.get("content-encoding")
    for name in direct.trailers:
        assert name not in seen.headers, f"the trailer {name} became a header"
    outcome, prompt, completion = expected_record(direct, family, count_chunks=count_chunks)
    got = (record["outcome"], record["prompt_tokens"], record["completion_tokens"])
    assert got == (outcome, prompt, completion)


def check_chat(direct: Message, seen: Seen, record: dict[str, Any], family: Family) -> None:
    """/chat answers in its own shape: the reference parse's text and token counts, or an
    error in its dialect when the upstream's answer is an error or unreadable."""
    assert direct.complete, "the direct read was cut short"
    reading = reference(direct, family, count_chunks=True)
    if reading is None:  # unreadable (an unknown coding): a 502 before any byte
        assert seen.status == 502
        assert json.loads(seen.body)["error"]["code"] == "bad_upstream_response"
        assert record["outcome"] == "error"
        return
    if direct.status != 200:
        assert seen.status == direct.status
        assert json.loads(seen.body)["error"]["message"] == reading.error
        assert record["outcome"] == "error"
        return
    usage = reading.usage or (None, reading.content_chunks)
    assert seen.status == 200
    recorded = (record["outcome"], record["prompt_tokens"], record["completion_tokens"])
    if family.name == CHAT_ONCE:
        answer = json.loads(seen.body)
        assert answer["response"] == reading.text
        assert (answer["prompt_tokens"], answer["completion_tokens"]) == usage
        assert recorded == ("success", *usage)
        return
    lines = [json.loads(line) for line in seen.body.splitlines()]
    text = "".join(line.get("response", "") for line in lines)
    if reading.complete and reading.error is None:
        assert text == reading.text
        assert lines[-1]["done"] is True
        assert (lines[-1]["prompt_tokens"], lines[-1]["completion_tokens"]) == usage
        assert recorded == ("success", *usage)
    else:  # the upstream's error, or an end without done: one error line, in /chat's dialect
        assert reading.text.startswith(text)
        assert [line for line in lines if "error" in line] == lines[-1:]
        assert set(lines[-1]["error"]) == {"message", "type", "param", "code"}
        assert record["outcome"] == "error"


async def check_family(
    family: Family,
    direct: Message,
    seen: Seen,
    finished: Finished,
    *,
    count_chunks: bool = False,
) -> None:
    record = await finished.get(seen.request_id)
    if family.chat:
        check_chat(direct, seen, record, family)
    else:
        check_relayed(direct, seen, record, family, count_chunks=count_chunks)
