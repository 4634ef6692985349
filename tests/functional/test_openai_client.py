"""The official ``openai`` Python SDK talks to Ollama's /v1 API through the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import openai
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, GatewayFactory, RunningGateway, metric

pytestmark = pytest.mark.timeout(20)


Make = Callable[..., openai.AsyncOpenAI]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """SDK clients without automatic retries, closed when the test ends."""
    made: list[openai.AsyncOpenAI] = []

    def build(url: str, key: str = "unused", **headers: str) -> openai.AsyncOpenAI:
        client = openai.AsyncOpenAI(
            base_url=url + "/v1", api_key=key, max_retries=0, default_headers=headers or None
        )
        made.append(client)
        return client

    yield build
    for client in made:
        await client.close()


async def test_chat_stream_without_usage_sees_exactly_what_it_asked_for(
    make: Make, gateway: RunningGateway, fake: FakeOllama
) -> None:
    """The gateway asks for usage on the client's behalf and strips it: no usage chunk."""
    client = make(gateway.url)
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text.startswith("The sky")
    upstream_body = fake.seen[-1].json
    assert upstream_body["stream_options"] == {"include_usage": True}


async def test_chat_stream_with_usage_gets_the_usage_chunk(
    make: Make, gateway: RunningGateway
) -> None:
    """A client that asks for usage gets Ollama's usage chunk unchanged."""
    client = make(gateway.url)
    stream = await client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens > 0


async def test_chat_non_stream_has_usage(
    make: Make, gateway: RunningGateway, fake: FakeOllama
) -> None:
    """A non-streamed completion carries usage equal to what the fake generated."""
    answer = await make(gateway.url).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    assert answer.usage is not None
    assert answer.usage.completion_tokens == fake.config.tokens


async def test_completions_models_and_embeddings(make: Make, gateway: RunningGateway) -> None:
    """Legacy completions (streamed too), the model list and one model, and embeddings."""
    client = make(gateway.url)
    completion = await client.completions.create(model=MODEL, prompt="Say hi", max_tokens=3)
    assert completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 3
    stream = await client.completions.create(model=MODEL, prompt="Say hi", stream=True)
    pieces = [c async for c in stream]
    assert all(c.usage is None for c in pieces)
    models = [m.id async for m in client.models.list()]
    assert MODEL in models
    assert (await client.models.retrieve(MODEL)).id == MODEL
    embedding = await client.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(embedding.data) == 2


async def test_not_found_raises_not_found_error(make: Make, gateway: RunningGateway) -> None:
    """Ollama's 404 passes through and the SDK raises NotFoundError."""
    with pytest.raises(openai.NotFoundError):
        await make(gateway.url).chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )


async def test_mid_stream_failure_raises_api_error(make: Make, gateway: RunningGateway) -> None:
    """A stream the upstream cuts off ends with the gateway's error event: APIError."""
    client = make(gateway.url, **{"X-Fake-Mode": "drop"})
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError, match="upstream"):
        async for chunk in stream:
            received.append(chunk)
    assert received


async def test_a_swallowed_mid_stream_error_is_relayed_as_sent_and_counted(
    make: Make, gateway: RunningGateway
) -> None:
    """Ollama swallows a /v1 mid-stream error and ends the stream cleanly without [DONE]:
    the client gets exactly that (no finish_reason), and the gateway records an error."""
    client = make(gateway.url, **{"X-Fake-Mode": "midstream_error"})
    stream = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
    )
    chunks = [chunk async for chunk in stream]
    assert chunks
    assert all(choice.finish_reason is None for chunk in chunks for choice in chunk.choices)
    text = await gateway.metrics_text()
    assert (
        metric(text, "ollama_requests_total", endpoint="/v1/chat/completions", status="error") == 1
    )
    assert metric(text, "ollama_errors_total", error_type="StreamInterrupted") == 1


async def test_sdk_with_an_api_key(make: Make, gateway_factory: GatewayFactory) -> None:
    """With keys configured the SDK's api_key is accepted and a wrong key is refused with 401."""
    gw = await gateway_factory(auth={"api_keys": [{"name": "bob", "key": "sk-bob-4567"}]})
    answer = await make(gw.url, key="sk-bob-4567").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
    with pytest.raises(openai.AuthenticationError) as caught:
        await make(gw.url, key="sk-wrong-key").models.list()
    assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
