"""The scaling run (issue 15): N fake Ollamas of one slot each behind one gateway, N = 1 to
``Settings.scaling_backends``. Does the gateway complete N times the generations of one
backend, and what does routing cost it per request?

Every fake generates for a fixed time (``GENERATION_S``), long beside what the gateway spends
on a request, and ``CLIENTS_PER_SLOT`` clients per slot keep a waiter queued at the gateway
for every slot that frees: the slots, not the proxy, bound the throughput. For each N two
gateways are measured: one whose ``BACKENDS`` lists N one-slot fakes, and one in the
single-upstream form (``OLLAMA_URL``, ``OLLAMA_NUM_PARALLEL=N``) in front of one fake of N
slots. The second carries the same load (requests per second, streams at once) without
routing: its CPU per request is what the first's is compared with (the difference also holds
what N upstream processes change against one: their chunks reach the gateway at independent
times), and its N=1 throughput is the one-backend figure. All gateways run at once, idle
but for the one measured, and take turns in rotating rounds, so a ratio compares runs made
within the same minute. Each fake is its own process, so a gateway's CPU clock counts its
own work alone.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.bench import results
from loadtest.bench.measure import STREAM_BODY, Settings, in_rounds, loadgen
from loadtest.bench.services import Service, cpu_seconds, start_fake, start_gateway, stop

TTFT_S = 0.02
TOKENS = 11
TOKEN_INTERVAL_S = 0.004
# The first token after TTFT_S, the others TOKEN_INTERVAL_S apart.
GENERATION_S = TTFT_S + (TOKENS - 1) * TOKEN_INTERVAL_S
CLIENTS_PER_SLOT = 2
ONE, SEVERAL = results.ONE_UPSTREAM, results.BACKENDS  # the gateways' names: prefix and N

_SERVED = re.compile(r'^ollama_requests_total\{[^}]*\bbackend="([^"]+)"[^}]*\}\s+(\S+)', re.M)


def served_by_backend(metrics_text: str) -> dict[str, int]:
    """Requests each backend served, from the gateway's ``/metrics`` (Prometheus text)."""
    served: dict[str, int] = {}
    for backend, value in _SERVED.findall(metrics_text):
        if backend != "none":  # refused before a backend was chosen
            served[backend] = served.get(backend, 0) + int(float(value))
    return served


async def warm_up(gateway: Service, requests: int) -> None:
    """Send a gateway its first requests, so that no round pays for its first-use costs."""
    body = json.dumps(STREAM_BODY).encode()
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession() as http:

        async def one() -> None:
            url = gateway.url + "/v1/chat/completions"
            async with http.post(url, data=body, headers=headers) as response:
                await response.read()

        await asyncio.gather(*(one() for _ in range(requests)))


async def scrape_served(gateway: Service) -> dict[str, int]:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/metrics") as response:
        return served_by_backend(await response.text())


def n_of(name: str) -> int:
    """N of a gateway's name (``one:N``, ``backends:N``)."""
    return int(name.rsplit(":", 1)[1])


def fake(slots: int) -> Awaitable[Service]:
    return start_fake(
        tokens=TOKENS, token_interval_s=TOKEN_INTERVAL_S, ttft_s=TTFT_S, num_parallel=slots
    )


async def start_all(
    starts: Sequence[Awaitable[Service | tuple[Service, float]]], started: list[Service]
) -> list[Service]:
    """Start services at once (a start-up is mostly imports: two cores do two at a time).
    Each that started is added to ``started``, to be stopped even when another failed."""
    outcomes = await asyncio.gather(*starts, return_exceptions=True)
    services = [
        o[0] if isinstance(o, tuple) else o for o in outcomes if not isinstance(o, BaseException)
    ]
    started.extend(services)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):
            raise outcome
    return services


async def measure_scaling(s: Settings, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Generations per second and the gateway's CPU per request, for N = 1 to
    ``s.scaling_backends``: N backends, and one upstream of N slots, in ``s.rounds`` rotating
    rounds."""
    largest = s.scaling_backends
    say(
        f"scaling: 1 to {largest} fake backends of one slot, "
        f"{GENERATION_S * 1000:.0f} ms per generation ..."
    )
    started: list[Service] = []  # to stop, whatever happens
    try:
        # `largest` one-slot fakes, and for each single-upstream gateway of N > 1 a fake of
        # exactly N slots: like the N backends, no more slots than the gateway fills.
        slots = [1] * largest + list(range(2, largest + 1))
        fakes = await start_all([fake(n) for n in slots], started)
        urls = [f.url for f in fakes[:largest]]
        one_of = {1: urls[0]} | {
            n: f.url for n, f in zip(slots[largest:], fakes[largest:], strict=True)
        }
        names = [f"{kind}{n}" for n in range(1, largest + 1) for kind in (ONE, SEVERAL)]
        starts = [
            start_gateway(one_of[n], parallel=n, workdir=workdir, name=f"gateway-one-{n}")
            if kind == ONE
            else start_gateway(
                urls[0], parallel=1, workdir=workdir, backends=urls[:n], name=f"gateway-{n}"
            )
            for n in range(1, largest + 1)
            for kind in (ONE, SEVERAL)
        ]
        gateways = dict(zip(names, await start_all(starts, started), strict=True))
        await asyncio.gather(
            *(warm_up(g, CLIENTS_PER_SLOT * n_of(name)) for name, g in gateways.items())
        )

        async def run(name: str) -> dict[str, Any]:
            gateway, n = gateways[name], n_of(name)
            clients = CLIENTS_PER_SLOT * n
            cpu_before = cpu_seconds(gateway.pid)
            raw = await loadgen(
                "stream", "--url", gateway.url + "/v1/chat/completions",
                "--body", json.dumps(STREAM_BODY), "--concurrency", str(clients),
                "--requests", str(s.scaling_generations * n),
            )  # fmt: skip
            # The load generator's untimed first round sends one request per client.
            sent = raw["requests"] + raw["errors"] + clients
            return {
                "generations_per_s": raw["requests"] / raw["wall_s"] if raw["wall_s"] > 0 else 0.0,
                "errors": raw["errors"],
                "cpu_us_per_request": (cpu_seconds(gateway.pid) - cpu_before) / sent * 1e6,
            }

        runs = await in_rounds({name: name for name in gateways}, s.rounds, run, say)
        served = {name: await scrape_served(gateway) for name, gateway in gateways.items()}
    finally:
        await asyncio.gather(*(stop(service) for service in started))  # stop() never raises
    return results.summarise_scaling(
        runs,
        served,
        generation_ms=GENERATION_S * 1000,
        clients_per_slot=CLIENTS_PER_SLOT,
        generations_per_slot=s.scaling_generations,
    )
