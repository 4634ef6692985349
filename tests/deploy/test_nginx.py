"""deploy/nginx/gateway.conf run by Debian's nginx (two workers, as a small box's image
would run) in front of real gateway replicas that share a real redis-server: what the
replicas stack's clients get from it.

The file is the deploy file with the gateway service's name resolved to the replicas'
addresses (tests/deploy/nginx.py); nginx listens on a socket bound here and inherited
(``NGINX`` environment variable), so there is no port to race for and no wait for it to
listen.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest

from loadtest.fake_ollama import MODE_HEADER, FakeOllama
from tests.conftest import MODEL, GatewayFactory, RedisServer, RunningGateway, merge, metric
from tests.deploy.nginx import write_config

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "stream": False}

StartNginx = Callable[[Sequence[str]], Awaitable[str]]


@pytest.fixture
async def nginx_in_front(nginx_binary: str, tmp_path: Path) -> AsyncIterator[StartNginx]:
    """Starts nginx with the deploy file in front of the given ``host:port`` upstreams; its
    URL."""
    started: list[asyncio.subprocess.Process] = []

    async def start(upstreams: Sequence[str]) -> str:
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(128)
        listener.set_inheritable(True)
        port = listener.getsockname()[1]
        main = write_config(tmp_path, upstreams, listen=f"127.0.0.1:{port}", workers=2)
        process = await asyncio.create_subprocess_exec(
            nginx_binary, "-c", str(main), "-e", str(tmp_path / "error.log"),
            pass_fds=[listener.fileno()], env={**os.environ, "NGINX": f"{listener.fileno()};"},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        listener.close()  # nginx holds it now
        started.append(process)
        return f"http://127.0.0.1:{port}"

    yield start
    for process in started:
        if process.returncode is None:
            process.terminate()
            try:
                async with asyncio.timeout(10):
                    await process.wait()
            except TimeoutError:
                process.kill()
                await process.wait()


@dataclass
class Fleet:
    replicas: list[RunningGateway]
    url: str  # nginx

    async def served(self) -> list[float]:
        """Successful requests each replica has answered."""
        texts = [await replica.metrics_text() for replica in self.replicas]
        return [metric(text, "ollama_requests_total", status="success") for text in texts]

    async def holding(self) -> list[float]:
        """Slots each replica holds now."""
        texts = [await replica.metrics_text() for replica in self.replicas]
        return [metric(text, "ollama_active_requests") for text in texts]


StartFleet = Callable[..., Awaitable[Fleet]]


@pytest.fixture
async def fleet(
    fake: FakeOllama,
    gateway_factory: GatewayFactory,
    redis_server: RedisServer,
    nginx_in_front: StartNginx,
) -> StartFleet:
    """Two gateway replicas sharing Redis, trusting nginx (127.0.0.1) as the replicas stack
    trusts its network, with two slots on the fake; nginx in front of them."""

    async def start(**sections: Any) -> Fleet:
        fake.config.num_parallel = 2
        replicas = []
        for name in ("a", "b"):
            settings = merge(
                {
                    "server": {"trusted_proxies": ["127.0.0.1/32"]},
                    "limits": {"parallel": 2},
                    "shared": {"redis_url": redis_server.url, "replicas": 2, "replica": name},
                },
                sections,
            )
            replicas.append(await gateway_factory(**settings))
        url = await nginx_in_front([urlsplit(replica.url).netloc for replica in replicas])
        return Fleet(replicas, url)

    return start


async def test_streams_flow_while_generating_and_new_requests_go_to_the_less_busy_replica(
    fleet: StartFleet, http: aiohttp.ClientSession
) -> None:
    """A stream's first line reaches the client while the model is still generating, and
    while it runs every new request goes to the other replica (least connections)."""
    running = await fleet()
    stalled = {MODE_HEADER: "stall"}  # two lines, then the fake never finishes
    async with http.post(
        running.url + "/api/chat", json={**CHAT, "stream": True}, headers=stalled
    ) as stream:
        assert stream.status == 200
        first = await asyncio.wait_for(stream.content.readline(), 10)
        assert json.loads(first)["done"] is False
        holding = await running.holding()
        assert sorted(holding) == [0, 1]
        busy = holding.index(1)
        for _ in range(4):
            async with http.post(running.url + "/api/chat", json=CHAT) as response:
                assert response.status == 200
                await response.read()
        served = await running.served()
        assert served[busy] == 0
        assert served[1 - busy] == 4


async def request_from(url: str, source: str, forwarded: str | None = None) -> int:
    """POST a chat from the local address ``source``; the status."""
    headers = {"X-Forwarded-For": forwarded} if forwarded else {}
    connector = aiohttp.TCPConnector(local_addr=(source, 0))
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(url + "/api/chat", json=CHAT, headers=headers) as response,
    ):
        await response.read()
        return response.status


async def test_clients_are_told_apart_by_their_own_address(fleet: StartFleet) -> None:
    """Behind nginx each client has its own per-client bucket, shared by the replicas, and a
    client cannot pose as another address with its own X-Forwarded-For."""
    running = await fleet(limits={"client_requests_per_minute": 1, "client_burst": 1})
    assert await request_from(running.url, "127.0.0.2") == 200
    assert await request_from(running.url, "127.0.0.2") == 429
    # Another address is another client, whichever replica nginx picks.
    assert await request_from(running.url, "127.0.0.3") == 200
    # A claimed address is replaced by the real one: no escape, and no framing another client.
    assert await request_from(running.url, "127.0.0.2", forwarded="203.0.113.9") == 429
    assert await request_from(running.url, "127.0.0.4", forwarded="127.0.0.2") == 200


async def test_large_bodies_reach_the_gateway_which_answers_in_dialect(
    fleet: StartFleet, http: aiohttp.ClientSession
) -> None:
    """nginx passes a body beyond its own 1 MB default to the gateway, whose limit answers
    in the client's dialect; a body within the gateway's limit is served."""
    running = await fleet(server={"max_body_bytes": 2_000_000})

    def generate(prompt_bytes: int) -> io.BytesIO:
        body = {"model": MODEL, "prompt": "x" * prompt_bytes, "stream": False}
        return io.BytesIO(json.dumps(body).encode())

    url, headers = running.url + "/api/generate", {"Content-Type": "application/json"}
    async with http.post(url, data=generate(1_500_000), headers=headers) as response:
        assert response.status == 200
        await response.read()
    async with http.post(url, data=generate(3_000_000), headers=headers) as response:
        assert response.status == 413
        assert "X-Request-ID" in response.headers  # the gateway's answer, not nginx's
        body = await response.json()
    assert isinstance(body["error"], str)


async def test_without_a_replica_nginx_answers_503_in_each_dialect(
    nginx_in_front: StartNginx, http: aiohttp.ClientSession
) -> None:
    """With no replica answering, clients get a 503 with Retry-After in their route's
    dialect, never nginx's HTML; /metrics is not served through nginx."""
    # A bound socket that does not listen: connections to it are refused.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        url = await nginx_in_front([f"127.0.0.1:{closed.getsockname()[1]}"])
        for _ in range(2):  # refused, then the replica marked down: the same answer
            async with http.post(url + "/api/chat", json=CHAT) as response:
                assert response.status == 503
                assert response.headers["Retry-After"] == "5"
                assert response.content_type == "application/json"
                assert isinstance((await response.json())["error"], str)
        async with http.post(url + "/v1/chat/completions", json=CHAT) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "5"
            error = (await response.json())["error"]
            assert error["code"] == "gateway_unavailable"
            assert error["message"]
        async with http.get(url + "/metrics") as response:
            assert response.status == 404
            assert (await response.json())["error"]["code"] == "not_found"
