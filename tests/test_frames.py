"""The two stream framings read as a client reads them, whatever the chunking."""

from __future__ import annotations

import asyncio
from unittest import mock

import aiohttp

from proxy.frames import FrameSplitter, iter_frames, json_object


async def _reader(*parts: bytes) -> aiohttp.StreamReader:
    protocol = mock.Mock(_reading_paused=False)
    reader = aiohttp.StreamReader(protocol, 2**16, loop=asyncio.get_running_loop())
    for part in parts:
        reader.feed_data(part)
    reader.feed_eof()
    return reader


async def test_iter_frames_reads_sse_payloads_across_chunks_and_crlf() -> None:
    """SSE events split anywhere, CRLF-separated, with comments: the data payloads in order."""
    reader = await _reader(b'data: {"a":', b"1}\r\n\r\n: ping\r\n\r\ndata: [DONE]\r\n\r\n")
    assert [frame async for frame in iter_frames(reader, sse=True)] == [b'{"a":1}', b"[DONE]"]


async def test_iter_frames_reads_ndjson_lines_and_an_unterminated_last_line() -> None:
    """NDJSON lines split anywhere; a last line without a newline still counts."""
    reader = await _reader(b'{"a":1}\n{"b"', b":2}\n\n", b'{"c":3}')
    frames = [frame async for frame in iter_frames(reader, sse=False)]
    assert frames == [b'{"a":1}', b'{"b":2}', b'{"c":3}']


def test_a_splitter_fed_one_byte_at_a_time_gives_the_same_frames() -> None:
    """Chunk boundaries change nothing: a byte at a time or all at once."""
    body = b'data: {"a":1}\n\nevent: x\ndata: {"b":2}\n\ndata: [DONE]\n\n'
    whole = FrameSplitter(sse=True)
    at_once = whole.feed(body) + whole.finish()
    split = FrameSplitter(sse=True)
    by_byte = [frame for i in range(len(body)) for frame in split.feed(body[i : i + 1])]
    assert by_byte + split.finish() == at_once == [b'{"a":1}', b'{"b":2}', b"[DONE]"]


def test_json_object_is_an_object_or_none() -> None:
    """Only a JSON object is a frame's object; anything else, parsed or not, is None."""
    assert json_object(b'{"done": true}') == {"done": True}
    assert json_object(b"[1]") is None
    assert json_object(b"[DONE]") is None
    assert json_object(b"") is None


def test_json_that_orjson_refuses_is_read_as_python_reads_it() -> None:
    """A lone surrogate escape (half an emoji) and a number beyond a double are JSON the
    SDKs read: so does the gateway. Text that is not JSON, or not UTF-8, is still None."""
    assert json_object(b'{"done":true,"t":"w\\ud83d"}') == {"done": True, "t": "w\ud83d"}
    assert json_object(b'{"x":1e400}') == {"x": float("inf")}
    assert json_object(b"[DONE]") is None
    assert json_object(b'{"t":"\xff"}') is None
