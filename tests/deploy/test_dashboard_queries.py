"""Dashboard panels and alert expressions, evaluated by a real Prometheus scraping gateways.

Two gateway replicas, ``a`` and ``b``, run in-process and share their limits and slots
through a real redis-server, as in the replicas stack; each is in front of the same two fake
Ollamas, its backends ``main`` and ``second`` (so that the per-backend panels have something
to tell apart, and a failover can happen). Debian's ``prometheus`` scrapes both every second
while the test sends each of them traffic that moves every gateway metric. Panels on the
gateway's metrics must then return data, split by no label their legends do not show, and
count what every replica reports alike (a backend's slots) once; panels on cAdvisor's (which
no test can produce) must evaluate without error, as must every alert rule's expression.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from loadtest.fake_ollama import MODE_HEADER, FakeOllama
from tests.conftest import MODEL, GatewayFactory, RedisServer, RunningGateway
from tests.deploy.dashboard import Query, load_dashboard, queries, rule_expressions
from tests.deploy.prometheus import PrometheusServer

pytestmark = [pytest.mark.timeout(120), pytest.mark.prometheus, pytest.mark.slow]

TESTER = {"Authorization": "Bearer tester-key-0001"}
GREEDY = {"Authorization": "Bearer greedy-key-0001"}
DATA_DEADLINE_S = 45.0
BACKENDS = {"main", "second"}
REPLICAS = ("a", "b")
Monitored = tuple[list[RunningGateway], PrometheusServer]


@pytest.fixture
async def monitored(
    fake: FakeOllama,
    second_fake: FakeOllama,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    prometheus_binary: str,
) -> AsyncIterator[Monitored]:
    """Two gateway replicas sharing Redis, each with two backends, a normal and a throttled
    API key, and a Prometheus scraping both."""
    for server in (fake, second_fake):
        server.config.load_s = 0.02  # so that Ollama's load_duration reaches its panel
    replicas = [
        await gateway_factory(
            upstream={"probe_interval_s": 0.2},  # loaded-model gauges follow within a scrape
            backends=[
                {"name": "main", "url": fake.url, "slots": 1},
                {"name": "second", "url": second_fake.url, "slots": 1},
            ],
            auth={
                "api_keys": [
                    {"name": "tester", "key": "tester-key-0001"},
                    {
                        "name": "greedy",
                        "key": "greedy-key-0001",
                        "requests_per_minute": 1,
                        "burst": 1,
                    },
                ]
            },
            shared={"redis_url": redis_server.url, "replicas": len(REPLICAS), "replica": name},
        )
        for name in REPLICAS
    ]
    targets = [urlsplit(replica.url).netloc for replica in replicas]
    async with PrometheusServer(targets, binary=prometheus_binary) as prometheus:
        await prometheus.wait_until_up()
        yield replicas, prometheus


async def send(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    json: object = None,
    data: bytes | None = None,
) -> int:
    """POST and read the whole (possibly streamed) answer; its status."""
    async with http.post(url, headers=headers, json=json, data=data) as response:
        await response.read()
        return response.status


async def exercise(http: aiohttp.ClientSession, base: str) -> None:
    """Traffic that moves every gateway metric the dashboard shows."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}]}
    # Streamed native and OpenAI-compatible chats: TTFT, tokens, tokens/s, load time, queue wait.
    assert await send(http, base + "/api/chat", TESTER, {**chat, "stream": True}) == 200
    assert await send(http, base + "/v1/chat/completions", TESTER, {**chat, "stream": True}) == 200
    # Not streamed.
    generate = {"model": MODEL, "prompt": "hello", "stream": False}
    assert await send(http, base + "/api/generate", TESTER, generate) == 200
    # Failures at the upstream: an error, and "busy" answers: the first backend's moves the
    # request to the other (a failover), where, alone, it is retried.
    failing = {**TESTER, MODE_HEADER: "error500"}
    assert await send(http, base + "/api/chat", failing, {**chat, "stream": False}) == 500
    busy = {**TESTER, MODE_HEADER: "busy"}
    assert await send(http, base + "/api/chat", busy, {**chat, "stream": False}) == 503
    # Refused before the upstream: malformed JSON, and no API key.
    malformed = {**TESTER, "Content-Type": "application/json"}
    assert await send(http, base + "/api/chat", malformed, data=b'{"model": ') == 400
    assert await send(http, base + "/api/chat", {}, {**chat, "stream": False}) == 401
    # Rate limited: the greedy key's burst is one request a minute.
    first = await send(http, base + "/api/chat", GREEDY, {**chat, "stream": False})
    assert first in {200, 429}
    assert await send(http, base + "/api/chat", GREEDY, {**chat, "stream": False}) == 429


async def exercise_twice(
    http: aiohttp.ClientSession, replicas: list[RunningGateway], prometheus: PrometheusServer
) -> None:
    """Two rounds of traffic to every replica, with a scrape between them.

    A labelled series appears with its first request, so the first scrape already holds the
    first round's count and rate()/increase() see nothing of it; the second round moves
    series that Prometheus already knows, on each replica.
    """
    for replica in replicas:
        await exercise(http, replica.url)
    await prometheus.wait_for_scrapes(1)
    for replica in replicas:
        await exercise(http, replica.url)


async def queries_without_data(prometheus: PrometheusServer, candidates: list[Query]) -> list[str]:
    """The queries whose result is empty or only NaN (a quantile of rates that are all 0)."""
    missing = []
    for query in candidates:
        values = [series["value"][1] for series in await prometheus.query(query.promql)]
        if all(value == "NaN" for value in values):
            missing.append(f"{query.panel} [{query.ref_id}]: {query.promql} -> {values}")
    return missing


async def queries_split_beyond_their_legend(
    prometheus: PrometheusServer, candidates: list[Query]
) -> list[str]:
    """The queries whose series carry a label their legend does not show: a panel meant to
    show one line per model (or one number) that a second backend would split."""
    split = []
    for query in candidates:
        for series in await prometheus.query(query.promql):
            extra = set(series["metric"]) - query.legend_labels
            if extra:
                split.append(f"{query.panel} [{query.ref_id}]: {query.promql} -> by {extra}")
                break
    return split


async def test_dashboard_queries_return_data(
    monitored: Monitored, http: aiohttp.ClientSession
) -> None:
    """Each gateway panel returns data after traffic; container panels and alerts evaluate."""
    replicas, prometheus = monitored
    await exercise_twice(http, replicas, prometheus)

    all_queries = queries(load_dashboard())
    gateway_queries = [query for query in all_queries if not query.is_container]
    container_queries = [query for query in all_queries if query.is_container]
    assert gateway_queries
    assert container_queries

    # Scrapes land every second: poll until every gateway query has data, or the deadline.
    deadline = time.monotonic() + DATA_DEADLINE_S
    missing = await queries_without_data(prometheus, gateway_queries)
    while missing and time.monotonic() < deadline:
        await prometheus.wait_for_scrapes(1)
        missing = await queries_without_data(prometheus, gateway_queries)
    assert not missing, "panels without data:\n" + "\n".join(missing)
    split = await queries_split_beyond_their_legend(prometheus, gateway_queries)
    assert not split, "panels split by labels they do not show:\n" + "\n".join(split)

    # No cAdvisor here: these must only evaluate (a bad query raises PrometheusError).
    for query in container_queries:
        await prometheus.query(query.promql)
    for _name, expr in rule_expressions():
        await prometheus.query(expr)


async def test_traffic_reaches_prometheus_with_its_labels(
    monitored: Monitored, http: aiohttp.ClientSession
) -> None:
    """The throttled key, the rejection reasons and the outcomes arrive as the dashboard expects."""
    replicas, prometheus = monitored
    await exercise_twice(http, replicas, prometheus)

    async def labels(promql: str, label: str) -> set[str]:
        return {series["metric"].get(label, "") for series in await prometheus.query(promql)}

    expected = {
        ("sum by (client) (ollama_rate_limited_total)", "client"): {"greedy"},
        ("sum by (reason) (ollama_rejected_total > 0)", "reason"): {"invalid", "unauthorized"},
        ("sum by (status) (ollama_requests_total)", "status"): {
            "success",
            "error",
            "rate_limited",
            "rejected",
        },
        ("sum by (endpoint) (ollama_time_to_first_token_seconds_count)", "endpoint"): {
            "/api/chat",
            "/v1/chat/completions",
        },
    }
    deadline = time.monotonic() + DATA_DEADLINE_S
    while True:
        got = {key: await labels(*key) for key in expected}
        if all(got[key] >= want for key, want in expected.items()):
            break
        assert time.monotonic() < deadline, f"after {DATA_DEADLINE_S:g} s: {got}"
        await prometheus.wait_for_scrapes(1)
    retries = await prometheus.query("sum(ollama_upstream_retries_total)")
    assert float(retries[0]["value"][1]) > 0


async def test_each_backend_reaches_prometheus_and_failovers_name_both(
    monitored: Monitored, http: aiohttp.ClientSession
) -> None:
    """Both backends' slots and probes arrive per backend, and each busy answer's failover is
    counted from one backend to the other."""
    replicas, prometheus = monitored
    await exercise_twice(http, replicas, prometheus)

    async def by_backend(promql: str) -> dict[str, float]:
        return {
            s["metric"]["backend"]: float(s["value"][1]) for s in await prometheus.query(promql)
        }

    async def failovers() -> dict[tuple[str, str], float]:
        result = await prometheus.query(
            "sum by (from_backend, to_backend) (ollama_backend_failovers_total)"
        )
        return {
            (s["metric"]["from_backend"], s["metric"]["to_backend"]): float(s["value"][1])
            for s in result
        }

    deadline = time.monotonic() + DATA_DEADLINE_S
    while sum((moved := await failovers()).values()) < 2:  # one busy request a round
        assert time.monotonic() < deadline, f"after {DATA_DEADLINE_S:g} s: {moved}"
        await prometheus.wait_for_scrapes(1)
    assert all(src != dst and {src, dst} == BACKENDS for src, dst in moved)
    assert await by_backend("max by (backend) (ollama_concurrency_slots)") == {
        "main": 1.0,
        "second": 1.0,
    }
    assert await by_backend("max by (backend) (ollama_upstream_up)") == {
        "main": 1.0,
        "second": 1.0,
    }
    served = await by_backend('sum by (backend) (ollama_requests_total{backend!="none"})')
    assert set(served) == BACKENDS
    assert sum(served.values()) > 0


async def test_panels_count_each_backend_once_and_show_each_replica(
    monitored: Monitored, http: aiohttp.ClientSession
) -> None:
    """With two replicas scraped, the capacity panels count each backend's slots and loaded
    models once, and the replica panels show both replicas by name, both sharing Redis."""
    replicas, prometheus = monitored
    await exercise_twice(http, replicas, prometheus)
    panels = {(query.panel, query.ref_id): query for query in queries(load_dashboard())}

    async def panel(title: str, ref_id: str = "A") -> dict[tuple[str, ...], float]:
        """The panel query's series, keyed by the values of the labels its legend shows."""
        query = panels[title, ref_id]
        labels = sorted(query.legend_labels)
        return {
            tuple(series["metric"].get(label, "") for label in labels): float(series["value"][1])
            for series in await prometheus.query(query.promql)
        }

    async def loaded_per_replica() -> list[float]:
        result = await prometheus.query("sum by (instance) (ollama_loaded_models)")
        return [float(series["value"][1]) for series in result]

    # Loaded models follow each replica's probe: wait until both report the same, non-zero.
    deadline = time.monotonic() + DATA_DEADLINE_S
    while len(set(each := await loaded_per_replica())) != 1 or len(each) != 2 or not each[0]:
        assert time.monotonic() < deadline, f"after {DATA_DEADLINE_S:g} s: {each}"
        await prometheus.wait_for_scrapes(1)
    assert await panel("Loaded Models") == {(): each[0]}, "each backend's models counted once"

    assert await panel("Active Requests vs Slots", "B") == {(): 2.0}  # two backends of one
    assert await panel("Active Requests vs Slots by Backend", "B") == {
        ("main",): 1.0,
        ("second",): 1.0,
    }
    assert await panel("Shared State Up by Replica") == {("a",): 1.0, ("b",): 1.0}
    assert await panel("Gateway Replicas Up", "A") == {(): 2.0}
    assert await panel("Gateway Replicas Up", "B") == {(): 2.0}
    assert await panel("Gateway Replicas Up", "C") == {(): 2.0}  # GATEWAY_REPLICAS
    held = await panel("Slots Held by Replica")
    assert set(held) == {(backend, name) for backend in BACKENDS for name in REPLICAS}
    assert all(value == 0 for value in held.values()), "every request has ended"
    assert await panel("Queue by Replica") == {("a",): 0.0, ("b",): 0.0}
    assert set(await panel("Requests by Replica")) == {("a",), ("b",)}
