"""The gateway's own routes: POST /chat, GET /health and GET /health/ollama."""

from __future__ import annotations

import json

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, GatewayFactory, RunningGateway

pytestmark = pytest.mark.timeout(20)


async def test_chat_answers_with_text_tokens_and_timings(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Non-streamed /chat returns the answer with counts and timings from Ollama's statistics."""
    body = {"prompt": "why is the sky blue", "system": "be brief", "options": {"temperature": 0}}
    async with http.post(gateway.url + "/chat", json=body) as response:
        assert response.status == 200
        answer = await response.json()
    sent = fake.seen[-1].json
    assert sent["model"] == MODEL  # the configured default
    assert sent["messages"][0] == {"role": "system", "content": "be brief"}
    assert sent["stream"] is False
    assert answer["response"].startswith("The sky")
    assert answer["completion_tokens"] == fake.config.tokens
    assert answer["prompt_tokens"] == fake.totals["prompt_eval_count"]
    assert answer["done_reason"] == "stop"
    assert answer["eval_duration_s"] > 0
    assert answer["tokens_per_second"] > 0


async def test_chat_streams_ndjson_ending_with_statistics(
    gateway: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Streamed /chat sends one line per piece of text and a final line with the statistics."""
    async with http.post(gateway.url + "/chat", json={"prompt": "hi", "stream": True}) as response:
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in (await response.read()).splitlines()]
    assert [line["done"] for line in lines] == [False] * fake.config.tokens + [True]
    assert "".join(line["response"] for line in lines).startswith("The sky")
    assert lines[-1]["completion_tokens"] == fake.config.tokens


async def test_chat_stream_failure_ends_with_an_error_line(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """A mid-stream upstream failure on /chat ends with an OpenAI-shaped error line, no done."""
    headers = {"X-Fake-Mode": "midstream_error"}
    body = {"prompt": "hi", "stream": True}
    async with http.post(gateway.url + "/chat", json=body, headers=headers) as response:
        lines = [json.loads(line) for line in (await response.read()).splitlines()]
    assert lines[-1]["error"]["code"] == "stream_interrupted"
    assert not any(line.get("done") for line in lines)


async def test_chat_validates_its_body(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """A missing prompt or a wrongly typed field is a 400 naming the field."""
    for body, field in (
        ({}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": "x", "stream": 1}, "stream"),
    ):
        async with http.post(gateway.url + "/chat", json=body) as response:
            assert response.status == 400
            assert f"'{field}'" in (await response.json())["error"]["message"]


async def test_chat_passes_upstream_errors_in_its_dialect(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """An unknown model keeps Ollama's 404 status with an OpenAI-shaped error body."""
    async with http.post(gateway.url + "/chat", json={"prompt": "x", "model": "nope"}) as response:
        assert response.status == 404
        assert "not found" in (await response.json())["error"]["message"]


async def test_streaming_can_be_turned_off(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """With ENABLE_STREAMING=false, /chat answers in one piece even when asked to stream."""
    gw = await gateway_factory(limits={"enable_streaming": False})
    async with http.post(gw.url + "/chat", json={"prompt": "x", "stream": True}) as response:
        answer = await response.json()
    assert answer["completion_tokens"] == fake.config.tokens
    assert fake.seen[-1].json["stream"] is False


async def test_health_is_liveness_and_shows_the_gate(
    gateway: RunningGateway, http: aiohttp.ClientSession
) -> None:
    """/health answers 200 with the gate's state whatever the upstream does."""
    async with http.get(gateway.url + "/health") as response:
        assert response.status == 200
        body = await response.json()
    assert body["status"] == "ok"
    assert (body["active"], body["queued"], body["slots"]) == (0, 0, 1)


async def test_readiness_reports_version_and_model(
    gateway_factory: GatewayFactory, http: aiohttp.ClientSession
) -> None:
    """/health/ollama is 200 with the version and whether the default model is loaded."""
    gw = await gateway_factory()
    async with http.get(gw.url + "/health/ollama") as response:
        assert response.status == 200
        body = await response.json()
    assert body["reachable"] is True
    assert body["version"] == "0.33.0"
    assert body["installed"] is True
    assert body["loaded"] is False
    async with http.post(gw.url + "/api/generate", json={"model": MODEL, "prompt": ""}) as r:
        await r.read()
    async with http.get(gw.url + "/health/ollama") as response:
        assert (await response.json())["loaded"] is True


async def test_readiness_is_503_with_the_reason(
    gateway_factory: GatewayFactory, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A missing default model, or an unreachable upstream, is 503 with the reason."""
    gw = await gateway_factory(upstream={"default_model": "qwen2.5:7b-instruct-q4_0"})
    async with http.get(gw.url + "/health/ollama") as response:
        assert response.status == 503
        assert "not installed" in (await response.json())["reason"]
    await fake.close()
    async with http.get(gw.url + "/health/ollama") as response:
        assert response.status == 503
        assert "not reachable" in (await response.json())["reason"]
    async with http.get(gw.url + "/health") as response:
        assert response.status == 200
