"""Bad input of every kind, sent as bytes to the running gateway: each class gets its
documented 4xx, the gateway stays healthy, and no log line or metric shows a traceback or
a key."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import structlog

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, GatewayFactory, RunningGateway

pytestmark = pytest.mark.timeout(60)

CLIENT_KEY = "sk-table-client-0123456789"
ADMIN_KEY = "sk-table-admin-0123456789"
AUTH = f"Authorization: Bearer {CLIENT_KEY}\r\n".encode()
ADMIN = f"Authorization: Bearer {ADMIN_KEY}\r\n".encode()


def post(path: str, body: bytes, *, auth: bytes = AUTH, extra: bytes = b"") -> bytes:
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\n%s%sContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path.encode(), auth, extra, len(body), body)
    )


def get(path: bytes, *, auth: bytes = AUTH, extra: bytes = b"") -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: x\r\n%s%s\r\n" % (path, auth, extra)


def chat(**fields: object) -> bytes:
    return json.dumps({"model": MODEL, "messages": [], **fields}).encode()


NESTED = b'{"model": "m", "messages": ' + b"[" * 5_000 + b"]" * 5_000 + b"}"  # past orjson's 1024
MANY_HEADERS = b"".join(b"X-%d: 1\r\n" % i for i in range(200))
WRONG_KEY = b"Authorization: Bearer sk-wrong-key-1\r\n"
ODD_KEY = b"X-API-Key: sk-\xc3\xa9t\xc3\xa9\r\n"

# name -> (request bytes, documented status)
CASES: dict[str, tuple[bytes, int]] = {
    "not JSON": (post("/api/chat", b"{nope"), 400),
    "a JSON array": (post("/api/chat", b"[1, 2]"), 400),
    "a JSON string": (post("/v1/chat/completions", b'"hi"'), 400),
    "an empty body": (post("/api/chat", b""), 400),
    "model not a string": (post("/api/chat", chat(model=7)), 400),
    "stream not a bool": (post("/api/chat", chat(stream="yes")), 400),
    "options not an object": (post("/api/generate", chat(options=[1])), 400),
    "num_ctx a string": (post("/api/chat", chat(options={"num_ctx": "big"})), 400),
    "num_ctx negative": (post("/api/chat", chat(options={"num_ctx": -5})), 400),
    "num_ctx zero": (post("/api/chat", chat(options={"num_ctx": 0})), 400),
    "num_predict a float": (post("/api/chat", chat(options={"num_predict": 1.5})), 400),
    "max_tokens a string": (post("/v1/chat/completions", chat(max_tokens="9")), 400),
    "stream_options not an object": (
        post("/v1/chat/completions", chat(stream=True, stream_options=3)),
        400,
    ),
    "a body over the limit": (post("/api/chat", b"{" + b" " * 70_000 + b"}"), 413),
    "deeply nested JSON": (post("/api/chat", NESTED), 400),
    "invalid UTF-8": (post("/api/chat", b'{"model": "\xff\xfe"}'), 400),
    "a NUL byte in the body": (post("/api/chat", b'{"model": "m"\x00}'), 400),
    "/chat without a prompt": (post("/chat", b'{"model": "m"}'), 400),
    "/chat prompt not a string": (post("/chat", b'{"prompt": ["x"]}'), 400),
    "a model outside the allowlist": (post("/api/chat", chat(model="forbidden:1b")), 403),
    "an overlong header": (get(b"/api/tags", extra=b"X-A: " + b"a" * 9000 + b"\r\n"), 400),
    "an overlong URL": (get(b"/api/" + b"a" * 9000), 400),
    "too many headers": (
        get(b"/api/tags", extra=b"".join(b"X-%d: 1\r\n" % i for i in range(200))),
        400,
    ),
    "a control byte in a header": (get(b"/api/tags", extra=b"X-A: a\x01b\r\n"), 400),
    "a bad Content-Length": (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\n" + AUTH + b"Content-Length: 1x\r\n\r\n",
        400,
    ),
    "Content-Length with Transfer-Encoding": (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
        + AUTH
        + b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "two different Content-Lengths": (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
        + AUTH
        + b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
        400,
    ),
    "bad chunking": (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\n"
        + AUTH
        + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
        400,
    ),
    "an HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "a traversal in a blob digest": (
        b"POST /api/blobs/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: x\r\n"
        + ADMIN
        + b"Content-Length: 0\r\n\r\n",
        400,
    ),
    "a digest that is not sha256": (
        b"HEAD /api/blobs/md5:abc HTTP/1.1\r\nHost: x\r\n" + ADMIN + b"\r\n",
        400,
    ),
    "no key": (post("/api/chat", chat(), auth=b""), 401),
    "a wrong key": (
        post("/api/chat", chat(), auth=b"Authorization: Bearer sk-wrong-key-1\r\n"),
        401,
    ),
    "a non-ASCII key": (
        post("/api/chat", chat(), auth=b"X-API-Key: sk-\xc3\xa9t\xc3\xa9\r\n"),
        401,
    ),
    "a management route without the admin key": (post("/api/pull", b'{"model": "m"}'), 403),
    "a wrong method": (get(b"/api/chat"), 405),
    "an unknown native route": (get(b"/api/nothing"), 404),
    "an unknown OpenAI route": (get(b"/v1/nothing"), 404),
}


async def send(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {
                k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:] if ": " in line)
            }
            length = int(headers.get("content-length", "0"))
            head_only = request.startswith(b"HEAD")
            body = b"" if head_only else await reader.readexactly(length)
        return int(lines[0].split()[1]), headers, body
    finally:
        writer.close()


@pytest.fixture
async def guarded(gateway_factory: GatewayFactory) -> RunningGateway:
    return await gateway_factory(
        server={"max_body_bytes": 65_536},
        auth={"api_keys": [{"name": "table", "key": CLIENT_KEY}], "admin_key": ADMIN_KEY},
        models={"allowlist": [MODEL]},
    )


@pytest.mark.parametrize(("request_bytes", "status"), CASES.values(), ids=CASES.keys())
async def test_bad_input_gets_its_documented_4xx_and_nothing_leaks(
    guarded: RunningGateway,
    fake: FakeOllama,
    request_bytes: bytes,
    status: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The documented status, a JSON body with an X-Request-ID (a HEAD answer has no body),
    nothing sent upstream, no traceback, no key in a log line or in /metrics, and the
    gateway still healthy."""
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as events:
        answer_status, headers, body = await send(guarded.url, request_bytes)
        healthy, _, _ = await send(guarded.url, get(b"/health"))
    assert answer_status == status
    assert headers.get("x-request-id")
    if body:
        assert headers["content-type"].startswith("application/json")
        assert "error" in json.loads(body)
    assert healthy == 200
    assert fake.seen == []
    logged = caplog.text + repr(events)
    assert "Traceback" not in logged
    assert not [e for e in events if e.get("event") == "request_failed"]
    for key in (CLIENT_KEY, ADMIN_KEY, "sk-wrong-key-1"):
        assert key not in logged
        assert key not in await guarded.metrics_text()


def test_the_table_covers_at_least_thirty_classes() -> None:
    """The issue asks for thirty kinds of bad input at least."""
    assert len(CASES) >= 30
