"""The official ``ollama`` Python client talks to Ollama through the gateway."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import ollama
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, GatewayFactory, RunningGateway

pytestmark = pytest.mark.timeout(20)

Make = Callable[..., ollama.AsyncClient]


@pytest.fixture
async def make() -> AsyncIterator[Make]:
    """Official clients, closed when the test ends."""
    made: list[ollama.AsyncClient] = []

    def build(url: str, **headers: str) -> ollama.AsyncClient:
        client = ollama.AsyncClient(host=url, headers=headers or None)
        made.append(client)
        return client

    yield build
    for client in made:
        await client.close()


ADMIN_KEY = "admin-key-for-tests"


async def test_chat_stream_carries_final_statistics(
    make: Make, gateway: RunningGateway, fake: FakeOllama
) -> None:
    """A streamed chat yields each token and a final part with Ollama's statistics."""
    client = make(gateway.url)
    parts = [
        part
        async for part in await client.chat(
            model="llama3.2",
            messages=[{"role": "user", "content": "why is the sky blue"}],
            stream=True,
        )
    ]
    assert len(parts) == fake.config.tokens + 1
    assert "".join(p.message.content for p in parts).startswith("The sky")
    final = parts[-1]
    assert final.done
    assert final.eval_count == fake.config.tokens
    assert final.prompt_eval_count == fake.totals["prompt_eval_count"]
    assert final.eval_duration is not None


async def test_generate_stream_and_non_stream(
    make: Make, gateway: RunningGateway, fake: FakeOllama
) -> None:
    """Generate works streamed (parts) and not (one answer with metrics)."""
    client = make(gateway.url)
    parts = [p async for p in await client.generate(model=MODEL, prompt="hello", stream=True)]
    assert parts[-1].done
    assert parts[-1].context
    answer = await client.generate(model=MODEL, prompt="hello")
    assert answer.response == "".join(p.response for p in parts)
    assert answer.eval_count == fake.config.tokens


async def test_model_listing_show_and_ps(make: Make, gateway: RunningGateway) -> None:
    """Tags, show and ps pass through and parse in the official client."""
    client = make(gateway.url)
    names = [m.model for m in (await client.list()).models]
    assert MODEL in names
    shown = await client.show(MODEL)
    assert shown.modelinfo is not None or shown.details is not None
    await client.generate(model=MODEL, prompt="load me")
    running = await client.ps()
    assert any(m.model == MODEL for m in running.models)


async def test_embed_and_legacy_embeddings(make: Make, gateway: RunningGateway) -> None:
    """Both embedding routes return vectors through the gateway."""
    client = make(gateway.url)
    embedded = await client.embed(model="all-minilm", input=["a", "b"])
    assert len(embedded.embeddings) == 2
    legacy = await client.embeddings(model="all-minilm", prompt="a")
    assert len(legacy.embedding) > 0


async def test_pull_progress_streams_with_the_admin_key(
    make: Make, gateway_factory: GatewayFactory
) -> None:
    """Pull progress arrives part by part for a holder of the admin key."""
    gw = await gateway_factory(auth={"admin_key": ADMIN_KEY})
    client = make(gw.url, Authorization=f"Bearer {ADMIN_KEY}")
    statuses = [p.status async for p in await client.pull("qwen2.5:0.5b", stream=True)]
    assert statuses[0] == "pulling manifest"
    assert statuses[-1] == "success"
    assert any(s and s.startswith("pulling ") and s != "pulling manifest" for s in statuses)


async def test_unknown_model_raises_response_error_with_status(
    make: Make, gateway: RunningGateway
) -> None:
    """Ollama's 404 passes through unchanged and the client raises ResponseError(404)."""
    client = make(gateway.url)
    with pytest.raises(ollama.ResponseError) as caught:
        await client.chat(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert "not found" in caught.value.error


async def test_mid_stream_failure_raises_response_error(
    make: Make, gateway_factory: GatewayFactory
) -> None:
    """An upstream error after the first chunks reaches the client as ResponseError."""
    gw = await gateway_factory()
    client = make(gw.url, **{"X-Fake-Mode": "midstream_error"})
    received = []
    with pytest.raises(ollama.ResponseError, match="error was encountered"):
        async for part in await client.chat(
            model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
        ):
            received.append(part)
    assert received
    assert not any(p.done for p in received)


async def test_connection_drop_mid_stream_raises_response_error(
    make: Make,
    gateway_factory: GatewayFactory,
) -> None:
    """An upstream that drops the connection mid-stream ends in an error line, not done."""
    gw = await gateway_factory()
    client = make(gw.url, **{"X-Fake-Mode": "drop"})
    with pytest.raises(ollama.ResponseError, match="upstream"):
        async for part in await client.generate(model=MODEL, prompt="x", stream=True):
            assert not part.done


async def test_client_with_an_api_key(make: Make, gateway_factory: GatewayFactory) -> None:
    """With keys configured, the client's Bearer key is accepted and a missing key is 401."""
    gw = await gateway_factory(auth={"api_keys": [{"name": "alice", "key": "sk-alice-123"}]})
    client = make(gw.url, Authorization="Bearer sk-alice-123")
    answer = await client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert answer.message.content
    anonymous = make(gw.url)
    with pytest.raises(ollama.ResponseError) as caught:
        await anonymous.list()
    assert caught.value.status_code == 401
    assert "API key" in caught.value.error
