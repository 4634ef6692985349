"""Several Ollama hosts behind one gateway: three fake Ollamas with different models and
slot counts, routing, one fair queue, failover, and what each backend saw."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import pytest

from loadtest.fake_ollama import FakeModel, FakeOllama, FakeOllamaConfig
from tests.conftest import GatewayFactory, RunningGateway, gate_until, metric

pytestmark = pytest.mark.timeout(60)

SHARED = "llama3.2:latest"  # on gpu and cpu
GPU_ONLY = "qwen2.5:0.5b"
CPU_ONLY = "phi3:mini"
THIRD_ONLY = "mistral:7b"


@dataclass
class Boxes:
    gpu: FakeOllama  # 2 slots, tier 0
    cpu: FakeOllama  # 1 slot, tier 1
    third: FakeOllama  # 1 slot, tier 0

    @property
    def all(self) -> dict[str, FakeOllama]:
        return {"gpu": self.gpu, "cpu": self.cpu, "third": self.third}


@pytest.fixture
async def boxes() -> AsyncIterator[Boxes]:
    def fake(*names: str) -> FakeOllama:
        # Each fake would run four at once: only the gateway keeps it to its slots.
        config = FakeOllamaConfig(models=[FakeModel(n) for n in names], num_parallel=4)
        return FakeOllama(config)

    made = Boxes(fake(SHARED, GPU_ONLY), fake(SHARED, CPU_ONLY), fake(THIRD_ONLY))
    for box in made.all.values():
        await box.start()
    yield made
    for box in made.all.values():
        await box.close()


async def start(
    gateway_factory: GatewayFactory, boxes: Boxes, **sections: object
) -> RunningGateway:
    running = await gateway_factory(
        backends=[
            {"name": "gpu", "url": boxes.gpu.url, "slots": 2, "priority": 0},
            {"name": "cpu", "url": boxes.cpu.url, "slots": 1, "priority": 1},
            {"name": "third", "url": boxes.third.url, "slots": 1, "priority": 0},
        ],
        upstream={"default_model": SHARED},
        **sections,
    )
    for box in boxes.all.values():
        box.reset()  # forget the start-up probe
    return running


@pytest.fixture
async def gw(gateway_factory: GatewayFactory, boxes: Boxes) -> RunningGateway:
    return await start(gateway_factory, boxes)


def chat(model: str, *, stream: bool = True) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def generations(box: FakeOllama) -> int:
    return sum(1 for seen in box.seen if seen.path == "/api/chat")


async def test_no_backend_runs_more_than_its_slots_and_the_shared_model_spreads(
    gw: RunningGateway, boxes: Boxes
) -> None:
    """Twenty concurrent requests for a model two backends hold: gpu never runs more than
    two, cpu never more than one, and both serve."""
    for box in (boxes.gpu, boxes.cpu):
        box.config.tokens = 4
        box.config.token_interval_s = 0.02
    async with aiohttp.ClientSession() as http:

        async def one() -> None:
            async with http.post(gw.url + "/api/chat", json=chat(SHARED)) as response:
                assert response.status == 200
                assert json.loads((await response.read()).splitlines()[-1])["done"] is True

        await asyncio.gather(*(one() for _ in range(20)))
    assert boxes.gpu.max_active <= 2
    assert boxes.cpu.max_active <= 1
    assert generations(boxes.gpu) + generations(boxes.cpu) == 20
    assert generations(boxes.gpu) > 0
    assert generations(boxes.cpu) > 0
    assert generations(boxes.third) == 0  # it does not hold the model


async def test_a_model_held_by_one_backend_goes_there(
    gw: RunningGateway, boxes: Boxes, http: aiohttp.ClientSession
) -> None:
    """Every request for a model only one backend holds goes to it, names with or without
    their tag alike (mistral:7b; phi3:mini)."""
    for _ in range(3):
        async with http.post(gw.url + "/api/chat", json=chat(THIRD_ONLY, stream=False)) as r:
            assert r.status == 200
        async with http.post(gw.url + "/v1/chat/completions", json=chat(CPU_ONLY)) as r:
            assert r.status == 200
            await r.read()
    assert generations(boxes.third) == 3
    assert sum(1 for s in boxes.cpu.seen if s.path == "/v1/chat/completions") == 3
    assert generations(boxes.gpu) == 0


async def test_a_waiter_for_one_model_does_not_block_a_request_for_another(
    gw: RunningGateway, boxes: Boxes, http: aiohttp.ClientSession
) -> None:
    """cpu busy and a request queued for its model: a request for a model gpu holds is
    served at once, not after the queued one (no head-of-line blocking)."""
    hang = {"X-Fake-Mode": "hang"}
    holder = asyncio.create_task(http.post(gw.url + "/api/chat", json=chat(CPU_ONLY), headers=hang))
    gate = gw.gateway.gate
    await gate_until(gw, lambda: gw.gateway.backends.by_name["cpu"].active == 1)
    waiting = asyncio.create_task(http.post(gw.url + "/api/chat", json=chat(CPU_ONLY)))
    await gate_until(gw, lambda: gate.queued == 1)
    async with http.post(gw.url + "/api/chat", json=chat(GPU_ONLY, stream=False)) as response:
        assert response.status == 200
    assert gate.queued == 1  # still waiting for cpu
    holder.cancel()
    served = await waiting
    assert served.status == 200
    await served.read()


async def test_an_unknown_model_is_404_and_one_held_only_by_down_backends_is_503(
    gw: RunningGateway, boxes: Boxes, http: aiohttp.ClientSession
) -> None:
    """No backend lists it: 404 in the dialect; only a backend that does not answer holds
    it: 503 with Retry-After, and the request waits nowhere."""
    async with http.post(gw.url + "/api/chat", json=chat("nobody:1b")) as response:
        assert response.status == 404
        assert (await response.json())["error"] == "model 'nobody:1b' not found on any backend"
    async with http.post(gw.url + "/v1/chat/completions", json=chat("nobody:1b")) as response:
        assert (await response.json())["error"]["code"] == "model_not_found"
    await boxes.third.close()
    await gw.gateway.probe.look_all(timeout_s=2)
    async with http.post(gw.url + "/api/chat", json=chat(THIRD_ONLY)) as response:
        assert response.status == 503
        assert "Retry-After" in response.headers
        assert "(third)" in (await response.json())["error"]


async def test_a_dead_backend_is_left_for_another_and_comes_back(
    gw: RunningGateway, boxes: Boxes, http: aiohttp.ClientSession
) -> None:
    """gpu dies mid-stream: its open stream ends with an in-dialect error; new requests move
    to cpu (one failover, counted with both names); after gpu restarts on its address and
    the probe sees it, it serves again."""
    boxes.gpu.config.tokens = 1000
    boxes.gpu.config.token_interval_s = 0.01
    stream = await http.post(gw.url + "/api/chat", json=chat(GPU_ONLY))
    await stream.content.readline()
    port = int(boxes.gpu.url.rsplit(":", 1)[1])
    await boxes.gpu.close()
    last = json.loads((await stream.read()).splitlines()[-1])
    assert "error" in last
    async with http.post(gw.url + "/api/chat", json=chat(SHARED, stream=False)) as response:
        assert response.status == 200
    assert generations(boxes.cpu) == 1
    text = await gw.metrics_text()
    assert metric(text, "ollama_backend_failovers_total", from_backend="gpu", to_backend="cpu") == 1
    assert not gw.gateway.backends.by_name["gpu"].up
    boxes.gpu.config.tokens = 4
    boxes.gpu.config.token_interval_s = 0.0
    await boxes.gpu.start(port=port)
    await gw.gateway.probe.look_all(timeout_s=2)
    boxes.gpu.reset()
    async with http.post(gw.url + "/api/chat", json=chat(SHARED, stream=False)) as response:
        assert response.status == 200
    assert generations(boxes.gpu) == 1  # tier 0 again


async def test_metrics_per_backend_equal_what_each_backend_saw(
    gw: RunningGateway, boxes: Boxes, http: aiohttp.ClientSession
) -> None:
    """ollama_requests_total{backend} counts what each fake received; slots and up per
    backend are exported."""
    for model in (SHARED, SHARED, GPU_ONLY, CPU_ONLY, THIRD_ONLY, THIRD_ONLY):
        async with http.post(gw.url + "/api/chat", json=chat(model, stream=False)) as response:
            assert response.status == 200
    text = await gw.metrics_text()
    for name, box in boxes.all.items():
        counted = metric(text, "ollama_requests_total", backend=name, status="success")
        assert counted == generations(box), name
        assert metric(text, "ollama_upstream_up", backend=name) == 1
    assert metric(text, "ollama_concurrency_slots", backend="gpu") == 2
    assert metric(text, "ollama_concurrency_slots", backend="cpu") == 1


async def test_listings_merge_the_backends_and_management_names_one(
    gateway_factory: GatewayFactory, boxes: Boxes, http: aiohttp.ClientSession
) -> None:
    """/api/tags lists each model once; a pull without X-Backend is refused with the names;
    with it, only that backend pulls."""
    gw = await start(gateway_factory, boxes, auth={"admin_key": "admin-key-0123"})
    async with http.get(gw.url + "/api/tags") as response:
        names = [m["name"] for m in (await response.json())["models"]]
    assert sorted(names) == sorted({SHARED, GPU_ONLY, CPU_ONLY, THIRD_ONLY})
    async with http.get(gw.url + "/v1/models") as response:
        ids = [m["id"] for m in (await response.json())["data"]]
    assert len(ids) == len(set(ids)) == 4
    headers = {"Authorization": "Bearer admin-key-0123"}
    pull = {"model": "tiny:1b", "stream": False}
    async with http.post(gw.url + "/api/pull", json=pull, headers=headers) as response:
        assert response.status == 400
        assert "X-Backend" in (await response.json())["error"]
    named = {**headers, "X-Backend": "cpu"}
    async with http.post(gw.url + "/api/pull", json=pull, headers=named) as response:
        assert response.status == 200
    (pulled,) = [s for s in boxes.cpu.seen if s.path == "/api/pull"]
    assert "X-Backend" not in pulled.headers
    assert not any(s.path == "/api/pull" for b in (boxes.gpu, boxes.third) for s in b.seen)


async def test_a_session_returns_to_the_backend_of_its_previous_turn(
    gw: RunningGateway, boxes: Boxes, http: aiohttp.ClientSession
) -> None:
    """Turns with the same X-Session-ID prefer the backend that served the last one (its
    prompt cache) while it is free, even when it is not the preferred tier."""
    session = {"X-Session-ID": "conversation-1"}
    gw.gateway.affinity.remember("conversation-1", "cpu")
    for _ in range(3):
        async with http.post(
            gw.url + "/api/chat", json=chat(SHARED, stream=False), headers=session
        ) as response:
            assert response.status == 200
    assert generations(boxes.cpu) == 3
    assert generations(boxes.gpu) == 0


async def test_x_backend_pins_an_inference_request_to_one_backend(
    gw: RunningGateway, boxes: Boxes, http: aiohttp.ClientSession
) -> None:
    """warmup --backend cpu loads the model there: X-Backend keeps a generation on the named
    backend even when a preferred tier is free; a name that is none is a 400, and a model
    the named backend lacks a 404 naming it."""
    pinned = {"X-Backend": "cpu"}
    body = chat(SHARED, stream=False)
    async with http.post(gw.url + "/api/chat", json=body, headers=pinned) as response:
        assert response.status == 200
    assert (generations(boxes.cpu), generations(boxes.gpu)) == (1, 0)
    async with http.post(gw.url + "/api/chat", json=body, headers={"X-Backend": "x"}) as r:
        assert r.status == 400
    lacking = chat(GPU_ONLY, stream=False)
    async with http.post(gw.url + "/api/chat", json=lacking, headers=pinned) as response:
        assert response.status == 404
        assert "not found on backend 'cpu'" in (await response.json())["error"]
