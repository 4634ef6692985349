"""Gateway replicas sharing one set of limits and slots through a real Redis: three real
``python -m proxy serve`` processes, one fake Ollama, one redis-server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, RedisServer, metric

pytestmark = pytest.mark.timeout(90)

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": False}


@dataclass
class Replica:
    name: str
    url: str
    process: asyncio.subprocess.Process
    lines: list[dict[str, object]] = field(default_factory=list)
    _seen: asyncio.Event = field(default_factory=asyncio.Event)

    async def read_log(self) -> None:
        assert self.process.stderr is not None
        while raw := await self.process.stderr.readline():
            try:
                self.lines.append(json.loads(raw))
            except ValueError:
                self.lines.append({"event": raw.decode(errors="replace")})
            self._seen.set()

    async def logged(self, event: str, *, after: int = 0, within_s: float = 15) -> None:
        """Wait until this replica logs ``event`` (after its first ``after`` lines)."""
        async with asyncio.timeout(within_s):
            while not any(line.get("event") == event for line in self.lines[after:]):
                self._seen.clear()
                await self._seen.wait()


Start = Callable[..., Awaitable[list[Replica]]]


@pytest.fixture
async def start_replicas(fake: FakeOllama, redis_server: RedisServer) -> AsyncIterator[Start]:
    started: list[Replica] = []
    readers: list[asyncio.Task[None]] = []

    async def start(count: int, **env: str) -> list[Replica]:
        made = []
        for _ in range(count):
            port = aiohttp.test_utils.unused_port()
            name = f"r{len(started) + 1}"
            settings = {
                **os.environ,
                "OLLAMA_URL": fake.url,
                "OLLAMA_MODEL": MODEL,
                "PROXY_HOST": "127.0.0.1",
                "PROXY_PORT": str(port),
                "REDIS_URL": redis_server.url,
                "GATEWAY_REPLICAS": str(count),
                "REPLICA_ID": name,
                "PROBE_INTERVAL": "3600",
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "info",
                "MAX_REQUESTS_PER_MINUTE": "1000000",
                "RATE_LIMIT_BURST": "100000",
                "MAX_QUEUE": "64",
                "MAX_QUEUE_PER_CLIENT": "64",
                "SHUTDOWN_DRAIN_TIMEOUT": "1",
                **env,
            }
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", stderr=asyncio.subprocess.PIPE,
                env=settings,
            )  # fmt: skip
            replica = Replica(name, f"http://127.0.0.1:{port}", process)
            readers.append(asyncio.create_task(replica.read_log()))
            await replica.logged("gateway_ready")
            started.append(replica)
            made.append(replica)
        fake.reset()
        return made

    yield start
    for replica in started:
        if replica.process.returncode is None:
            replica.process.kill()
        await replica.process.wait()
    for reader in readers:
        await reader


async def test_admissions_across_replicas_equal_rate_times_time_plus_burst(
    start_replicas: Start,
) -> None:
    """60 per minute in bursts of 10, shared: requests spread over three replicas are
    admitted as one bucket would admit them (rate x time + burst, within one)."""
    replicas = await start_replicas(3, MAX_REQUESTS_PER_MINUTE="60", RATE_LIMIT_BURST="10")
    loop = asyncio.get_running_loop()
    admitted = 0
    async with aiohttp.ClientSession() as http:
        started = loop.time()
        for i in range(45):
            async with http.post(replicas[i % 3].url + "/api/chat", json=CHAT) as response:
                await response.read()
                admitted += response.status == 200
                assert response.status in (200, 429)
        elapsed = loop.time() - started
    expected = 10 + elapsed * 60 / 60
    assert abs(admitted - expected) <= 1, (admitted, expected)


async def test_one_slot_holds_across_replicas_and_metrics_sum_to_what_ollama_saw(
    start_replicas: Start, fake: FakeOllama
) -> None:
    """One slot on the backend: whatever replica the clients hit, Ollama never runs two
    generations at once; the replicas' request counts sum to what it saw."""
    fake.config.num_parallel = 4  # it would run four: only the shared slot stops it
    fake.config.tokens = 3
    fake.config.token_interval_s = 0.03
    replicas = await start_replicas(3)
    async with aiohttp.ClientSession() as http:

        async def one(i: int) -> int:
            async with http.post(replicas[i % 3].url + "/api/chat", json=CHAT) as response:
                await response.read()
                return response.status

        statuses = await asyncio.gather(*(one(i) for i in range(12)))
        texts = []
        for replica in replicas:
            async with http.get(replica.url + "/metrics") as scraped:
                texts.append(await scraped.text())
    assert statuses == [200] * 12
    assert fake.max_active == 1
    served = sum(metric(t, "ollama_requests_total", status="success") for t in texts)
    assert served == sum(1 for seen in fake.seen if seen.path == "/api/chat") == 12
    assert {metric(t, "ollama_shared_state_up") for t in texts} == {1}
    assert {metric(t, "ollama_gateway_replicas") for t in texts} == {3}  # GATEWAY_REPLICAS
    names = sorted(r.name for r in replicas)
    assert names == sorted(
        label for t in texts for label in ("r1", "r2", "r3") if f'replica="{label}"' in t
    )


async def test_a_killed_replica_loses_its_slot_within_the_lease(
    start_replicas: Start, fake: FakeOllama
) -> None:
    """A replica that holds the one slot is SIGKILLed: within the lease the slot is free
    again and another replica's waiter is served."""
    replicas = await start_replicas(2, SLOT_LEASE="2", QUEUE_TIMEOUT="20")
    holder, other = replicas
    async with aiohttp.ClientSession() as http:
        hanging = asyncio.create_task(
            http.post(holder.url + "/api/chat", json=CHAT, headers={"X-Fake-Mode": "hang"})
        )
        await fake.wait_for(lambda: len(fake.seen) == 1)
        waiting = asyncio.create_task(http.post(other.url + "/api/chat", json=CHAT))
        async with asyncio.timeout(10):  # until the other replica says the request waits
            while True:
                async with http.get(other.url + "/health") as health:
                    if (await health.json())["queued"] == 1:
                        break
        loop = asyncio.get_running_loop()
        holder.process.send_signal(signal.SIGKILL)
        killed_at = loop.time()
        response = await waiting
        assert response.status == 200
        await response.read()
        assert loop.time() - killed_at < 2 + 1.5  # the lease, and a little
        hanging.cancel()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_when_redis_stops_each_policy_holds_and_recovery_is_automatic(
    start_replicas: Start, redis_server: RedisServer, policy: str
) -> None:
    """Redis stops: open, the replica serves alone; closed, it answers 503 with Retry-After;
    neither waits longer than the short Redis timeout. Redis starts again: the replica is
    back on the shared state by itself (one log line each way)."""
    (replica,) = await start_replicas(1, SHARED_STATE_ON_FAILURE=policy, REDIS_TIMEOUT="0.2")
    async with aiohttp.ClientSession() as http:
        redis_server.stop()
        loop = asyncio.get_running_loop()
        for _ in range(2):  # the first finds out, the second knows
            started = loop.time()
            async with http.post(replica.url + "/api/chat", json=CHAT) as response:
                body = await response.json()
            assert loop.time() - started < 1.0
            if policy == "open":
                assert response.status == 200
            else:
                assert response.status == 503
                assert body["error"].startswith("the gateway's shared state (Redis) does not")
                assert response.headers["Retry-After"] == "1"
        await replica.logged("shared_state_down")
        mark = len(replica.lines)
        redis_server.start()
        await replica.logged("shared_state_up", after=mark)
        async with http.post(replica.url + "/api/chat", json=CHAT) as response:
            assert response.status == 200
        async with http.get(replica.url + "/metrics") as scraped:
            assert metric(await scraped.text(), "ollama_shared_state_up") == 1
    assert redis_server.scripts_run() > 0  # the last request was decided in Redis again
