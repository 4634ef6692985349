"""Streaming relay, cancellation, headers and every error path, over real sockets."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import time

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, GatewayFactory, RunningGateway, gate_until, metric

pytestmark = pytest.mark.timeout(20)

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
V1_CHAT = {**CHAT, "stream": True}


async def test_first_chunk_reaches_the_client_before_the_upstream_sends_the_last(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """The relay does not buffer: the first line arrives while the fake is still generating."""
    fake.config.tokens = 20
    fake.config.token_interval_s = 0.05
    async with http.post(gateway.url + "/api/chat", json=CHAT) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        first = await response.content.readline()
        seen = fake.seen[-1]
        assert json.loads(first)["done"] is False
        assert seen.finished is None
        assert seen.chunks_sent < 20
        rest = (await response.read()).splitlines()
    assert json.loads(rest[-1])["done"] is True


async def test_client_disconnect_closes_the_upstream_at_once(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A client that goes away mid-stream makes the fake see its connection closed within 0.5 s."""
    fake.config.tokens = 1000
    fake.config.token_interval_s = 0.02
    response = await http.post(gateway.url + "/api/generate", json={"model": MODEL, "prompt": "x"})
    await response.content.readline()
    seen = fake.seen[-1]
    response.close()
    left_at = time.monotonic()
    await fake.wait_for(lambda: seen.disconnected, timeout=0.5)
    assert time.monotonic() - left_at < 0.5
    assert seen.chunks_sent < 1000


async def test_a_client_that_stops_reading_is_dropped_and_frees_its_slot(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """Once sent data sits unread for server.send_timeout_s, the connection is dropped (a
    vanished client would hold the one slot for about 15 minutes of TCP retries)."""
    gw = await gateway_factory(server={"send_timeout_s": 0.5})
    fake.config.tokens = 10_000_000  # never finishes: the buffers fill first
    body = json.dumps({**V1_CHAT, "model": MODEL}).encode()
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    loop = asyncio.get_running_loop()
    with socket.socket() as client:  # reads nothing, into a small window
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        client.setblocking(False)
        await loop.sock_connect(client, (gw.server.host, gw.server.port))
        await loop.sock_sendall(client, request)
        await fake.wait_for(lambda: len(fake.seen) == 1 and fake.seen[0].chunks_sent > 0)
        await gate_until(gw, lambda: gw.gateway.gate.active == 0, within_s=15)
        await fake.wait_for(lambda: fake.seen[0].disconnected, timeout=1)
    assert fake.seen[0].chunks_sent < fake.config.tokens


async def test_disconnect_while_waiting_for_headers_closes_the_upstream(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A client that gives up before the first byte (cold load) also frees the upstream."""
    request = asyncio.create_task(
        http.post(gateway.url + "/api/chat", json=CHAT, headers={"X-Fake-Mode": "hang"})
    )
    await fake.wait_for(lambda: len(fake.seen) == 1)
    request.cancel()
    await fake.wait_for(lambda: fake.seen[0].disconnected, timeout=0.5)


async def test_host_is_rewritten_and_hop_by_hop_fields_are_dropped(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Ollama's Host check passes for any client Host; hop-by-hop and client keys stay behind."""
    headers = {
        "Host": "gateway.example.com",
        "Connection": "keep-alive, X-Private",
        "X-Private": "1",
        "Proxy-Authorization": "Basic eA==",
        "Origin": "https://evil.example",
        "X-Custom": "kept",
    }
    async with http.get(gateway.url + "/api/tags", headers=headers) as response:
        assert response.status == 200
    seen = fake.seen[-1].headers
    assert seen["Host"].startswith("127.0.0.1:")
    assert "X-Private" not in seen
    assert "Proxy-Authorization" not in seen
    assert "Origin" not in seen
    assert seen["X-Custom"] == "kept"


async def test_request_id_is_generated_or_propagated_on_every_response(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Every response carries X-Request-ID: the client's if sent, else a new one, also upstream."""
    async with http.post(gateway.url + "/api/chat", json=CHAT) as response:
        generated = response.headers["X-Request-ID"]
        await response.read()
    assert len(generated) == 32
    assert fake.seen[-1].headers["X-Request-ID"] == generated
    async with http.get(
        gateway.url + "/v1/nowhere", headers={"X-Request-ID": "abc-123"}
    ) as response:
        assert response.status == 404
        assert response.headers["X-Request-ID"] == "abc-123"


async def test_unknown_routes_answer_404_in_the_prefix_dialect(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """/api/* gets Ollama's error string, everything else OpenAI's error object."""
    async with http.get(gateway.url + "/api/nope") as response:
        assert response.status == 404
        assert await response.json() == {"error": "no such route"}
    async with http.post(gateway.url + "/v1/nope") as response:
        assert response.status == 404
        assert (await response.json())["error"]["type"] == "not_found_error"
    async with http.get(gateway.url + "/api/chat") as response:
        assert response.status == 405
        assert "method not allowed" in (await response.json())["error"]
    async with http.get(gateway.url + "/v1/chat/completions") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "POST"  # RFC 9110: a 405 lists what is allowed
        assert (await response.json())["error"]["code"] == "method_not_allowed"


async def test_upstream_down_is_502_in_each_dialect_after_retries(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """An upstream that was up and now refuses connections is retried, then answered 502 in
    the route's dialect; once that is known, the next request fails at once, unretried."""
    gw = await gateway_factory()  # the start-up probe finds the fake up
    await fake.close()
    async with http.post(gw.url + "/api/chat", json=CHAT) as response:
        assert response.status == 502
        assert "cannot connect" in (await response.json())["error"]
    assert metric(await gw.metrics_text(), "ollama_upstream_retries_total") == 2
    async with http.post(gw.url + "/v1/chat/completions", json=V1_CHAT) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "upstream_unavailable"
    assert metric(await gw.metrics_text(), "ollama_upstream_retries_total") == 2  # no more


async def test_an_upstream_the_probe_found_down_fails_fast(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """Known down since the start-up probe: one try and a 502, without the backoff."""
    closed = aiohttp.test_utils.unused_port()  # nothing listens there
    gw = await gateway_factory(
        upstream_url=f"http://127.0.0.1:{closed}",
        upstream={"retry_delay_s": 5.0, "retry_max_delay_s": 5.0},
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with http.post(gw.url + "/api/chat", json=CHAT) as response:
        assert response.status == 502
    assert loop.time() - started < 2.5  # one backoff would be at least 2.5 s
    assert metric(await gw.metrics_text(), "ollama_upstream_retries_total") == 0


async def test_busy_upstream_is_retried_until_it_accepts(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Ollama's 503 "server busy" before any byte is retried with backoff."""
    gw = await gateway_factory(upstream={"max_retries": 5, "retry_delay_s": 0.05})
    fake.config.mode = "busy"
    request = asyncio.create_task(http.post(gw.url + "/api/chat", json=CHAT))
    await fake.wait_for(lambda: len(fake.seen) >= 2)
    fake.config.mode = "ok"
    response = await request
    assert response.status == 200
    assert json.loads((await response.read()).splitlines()[-1])["done"] is True
    assert len(fake.seen) >= 3


async def test_busy_upstream_after_last_retry_passes_503_through(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """When retries run out, Ollama's own 503 answer reaches the client unchanged."""
    headers = {"X-Fake-Mode": "busy"}
    async with http.post(gateway.url + "/api/chat", json=CHAT, headers=headers) as response:
        assert response.status == 503
        body = await response.json()
    assert body == {"error": "server busy, please try again.  maximum pending requests exceeded"}
    assert len(fake.seen) == 3  # first try and two retries


async def test_upstream_errors_pass_through_unchanged(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """A 500 from Ollama keeps its status and body; it is not retried."""
    headers = {"X-Fake-Mode": "error500"}
    async with http.post(gateway.url + "/api/generate", json=CHAT, headers=headers) as response:
        assert response.status == 500
        assert "runner has unexpectedly stopped" in (await response.json())["error"]


async def test_header_timeout_is_504(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """No response headers within the configured time: 504, and the upstream is let go."""
    gw = await gateway_factory(upstream={"headers_timeout_s": 0.3})
    headers = {"X-Fake-Mode": "hang"}
    async with http.post(
        gw.url + "/v1/chat/completions", json=V1_CHAT, headers=headers
    ) as response:
        assert response.status == 504
        assert (await response.json())["error"]["code"] == "upstream_timeout"
    await fake.wait_for(lambda: fake.seen[-1].disconnected, timeout=1)


async def test_idle_stream_ends_with_an_error_frame_in_each_dialect(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """A stream that stalls past the idle timeout ends with an error frame, never done/[DONE]."""
    gw = await gateway_factory(upstream={"idle_timeout_s": 0.3})
    headers = {"X-Fake-Mode": "stall"}
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=headers) as response:
        lines = (await response.read()).splitlines()
    assert response.status == 200
    assert "sent nothing for 0.3 s" in json.loads(lines[-1])["error"]
    assert all(not json.loads(line).get("done") for line in lines)
    async with http.post(
        gw.url + "/v1/chat/completions", json=V1_CHAT, headers=headers
    ) as response:
        body = await response.read()
    frames = [f for f in body.split(b"\n\n") if f]
    assert json.loads(frames[-1][6:])["error"]["code"] == "stream_interrupted"
    assert b"[DONE]" not in body


async def test_total_timeout_cuts_a_long_stream(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """With a total timeout, a response still streaming past it ends with an error line."""
    gw = await gateway_factory(upstream={"total_timeout_s": 0.3})
    fake.config.tokens = 100
    fake.config.token_interval_s = 0.02
    async with http.post(gw.url + "/api/chat", json=CHAT) as response:
        lines = (await response.read()).splitlines()
    assert "total timeout" in json.loads(lines[-1])["error"]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "missing request body"),
        (b"[1, 2]", "must be a JSON object"),
        (json.dumps({"model": 3}).encode(), "field 'model' must be a string"),
        (json.dumps({"model": MODEL, "stream": "yes"}).encode(), "field 'stream'"),
        (json.dumps({"model": MODEL, "options": {"num_ctx": "big"}}).encode(), "options.num_ctx"),
    ],
)
async def test_malformed_bodies_are_400_naming_the_field(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession, body: bytes, needle: str
) -> None:
    """The gateway reads the model and stream fields; bad ones are refused before Ollama."""
    async with http.post(gateway.url + "/api/chat", data=body) as response:
        assert response.status == 400
        assert needle in (await response.json())["error"]
    async with http.post(gateway.url + "/v1/chat/completions", data=body) as response:
        assert response.status == 400
        assert needle in (await response.json())["error"]["message"]
    assert fake.seen == []


async def test_oversized_body_is_413(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A body over max_body_bytes is refused with 413, with or without Content-Length."""
    gw = await gateway_factory(server={"max_body_bytes": 2048})
    big = json.dumps({"model": MODEL, "prompt": "x" * 4096}).encode()
    async with http.post(gw.url + "/api/generate", data=big) as response:
        assert response.status == 413

    async def chunks():  # type: ignore[no-untyped-def]
        yield big[:1000]
        yield big[1000:]

    async with http.post(gw.url + "/v1/completions", data=chunks()) as response:
        assert response.status == 413
        assert (await response.json())["error"]["code"] == "request_too_large"
    assert fake.seen == []


async def test_root_and_version_answer_like_ollama(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """GET and HEAD / answer "Ollama is running"; /api/version answers the version."""
    async with http.get(gateway.url + "/") as response:
        assert await response.text() == "Ollama is running"
    async with http.head(gateway.url + "/") as response:
        assert response.status == 200
    async with http.get(gateway.url + "/api/version") as response:
        assert "version" in await response.json()


async def test_head_only_where_ollama_answers_it(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """HEAD /api/ps, which Ollama does not serve, is the gateway's 405 with Allow, not relayed."""
    async with http.head(gateway.url + "/api/tags") as response:
        assert response.status == 200
    async with http.head(gateway.url + "/api/ps") as response:
        assert response.status == 405
        assert response.headers["Allow"] == "GET"
    assert [seen.path for seen in fake.seen] == ["/api/tags"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_streams_ndjson_lines(gateway: RunningGateway) -> None:
    """curl -N sees the NDJSON stream line by line with the request id header."""
    process = await asyncio.create_subprocess_exec(
        "curl", "-sS", "-N", "-i", "-d", json.dumps(CHAT), gateway.url + "/api/chat",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 10)
    head, _, body = out.partition(b"\r\n\r\n")
    assert b"x-request-id:" in head.lower()
    lines = body.splitlines()
    assert json.loads(lines[-1])["done"] is True
    assert len(lines) > 2


async def test_a_post_the_upstream_read_and_dropped_is_not_run_twice(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """An upstream that reads a POST on a reused connection and closes without a byte (an
    Ollama killed while loading the model) sees it once; the client gets Ollama's 502."""
    seen: list[bytes] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tags = b'{"models":[{"name":"llama3.2:latest"}]}'
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                seen.append(head.split(b"\r\n", 1)[0])
                if head.startswith(b"POST"):
                    length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    await reader.readexactly(length)
                    return  # read, never answered: the connection closes
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(tags), tags))  # fmt: skip
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(upstream, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        gw = await gateway_factory(f"http://127.0.0.1:{port}")
        async with http.get(gw.url + "/api/tags") as warm:  # leaves a keep-alive connection
            assert warm.status == 200
        seen.clear()
        async with http.post(gw.url + "/api/chat", json=CHAT) as response:
            assert response.status == 502
            body = await response.json()
        assert "closed the connection before answering" in body["error"]
        assert seen == [b"POST /api/chat HTTP/1.1"]
        text = await gw.metrics_text()
        assert metric(text, "ollama_upstream_retries_total") == 0
    finally:
        server.close()
