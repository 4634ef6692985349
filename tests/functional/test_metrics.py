"""Metrics tell the truth: counts and sums equal what the fake sent and the client saw."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from proxy.errors import ERROR_TYPES, REJECT_REASONS
from tests.conftest import MODEL, FakeClock, GatewayFactory, metric, parse_metrics

pytestmark = pytest.mark.timeout(30)

MESSAGES = [{"role": "user", "content": "why is the sky blue today"}]


async def test_scripted_run_matches_ground_truth(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Token counters, request counts by status and histogram counts equal ground truth."""
    clock = FakeClock()
    gw = await gateway_factory(
        clock=clock, limits={"client_requests_per_minute": 60, "client_burst": 11}
    )
    seen_by_client: Counter[tuple[str, str]] = Counter()

    async def send(path: str, body: dict[str, object], expect: str, **headers: str) -> None:
        async with http.post(gw.url + path, json=body, headers=headers) as response:
            await response.read()
        seen_by_client[(path, expect)] += 1

    # Successes: native streamed and not, OpenAI streamed (usage injected and stripped) and not.
    await send("/api/chat", {"model": MODEL, "messages": MESSAGES}, "success")
    await send("/api/chat", {"model": "llama3.2", "messages": MESSAGES, "stream": False}, "success")
    await send("/api/generate", {"model": MODEL, "prompt": "one two three"}, "success")
    await send(
        "/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "stream": True}, "success"
    )
    await send("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES}, "success")
    await send("/v1/completions", {"model": MODEL, "prompt": "a b c", "stream": True}, "success")
    await send("/chat", {"prompt": "hello there"}, "success")
    # A stream cut mid-way is an error; a 404 from Ollama too.
    await send(
        "/api/chat",
        {"model": MODEL, "messages": MESSAGES},
        "error",
        **{"X-Fake-Mode": "midstream_error"},
    )
    await send("/api/chat", {"model": "missing", "messages": MESSAGES}, "error")
    # A malformed body is rejected by the gateway.
    async with http.post(gw.url + "/api/chat", data=b"{") as response:
        assert response.status == 400
    seen_by_client[("/api/chat", "rejected")] += 1
    # A client abort is cancelled.
    fake.config.tokens = 500
    fake.config.token_interval_s = 0.01
    response = await http.post(gw.url + "/api/chat", json={"model": MODEL, "messages": MESSAGES})
    await response.content.readline()
    aborted = fake.seen[-1]
    response.close()
    await fake.wait_for(lambda: aborted.disconnected)
    seen_by_client[("/api/chat", "cancelled")] += 1
    fake.config.tokens = 8
    fake.config.token_interval_s = 0.0
    # The bucket (burst 11) is empty now: this one is rate limited.
    await send("/api/chat", {"model": MODEL, "messages": MESSAGES}, "rate_limited")

    text = await gw.metrics_text()
    await gw.gateway.probe.look_all(1.0)  # nothing may have changed the counters since
    assert metric(text, "ollama_prompt_tokens_total") == fake.totals["prompt_eval_count"]
    assert metric(text, "ollama_completion_tokens_total") == fake.totals["eval_count"]
    assert fake.totals["eval_count"] > 0

    for (path, status), count in seen_by_client.items():
        assert metric(text, "ollama_requests_total", endpoint=path, status=status) == count, (
            path,
            status,
        )
    total = sum(seen_by_client.values())
    assert metric(text, "ollama_requests_total") == total
    assert metric(text, "ollama_request_duration_seconds_count") == total
    for path in {p for p, _ in seen_by_client}:
        assert metric(text, "ollama_request_duration_seconds_count", endpoint=path) == sum(
            c for (p, _), c in seen_by_client.items() if p == path
        )
    assert metric(text, "ollama_errors_total", error_type="StreamInterrupted") == 1
    assert metric(text, "ollama_errors_total", error_type="UpstreamStatus") == 1
    assert metric(text, "ollama_errors_total", error_type="InvalidRequest") == 1
    assert metric(text, "ollama_rejected_total", reason="invalid") == 1
    assert metric(text, "ollama_rate_limited_total", client="anonymous") == 1
    assert metric(text, "ollama_client_disconnects_total", phase="streaming") == 1
    # Known models are labelled by their listed name; unknown ones as "other".
    assert metric(text, "ollama_requests_total", model=MODEL) > 0
    assert metric(text, "ollama_requests_total", model="other") == 1
    assert metric(text, "ollama_requests_total", model="missing") == 0
    # Streamed requests that produced a first chunk have a time to first token.
    # Streamed: /api/chat, /api/generate, both /v1 streams, the cut one and the aborted one.
    assert metric(text, "ollama_time_to_first_token_seconds_count") == 6
    # Every request that went through the gate recorded its queue wait.
    assert metric(text, "ollama_queue_wait_seconds_count") == 10
    assert metric(text, "ollama_tokens_per_second_count") > 0
    assert metric(text, "ollama_model_load_duration_seconds_count") > 0


async def test_every_error_type_and_reject_reason_starts_at_zero(
    gateway_factory: GatewayFactory,
) -> None:
    """increase() can see the first event because each bounded series exists from the start."""
    gw = await gateway_factory()
    text = await gw.metrics_text()
    names = {(n, tuple(sorted(labels.items()))) for n, labels, _ in parse_metrics(text)}
    for error_type in ERROR_TYPES:
        assert ("ollama_errors_total", (("error_type", error_type),)) in names
    for reason in REJECT_REASONS:
        assert ("ollama_rejected_total", (("reason", reason),)) in names
    assert metric(text, "ollama_upstream_retries_total") == 0
    assert metric(text, "ollama_proxy_info", version="0.1.0") == 1
    assert metric(text, "ollama_concurrency_slots") == 1
    # Without shared state there is no fleet: its series are absent, not 0 (an alert on
    # them would fire for every single gateway).
    exported = {name for name, _ in names}
    assert not exported & {"ollama_shared_state_up", "ollama_gateway_replicas"}


async def test_upstream_gauges_follow_the_probe(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """upstream_up, loaded models and their memory come from probing /api/version and /api/ps."""
    gw = await gateway_factory()
    async with http.post(gw.url + "/api/generate", json={"model": MODEL, "prompt": "x"}) as r:
        await r.read()
    await gw.gateway.probe.look_all(1.0)
    text = await gw.metrics_text()
    assert metric(text, "ollama_upstream_up") == 1
    assert metric(text, "ollama_loaded_models") == 1
    size = next(m.size for m in fake.config.models if m.name == MODEL)
    ram = metric(text, "ollama_model_memory_bytes", model=MODEL, kind="ram")
    vram = metric(text, "ollama_model_memory_bytes", model=MODEL, kind="vram")
    assert ram + vram == size
    await fake.close()
    await gw.gateway.probe.look_all(1.0)
    assert metric(await gw.metrics_text(), "ollama_upstream_up") == 0


async def test_metrics_answer_while_a_hundred_streams_are_in_flight(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Scraping during 100 open streams shows them and every stream still completes."""
    gw = await gateway_factory(limits={"parallel": 100})
    fake.config.num_parallel = 100
    fake.config.tokens = 200
    fake.config.token_interval_s = 0.05  # long enough to outlast the scrapes on a busy machine
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as many:
        responses = await asyncio.gather(
            *(
                many.post(gw.url + "/api/chat", json={"model": MODEL, "messages": MESSAGES})
                for _ in range(100)
            )
        )
        for response in responses:
            await response.content.readline()
        for _ in range(5):
            text = await gw.metrics_text()
            assert metric(text, "ollama_active_requests") == 100
        fake.config.token_interval_s = 0.0  # now let them finish
        bodies = await asyncio.gather(*(r.read() for r in responses))
    assert all(b'"done":true' in body for body in bodies)
