"""The background probe and readiness: what the gateway knows of its upstream, against the
fake Ollama and against nothing at all."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from loadtest.fake_ollama import FakeOllama
from proxy.config import parse_config
from proxy.metrics import Metrics
from proxy.upstream.forward import Upstream
from proxy.upstream.probe import UpstreamWatch
from tests.conftest import MODEL, metric

WatchFactory = Callable[..., Any]


@pytest.fixture
async def watch_for() -> AsyncIterator[WatchFactory]:
    upstreams: list[Upstream] = []

    async def make(url: str, **upstream: Any) -> UpstreamWatch:
        config = parse_config({"upstream": {"url": url, "default_model": MODEL, **upstream}})
        up = Upstream(config.upstream, on_retry=lambda: None)
        await up.start()
        upstreams.append(up)
        return UpstreamWatch(config, up, Metrics(), ("/api/chat",))

    yield make
    for up in upstreams:
        await up.close()


@pytest.fixture
def refused_url() -> Any:
    """A port that refuses connections: bound, not listening, held for the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_a_look_learns_version_models_and_what_is_loaded(
    fake: FakeOllama, watch_for: WatchFactory
) -> None:
    """Version, listed models and loaded models, as Ollama reports them."""
    await fake.ensure_loaded(next(m for m in fake.config.models if m.name == MODEL))
    watch = await watch_for(fake.url)
    snap = await watch.look(timeout_s=5)
    assert snap.reachable
    assert snap.version == fake.config.version
    assert MODEL in snap.models
    assert [m["name"] for m in snap.loaded] == [MODEL]


async def test_recording_a_look_sets_the_gauges_and_the_model_labels(
    fake: FakeOllama, watch_for: WatchFactory
) -> None:
    """Up, loaded models and their memory; labels only for listed models (tag optional)."""
    await fake.ensure_loaded(next(m for m in fake.config.models if m.name == MODEL))
    watch = await watch_for(fake.url)
    assert watch.model_label("llama3.2") == "other"  # nothing learned yet
    watch.record(await watch.look(timeout_s=5))
    assert watch.model_label(MODEL) == MODEL
    assert watch.model_label("llama3.2") == MODEL
    assert watch.model_label("mystery:7b") == "other"
    assert watch.model_label(None) == "none"
    text = _render(watch)
    assert metric(text, "ollama_upstream_up") == 1
    assert metric(text, "ollama_loaded_models") == 1
    size = next(m.size for m in fake.config.models if m.name == MODEL)
    assert metric(text, "ollama_model_memory_bytes", model=MODEL) == size
    # Request series exist at zero for every listed model, and for "other".
    assert 'ollama_requests_total{endpoint="/api/chat",method="POST",model="other"' in text


async def test_an_unreachable_upstream_is_down_and_not_ready(
    refused_url: str, watch_for: WatchFactory
) -> None:
    """Connection refused: down, with the reason, and readiness says so."""
    watch = await watch_for(refused_url)
    snap = await watch.look(timeout_s=5)
    assert not snap.reachable
    assert snap.error is not None
    assert "refused" in snap.error.lower()
    ready, body = await watch.readiness()
    assert not ready
    assert body["reason"].startswith("upstream not reachable")
    assert metric(_render(watch), "ollama_upstream_up") == 0


async def test_readiness_needs_the_default_model_installed(
    fake: FakeOllama, watch_for: WatchFactory
) -> None:
    """Reachable but without the default model: not ready, and the reason says what to do."""
    ready, body = await (await watch_for(fake.url)).readiness()
    assert ready
    assert (body["installed"], body["loaded"]) == (True, False)
    missing = await watch_for(fake.url, default_model="absent:1b")
    ready, body = await missing.readiness()
    assert not ready
    assert "just pull" in body["reason"]


async def test_an_openai_kind_upstream_is_read_through_v1_models(
    fake: FakeOllama, watch_for: WatchFactory
) -> None:
    """An OpenAI-compatible server lists its models at /v1/models; no version, no /api/ps."""
    watch = await watch_for(fake.url, kind="openai")
    snap = await watch.look(timeout_s=5)
    assert snap.reachable
    assert snap.version is None
    assert MODEL in snap.models
    assert [seen.path for seen in fake.seen] == ["/v1/models"]


def _render(watch: UpstreamWatch) -> str:
    from aioprometheus.renderer import render

    return render(watch._metrics.registry, [])[0].decode()
