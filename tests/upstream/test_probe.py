"""The background probe and readiness: what the gateway knows of its backends, against the
fake Ollama and against nothing at all."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from aioprometheus.renderer import render

from loadtest.fake_ollama import FakeOllama
from proxy.config import backends_of, parse_config
from proxy.metrics import Metrics
from proxy.upstream.backends import Backends
from proxy.upstream.probe import Probe, look
from tests.conftest import MODEL, metric

ProbeFactory = Callable[..., Any]


@pytest.fixture
async def probe_for() -> AsyncIterator[ProbeFactory]:
    started: list[Backends] = []

    async def make(url: str, **upstream: Any) -> tuple[Probe, Backends, Metrics]:
        config = parse_config({"upstream": {"url": url, "default_model": MODEL, **upstream}})
        backends = Backends.build(backends_of(config), config.upstream, lambda _: None)
        await backends.start()
        started.append(backends)
        metrics = Metrics()
        metrics.initialise_backends({b.name: b.slots for b in backends.all})
        return Probe(backends, config.upstream, metrics, ("/api/chat",)), backends, metrics

    yield make
    for backends in started:
        await backends.close()


@pytest.fixture
def refused_url() -> Iterator[str]:
    """A port that refuses connections: bound, not listening, held for the test."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


def loaded(fake: FakeOllama) -> Any:
    return next(m for m in fake.config.models if m.name == MODEL)


async def test_a_look_learns_version_models_and_what_is_loaded(
    fake: FakeOllama, probe_for: ProbeFactory
) -> None:
    """Version, listed models and loaded models, as Ollama reports them."""
    await fake.ensure_loaded(loaded(fake))
    _, backends, _ = await probe_for(fake.url)
    snap = await look(backends.all[0], timeout_s=5)
    assert snap.reachable
    assert snap.version == fake.config.version
    assert MODEL in snap.models
    assert [m["name"] for m in snap.loaded] == [MODEL]


async def test_recording_a_look_sets_the_gauges_and_the_model_labels(
    fake: FakeOllama, probe_for: ProbeFactory
) -> None:
    """Up, loaded models and their memory; labels only for listed models (tag optional)."""
    await fake.ensure_loaded(loaded(fake))
    probe, backends, metrics = await probe_for(fake.url)
    assert backends.model_label("llama3.2") == "other"  # nothing learned yet
    await probe.look_all(timeout_s=5)
    assert backends.model_label(MODEL) == MODEL
    assert backends.model_label("llama3.2") == MODEL
    assert backends.model_label("mystery:7b") == "other"
    assert backends.model_label(None) == "none"
    text = render(metrics.registry, [])[0].decode()
    assert metric(text, "ollama_upstream_up", backend="default") == 1
    assert metric(text, "ollama_loaded_models", backend="default") == 1
    size = loaded(fake).size
    assert metric(text, "ollama_model_memory_bytes", model=MODEL, backend="default") == size
    # Request series exist at zero for every listed model, and for "other".
    assert 'endpoint="/api/chat",method="POST",model="other"' in text


async def test_an_unreachable_backend_is_down_and_not_ready(
    refused_url: str, probe_for: ProbeFactory
) -> None:
    """Connection refused: down, with the reason, and readiness says so."""
    probe, backends, metrics = await probe_for(refused_url)
    snap = await look(backends.all[0], timeout_s=5)
    assert not snap.reachable
    assert snap.error is not None
    assert "refused" in snap.error.lower()
    ready, body = await probe.readiness(MODEL)
    assert not ready
    assert body["reason"].startswith("upstream not reachable")
    assert not backends.all[0].up
    text = render(metrics.registry, [])[0].decode()
    assert metric(text, "ollama_upstream_up", backend="default") == 0


async def test_readiness_needs_the_default_model_installed(
    fake: FakeOllama, probe_for: ProbeFactory
) -> None:
    """Reachable but without the default model: not ready, and the reason says what to do."""
    probe, _, _ = await probe_for(fake.url)
    ready, body = await probe.readiness(MODEL)
    assert ready
    assert (body["installed"], body["loaded"]) == (True, False)
    assert [b["backend"] for b in body["backends"]] == ["default"]
    ready, body = await probe.readiness("absent:1b")
    assert not ready
    assert "just pull" in body["reason"]


async def test_an_openai_kind_backend_is_read_through_v1_models(
    fake: FakeOllama, probe_for: ProbeFactory
) -> None:
    """An OpenAI-compatible server lists its models at /v1/models; no version, no /api/ps."""
    _, backends, _ = await probe_for(fake.url, kind="openai")
    snap = await look(backends.all[0], timeout_s=5)
    assert snap.reachable
    assert snap.version is None
    assert MODEL in snap.models
    assert [seen.path for seen in fake.seen] == ["/v1/models"]
