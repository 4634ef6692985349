"""The edges of the gateway, tried as a careless client and as an attacker would: clients
that leave mid-write, malformed requests, slow clients and too many connections."""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
import pytest
import structlog

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, GatewayFactory, RunningGateway, gate_until, metric

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


async def answer_to(url: str, request: bytes) -> bytes:
    """Send raw bytes, read everything the gateway answers until it closes (bounded)."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            return await reader.read()
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)}
    return int(lines[0].split()[1]), headers, body


async def test_clients_that_leave_during_the_last_write_are_cancellations(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """Streams whose clients read one line and close end as 'cancelled', never as a gateway
    failure with a traceback (the final write often meets the closing connection)."""
    gw = await gateway_factory()
    fake.config.tokens = 3
    with structlog.testing.capture_logs() as events:
        async with aiohttp.ClientSession() as http:
            for _ in range(150):
                response = await http.post(gw.url + "/api/chat", json=CHAT)
                await response.content.readline()
                response.close()
        await gate_until(gw, lambda: gw.gateway.drain.inflight == 0, within_s=10)
    assert not [e for e in events if e["event"] == "request_failed"]
    text = await gw.metrics_text()
    assert metric(text, "ollama_errors_total", error_type="InternalError") == 0
    finished = metric(text, "ollama_requests_total", endpoint="/api/chat")
    cancelled = metric(text, "ollama_requests_total", endpoint="/api/chat", status="cancelled")
    success = metric(text, "ollama_requests_total", endpoint="/api/chat", status="success")
    assert finished == cancelled + success == 150


MALFORMED = {
    "a key with a control byte": b"GET /api/tags HTTP/1.1\r\nHost: x\r\n"
    b"Authorization: Bearer sk-REAL-secret\x01\r\n\r\n",
    "an oversized key": b"GET /api/tags HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-REAL-secret"
    + b"S" * 9000
    + b"\r\n\r\n",
    "an overlong URL": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "a bad Content-Length": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    "Content-Length with Transfer-Encoding": b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
    b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "broken chunking": b"POST /api/chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
    b"\r\nzz\r\n",
    "an HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "a NUL in a header": b"GET /api/tags HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n",
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
async def test_a_request_the_parser_refuses_is_a_json_400_and_one_clean_log_line(
    gateway: RunningGateway, raw: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    """JSON with an X-Request-ID, one request_refused line, no traceback, no key bytes."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        status, headers, body = split_response(await answer_to(gateway.url, raw))
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    assert headers["x-request-id"]
    assert "malformed HTTP/1.1 request" in json.loads(body)["error"]["message"]
    refused = [e for e in events if e["event"] == "request_refused"]
    assert len(refused) == 1
    assert refused[0]["request_id"] == headers["x-request-id"]
    logged = caplog.text + repr(events)
    assert "Traceback" not in logged
    assert "sk-REAL" not in logged
    assert "sk-REAL" not in await gateway.metrics_text()
    assert metric(await gateway.metrics_text(), "ollama_rejected_total", reason="invalid") == 1


async def test_a_slow_head_gets_408_and_is_closed(gateway_factory: GatewayFactory) -> None:
    """Twenty clients sending a head a byte at a time are all closed at the head timeout,
    and the gateway answers others meanwhile."""
    gw = await gateway_factory(server={"header_timeout_s": 0.5})
    host, port = host_port(gw.url)

    async def dribble() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            for byte in b"GET /api/tags HTTP/1.1\r\nHost: x\r\n":
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
                try:
                    return await asyncio.wait_for(reader.read(), 0.1)  # closed on us?
                except TimeoutError:
                    continue
            return b""
        finally:
            writer.close()

    loop = asyncio.get_running_loop()
    started = loop.time()
    clients = [asyncio.create_task(dribble()) for _ in range(20)]
    async with aiohttp.ClientSession() as http, http.get(gw.url + "/health") as health:
        assert health.status == 200
    answers = await asyncio.gather(*clients)
    assert loop.time() - started < 3
    for answer in answers:
        status, _, body = split_response(answer)
        assert status == 408
        assert "did not arrive within 0.5 s" in json.loads(body)["error"]["message"]
    text = await gw.metrics_text()
    assert metric(text, "ollama_rejected_total", reason="slow_client") == 20


async def test_a_stalled_body_gets_408(gateway_factory: GatewayFactory, fake: FakeOllama) -> None:
    """Ten bytes of a hundred, then nothing: 408 in the route's dialect at the body timeout."""
    gw = await gateway_factory(server={"body_timeout_s": 0.3})
    request = (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n" + b'{"model": '
    )
    reader, writer = await asyncio.open_connection(*host_port(gw.url))
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            head = await reader.readuntil(b"\r\n\r\n")
            status, headers, _ = split_response(head)
            body = await reader.readexactly(int(headers["content-length"]))
            assert await reader.read() == b""  # then closed (after a short linger)
    finally:
        writer.close()
    assert status == 408
    assert "nothing of it arrived for 0.3 s" in json.loads(body)["error"]
    assert fake.seen == []


async def test_connections_beyond_the_bound_get_503_and_are_closed(
    gateway_factory: GatewayFactory,
) -> None:
    """Three idle connections allowed: the fourth is answered 503 at once and closed."""
    gw = await gateway_factory(server={"max_connections": 3})
    host, port = host_port(gw.url)
    held = [await asyncio.open_connection(host, port) for _ in range(3)]
    try:
        reader, writer = await asyncio.open_connection(host, port)
        async with asyncio.timeout(5):
            status, headers, body = split_response(await reader.read())
        writer.close()
        assert status == 503
        assert headers["retry-after"] == "1"
        assert json.loads(body)["error"]["code"] == "too_many_connections"
    finally:
        for _, held_writer in held:
            held_writer.close()
    rejected = gw.gateway.metrics.rejected  # read in-process: no connection needed
    assert rejected.get({"reason": "too_many_connections"}) == 1
