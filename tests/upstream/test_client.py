"""The upstream client against scripted raw-socket servers: what a real HTTP/1.1 server can
do to it (close idle connections, delimit a body by closing, stall, break framing)."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme

from proxy.upstream.client import (
    ConnectFailed,
    Pool,
    UploadStalled,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamResponse,
    header_block,
)
from proxy.upstream.connection import UpstreamConnection

pytestmark = pytest.mark.timeout(10)

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Scripted:
    """A TCP server running ``script`` for each connection; counts connections."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.writers: list[asyncio.StreamWriter] = []

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            await self.script(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


Serve = Callable[[Script], Awaitable["Scripted"]]
PoolFor = Callable[[int], Pool]


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[Scripted]]]:
    started: list[Scripted] = []

    async def start(script: Script) -> Scripted:
        scripted = Scripted(script)
        scripted.server = await asyncio.start_server(scripted._serve, "127.0.0.1", 0)
        started.append(scripted)
        return scripted

    yield start
    for scripted in started:
        assert scripted.server is not None
        for writer in scripted.writers:
            writer.close()
        scripted.server.close()


@pytest.fixture
async def pool_for() -> AsyncIterator[Callable[[int], Pool]]:
    pools: list[Pool] = []

    def make(port: int) -> Pool:
        pool = Pool("127.0.0.1", port, tls=None, connect_timeout_s=2)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.close()


async def read_head(reader: asyncio.StreamReader) -> list[bytes]:
    return (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")[:-2]


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


def sends(data: bytes, *, after_s: float = 0.0) -> Script:
    """A server that answers a request with ``data`` (``after_s`` late, as a slow upstream
    is), then keeps the connection open until the client leaves."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        if after_s:
            await asyncio.sleep(after_s)
        writer.write(data)
        await reader.read()

    return script


CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


async def get(pool: Pool, path: str = "/", method: str = "GET") -> tuple[int, bytes]:
    response = await pool.request(method, path, b"", None, headers_timeout_s=5)
    body = await response.read()
    response.release()
    return response.status, body


async def keep_answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head = await read_head(reader)
        writer.write(ok(head[0]))


async def test_requests_reuse_one_keep_alive_connection(serve: Serve, pool_for: PoolFor) -> None:
    server = await serve(keep_answering)
    pool = pool_for(server.port)
    for path in ("/a", "/b", "/c"):
        assert await get(pool, path) == (200, f"GET {path} HTTP/1.1".encode())
    assert server.connections == 1


async def test_request_line_host_and_framing(serve: Serve, pool_for: PoolFor) -> None:
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        sizes = [int(line.split(b":")[1]) for line in head if line.startswith(b"Content-Length")]
        length = sizes[0]
        seen.extend([*head, await reader.readexactly(length)])
        writer.write(ok(b"{}"))

    server = await serve(script)
    pool = pool_for(server.port)
    head = header_block([("Content-Type", "application/json"), ("X-Request-ID", "abc")])
    response = await pool.request("POST", "/api/chat?x=1", head, b'{"a":1}', headers_timeout_s=5)
    assert await response.read() == b"{}"
    assert seen == [
        b"POST /api/chat?x=1 HTTP/1.1",
        f"Host: 127.0.0.1:{server.port}".encode(),
        b"Content-Type: application/json",
        b"X-Request-ID: abc",
        b"Content-Length: 7",
        b'{"a":1}',
    ]


def test_a_line_break_in_a_header_value_is_refused() -> None:
    with pytest.raises(ValueError, match="X-Evil"):
        header_block([("X-Evil", "a\r\nInjected: yes")])


async def test_a_connection_closed_while_idle_is_replaced_without_an_error(
    serve: Serve, pool_for: PoolFor
) -> None:
    async def answer_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(ok(b"once"))
        await writer.drain()
        # Then close while the client holds the connection idle: the keep-alive race.

    server = await serve(answer_once)
    pool = pool_for(server.port)
    assert await get(pool) == (200, b"once")
    assert await get(pool) == (200, b"once")
    assert server.connections == 2


async def test_a_connection_lost_after_the_request_went_out_is_an_error(
    serve: Serve, pool_for: PoolFor
) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)  # a fresh connection: the request was seen, then dropped

    pool = pool_for((await serve(hang_up)).port)
    with pytest.raises(UpstreamDisconnected):
        await get(pool)


async def test_head_ends_at_the_headers_and_keeps_the_connection(
    serve: Serve, pool_for: PoolFor
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")  # no body: HEAD
        await keep_answering(reader, writer)

    server = await serve(script)
    pool = pool_for(server.port)
    assert await get(pool, "/blob", method="HEAD") == (200, b"")
    assert await get(pool, "/next") == (200, b"GET /next HTTP/1.1")
    assert server.connections == 1


async def test_bytes_after_the_response_are_ignored_and_the_connection_dropped(
    serve: Serve, pool_for: PoolFor
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        writer.write(ok(head[0]) + ok(b"unasked"))  # a second response nobody asked for
        await keep_answering(reader, writer)

    server = await serve(script)
    pool = pool_for(server.port)
    assert await get(pool) == (200, b"GET / HTTP/1.1")
    assert await get(pool, "/next") == (200, b"GET /next HTTP/1.1")
    assert server.connections == 2


async def test_an_interim_response_is_skipped(serve: Serve, pool_for: PoolFor) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"final"))
        await keep_answering(reader, writer)

    server = await serve(script)
    pool = pool_for(server.port)
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5)
    assert (response.status, response.reason, dict(response.headers)) == (
        200, "OK", {"Content-Length": "5"}
    )  # fmt: skip
    assert await response.read() == b"final"
    response.release()
    assert await get(pool, "/next") == (200, b"GET /next HTTP/1.1")
    assert server.connections == 1


async def test_a_body_delimited_by_the_connection_end(serve: Serve, pool_for: PoolFor) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it")

    pool = pool_for((await serve(script)).port)
    assert await get(pool) == (200, b"all of it")


async def test_a_cut_chunked_body_fails_the_read(serve: Serve, pool_for: PoolFor) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")

    pool = pool_for((await serve(script)).port)
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5)
    assert await response.readany() == b"hello"
    with pytest.raises(UpstreamDisconnected):
        await response.readany()
    response.release()


async def test_broken_framing_is_an_upstream_error(serve: Serve, pool_for: PoolFor) -> None:
    pool = pool_for((await serve(sends(CHUNKED + b"zz\r\n"))).port)
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5)
    with pytest.raises(UpstreamError, match="framing"):
        await response.read()


async def test_silence_after_the_headers_times_out(serve: Serve, pool_for: PoolFor) -> None:
    pool = pool_for((await serve(sends(CHUNKED + b"2\r\nhi\r\n"))).port)
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5, idle_timeout_s=0.2)
    assert await response.readany() == b"hi"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=r"nothing for 0\.2 s"):
        await response.readany()
    assert 0.15 < loop.time() - started < 2


@pytest.mark.parametrize("headers_timeout_s", [5.0, 0.0])
async def test_each_phase_has_its_own_limit(
    serve: Serve, pool_for: PoolFor, headers_timeout_s: float
) -> None:
    """A slow first byte is judged by the headers limit, even when the idle limit is
    shorter; after the headers, the idle limit applies. 0 means no limit for the phase."""

    # The upstream is slow to start, as with a model load.
    pool = pool_for((await serve(sends(CHUNKED + b"2\r\nhi\r\n", after_s=0.4))).port)
    response = await pool.request(
        "GET", "/", b"", None, headers_timeout_s=headers_timeout_s, idle_timeout_s=0.15
    )
    assert await response.readany() == b"hi"
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError, match=r"nothing for 0\.15 s"):
        await response.readany()
    assert loop.time() - started < 1


async def test_no_headers_in_time_is_a_timeout(serve: Serve, pool_for: PoolFor) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    pool = pool_for((await serve(silent)).port)
    with pytest.raises(TimeoutError):
        await pool.request("GET", "/", b"", None, headers_timeout_s=0.2)


class StubTransport:
    def __init__(self) -> None:
        self.reading = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_closing(self) -> bool:
        return False


def stub_exchange() -> tuple[UpstreamConnection, StubTransport, UpstreamResponse]:
    """A connection on a stub transport with a response in flight: bytes are fed to it by
    hand, and the transport says whether it is reading."""
    connection = UpstreamConnection(Pool("127.0.0.1", 9, tls=None, connect_timeout_s=1))
    transport = StubTransport()
    connection.connection_made(transport)  # type: ignore[arg-type]
    response = UpstreamResponse(connection, head_only=False)
    connection.response = response
    return connection, transport, response


async def test_reading_pauses_while_unread_body_piles_up() -> None:
    connection, transport, response = stub_exchange()
    part = b"x" * (200 * 1024)
    connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (3 * len(part)))
    connection.data_received(part)
    assert transport.reading  # under the high-water mark
    connection.data_received(part)
    assert not transport.reading  # 400 KB unread: the socket waits
    assert await response.readany() == part * 2
    assert transport.reading  # read: the socket reads again
    connection.data_received(part)
    assert await response.read() == part
    assert response.complete


async def test_a_streamed_request_body_is_sent_chunked(serve: Serve, pool_for: PoolFor) -> None:
    received: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        assert b"Transfer-Encoding: chunked" in head
        received.append(await reader.readuntil(b"0\r\n\r\n"))
        writer.write(ok(b"stored"))

    async def body() -> AsyncIterator[bytes]:
        for part in (b"abc", b"", b"defgh"):
            yield part

    pool = pool_for((await serve(script)).port)
    response = await pool.request("POST", "/blob", b"", body(), headers_timeout_s=5)
    assert await response.read() == b"stored"
    assert received == [b"3\r\nabc\r\n5\r\ndefgh\r\n0\r\n\r\n"]


async def test_nothing_listening_is_a_connect_failure(pool_for: PoolFor) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        pool = pool_for(port)
        with pytest.raises(ConnectFailed, match="Connection refused"):
            await get(pool)


async def test_closing_the_pool_ends_a_response_in_flight(serve: Serve, pool_for: PoolFor) -> None:
    pool = pool_for((await serve(sends(CHUNKED))).port)
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5)
    reading = asyncio.create_task(response.readany())
    turn = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(turn.set_result, None)
    await turn  # callbacks run in order: the read has started and waits for the body
    assert response._waiter is not None
    pool.close()
    with pytest.raises(UpstreamDisconnected):
        await reading


async def test_an_https_upstream_is_verified_and_spoken_to_over_tls() -> None:
    ca = trustme.CA()
    server_tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_tls)
    client_tls = ssl.create_default_context()
    ca.configure_trust(client_tls)
    scripted = Scripted(keep_answering)
    server = await asyncio.start_server(scripted._serve, "localhost", 0, ssl=server_tls)
    port = server.sockets[0].getsockname()[1]
    trusting = Pool("localhost", port, tls=client_tls, connect_timeout_s=2)
    doubting = Pool("localhost", port, tls=ssl.create_default_context(), connect_timeout_s=2)
    try:
        assert await get(trusting, "/tls") == (200, b"GET /tls HTTP/1.1")
        with pytest.raises(ConnectFailed, match=r"TLS handshake failed: .*certificate"):
            await get(doubting)
    finally:
        trusting.close()
        doubting.close()
        for writer in scripted.writers:
            writer.close()
        server.close()


# --- RFC 9112 framing, replays, timers, the pool bound and uploads (issue 13) -------------


async def loop_turns(count: int) -> None:
    """Let the event loop run ``count`` times (and so read what the sockets have)."""
    loop = asyncio.get_running_loop()
    for _ in range(count):
        turn = loop.create_future()
        loop.call_soon(turn.set_result, None)
        await turn


async def test_transfer_encoding_is_read_case_insensitively(
    serve: Serve, pool_for: PoolFor
) -> None:
    """``Chunked`` is chunked: a whole body keeps the connection, a cut one is an error."""
    odd = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: Chunked\r\n\r\n"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(odd + b"2\r\nhi\r\n0\r\n\r\n")
        await read_head(reader)
        writer.write(odd + b"5\r\nhello\r\n3\r\nab")  # cut in the middle of a chunk

    server = await serve(script)
    pool = pool_for(server.port)
    assert await get(pool) == (200, b"hi")
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5)
    with pytest.raises(UpstreamDisconnected):
        while await response.readany():
            pass
    response.release()
    assert server.connections == 1


async def test_trailers_never_become_header_fields(serve: Serve, pool_for: PoolFor) -> None:
    """Fields after the last chunk are dropped, even when they arrive with the headers."""
    body = CHUNKED + b"2\r\nhi\r\n0\r\nX-Checksum: abc\r\nX-Late: 1\r\n\r\n"
    server = await serve(sends(body))
    pool = pool_for(server.port)
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5)
    assert await response.read() == b"hi"
    assert dict(response.headers) == {"Transfer-Encoding": "chunked"}
    assert response.raw_headers == [("Transfer-Encoding", "chunked")]
    response.release()


async def test_a_coding_beside_a_length_wins_and_the_connection_is_not_reused(
    serve: Serve, pool_for: PoolFor
) -> None:
    """RFC 9112 section 6.3: Transfer-Encoding overrides Content-Length; close after."""
    both = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 99\r\n\r\n"
    server = await serve(sends(both + b"2\r\nhi\r\n0\r\n\r\n"))
    pool = pool_for(server.port)
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5)
    assert response.content_length is None
    assert await response.read() == b"hi"
    assert not response.keep_alive
    response.release()


async def test_a_post_on_a_stale_connection_is_never_sent_twice(
    serve: Serve, pool_for: PoolFor
) -> None:
    """The upstream read the POST and closed without a byte (an OOM-killed Ollama): the
    request fails instead of running twice; a GET in the same spot goes again, counted."""
    seen: list[bytes] = []

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        seen.append(head[0])
        writer.write(ok(b"first"))
        head = await read_head(reader)  # the reused connection's request: read, not answered
        seen.append(head[0])

    server = await serve(script)
    pool = pool_for(server.port)
    assert await get(pool, "/warm") == (200, b"first")
    resent: list[int] = []
    with pytest.raises(UpstreamDisconnected):
        await pool.request(
            "POST", "/api/chat", b"", b"{}", headers_timeout_s=5, on_resend=lambda: resent.append(1)
        )
    assert seen == [b"GET /warm HTTP/1.1", b"POST /api/chat HTTP/1.1"]
    assert resent == []
    assert await get(pool, "/again") == (200, b"first")
    response = await pool.request(
        "GET", "/read", b"", None, headers_timeout_s=5, on_resend=lambda: resent.append(1)
    )
    assert await response.read() == b"first"
    assert seen[-2:] == [b"GET /read HTTP/1.1", b"GET /read HTTP/1.1"]
    assert resent == [1]


async def test_the_idle_timer_does_not_count_a_pause_for_a_slow_reader() -> None:
    """Reading paused because the gateway's client is slow: not the upstream's silence."""
    connection, transport, response = stub_exchange()
    response.start_timer(5.0, 0.1)
    part = b"x" * (300 * 1024)
    connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (2 * len(part)))
    connection.data_received(part)
    assert not transport.reading  # paused, as while the client reads slowly
    finished = asyncio.get_running_loop().create_future()
    response.headers_done.get_loop().call_later(0.35, finished.set_result, None)
    await finished  # three idle limits pass while paused
    assert await response.readany() == part  # no TimeoutError: it was the gateway's pause
    assert transport.reading
    connection.data_received(part)
    assert await response.read() == part


async def test_the_total_deadline_ends_a_silent_stream(serve: Serve, pool_for: PoolFor) -> None:
    """No idle limit, no byte after the first: the total timeout still ends it."""
    pool = pool_for((await serve(sends(CHUNKED + b"2\r\nhi\r\n"))).port)
    response = await pool.request("GET", "/", b"", None, headers_timeout_s=5)
    loop = asyncio.get_running_loop()
    response.set_deadline(loop.time() + 0.2, 0.2)
    assert await response.readany() == b"hi"
    with pytest.raises(TimeoutError, match=r"total timeout of 0\.2 s"):
        await response.readany()
    response.release()


async def test_the_pool_holds_at_most_its_connections_and_waiters_wait_bounded(
    serve: Serve,
) -> None:
    """With one connection busy, the next request waits for it, up to the connect timeout."""
    server = await serve(keep_answering)
    pool = Pool("127.0.0.1", server.port, tls=None, connect_timeout_s=0.3, max_connections=1)
    try:
        first = await pool.request("GET", "/one", b"", None, headers_timeout_s=5)
        with pytest.raises(ConnectFailed, match="all 1 connections to the upstream stayed busy"):
            await pool.request("GET", "/two", b"", None, headers_timeout_s=5)
        waiting = asyncio.create_task(get(pool, "/three"))
        assert await first.read() == b"GET /one HTTP/1.1"
        first.release()  # back to the pool: the waiter takes it
        assert await waiting == (200, b"GET /three HTTP/1.1")
        assert server.connections == 1
    finally:
        pool.close()


async def test_an_early_answer_stops_a_streamed_upload(serve: Serve, pool_for: PoolFor) -> None:
    """The upstream refuses before reading the body: the answer comes back, the rest of the
    body is not sent, and the connection is not reused."""
    answered = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\n\r\nnope")
        await writer.drain()
        answered.set()
        await reader.read()

    sent: list[bytes] = []

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        sent.append(b"first")
        await answered.wait()
        for _ in range(5):
            await loop_turns(3)  # a client's body arrives over the network, not all at once
            yield b"more"
            sent.append(b"more")

    server = await serve(script)
    pool = pool_for(server.port)
    response = await pool.request("POST", "/api/blobs/x", b"", body(), headers_timeout_s=5)
    assert (response.status, await response.read()) == (413, b"nope")
    assert not response.request_sent
    response.release()
    assert await get(pool, "/after") == (413, b"nope")  # a new connection: the same script
    assert server.connections == 2
    assert len(sent) < 3


async def test_an_upload_the_upstream_never_reads_fails_at_the_idle_timeout(
    serve: Serve, pool_for: PoolFor
) -> None:
    """Socket buffers full and nothing read for the idle limit: UploadStalled."""

    async def deaf(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.get_running_loop().create_future()  # never reads again

    async def endless() -> AsyncIterator[bytes]:
        block = b"x" * (1024 * 1024)
        for _ in range(512):
            yield block

    pool = pool_for((await serve(deaf)).port)
    with pytest.raises(UploadStalled, match=r"read none of the request body for 0\.3 s"):
        await pool.request(
            "POST", "/api/blobs/x", b"", endless(), headers_timeout_s=5, idle_timeout_s=0.3
        )


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n  folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    ],
    ids=["obs-fold", "bare-LF"],
)
async def test_obsolete_header_syntax_is_a_framing_error(
    serve: Serve, pool_for: PoolFor, head: bytes
) -> None:
    """Obsolete line folding and bare LF are refused as broken framing, named as such."""
    pool = pool_for((await serve(sends(head))).port)
    with pytest.raises(UpstreamProtocolError, match="broke HTTP framing"):
        await pool.request("GET", "/", b"", None, headers_timeout_s=5)


async def test_the_upstreams_keep_alive_timeout_is_honoured(
    serve: Serve, pool_for: PoolFor
) -> None:
    """Keep-Alive: timeout=1 leaves no time to reuse safely: a new connection each time."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await read_head(reader)
            writer.write(b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=1\r\nContent-Length: 2\r\n\r\nok")

    server = await serve(script)
    pool = pool_for(server.port)
    assert await get(pool) == (200, b"ok")
    assert await get(pool) == (200, b"ok")
    assert server.connections == 2
