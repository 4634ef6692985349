"""Copying an upstream response to the client: status, filtered headers, the body stream.

The relay is transparent: for every upstream response that is complete at the HTTP level,
the client gets exactly the upstream's body bytes, except only the usage the gateway asked
for on its behalf, and what the gateway records is what a client's parser reads from those
bytes. Each chunk is written as it arrives (``readany`` coalesces what is already
buffered, and ``write`` waits when the client reads slowly, so backpressure reaches the
upstream).

Only a message the upstream cut short (the connection lost before the last chunk, before
``Content-Length``, or a timeout) gets something of the gateway's: a stream ends with an
error frame in the client's dialect, never a fake ``done: true`` or ``[DONE]``; a
non-streamed or compressed body, which cannot carry one, ends with the connection cut.
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from proxy.dialects import JSON_CONTENT_TYPE, NDJSON_CONTENT_TYPE, SSE_CONTENT_TYPE
from proxy.exchange import Exchange
from proxy.upstream.client import Interrupted, UpstreamError, UpstreamResponse
from proxy.upstream.encodings import decoder_for
from proxy.upstream.headers import forward_response_headers
from proxy.upstream.scanners import DecodingScanner, JsonScanner, NdjsonScanner, Scanner
from proxy.upstream.sse import SseScanner

log = structlog.get_logger("proxy.relay")


def scanner_for(
    content_type: str,
    *,
    status: int,
    content_encoding: str,
    strip_usage: bool,
    openai: bool,
    counts_usage: bool,
    count_chunks: bool,
) -> Scanner:
    """Pick how to read a body from the response's Content-Type, not the request's Accept.

    A compressed body is relayed as it came: a decoded copy is read (nothing stripped),
    or, in a coding the gateway cannot decode, nothing is read and usage stays unknown.
    """
    plain = content_encoding == "identity"
    if content_type == NDJSON_CONTENT_TYPE and status == 200:
        scanner: Scanner = NdjsonScanner()
    elif content_type == SSE_CONTENT_TYPE and status == 200:
        scanner = SseScanner(strip_usage=strip_usage and plain, count_chunks=count_chunks)
    elif content_type == JSON_CONTENT_TYPE and counts_usage:
        scanner = JsonScanner(openai=openai)
    else:
        return Scanner()
    if plain:
        return scanner
    decompressor = decoder_for(content_encoding)
    return DecodingScanner(scanner, decompressor()) if decompressor is not None else Scanner()


def is_stream(content_type: str) -> bool:
    return content_type in (NDJSON_CONTENT_TYPE, SSE_CONTENT_TYPE)


async def relay(
    request: web.Request,
    upstream: UpstreamResponse,
    exchange: Exchange,
    *,
    strip_usage: bool = False,
    counts_usage: bool = False,
    count_chunks: bool = False,
    require_end: bool = False,
) -> web.StreamResponse:
    """Relay ``upstream`` to the client and record what the body said in ``exchange``.

    ``counts_usage``: an inference answer, whose statistics are read even when it is not
    streamed; ``count_chunks``: its upstream may send no usage in streams, so count content
    chunks. ``require_end``: a generation stream ends with ``done: true`` or ``[DONE]``; one
    that ends without is recorded as failed, its bytes relayed as they came. (Pull progress
    ends with a status line instead.)
    """
    content_type = upstream.content_type
    streamed = is_stream(content_type)
    scanner = scanner_for(
        content_type,
        status=upstream.status,
        content_encoding=upstream.content_encoding,
        strip_usage=strip_usage,
        openai=exchange.dialect.is_openai,
        counts_usage=counts_usage,
        count_chunks=count_chunks,
    )
    headers = forward_response_headers(upstream.raw_headers, exchange.headers)
    response = _RelayResponse(status=upstream.status, reason=upstream.reason, headers=headers)
    if not streamed and upstream.content_length is not None:
        response.content_length = upstream.content_length
    exchange.status = upstream.status
    exchange.streamed = streamed
    exchange.phase = "streaming"
    exchange.response = response
    await response.prepare(request)
    exchange.first_byte_at = time.monotonic()
    if request.method == "HEAD":
        await response.write_eof()
        return response

    failure, last = await _copy(upstream, response, scanner, exchange, streamed=streamed)
    if failure is not None:
        # An error frame can be added to a plain stream only: never into compressed bytes.
        framed = streamed and upstream.content_encoding == "identity"
        await _interrupted(request, response, exchange, failure, streamed=framed)
        return response
    if scanner.error is not None:
        # The upstream's own error frame was relayed; it is the outcome.
        exchange.fail("StreamInterrupted", scanner.error)
    elif require_end and streamed and scanner.readable and not scanner.complete:
        exchange.fail("StreamInterrupted", "the upstream ended the stream without finishing it")
    try:
        await response.write_eof(last)
    finally:
        # After the end is out: counting a stream without usage reads its deferred events.
        _record_usage(scanner, exchange, streamed=streamed)
    return response


class _RelayResponse(web.StreamResponse):
    """Headers leave with the first body bytes, as aiohttp's own ``web.Response`` does: one
    write fewer per response. (Ollama, too, sends its headers with the first chunk.)"""

    _send_headers_immediately = False


Failure = tuple[str, str]  # (error type, message)


async def _copy(
    upstream: UpstreamResponse,
    response: web.StreamResponse,
    scanner: Scanner,
    exchange: Exchange,
    *,
    streamed: bool,
) -> tuple[Failure | None, bytes]:
    """The hot loop: read what the upstream has, write it, until EOF or a failure.

    A stream's chunks are written as they come. What can wait (a non-streamed body's latest
    chunk, a stream's last frames once it said it is done) is held back to leave with the
    end of the response in one write; returned as the second item.
    """
    held = b""
    while True:
        chunk = await _read(upstream)
        if isinstance(chunk, tuple):
            if held:
                exchange.bytes_out += len(held)
                await response.write(held)
            return chunk, b""
        if not chunk:
            break
        if exchange.first_chunk_at is None:
            exchange.first_chunk_at = time.monotonic()
        out = scanner.feed(chunk)
        if out:
            if held:
                exchange.bytes_out += len(held)
                await response.write(held)
                held = b""
            if streamed and not scanner.complete:
                exchange.bytes_out += len(out)
                await response.write(out)
            else:
                held = out
    tail = scanner.finish()
    exchange.bytes_out += len(held) + len(tail)
    return None, held + tail


async def _read(upstream: UpstreamResponse) -> bytes | Failure:
    """Whatever the upstream has sent so far (b"" at EOF), or why it failed."""
    try:
        return await upstream.readany()
    except TimeoutError as exc:
        return "TimeoutError", str(exc)  # the client's: the upstream's silence, or the total
    except Interrupted as exc:
        return "StreamInterrupted", str(exc)  # the gateway's own reason: it is shutting down
    except UpstreamError as exc:
        return "StreamInterrupted", f"the upstream connection failed: {exc}"


def _record_usage(scanner: Scanner, exchange: Exchange, *, streamed: bool) -> None:
    usage = scanner.usage
    if usage is not None:
        exchange.record_usage(usage)
    elif streamed and scanner.content_chunks and exchange.dialect.is_openai:
        # Backends that ignore stream_options.include_usage (llama-cpp-python's server)
        # send one token per content chunk: the chunk count is the completion count.
        exchange.completion_tokens = scanner.content_chunks


async def _interrupted(
    request: web.Request,
    response: web.StreamResponse,
    exchange: Exchange,
    failure: Failure,
    *,
    streamed: bool,
) -> None:
    error_type, message = failure
    exchange.fail(error_type, message)
    log.warning("upstream_stream_interrupted", error_type=error_type, detail=message)
    if streamed:
        frame = exchange.dialect.error_frame(message, "stream_interrupted")
        exchange.bytes_out += len(frame)
        await response.write(frame)
        await response.write_eof()
    else:
        # A half-sent JSON document cannot carry an error: cut the connection so the client
        # sees a truncated body instead of a complete-looking one.
        response.force_close()
        if request.transport is not None:
            request.transport.abort()
