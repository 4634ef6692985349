"""Admission control and access through the running gateway: buckets, the gate, keys."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, FakeClock, GatewayFactory, RunningGateway, gate_until, metric

pytestmark = pytest.mark.timeout(30)

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
QUICK = {**CHAT, "stream": False}


@pytest.fixture(params=["in-process", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """The buckets' store: this process, or a real Redis shared by replicas. The same
    behavioural tests run against both; with Redis, the test must have decided there."""
    if request.param == "in-process":
        yield {}
        return
    server = request.getfixturevalue("redis_server")
    yield {"shared": {"redis_url": server.url}}
    assert server.scripts_run() > 0, "no decision was made in Redis"


async def _statuses(http: aiohttp.ClientSession, url: str, n: int, **kwargs: object) -> list[int]:
    statuses = []
    for _ in range(n):
        async with http.post(url, **kwargs) as response:  # type: ignore[arg-type]
            await response.read()
            statuses.append(response.status)
    return statuses


async def test_burst_admits_exactly_the_bucket_then_429_with_retry_after(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
) -> None:
    """At 6/min with burst 3, a burst of 5 gets 3 answers and 2 429s with Retry-After 10."""
    clock = FakeClock()
    gw = await gateway_factory(
        **store, clock=clock, limits={"client_requests_per_minute": 6, "client_burst": 3}
    )
    url = gw.url + "/api/chat"
    assert await _statuses(http, url, 5, json=QUICK) == [200, 200, 200, 429, 429]
    assert len(fake.seen) == 3
    async with http.post(url, json=QUICK) as response:
        assert response.status == 429
        assert response.headers["Retry-After"] == "10"
        assert response.headers["X-RateLimit-Remaining"] == "0"
        error = (await response.json())["error"]
        assert error == "rate limit exceeded (6 requests per minute per client); retry in 10 s"
    clock.advance(9.9)
    assert await _statuses(http, url, 1, json=QUICK) == [429]
    clock.advance(0.1)
    assert await _statuses(http, url, 2, json=QUICK) == [200, 429]


async def test_global_bucket_limits_all_clients_together(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, store: dict[str, Any]
) -> None:
    """The global MAX_REQUESTS_PER_MINUTE bucket binds even when each client is under its own."""
    clock = FakeClock()
    gw = await gateway_factory(
        **store,
        clock=clock,
        limits={"requests_per_minute": 60, "burst": 2},
        auth={
            "api_keys": [{"name": "a", "key": "key-aaaaaaaa"}, {"name": "b", "key": "key-bbbbbbbb"}]
        },
    )
    url = gw.url + "/v1/chat/completions"
    a = {"Authorization": "Bearer key-aaaaaaaa"}
    b = {"Authorization": "Bearer key-bbbbbbbb"}
    assert await _statuses(http, url, 1, json=CHAT, headers=a) == [200]
    assert await _statuses(http, url, 1, json=CHAT, headers=b) == [200]
    async with http.post(url, json=CHAT, headers=b) as response:
        assert response.status == 429
        body = await response.json()
    assert body["error"]["type"] == "rate_limit_error"
    assert "(60 requests per minute for all clients)" in body["error"]["message"]


async def test_streaming_responses_carry_the_limit_state(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, store: dict[str, Any]
) -> None:
    """Admitted streams get X-RateLimit-Limit/Remaining/Reset before the first chunk."""
    gw = await gateway_factory(
        **store, limits={"client_requests_per_minute": 30, "client_burst": 5}
    )
    async with http.post(gw.url + "/api/chat", json=CHAT) as response:
        assert response.headers["X-RateLimit-Limit"] == "30"
        assert response.headers["X-RateLimit-Remaining"] == "4"
        assert int(response.headers["X-RateLimit-Reset"]) >= 1
        await response.read()


async def test_per_key_limits_override_the_default(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, store: dict[str, Any]
) -> None:
    """A key with its own requests_per_minute and burst is limited by those."""
    keys = [
        {"name": "tight", "key": "key-tight-1", "requests_per_minute": 1, "burst": 1},
        {"name": "loose", "key": "key-loose-1"},
    ]
    gw = await gateway_factory(**store, clock=FakeClock(), auth={"api_keys": keys})
    url = gw.url + "/api/chat"
    tight = {"X-API-Key": "key-tight-1"}
    loose = {"X-API-Key": "key-loose-1"}
    assert await _statuses(http, url, 2, json=QUICK, headers=tight) == [200, 429]
    assert await _statuses(http, url, 3, json=QUICK, headers=loose) == [200, 200, 200]


async def test_forwarded_for_is_trusted_only_from_configured_proxies(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """Behind a trusted proxy each X-Forwarded-For client has its own bucket; otherwise not."""
    limits = {"client_requests_per_minute": 1, "client_burst": 1}
    trusted = await gateway_factory(
        clock=FakeClock(), limits=limits, server={"trusted_proxies": ["127.0.0.0/8"]}
    )
    for client in ("203.0.113.1", "203.0.113.2"):
        headers = {"X-Forwarded-For": client}
        got = await _statuses(http, trusted.url + "/api/chat", 1, json=QUICK, headers=headers)
        assert got == [200]
    untrusted = await gateway_factory(clock=FakeClock(), limits=limits)
    statuses = [
        (
            await _statuses(
                http, untrusted.url + "/api/chat", 1, json=QUICK, headers={"X-Forwarded-For": c}
            )
        )[0]
        for c in ("203.0.113.1", "203.0.113.2")
    ]
    assert statuses == [200, 429]


async def test_metadata_and_health_routes_are_not_rate_limited(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """With the inference bucket empty, model listing, health and metrics still answer."""
    gw = await gateway_factory(
        clock=FakeClock(), limits={"client_requests_per_minute": 1, "client_burst": 1}
    )
    assert await _statuses(http, gw.url + "/api/chat", 2, json=QUICK) == [200, 429]
    for path in ("/api/tags", "/v1/models", "/api/version", "/health", "/metrics"):
        for _ in range(3):
            async with http.get(gw.url + path) as response:
                assert response.status == 200, path


async def test_token_bucket_reserves_then_settles_real_counts(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
) -> None:
    """With a tokens-per-minute bucket, real usage is charged; an overdrawn client gets 429."""
    clock = FakeClock()
    gw = await gateway_factory(**store, clock=clock, limits={"client_tokens_per_minute": 100})
    fake.config.tokens = 60
    body = {**QUICK, "options": {"num_predict": 60}}
    async with http.post(gw.url + "/api/chat", json=body) as response:
        assert response.status == 200
        answer = await response.json()
    used = answer["prompt_eval_count"] + answer["eval_count"]
    assert used > 60
    async with http.post(gw.url + "/api/chat", json=body) as response:
        assert response.status == 429
        assert "token rate limit" in (await response.json())["error"]
        wait = int(response.headers["Retry-After"])
    clock.advance(wait)
    async with http.post(gw.url + "/api/chat", json=body) as response:
        assert response.status == 200


async def test_aborted_stream_keeps_its_token_reservation(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    store: dict[str, Any],
) -> None:
    """A stream aborted before its statistics is not refunded: aborting cannot evade the limit."""
    gw = await gateway_factory(
        **store, clock=FakeClock(), limits={"client_tokens_per_minute": 1000}
    )
    fake.config.tokens = 1000
    fake.config.token_interval_s = 0.01
    response = await http.post(gw.url + "/api/chat", json=CHAT)  # reserves about 530
    await response.content.readline()
    seen = fake.seen[-1]
    response.close()
    await fake.wait_for(lambda: seen.disconnected)
    await gate_until(gw, lambda: gw.gateway.gate.active == 0)
    async with http.post(gw.url + "/api/chat", json=QUICK) as refused:
        assert refused.status == 429


async def test_queue_full_is_503_with_retry_after(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """One slot and a queue of two: the fourth concurrent request is refused at once."""
    gw = await gateway_factory(limits={"parallel": 1, "max_queue": 2, "max_queue_per_client": 2})
    hang = {"X-Fake-Mode": "hang"}
    holders = [
        asyncio.create_task(http.post(gw.url + "/api/chat", json=CHAT, headers=hang))
        for _ in range(3)
    ]
    await gate_until(gw, lambda: gw.gateway.gate.active == 1 and gw.gateway.gate.queued == 2)
    async with http.post(gw.url + "/v1/chat/completions", json=CHAT) as response:
        assert response.status == 503
        assert int(response.headers["Retry-After"]) >= 1
        assert (await response.json())["error"]["code"] == "queue_full"
    for task in holders:
        task.cancel()
    await gate_until(gw, lambda: gw.gateway.gate.active == 0 and gw.gateway.gate.queued == 0)
    assert len(fake.seen) == 1  # the queued ones never reached Ollama


async def test_queue_timeout_is_503_and_frees_the_place(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """A request that waits longer than queue_timeout gets 503 queue_timeout in its dialect."""
    gw = await gateway_factory(limits={"queue_timeout_s": 0.2})
    holder = asyncio.create_task(
        http.post(gw.url + "/api/chat", json=CHAT, headers={"X-Fake-Mode": "hang"})
    )
    await gate_until(gw, lambda: gw.gateway.gate.active == 1)
    async with http.post(gw.url + "/api/generate", json={"model": MODEL, "prompt": "x"}) as resp:
        assert resp.status == 503
        assert "no slot became free" in (await resp.json())["error"]
        assert "Retry-After" in resp.headers
    assert gw.gateway.gate.queued == 0
    holder.cancel()


async def test_queued_client_disconnect_leaves_the_queue_and_never_reaches_ollama(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A client that gives up while queued is gone from the queue at once."""
    gw = await gateway_factory()
    fake.config.tokens = 1000
    fake.config.token_interval_s = 0.01
    first = await http.post(gw.url + "/api/chat", json=CHAT)
    await first.content.readline()
    queued = asyncio.create_task(http.post(gw.url + "/api/chat", json=CHAT))
    await gate_until(gw, lambda: gw.gateway.gate.queued == 1)
    queued.cancel()
    await gate_until(gw, lambda: gw.gateway.gate.queued == 0, within_s=0.5)
    first.close()
    await gate_until(gw, lambda: gw.gateway.gate.active == 0)
    assert len(fake.seen) == 1
    text = await gw.metrics_text()
    assert 'ollama_client_disconnects_total{phase="queued"} 1' in text


async def test_one_client_cannot_fill_the_queue(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """Past its per-client cap a client is refused while another client still gets a place."""
    keys = [{"name": "greedy", "key": "key-greedy"}, {"name": "polite", "key": "key-polite"}]
    gw = await gateway_factory(
        limits={"max_queue": 4, "max_queue_per_client": 2}, auth={"api_keys": keys}
    )
    greedy = {"Authorization": "Bearer key-greedy", "X-Fake-Mode": "hang"}
    polite = {"Authorization": "Bearer key-polite", "X-Fake-Mode": "hang"}
    tasks = [
        asyncio.create_task(http.post(gw.url + "/api/chat", json=CHAT, headers=greedy))
        for _ in range(3)
    ]
    await gate_until(gw, lambda: gw.gateway.gate.queued == 2)
    async with http.post(gw.url + "/api/chat", json=CHAT, headers=greedy) as response:
        assert response.status == 503
    tasks.append(asyncio.create_task(http.post(gw.url + "/api/chat", json=CHAT, headers=polite)))
    await gate_until(gw, lambda: gw.gateway.gate.queued == 3)
    for task in tasks:
        task.cancel()
    await gate_until(gw, lambda: gw.gateway.gate.queued == 0 and gw.gateway.gate.active == 0)


async def test_admin_routes_are_closed_without_an_admin_key(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """With no admin key configured, model management is refused with how to enable it."""
    for method, path in (("POST", "/api/pull"), ("DELETE", "/api/delete"), ("POST", "/api/copy")):
        async with http.request(method, gateway.url + path, json={"model": MODEL}) as response:
            assert response.status == 403
            assert "PROXY_ADMIN_KEY" in (await response.json())["error"]
    assert fake.seen == []


async def test_admin_routes_need_the_admin_key(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A client key is not enough for model management; the admin key is, body and all."""
    gw = await gateway_factory(
        auth={"api_keys": [{"name": "c", "key": "client-key"}], "admin_key": "admin-key-1"}
    )
    url = gw.url + "/api/delete"
    async with http.delete(url, json={"model": MODEL}, headers={"X-API-Key": "client-key"}) as r:
        assert r.status == 403
    async with http.delete(url, json={"model": MODEL}) as response:
        assert response.status == 401
    async with http.delete(url, json={"model": MODEL}, headers={"X-API-Key": "admin-key-1"}) as r:
        assert r.status == 200
    assert fake.seen[-1].json == {"model": MODEL}


async def test_unauthorized_requests_are_refused_in_each_dialect(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """No key or a wrong key: 401, Ollama-shaped on /api, OpenAI-shaped on /v1 and /chat."""
    gw = await gateway_factory(auth={"api_keys": [{"name": "c", "key": "client-key"}]})
    async with http.post(gw.url + "/api/chat", json=CHAT) as response:
        assert response.status == 401
        assert "missing API key" in (await response.json())["error"]
    bad = {"Authorization": "Bearer nope-nope"}
    async with http.post(gw.url + "/v1/chat/completions", json=CHAT, headers=bad) as response:
        assert response.status == 401
        error = (await response.json())["error"]
    assert error["type"] == "authentication_error"
    assert "invalid API key" in error["message"]
    async with http.post(gw.url + "/chat", json={"prompt": "x"}) as response:
        assert response.status == 401
        assert (await response.json())["error"]["code"] == "invalid_api_key"
    async with http.get(gw.url + "/health") as response:
        assert response.status == 200
    assert fake.seen == []


async def test_model_allowlist_refuses_other_models_before_ollama(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Only allowlisted models pass; `llama3.2` matches `llama3.2:latest`."""
    gw = await gateway_factory(models={"allowlist": ["llama3.2:latest"]})
    async with http.post(gw.url + "/api/chat", json={**QUICK, "model": "llama3.2"}) as response:
        assert response.status == 200
    async with http.post(gw.url + "/api/chat", json={**QUICK, "model": "qwen2.5:0.5b"}) as r:
        assert r.status == 403
        assert "not allowed" in (await r.json())["error"]
    async with http.post(gw.url + "/chat", json={"prompt": "x", "model": "qwen2.5:0.5b"}) as r:
        assert r.status == 403
    assert len(fake.seen) == 1


async def test_large_num_ctx_is_clamped(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A num_ctx over MAX_CONTEXT_LENGTH is lowered to it, and the client is told so."""
    gw = await gateway_factory(limits={"max_context_length": 4096})
    body = {**QUICK, "options": {"num_ctx": 131072, "temperature": 0.1}}
    async with http.post(gw.url + "/api/chat", json=body) as response:
        assert response.status == 200
        assert response.headers["X-Context-Length-Clamped"] == "131072"
    sent = fake.seen[-1].json
    assert sent["options"] == {"num_ctx": 4096, "temperature": 0.1}


async def test_many_requests_with_aborts_failures_and_timeouts_leak_no_slot(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Hundreds of mixed requests later, nothing is active or queued, and the next is served."""
    gw = await gateway_factory(
        limits={"parallel": 2, "max_queue": 64, "max_queue_per_client": 64, "queue_timeout_s": 2},
        upstream={"idle_timeout_s": 0.2, "headers_timeout_s": 0.3},
    )
    fake.config.num_parallel = 2
    fake.config.tokens = 6
    fake.config.token_interval_s = 0.002
    modes = ["ok", "ok", "ok", "midstream_error", "drop", "stall", "hang", "error500", "busy"]

    async def one(i: int) -> None:
        mode = modes[i % len(modes)]
        body = CHAT if i % 2 else {"model": MODEL, "messages": CHAT["messages"], "stream": True}
        path = "/api/chat" if i % 3 else "/v1/chat/completions"
        try:
            async with http.post(
                gw.url + path, json=body, headers={"X-Fake-Mode": mode}
            ) as response:
                if i % 5 == 0:
                    await response.content.readline()  # abort after the first chunk
                    return
                await response.read()
        except aiohttp.ClientError:
            pass

    async def aborted(i: int) -> None:
        task = asyncio.create_task(one(i))
        await asyncio.sleep(0)  # let it start, then abort it at whatever point it reached
        for _ in range(i % 7):
            await asyncio.sleep(0)
        task.cancel()

    await asyncio.gather(
        *(aborted(i) if i % 4 == 0 else one(i) for i in range(300)), return_exceptions=True
    )
    gate = gw.gateway.gate
    await gate_until(gw, lambda: gate.active == 0 and gate.queued == 0, within_s=10)
    fake.config.token_interval_s = 0.0
    async with http.post(gw.url + "/api/chat", json=QUICK, timeout=aiohttp.ClientTimeout(2)) as r:
        assert r.status == 200
        body = await r.json()
    assert body["done"] is True
    text = await gw.metrics_text()
    assert metric(text, "ollama_active_requests", backend="default") == 0
    assert "ollama_queued_requests 0" in text
    assert json.dumps(body)


# --- issue 14: honest at the edges ------------------------------------------------------


async def raw_request(url: str, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as bytes (what no well-behaved client library would send) and read
    the answer: status, headers, body."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
        length = int(headers.get("Content-Length", "0"))
        return status, headers, await reader.readexactly(length)
    finally:
        writer.close()


@pytest.mark.parametrize("with_keys", [False, True])
@pytest.mark.parametrize("field", [b"Authorization: Bearer \xff\xfe", b"X-API-Key: k\xffey"])
async def test_a_non_ascii_credential_is_a_401_in_the_dialect(
    gateway_factory: GatewayFactory, with_keys: bool, field: bytes
) -> None:
    """A key byte no configured key can hold is a bad credential, keys configured or not."""
    keys = {"auth": {"api_keys": [{"name": "app", "key": "app-key-123"}]}} if with_keys else {}
    gw = await gateway_factory(**keys)
    body = json.dumps(QUICK).encode()
    request = (
        b"POST /api/chat HTTP/1.1\r\nHost: x\r\n" + field + b"\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    status, headers, answer = await raw_request(gw.url, request)
    assert status == 401
    assert "X-Request-ID" in headers
    assert "malformed API key" in json.loads(answer)["error"]


async def test_raising_the_global_limit_raises_it_for_one_client_too(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession, store: dict[str, Any]
) -> None:
    """Only MAX_REQUESTS_PER_MINUTE and its burst set: one client may use all of them."""
    gw = await gateway_factory(
        **store,
        clock=FakeClock(),
        limits={
            "requests_per_minute": 600,
            "burst": 25,
            "client_requests_per_minute": 0,
            "client_burst": 0,
        },
    )
    statuses = await _statuses(http, gw.url + "/api/chat", 26, json=QUICK)
    assert statuses == [200] * 25 + [429]
    async with http.post(gw.url + "/api/chat", json=QUICK) as response:
        assert response.headers["X-RateLimit-Limit"] == "600"


@pytest.mark.parametrize(
    ("reason", "limits"),
    [("queue_full", {"max_queue": 0}), ("queue_timeout", {"queue_timeout_s": 0.2})],
)
async def test_a_request_the_gate_refuses_gets_its_tokens_back(
    gateway_factory: GatewayFactory,
    fake: FakeOllama,
    http: aiohttp.ClientSession,
    reason: str,
    limits: dict[str, float],
) -> None:
    """Refused by the gate (queue full, queue timeout): no work done, no tokens charged."""
    gw = await gateway_factory(
        clock=FakeClock(), limits={"client_tokens_per_minute": 2000, "parallel": 1, **limits}
    )
    holder = asyncio.create_task(
        http.post(gw.url + "/api/chat", json=QUICK, headers={"X-Fake-Mode": "hang"})
    )  # reserves about 530 of 2000
    await gate_until(gw, lambda: gw.gateway.gate.active == 1)
    async with http.post(gw.url + "/api/chat", json=QUICK) as refused:  # reserves 530 more
        assert refused.status == 503
        assert (await refused.json())["error"].startswith(
            "the gateway's wait queue is full" if reason == "queue_full" else "no slot became"
        )
    holder.cancel()
    await gate_until(gw, lambda: gw.gateway.gate.active == 0)
    # 2000 - 530 (the aborted holder keeps its reservation) leaves about 1470: a request
    # estimated at 1400 passes only if the refused one's 530 came back.
    big = {**QUICK, "options": {"num_predict": 1380}}
    async with http.post(gw.url + "/api/chat", json=big) as response:
        assert response.status == 200


async def test_a_negative_num_ctx_is_refused(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """options.num_ctx must be positive: 400 naming it, never forwarded."""
    body = {**QUICK, "options": {"num_ctx": -1}}
    async with http.post(gateway.url + "/api/chat", json=body) as response:
        assert response.status == 400
        assert "num_ctx" in (await response.json())["error"]
    assert fake.seen == []
