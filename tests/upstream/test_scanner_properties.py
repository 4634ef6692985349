"""Property tests for the relay's scanners: any legal encoding of a stream, cut anywhere,
is forwarded byte for byte (minus only the usage the gateway asked for) and read as a
client's parser reads it (issue #13).

Each example draws a logical stream (content chunks, an optional usage-only chunk, an
optional error, an optional end marker), writes it in random legal ways (JSON whitespace,
key order, escapes; NDJSON and SSE line ends; SSE fields, comments, multi-line data), cuts
the bytes at random positions and at every byte, and compares the scanner's decisions with
a reference parse: ``json.loads`` per line as the ``ollama`` SDK does, and the ``openai``
SDK's own ``SSEDecoder``.
"""

from __future__ import annotations

import gzip
import itertools
import json
import zlib
from dataclasses import dataclass
from random import Random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.frames import FrameSplitter
from proxy.upstream.encodings import decoder_for
from proxy.upstream.scanners import (
    DecodingScanner,
    JsonScanner,
    NdjsonScanner,
    Scanner,
    has_marker,
)
from proxy.upstream.sse import SseScanner
from tests.reference import (
    Reading,
    check_stripped,
    read_document,
    read_ndjson,
    read_sse,
    sse_events,
)

# Deterministic in CI: the same examples on every run (a failure found once is kept by
# the explicit @example or a regression test, not by a local database).
PROPERTIES = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Text a model may write: quotes, backslashes, control characters, non-ASCII (two, three and
# four UTF-8 bytes), half an emoji (a lone surrogate), and the markers the scanners look for.
_TRICKY = ['"', "\\", "/", "\n", "\r", "\t", "é", "€", "😀", "中", '"done"', "usage", "[DONE]",
           "data: ", "error", "\\u0064", '{"done": true}', "\u2028", "\ud83d"]  # fmt: skip
TEXT = st.lists(
    st.one_of(st.sampled_from(_TRICKY), st.characters(blacklist_categories=("Cs",))),
    max_size=8,
).map("".join)


@dataclass(frozen=True)
class Logical:
    """What a stream says, whatever its encoding."""

    contents: list[str]
    usage: tuple[int, int] | None  # (prompt, completion)
    error: str | None
    end: bool  # done: true / [DONE]
    per_chunk_usage: bool  # /v1/completions: a zeroed usage on every chunk


@st.composite
def logical_streams(draw: st.DrawFn) -> Logical:
    counts = st.tuples(st.integers(0, 10**6), st.integers(0, 10**6))
    error = draw(st.none() | TEXT.filter(bool))
    return Logical(
        contents=draw(st.lists(TEXT, max_size=5)),
        usage=draw(st.none() | counts),
        error=error,
        end=error is None and draw(st.booleans()),
        per_chunk_usage=draw(st.booleans()),
    )


# ---- random legal JSON ------------------------------------------------------------------


def _escape_letters(literal: str, rnd: Random) -> str:
    """``literal`` (a JSON string) with some ASCII letters written as ``\\u00XX``."""
    if rnd.random() < 0.5:
        return literal
    out = []
    i = 0
    while i < len(literal):
        char = literal[i]
        if char == "\\":  # an escape already: copied as it is
            size = 6 if literal[i + 1] == "u" else 2
            out.append(literal[i : i + size])
            i += size
            continue
        if char.isascii() and char.isalpha() and rnd.random() < 0.5:
            digits = f"{ord(char):04x}"
            out.append("\\u" + (digits.upper() if rnd.random() < 0.5 else digits))
        else:
            out.append(char)
        i += 1
    return "".join(out)


def json_tokens(value: Any, rnd: Random, *, ensure_ascii: bool) -> list[str]:
    """``value`` as JSON tokens: keys in any order, escapes, ``ensure_ascii`` or not."""
    if isinstance(value, dict):
        keys = rnd.sample(list(value), len(value))
        tokens = ["{"]
        for i, key in enumerate(keys):
            if i:
                tokens.append(",")
            key_literal = json.dumps(key, ensure_ascii=ensure_ascii)
            tokens += [_escape_letters(key_literal, rnd), ":"]
            tokens += json_tokens(value[key], rnd, ensure_ascii=ensure_ascii)
        return [*tokens, "}"]
    if isinstance(value, list):
        tokens = ["["]
        for i, item in enumerate(value):
            if i:
                tokens.append(",")
            tokens += json_tokens(item, rnd, ensure_ascii=ensure_ascii)
        return [*tokens, "]"]
    # A lone surrogate has no UTF-8: a server writes it as a \uXXXX escape (RFC 8259 section
    # 8.2 allows the escape; Python's json reads it), whatever it does with other text.
    lone = isinstance(value, str) and any("\ud800" <= c <= "\udfff" for c in value)
    literal = json.dumps(value, ensure_ascii=ensure_ascii or lone)
    if isinstance(value, str):
        literal = _escape_letters(literal, rnd)
        if rnd.random() < 0.5:
            literal = literal.replace("/", "\\/")
    return [literal]


def join_tokens(tokens: list[str], rnd: Random, whitespace: list[str]) -> str:
    """Tokens with random insignificant whitespace between (and around) them."""
    parts = [rnd.choice(whitespace)]
    for token in tokens:
        parts += [token, rnd.choice(whitespace)]
    return "".join(parts)


# ---- NDJSON -----------------------------------------------------------------------------


def ndjson_objects(stream: Logical) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = [
        {
            "model": "m",
            "created_at": "2026-01-01T00:00:00Z",
            "message": {"role": "assistant", "content": text},
            "done": False,
        }
        for text in stream.contents
    ]
    if stream.error is not None:
        objs.append({"error": stream.error})
    elif stream.end:
        final: dict[str, Any] = {"model": "m", "message": {"role": "assistant", "content": ""},
                                 "done": True, "done_reason": "stop"}  # fmt: skip
        if stream.usage is not None:
            final |= {"prompt_eval_count": stream.usage[0], "eval_count": stream.usage[1],
                      "eval_duration": 123456789}  # fmt: skip
        objs.append(final)
    return objs


def encode_ndjson(stream: Logical, rnd: Random) -> bytes:
    ensure_ascii = rnd.random() < 0.5
    line_end = rnd.choice(["\n", "\r\n"])
    lines = [
        join_tokens(json_tokens(obj, rnd, ensure_ascii=ensure_ascii), rnd, ["", " ", "\t"])
        for obj in ndjson_objects(stream)
    ]
    body = line_end.join(lines)
    if lines and rnd.random() < 0.5:
        body += line_end
    return body.encode()


# ---- SSE --------------------------------------------------------------------------------


def sse_objects(stream: Logical) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for i, text in enumerate(stream.contents):
        if stream.per_chunk_usage:
            obj: dict[str, Any] = {
                "id": "cmpl-1",
                "object": "text_completion",
                "choices": [{"text": text, "index": 0, "finish_reason": None}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
            }
        else:
            obj = {
                "id": "chatcmpl-1",
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"role": "assistant", "content": text},
                             "finish_reason": "stop" if i == len(stream.contents) - 1 else None}],
            }  # fmt: skip
        objs.append(obj)
    if stream.error is not None:
        objs.append({"error": {"message": stream.error, "type": "api_error", "param": None,
                               "code": None}})  # fmt: skip
    elif stream.usage is not None:
        prompt, completion = stream.usage
        objs.append({"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [],
                     "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": prompt + completion}})  # fmt: skip
    return objs


_LINE_ENDS = ["\n", "\r", "\r\n"]


class _Lines:
    """SSE lines with random, but unambiguous, line ends: after a lone CR, an empty line
    never ends with a lone LF (the two would read as one CRLF)."""

    def __init__(self, rnd: Random, fixed_end: str | None) -> None:
        self.rnd = rnd
        self.fixed_end = fixed_end
        self.parts: list[str] = []
        self.last_end = ""

    def add(self, line: str) -> None:
        ends = [self.fixed_end] if self.fixed_end is not None else _LINE_ENDS
        if line == "" and self.last_end == "\r":
            ends = [e for e in ends if e != "\n"] or ["\r\n"]
        end = self.rnd.choice(ends)
        self.parts += [line, end]
        self.last_end = end


def _field_lines(rnd: Random) -> list[str]:
    """Lines a client ignores or keeps aside: ``id``, ``event``, ``retry``, comments."""
    extras = ["id: 7", "id:8", "event: message", "event:completion", "retry: 3000",
              ": keep-alive", ":", "x-unknown: field"]  # fmt: skip
    return rnd.choices(extras, k=rnd.choice([0, 0, 1, 2]))


def encode_sse(stream: Logical, rnd: Random) -> bytes:
    ensure_ascii = rnd.random() < 0.5
    lines = _Lines(rnd, rnd.choice([None, *_LINE_ENDS]))
    for obj in sse_objects(stream):
        if rnd.random() < 0.15:  # a keep-alive comment between events
            lines.add(": ping")
            lines.add("")
        tokens = json_tokens(obj, rnd, ensure_ascii=ensure_ascii)
        # Data split over several data lines at token boundaries: joined with "\n", which
        # is JSON whitespace.
        segments: list[list[str]] = [[]]
        for token in tokens:
            if segments[-1] and rnd.random() < 0.12:
                segments.append([])
            segments[-1].append(token)
        data_lines = [
            "data:" + rnd.choice(["", " "]) + join_tokens(seg, rnd, ["", " "]).lstrip()
            for seg in segments
        ]
        before, after = _field_lines(rnd), _field_lines(rnd)
        for line in [*before, *data_lines, *after]:
            lines.add(line)
        lines.add("")
    if stream.end:
        for line in _field_lines(rnd):
            lines.add(line)
        lines.add("data:" + rnd.choice(["", " "]) + "[DONE]")
        ending = rnd.choice(["blank", "line end", "none"])
        if ending == "blank":
            lines.add("")
        elif ending == "none":
            lines.parts.pop()  # the [DONE] line's own line end
    return "".join(lines.parts).encode()


# ---- feeding ----------------------------------------------------------------------------


def cut(body: bytes, positions: list[int]) -> list[bytes]:
    bounds = [0, *sorted({p for p in positions if 0 < p < len(body)}), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def run(scanner: Scanner, chunks: list[bytes]) -> bytes:
    out = b"".join(scanner.feed(chunk) for chunk in chunks)
    return out + scanner.finish()


def splits(body: bytes, rnd: Random) -> list[list[bytes]]:
    """Random cuts, and (for small bodies) a cut at every byte."""
    positions = [rnd.randint(0, len(body)) for _ in range(rnd.randint(0, 12))]
    ways = [[body], cut(body, positions)]
    if len(body) <= 1500:
        ways.append([body[i : i + 1] for i in range(len(body))])
    return ways


Decisions = tuple[bool, str | None, tuple[int, int] | None, int]


def learned(scanner: Scanner) -> Decisions:
    """What the scanner decided: complete, error, usage, content chunks."""
    usage = scanner.usage
    counts = None if usage is None else (usage.prompt_tokens or 0, usage.completion_tokens or 0)
    return scanner.complete, scanner.error, counts, scanner.content_chunks


def decisions(reading: Reading) -> Decisions:
    """The same, as the reference parse read them."""
    return reading.complete, reading.error, reading.usage, reading.content_chunks


# ---- the properties ---------------------------------------------------------------------


@PROPERTIES
@given(logical_streams(), st.randoms(use_true_random=True))
def test_ndjson_scanner_reads_what_the_ollama_sdk_reads(stream: Logical, rnd: Random) -> None:
    """Any legal NDJSON, cut anywhere, is forwarded unchanged and read as json.loads reads it."""
    body = encode_ndjson(stream, rnd)
    want = decisions(read_ndjson(body))
    for chunks in splits(body, rnd):
        scanner = NdjsonScanner()
        assert run(scanner, chunks) == body
        assert learned(scanner) == want


@PROPERTIES
@given(logical_streams(), st.randoms(use_true_random=True), st.booleans(), st.booleans())
def test_sse_scanner_reads_what_the_openai_sdk_reads(
    stream: Logical, rnd: Random, strip_usage: bool, count_chunks: bool
) -> None:
    """Any legal SSE, cut anywhere, is forwarded unchanged (minus the usage the gateway
    asked for) and read as the openai SDK's decoder reads it."""
    body = encode_sse(stream, rnd)
    want = decisions(read_sse(body, count_chunks=count_chunks))
    for chunks in splits(body, rnd):
        scanner = SseScanner(strip_usage=strip_usage, count_chunks=count_chunks)
        out = run(scanner, chunks)
        if strip_usage:
            check_stripped(body, out)
        else:
            assert out == body
        assert learned(scanner) == want


def _native_answer(stream: Logical) -> dict[str, Any]:
    text = "".join(stream.contents)
    if stream.error is not None:
        return {"error": stream.error}
    answer: dict[str, Any] = {"model": "m", "message": {"role": "assistant", "content": text},
                              "done": True}  # fmt: skip
    if stream.usage is not None:
        answer |= {"prompt_eval_count": stream.usage[0], "eval_count": stream.usage[1]}
    return answer


def _openai_answer(stream: Logical) -> dict[str, Any]:
    if stream.error is not None:
        return {"error": {"message": stream.error, "type": "api_error"}}
    answer: dict[str, Any] = {
        "id": "chatcmpl-1",
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": "".join(stream.contents)}}],
    }  # fmt: skip
    if stream.usage is not None:
        answer["usage"] = {"prompt_tokens": stream.usage[0], "completion_tokens": stream.usage[1]}
    return answer


@PROPERTIES
@given(logical_streams(), st.randoms(use_true_random=True), st.booleans())
def test_json_scanner_reads_any_whitespace(stream: Logical, rnd: Random, openai: bool) -> None:
    """A non-streamed answer with any whitespace (indent too) is forwarded as it is and its
    usage or error read as json.loads reads it."""
    obj = _openai_answer(stream) if openai else _native_answer(stream)
    tokens = json_tokens(obj, rnd, ensure_ascii=rnd.random() < 0.5)
    body = join_tokens(tokens, rnd, ["", " ", "\n", "\r\n", "\t", "\n    "]).encode()
    reading = read_document(body, openai=openai)
    want = (True, reading.error, None if reading.error else reading.usage, 0)
    for chunks in splits(body, rnd):
        scanner = JsonScanner(openai=openai)
        assert run(scanner, chunks) == body
        assert learned(scanner) == want


def compress(body: bytes, coding: str, rnd: Random) -> bytes:
    """``body`` in ``coding``, as one member or several one after another (RFC 1952: a
    gzip body is a series of members; a streaming compressor may end one per flush)."""
    level = rnd.randint(1, 9)
    members = cut(body, [rnd.randint(0, len(body)) for _ in range(rnd.choice([0, 0, 1, 3]))])
    if coding == "gzip":
        return b"".join(gzip.compress(member, compresslevel=level) for member in members)
    # deflate is the zlib format (RFC 9110 section 8.4.1.2)
    return b"".join(zlib.compress(member, level) for member in members)


@PROPERTIES
@given(
    logical_streams(),
    st.randoms(use_true_random=True),
    st.sampled_from(["gzip", "deflate"]),
    st.sampled_from(["ndjson", "sse"]),
)
def test_a_compressed_stream_is_forwarded_as_it_came_and_read_decoded(
    stream: Logical, rnd: Random, coding: str, framing: str
) -> None:
    """A gzip or deflate body, cut anywhere, is forwarded byte for byte and its decoded copy
    read as a client reads the decoded stream."""
    if framing == "ndjson":
        plain = encode_ndjson(stream, rnd)
        want = decisions(read_ndjson(plain))
    else:
        plain = encode_sse(stream, rnd)
        want = decisions(read_sse(plain))
    body = compress(plain, coding, rnd)
    factory = decoder_for(coding)
    assert factory is not None
    for chunks in splits(body, rnd)[:2]:
        inner: Scanner = NdjsonScanner() if framing == "ndjson" else SseScanner(strip_usage=False)
        scanner = DecodingScanner(inner, factory())
        assert run(scanner, chunks) == body
        assert scanner.readable
        assert learned(scanner) == want


@PROPERTIES
@given(st.binary(max_size=64), st.binary(max_size=64), st.sampled_from([b"done", b"usage"]))
def test_the_marker_prefilter_finds_any_spelling_of_a_key(
    before: bytes, after: bytes, key: bytes
) -> None:
    """has_marker finds a key in any spelling a JSON parser accepts (escaped letters too)."""
    spelled = "".join(
        f"\\u{b:04x}" if i % 2 else chr(b) for i, b in enumerate(key)
    ).encode()  # every other letter escaped
    for name in (key, spelled):
        data = before + b'"' + name + b'"' + after
        assert has_marker(data, (b'"done"', b'"error"', b"usage", b"[DONE]")) >= 0


@PROPERTIES
@given(logical_streams(), st.randoms(use_true_random=True), st.booleans())
def test_the_frame_splitter_gives_what_the_sdks_read(
    stream: Logical, rnd: Random, sse: bool
) -> None:
    """/chat's reader (FrameSplitter), cut anywhere, gives the payloads the SDKs read:
    each SSE event's data, each NDJSON line."""
    if sse:
        body = encode_sse(stream, rnd)
        want = [data.encode() for _, data in sse_events(body)]
    else:
        body = encode_ndjson(stream, rnd)
        want = [line.strip() for line in body.split(b"\n") if line.strip()]
    for chunks in splits(body, rnd):
        splitter = FrameSplitter(sse=sse)
        got = [payload for chunk in chunks for payload in splitter.feed(chunk)]
        assert [*got, *splitter.finish()] == want
