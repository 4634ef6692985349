"""``upstream.kind: openai``: the gateway in front of an OpenAI-compatible server (the fake's /v1).

The fake plays a server that ignores ``stream_options.include_usage`` (llama-cpp-python's),
except where a test turns usage back on to see the gateway strip what it asked for.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import aiohttp
import ollama
import openai
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, GatewayFactory, RunningGateway, metric

pytestmark = pytest.mark.timeout(20)

OPENAI_KIND = {"kind": "openai"}
HELLO = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def backend(gateway_factory: GatewayFactory, fake: FakeOllama) -> RunningGateway:
    fake.config.honor_stream_usage = False
    return await gateway_factory(upstream=OPENAI_KIND)


@pytest.fixture
async def client(backend: RunningGateway) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=backend.url + "/v1", api_key="unused", max_retries=0)
    yield sdk
    await sdk.close()


async def test_native_routes_answer_501_in_ollama_dialect(
    backend: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """/api/* answers 501 with Ollama's {"error": "..."} body and never reaches the upstream."""
    for method, path in (("POST", "/api/chat"), ("POST", "/api/generate"), ("GET", "/api/tags")):
        body = {"model": MODEL, "messages": HELLO} if method == "POST" else None
        async with http.request(method, backend.url + path, json=body) as response:
            assert response.status == 501, path
            assert response.content_type == "application/json"
            error = (await response.json())["error"]
            assert isinstance(error, str)
            assert "OpenAI-compatible" in error
            assert response.headers["X-Request-ID"]
    assert fake.seen == []


async def test_official_ollama_client_sees_the_501(backend: RunningGateway) -> None:
    """The ollama package raises ResponseError with status 501 and the gateway's message."""
    client = ollama.AsyncClient(host=backend.url)
    try:
        with pytest.raises(ollama.ResponseError) as raised:
            await client.chat(model=MODEL, messages=HELLO)
    finally:
        await client.close()
    assert raised.value.status_code == 501
    assert "upstream.kind: openai" in raised.value.error


async def test_chat_route_speaks_chat_completions_upstream(
    backend: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Non-streamed /chat asks /v1/chat/completions and answers with the text and usage."""
    async with http.post(backend.url + "/chat", json={"prompt": "hi"}) as response:
        assert response.status == 200
        answer = await response.json()
    assert fake.seen[-1].path == "/v1/chat/completions"
    assert fake.seen[-1].json["model"] == MODEL
    assert answer["response"].startswith("The sky")
    assert answer["completion_tokens"] == fake.config.tokens
    assert answer["prompt_tokens"] > 0
    text = await backend.metrics_text()
    assert metric(text, "ollama_completion_tokens_total", model=MODEL) == fake.config.tokens
    assert metric(text, "ollama_prompt_tokens_total", model=MODEL) == answer["prompt_tokens"]


async def test_streamed_chat_route_counts_chunks_without_usage(
    backend: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """Streamed /chat from a backend that sends no usage reports the content-chunk count."""
    body = {"prompt": "hi", "stream": True}
    async with http.post(backend.url + "/chat", json=body) as response:
        assert response.status == 200
        lines = [json.loads(line) async for line in response.content if line.strip()]
    assert fake.seen[-1].json["stream_options"] == {"include_usage": True}
    pieces, final = lines[:-1], lines[-1]
    assert len(pieces) == fake.config.tokens
    assert all(not piece["done"] and piece["response"] for piece in pieces)
    assert final["done"] is True
    assert final["completion_tokens"] == fake.config.tokens
    # The same keys as from Ollama, with what this backend cannot tell left empty.
    assert final["model"] == MODEL
    assert final["done_reason"] == "stop"
    assert final["prompt_tokens"] is None
    assert "tokens_per_second" in final
    text = await backend.metrics_text()
    assert metric(text, "ollama_completion_tokens_total", model=MODEL) == fake.config.tokens


async def test_v1_stream_without_usage_counts_content_chunks(
    backend: RunningGateway, fake: FakeOllama, client: openai.AsyncOpenAI
) -> None:
    """A /v1 stream with no usage chunk feeds the completion counter with its content chunks."""
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == fake.config.tokens
    assert all(chunk.usage is None for chunk in chunks)
    assert fake.seen[-1].json["stream_options"] == {"include_usage": True}
    text = await backend.metrics_text()
    assert metric(text, "ollama_completion_tokens_total", model=MODEL) == len(content)
    assert metric(text, "ollama_prompt_tokens_total") == 0  # unknown, not guessed
    assert metric(text, "ollama_time_to_first_token_seconds_count", model=MODEL) == 1


async def test_v1_usage_asked_by_the_gateway_is_stripped(
    backend: RunningGateway, fake: FakeOllama, client: openai.AsyncOpenAI
) -> None:
    """From a backend that honours include_usage, the usage the gateway asked for is counted
    exactly and never reaches a client that did not ask for it."""
    fake.config.honor_stream_usage = True
    stream = await client.chat.completions.create(model=MODEL, messages=HELLO, stream=True)
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None and chunk.choices for chunk in chunks)
    text = await backend.metrics_text()
    assert metric(text, "ollama_completion_tokens_total", model=MODEL) == fake.config.tokens
    assert metric(text, "ollama_prompt_tokens_total", model=MODEL) > 0


async def test_v1_non_streamed_usage_is_counted(
    backend: RunningGateway, fake: FakeOllama, client: openai.AsyncOpenAI
) -> None:
    """A non-streamed /v1 answer's usage becomes the token counters."""
    answer = await client.chat.completions.create(model=MODEL, messages=HELLO)
    assert answer.usage is not None
    text = await backend.metrics_text()
    assert metric(text, "ollama_completion_tokens_total", model=MODEL) == (
        answer.usage.completion_tokens
    )
    assert metric(text, "ollama_prompt_tokens_total", model=MODEL) == answer.usage.prompt_tokens


async def test_readiness_asks_v1_models(
    backend: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """/health/ollama is ready when /v1/models lists the default model; no /api/* is asked."""
    async with http.get(backend.url + "/health/ollama") as response:
        assert response.status == 200
        body = await response.json()
    assert body["kind"] == "openai"
    assert body["installed"] is True
    assert [seen.path for seen in fake.seen] == ["/v1/models"]


async def test_request_without_a_model_gets_the_default(
    backend: RunningGateway, fake: FakeOllama, http: aiohttp.ClientSession
) -> None:
    """A /v1 request naming no model is sent with the configured one, never the server's guess."""
    async with http.post(backend.url + "/v1/chat/completions", json={"messages": HELLO}) as r:
        assert r.status == 200
    assert fake.seen[-1].json["model"] == MODEL
