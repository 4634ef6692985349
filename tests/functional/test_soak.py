"""A soak of the running gateway: ten thousand requests from careless clients against a
faulty upstream, and afterwards nothing held, nothing leaked, nothing miscounted."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sys
from collections import Counter
from pathlib import Path

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL, metric

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

REQUESTS = int(os.environ.get("SOAK_REQUESTS", "10000"))
CLIENTS = 8  # fewer than the queue holds: every request waits its turn, none is turned away
KEYS = {f"app{i}": f"soak-key-{i}-0123456789" for i in range(4)}
# Upstream faults, each on 2.5 % of requests (10 % in all): a reset mid-stream, a 500
# before any byte, a stall (the gateway's idle or headers timeout ends it), a line that is
# not JSON.
FAULTS = ("drop", "error500", "stall", "malformed")
ENDED_BY_UPSTREAM = {"malformed"}  # ended cleanly without finishing: relayed as it came


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def generation_peak(fake: FakeOllama) -> int:
    """The most generations the upstream ever worked on at once, from what it recorded."""
    events = []
    for seen in fake.seen:
        if seen.path in ("/api/chat", "/v1/chat/completions") and seen.finished is not None:
            events += [(seen.started, 1), (seen.finished, -1)]
    peak = running = 0
    for _, step in sorted(events, key=lambda event: (event[0], event[1])):
        running += step
        peak = max(peak, running)
    return peak


def ended_properly(body: bytes, *, sse: bool) -> bool:
    """A stream read to its end ends with its final statistics or an in-dialect error."""
    if sse:
        events = [e for e in body.split(b"\n\n") if e.strip()]
        last = events[-1] if events else b""
        return last == b"data: [DONE]" or b'"error"' in last
    lines = body.splitlines()
    last = json.loads(lines[-1]) if lines else {}
    return last.get("done") is True or "error" in last


async def one_request(
    http: aiohttp.ClientSession, url: str, rng: random.Random, tally: Counter[str]
) -> None:
    openai = rng.random() < 0.5
    stream = rng.random() < 0.7
    key = rng.choice(list(KEYS.values()))
    fault = rng.choice(FAULTS) if rng.random() < 0.10 else "ok"
    abort_after = rng.randrange(0, 6) if rng.random() < 0.30 else None
    messages = [{"role": "user", "content": "soak"}]
    body = {"model": MODEL, "messages": messages, "stream": stream}
    path = "/v1/chat/completions" if openai else "/api/chat"
    headers = {"Authorization": f"Bearer {key}", "X-Fake-Mode": fault}
    async with http.post(url + path, json=body, headers=headers) as response:
        tally[f"status {response.status}"] += 1
        if abort_after is not None:
            for _ in range(abort_after):
                if not await response.content.readline():
                    break
            response.close()  # a client that leaves at a random point
            tally["aborted"] += 1
            return
        raw = await response.read()
        if response.status != 200 or not stream:
            return
        if fault in ENDED_BY_UPSTREAM:
            tally["ended by the upstream"] += 1
        elif not ended_properly(raw, sse=openai):
            tally["badly ended"] += 1


async def test_ten_thousand_careless_requests_leave_nothing_behind(fake: FakeOllama) -> None:
    """10,000 native and /v1 requests, streamed and not, several keys, one slot and a bounded
    queue, 30 % of clients leaving at random points and 10 % of upstream answers failing:
    afterwards no slot or queue place is held, the upstream never ran two generations at
    once, the gateway's memory grew by less than 30 MB, no InternalError, and every stream
    read to its end ended with its statistics or an in-dialect error."""
    fake.config.num_parallel = 4  # the fake would run four at once: only the gate stops it
    fake.config.tokens = 6
    fake.config.max_seen = None
    port = aiohttp.test_utils.unused_port()
    env = {
        **os.environ,
        "OLLAMA_URL": fake.url,
        "OLLAMA_MODEL": MODEL,
        "PROXY_HOST": "127.0.0.1",
        "PROXY_PORT": str(port),
        "PROXY_API_KEYS": ",".join(f"{name}:{key}" for name, key in KEYS.items()),
        "OLLAMA_NUM_PARALLEL": "1",
        "MAX_QUEUE": "12",
        "MAX_QUEUE_PER_CLIENT": "6",
        "QUEUE_TIMEOUT": "5",
        "MAX_REQUESTS_PER_MINUTE": "1000000",
        "RATE_LIMIT_BURST": "100000",
        "IDLE_TIMEOUT": "0.1",
        "API_TIMEOUT": "0.3",  # a stalled non-streamed answer sends no headers
        "MAX_RETRIES": "0",
        "PROBE_INTERVAL": "3600",
        "LOG_LEVEL": "info",  # every request_finished line: none may hold a key
        "LOG_FORMAT": "json",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", stderr=asyncio.subprocess.PIPE, env=env
    )
    assert process.stderr is not None
    log_lines: list[bytes] = []

    async def collect_log() -> None:
        assert process.stderr is not None
        while line := await process.stderr.readline():
            log_lines.append(line)

    url = f"http://127.0.0.1:{port}"
    async with asyncio.timeout(15):
        while b"gateway_ready" not in await process.stderr.readline():
            pass
    collecting = asyncio.create_task(collect_log())
    try:
        async with aiohttp.ClientSession() as http:
            warm = aiohttp.TCPConnector(limit=CLIENTS)
            async with aiohttp.ClientSession(connector=warm) as clients:
                await one_request(clients, url, random.Random(0), Counter())
                rss_before = rss_mb(process.pid)
                tally: Counter[str] = Counter()
                todo = iter(range(REQUESTS))

                async def client(seed: int) -> None:
                    rng = random.Random(seed)
                    for _ in todo:
                        await one_request(clients, url, rng, tally)

                await asyncio.gather(*(client(seed) for seed in range(CLIENTS)))
            async with http.get(url + "/health") as health:
                state = await health.json()
            async with http.get(url + "/metrics") as scraped:
                text = await scraped.text()
            rss_after = rss_mb(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 15)
        await collecting

    assert (state["active"], state["queued"]) == (0, 0)
    assert generation_peak(fake) == 1
    assert rss_after - rss_before < 30, (rss_before, rss_after)
    assert metric(text, "ollama_errors_total", error_type="InternalError") == 0
    assert tally["badly ended"] == 0, tally
    assert tally["aborted"] > REQUESTS * 0.2, tally
    assert tally["status 200"] > REQUESTS * 0.8, tally  # served, not turned away
    assert sum(n for name, n in tally.items() if name.startswith("status")) == REQUESTS + 0
    logs = b"".join(log_lines)
    assert b"Traceback" not in logs
    assert not any(key.encode() in logs for key in KEYS.values())
