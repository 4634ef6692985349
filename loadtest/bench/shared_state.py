"""The shared-state section (issue 16): what sharing limits and slots through Redis costs a
gateway, against the same gateway with in-process state, in the same run.

Four gateways run at once in front of one fake Ollama of ``UPSTREAM_SLOTS`` slots (the gate
is never what limits), with limits too high to refuse anything: in-process state, and
``REDIS_URL``; then both again with ``CLIENT_TOKENS_PER_MINUTE`` (a token reservation at
admission, a settlement at the end). Each Redis gateway has a redis-server of its own, on a
Unix socket, so that each server's statistics hold one gateway's calls. In rotating rounds
every gateway gets the same two workloads, small non-streamed requests and streams; around
each run the bench reads the gateway's CPU clock and its requests (``/metrics``), and its
Redis's CPU clock and statistics (``shared_results`` says what is counted). Then long
streams through a gateway whose ``SLOT_LEASE`` is short: in a window where every stream
holds its slot, the only calls left are the lease renewals.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from redis import asyncio as aioredis

from loadtest.bench import results, shared_results
from loadtest.bench.measure import (
    SMALL,
    STREAM_BODY,
    UPSTREAM_SLOTS,
    LoadGenerator,
    Settings,
    gate_state,
    in_rounds,
)
from loadtest.bench.scaling import start_all, warm_up
from loadtest.bench.services import (
    Service,
    cpu_seconds,
    find_redis_server,
    start_fake,
    start_gateway,
    start_redis,
    stop,
)

PATH = "/v1/chat/completions"
TOKENS_PER_MINUTE = "1e12"  # a token bucket that never refuses, but is reserved and settled
# A loaded two-core machine can stall a call for longer than the default 0.25 s; a gateway
# that marked Redis down would go on in-process and the section would measure that.
REDIS_TIMEOUT_S = "5"
LEASE_S = 1.5  # the long streams' SLOT_LEASE: a renewal every 0.5 s
LONG_TOKEN_INTERVAL_S = 0.1  # the long streams' fake: a chunk every 0.1 s, for ever
QUIET_POLL_S = 0.02
QUIET_WITHIN_S = 2.0
Workload = Callable[[str], Awaitable[dict[str, Any]]]  # a gateway's URL -> the run's numbers


@dataclass
class Gateway:
    """A gateway of the section, with the redis-server it shares state through (if any)."""

    service: Service
    redis: Service | None
    client: aioredis.Redis | None  # the bench's connection to that Redis, for INFO


async def read_redis(gateway: Gateway) -> dict[str, Any] | None:
    """Redis's counters now: calls by command, read events, CPU, time spent in INFO."""
    if gateway.client is None or gateway.redis is None:
        return None
    info = await gateway.client.info("stats", "commandstats")
    stats = {k.removeprefix("cmdstat_"): v for k, v in info.items() if k.startswith("cmdstat_")}
    return {
        "calls": {name: int(v["calls"]) for name, v in stats.items()},
        "info_usec": int(stats.get(shared_results.OWN, {}).get("usec", 0)),
        "reads": int(info["total_reads_processed"]),
        "connections": int(info["total_connections_received"]),
        "cpu_s": cpu_seconds(gateway.redis.pid),
    }


async def until_quiet(gateway: Gateway) -> dict[str, Any] | None:
    """Redis's counters once the gateway has finished (no request active) and its last
    calls have landed (a slot release and a settlement are sent, not awaited): the calls
    stopped changing over two readings, or ``QUIET_WITHIN_S`` passed."""
    deadline = time.perf_counter() + QUIET_WITHIN_S
    while time.perf_counter() < deadline:
        active, queued = await gate_state(gateway.service)
        if active == 0 and queued == 0:
            break
        await asyncio.sleep(QUIET_POLL_S)
    last = await read_redis(gateway)
    while last is not None and time.perf_counter() < deadline:
        await asyncio.sleep(QUIET_POLL_S)
        now = await read_redis(gateway)
        assert now is not None
        if shared_results.redis_delta(last, now)["calls"] == {}:
            return now
        last = now
    return last


async def scrape_requests(gateway: Gateway) -> tuple[int, int]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(gateway.service.url + "/metrics") as response,
    ):
        return shared_results.requests_counted(await response.text())


async def measured(gateway: Gateway, workload: Workload) -> dict[str, Any]:
    """One run of ``workload`` on ``gateway``: its own numbers, the requests admitted, the
    gateway's CPU per admitted request and what Redis did for them."""
    admitted_before, not_admitted_before = await scrape_requests(gateway)
    cpu_before = cpu_seconds(gateway.service.pid)
    redis_before = await read_redis(gateway)
    run = await workload(gateway.service.url)
    redis_after = await until_quiet(gateway)
    cpu_s = cpu_seconds(gateway.service.pid) - cpu_before
    admitted_after, not_admitted_after = await scrape_requests(gateway)
    admitted = admitted_after - admitted_before
    delta = (
        shared_results.redis_delta(redis_before, redis_after)
        if redis_before is not None and redis_after is not None
        else None
    )
    return run | {
        "admitted": admitted,
        "not_admitted": not_admitted_after - not_admitted_before,
        "cpu_us_per_request": cpu_s / admitted * 1e6 if admitted else None,
        "redis": delta,
    }


async def measure_shared(s: Settings, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """The section, or ``{"skipped": why}`` when there is no redis-server."""
    binary = find_redis_server()
    if binary is None:
        why = "no redis-server (Debian: apt-get install redis-server)"
        say(f"shared state: skipped: {why}")
        return {"skipped": why}
    say(f"shared state: in-process against Redis ({binary}) ...")
    started: list[Service] = []  # to stop, whatever happens
    clients: list[aioredis.Redis] = []
    try:
        fake = await start_fake(tokens=s.chunks, token_interval_s=0.0, num_parallel=UPSTREAM_SLOTS)
        started.append(fake)
        shared_by = [key for key, _title, shares, _tokens in shared_results.CONFIGS if shares]
        servers = await start_all(
            [start_redis(binary, workdir, f"redis-{key}") for key in shared_by], started
        )
        redis_of = dict(zip(shared_by, servers, strict=True))
        starts = [
            start_gateway(
                fake.url,
                parallel=UPSTREAM_SLOTS,
                workdir=workdir,
                name=f"gateway-{key}",
                env=_gateway_env(redis_of[key].url if shares else "", tokens=tokens),
            )
            for key, _title, shares, tokens in shared_results.CONFIGS
        ]
        services = await start_all(starts, started)
        gateways: dict[str, Gateway] = {}
        for (key, *_), service in zip(shared_results.CONFIGS, services, strict=True):
            redis = redis_of.get(key)
            client = None
            if redis is not None:
                client = aioredis.Redis.from_url(redis.url, decode_responses=True)
                clients.append(client)
            gateways[key] = Gateway(service, redis, client)
        # First requests: connections opened, Redis's pool grown, scripts loaded.
        await asyncio.gather(*(warm_up(g.service, 4 * s.concurrency) for g in gateways.values()))
        version = str((await clients[0].info("server"))["redis_version"])
        async with LoadGenerator(workdir / "loadgen.log") as load:
            runs = await _rounds(s, gateways, load, say)
        down_events = sum(_down_events(workdir / f"gateway-{key}.log") for key in gateways)
        await asyncio.gather(*(stop(g.service) for g in gateways.values()), stop(fake))
        say(f"  long streams, SLOT_LEASE={LEASE_S:g} s ...")
        long = await measure_long_streams(s, workdir, redis_of["redis"], started)
    finally:
        for client in clients:
            await client.aclose()
        await asyncio.gather(*(stop(service) for service in started))  # stop() never raises
    return shared_results.summarise_shared(
        runs,
        redis_version=version,
        slots=UPSTREAM_SLOTS,
        rounds=s.rounds,
        connections=s.small_concurrency,
        duration_s=s.shared_duration_s,
        chunks=s.chunks,
        concurrency=s.concurrency,
        streams=s.shared_streams,
        tokens_per_minute=float(TOKENS_PER_MINUTE),
        redis_timeout_s=float(REDIS_TIMEOUT_S),
        long_streams=long,
        down_events=down_events,
    )


async def _rounds(
    s: Settings, gateways: dict[str, Gateway], load: LoadGenerator, say: Callable[[str], None]
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Each workload on every gateway, in rotating rounds. Small requests go through the
    aiohttp load generator, not wrk: it finishes every request it starts, where wrk cuts its
    last ones, some in the middle of a Redis call (counted, not admitted, and a reconnection)."""

    def small(connections: int) -> Workload:
        async def run(base: str) -> dict[str, Any]:
            raw = await load.run(
                "small", base + PATH, SMALL[PATH],
                concurrency=connections, duration=s.shared_duration_s,
            )  # fmt: skip
            return {
                "requests_per_s": raw["requests_per_s"],
                "latency_p50_ms": results._ms(raw["latency_p50_s"]),
                "latency_p99_ms": results._ms(raw["latency_p99_s"]),
                "errors": raw["errors"],
            }

        return run

    async def streams(base: str) -> dict[str, Any]:
        raw = await load.run(
            "stream", base + PATH, STREAM_BODY,
            concurrency=s.concurrency, requests=s.shared_streams,
        )  # fmt: skip
        run = results.stream_run(raw)
        return {
            "latency_p50_ms": run["ttft_p50_ms"],
            "latency_p99_ms": run["ttft_p99_ms"],
            "errors": run["errors"],
        }

    workloads = {"light": small(1), "small": small(s.small_concurrency), "streams": streams}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for name in shared_results.WORKLOADS:

        async def run(key: str, workload: Workload = workloads[name]) -> dict[str, Any]:
            return await measured(gateways[key], workload)

        say(f"  shared state, {name} ...")
        runs[name] = await in_rounds({key: key for key in gateways}, s.rounds, run, say)
    return runs


async def measure_long_streams(
    s: Settings, workdir: Path, redis: Service, started: list[Service]
) -> dict[str, Any]:
    """``s.long_streams`` streams that never end, through a Redis gateway with a short
    lease: once each holds its slot, Redis's counters over ``s.long_window_s``."""
    fake = await start_fake(
        tokens=1_000_000, token_interval_s=LONG_TOKEN_INTERVAL_S, num_parallel=UPSTREAM_SLOTS
    )
    started.append(fake)
    service, _ = await start_gateway(
        fake.url, parallel=UPSTREAM_SLOTS, workdir=workdir, name="gateway-long",
        env=_gateway_env(redis.url, tokens=False) | {"SLOT_LEASE": str(LEASE_S)},
    )  # fmt: skip
    started.append(service)
    client = aioredis.Redis.from_url(redis.url, decode_responses=True)
    gateway = Gateway(service, redis, client)
    hold = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.bench.loadgen", "hold", "--url", service.url + PATH,
        "--body", json.dumps(STREAM_BODY), "--streams", str(s.long_streams),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert hold.stdin is not None
        assert hold.stdout is not None
        async with asyncio.timeout(30):
            await hold.stdout.readline()  # {"started": N}
            held = 0
            while held < s.long_streams:
                await asyncio.sleep(QUIET_POLL_S)
                held, _ = await gate_state(service)
        before = await read_redis(gateway)
        window_started = time.perf_counter()
        await asyncio.sleep(s.long_window_s)
        after = await read_redis(gateway)
        window_s = time.perf_counter() - window_started
        assert before is not None
        assert after is not None
        held = (await gate_state(service))[0]
        hold.stdin.write(b"\n")
        await hold.stdin.drain()
        async with asyncio.timeout(30):
            await hold.stdout.readline()
    finally:
        if hold.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                hold.kill()
            await hold.wait()
        await client.aclose()
    out = shared_results.long_streams(
        shared_results.redis_delta(before, after),
        streams=s.long_streams,
        window_s=window_s,
        lease_s=LEASE_S,
    )
    return out | {"held_at_end": held}


def _gateway_env(redis_url: str, *, tokens: bool) -> dict[str, str]:
    """A section gateway's settings beyond the bench's: Redis, the token limit."""
    env = {"CLIENT_TOKENS_PER_MINUTE": TOKENS_PER_MINUTE} if tokens else {}
    if redis_url:
        env |= {"REDIS_URL": redis_url, "REDIS_TIMEOUT": REDIS_TIMEOUT_S}
    return env


def _down_events(log: Path) -> int:
    """How many times a gateway marked its shared state down (its log's JSON lines)."""
    if not log.exists():
        return 0
    with log.open(errors="replace") as lines:
        return sum(1 for line in lines if '"shared_state_down"' in line)
