"""Running the benchmark: start the processes, run each workload in rotating rounds against
every target, hold streams open for the memory reading, time the start-ups."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.bench import results
from loadtest.bench.services import (
    MODEL,
    Service,
    cpu_seconds,
    find_nginx,
    rss_bytes,
    start_fake,
    start_gateway,
    start_naive,
    start_nginx,
    stop,
)
from loadtest.bench.wrk import find_wrk, run_wrk
from proxy.cli.engine import default_threads
from proxy.config import ConfigError, parse_config

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]
STREAM_BODY = {"model": MODEL, "messages": MESSAGES, "stream": True}
SMALL = {
    "/api/tags": None,
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES, "max_tokens": 4},
}
UPSTREAM_SLOTS = 64  # the fake's parallel slots for the throughput runs


@dataclass(frozen=True, slots=True)
class Settings:
    chunks: int = 50
    concurrency: int = 8
    stream_requests: int = 400
    small_duration_s: int = 3
    small_concurrency: int = 8
    rounds: int = 5  # the machine is shared: medians of more rounds move less
    streams: int = 500
    hold_interval_s: float = 1.0
    startup_runs: int = 3
    use_nginx: bool = True
    use_wrk: bool = True
    scaling_backends: int = 4  # the scaling run: N = 1 to this many backends
    scaling_generations: int = 8  # per slot per run
    shared_duration_s: float = 0.6  # the shared-state section: seconds per small-request run
    shared_streams: int = 100  # streams per run
    long_streams: int = 8  # streams held open for the lease renewals
    long_window_s: float = 3.0  # seconds over which their renewals are counted
    engine_rounds: int = 3  # the real engine: rounds, streams per side per round, length
    engine_streams: int = 6
    engine_tokens: int = 64
    engine_threads: int = field(default_factory=default_threads)


async def loadgen(*args: str, timeout_s: float = 600) -> dict[str, Any]:
    """Run the load generator in its own process and return its JSON report."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.bench.loadgen", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed: {err.decode()[-2000:]}")
    report: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    return report


class LoadGenerator:
    """The load generator as one long-lived process (its ``serve`` mode), for a section of
    many short runs: each run is a line to it and a line back. ``async with``."""

    def __init__(self, log: Path) -> None:
        self._log = log
        self._proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> LoadGenerator:
        with self._log.open("ab") as sink:
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "loadtest.bench.loadgen", "serve",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=sink,
                limit=1 << 24,  # a stream run's answer lists every TTFT
            )  # fmt: skip
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()

    async def run(self, mode: str, url: str, body: object, **sizes: float) -> dict[str, Any]:
        """One ``stream`` (``concurrency``, ``requests``) or ``small`` (``concurrency``,
        ``duration``) run; its JSON report."""
        proc = self._proc
        assert proc is not None
        assert proc.stdin is not None
        assert proc.stdout is not None
        ask = {"mode": mode, "url": url, "body": None if body is None else json.dumps(body)}
        proc.stdin.write(json.dumps(ask | sizes).encode() + b"\n")
        await proc.stdin.drain()
        async with asyncio.timeout(600):
            line = await proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited; see {self._log}")
        report: dict[str, Any] = json.loads(line)
        return report


async def in_rounds(
    targets: dict[str, str], rounds: int, run: Callable[[str], Any], say: Callable[[str], None]
) -> dict[str, list[dict[str, Any]]]:
    """Every target once per round, the order rotated each round to spread drift evenly."""
    names = list(targets)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            runs[name].append(await run(targets[name]))
        say(f"  round {r + 1}/{rounds} done")
    return runs


async def measure_streaming(
    targets: dict[str, str],
    pids: dict[str, int],
    s: Settings,
    say: Callable[[str], None],
    *,
    concurrency: int | None = None,
    requests: int | None = None,
) -> dict[str, Any]:
    by_url = {url: pids[name] for name, url in targets.items() if name in pids}
    concurrency = concurrency or s.concurrency
    requests = requests or s.stream_requests

    async def run(base: str) -> dict[str, Any]:
        pid = by_url.get(base)
        cpu_before = cpu_seconds(pid) if pid else 0.0
        raw = await loadgen(
            "stream", "--url", base + "/v1/chat/completions", "--body", json.dumps(STREAM_BODY),
            "--concurrency", str(concurrency), "--requests", str(requests),
        )  # fmt: skip
        run = results.stream_run(raw)
        # The load generator's untimed first round opens one stream per connection.
        streams = raw["requests"] + raw["errors"] + concurrency
        run["cpu_us_per_stream"] = (
            (cpu_seconds(pid) - cpu_before) / streams * 1e6 if pid and streams else None
        )
        return run

    say(f"streaming at concurrency {concurrency} ...")
    runs = await in_rounds(targets, s.rounds, run, say)
    return results.summarise(
        runs, "chunks_per_s", ("ttft_p50_ms", "ttft_p99_ms"), ("cpu_us_per_stream",)
    )


async def measure_small(
    targets: dict[str, str],
    pids: dict[str, int],
    *,
    s: Settings,
    wrk: str | None,
    workdir: Path,
    say: Callable[[str], None],
) -> dict[str, Any]:
    by_url = {url: pids[name] for name, url in targets.items() if name in pids}
    out: dict[str, Any] = {}
    for path, body in SMALL.items():

        async def run(base: str, path: str = path, body: object = body) -> dict[str, Any]:
            pid = by_url.get(base)
            cpu_before = cpu_seconds(pid) if pid else 0.0
            if wrk is not None:
                w = await run_wrk(
                    wrk, base + path, connections=s.small_concurrency,
                    duration_s=s.small_duration_s, body=body, workdir=workdir,
                )  # fmt: skip
                rps, p50, p99, errors = w.requests_per_s, w.latency_p50_s, w.latency_p99_s, w.errors
            else:
                args = ["small", "--url", base + path, "--concurrency", str(s.small_concurrency),
                        "--duration", str(s.small_duration_s)]  # fmt: skip
                raw = await loadgen(*args, *(["--body", json.dumps(body)] if body else []))
                rps, p50, p99 = raw["requests_per_s"], raw["latency_p50_s"], raw["latency_p99_s"]
                errors = raw["errors"]
            # CPU time per request: what the proxy itself spends, whatever else the machine
            # is doing (direct: the fake Ollama's own).
            served = rps * s.small_duration_s
            cpu_us = (cpu_seconds(pid) - cpu_before) / served * 1e6 if pid and served else None
            return {"requests_per_s": rps, "latency_p50_ms": results._ms(p50),
                    "latency_p99_ms": results._ms(p99), "errors": errors,
                    "cpu_us_per_request": cpu_us}  # fmt: skip

        say(f"small requests: {path} ...")
        runs = await in_rounds(targets, s.rounds, run, say)
        out[path] = results.summarise(
            runs, "requests_per_s", ("latency_p50_ms", "latency_p99_ms"), ("cpu_us_per_request",)
        )
    return out


def max_parallel(wanted: int) -> int:
    """The most gate slots the gateway's config accepts, up to ``wanted``."""
    for slots in (wanted, 256, 128, 64, 32, 16, 8, 4, 2, 1):
        if slots <= wanted:
            try:
                parse_config({"limits": {"parallel": slots}})
            except ConfigError:
                continue
            return slots
    return 1


async def scrape_ms(gateway: Service, times: int = 10) -> float | None:
    """Median time to fetch /metrics: the event loop renders it, so every stream waits that
    long while it does."""
    samples = []
    async with aiohttp.ClientSession() as http:
        for _ in range(times):
            started = time.perf_counter()
            async with http.get(gateway.url + "/metrics") as response:
                await response.read()
            samples.append((time.perf_counter() - started) * 1000)
    return results.median(samples)


async def gate_state(gateway: Service) -> tuple[int, int]:
    async with aiohttp.ClientSession() as http, http.get(gateway.url + "/health") as response:
        body = await response.json()
    return int(body["active"]), int(body["queued"])


async def measure_memory(s: Settings, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """Idle RSS of a fresh gateway, then with ``streams`` requests held open on a slow fake."""
    say(f"memory: idle, then {s.streams} open streams ...")
    parallel = max_parallel(s.streams)
    fake = gateway = None
    hold = None
    try:
        fake = await start_fake(
            tokens=1_000_000, token_interval_s=s.hold_interval_s, num_parallel=s.streams + 8
        )
        gateway, _ = await start_gateway(fake.url, parallel=parallel, workdir=workdir)
        idle = rss_bytes(gateway.pid)
        scrape_idle = await scrape_ms(gateway)
        hold = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "loadtest.bench.loadgen", "hold",
            "--url", gateway.url + "/v1/chat/completions", "--body", json.dumps(STREAM_BODY),
            "--streams", str(s.streams),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert hold.stdin is not None
        assert hold.stdout is not None
        async with asyncio.timeout(60):
            await hold.stdout.readline()  # {"started": N}
            active, queued = await gate_state(gateway)
            while active + queued < s.streams:
                await asyncio.sleep(0.1)
                active, queued = await gate_state(gateway)
            # Two token intervals: every admitted stream has relayed chunks by now.
            await asyncio.sleep(2 * s.hold_interval_s)
        held = rss_bytes(gateway.pid)
        scrape_busy = await scrape_ms(gateway)
        hold.stdin.write(b"\n")
        await hold.stdin.drain()
        async with asyncio.timeout(30):
            report = json.loads((await hold.stdout.readline()).decode())
        return {
            "idle_mb": idle / results.MB,
            "streams": s.streams,
            "streams_mb": held / results.MB,
            "parallel": parallel,
            "streaming": active,
            "queued": queued,
            "client_saw_streaming": report["streaming"],
            "scrape_idle_ms": scrape_idle,
            "scrape_streams_ms": scrape_busy,
        }
    finally:
        if hold is not None and hold.returncode is None:
            hold.kill()
            await hold.wait()
        await stop(gateway)
        await stop(fake)


async def measure_startup(upstream: str, s: Settings, workdir: Path) -> list[float]:
    times = []
    for _ in range(s.startup_runs):
        gateway, startup_s = await start_gateway(upstream, parallel=8, workdir=workdir)
        await stop(gateway)
        times.append(startup_s)
    return times


def machine() -> dict[str, Any]:
    """What the numbers were measured on: they mean nothing without it."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return {"nproc": os.cpu_count(), "cpu": models[0] if models else platform.processor(),
            "python": platform.python_version(), "platform": platform.platform()}  # fmt: skip


async def run_bench(s: Settings, workdir: Path, say: Callable[[str], None]) -> dict[str, Any]:
    """What the gateway costs: streaming, small requests, memory and start-up, against the
    fake direct, nginx and the naive relay."""
    nginx_bin = find_nginx() if s.use_nginx else None
    wrk_bin = find_wrk() if s.use_wrk else None
    say(f"nginx: {nginx_bin or 'not found'}; wrk: {wrk_bin or 'not found (aiohttp instead)'}")
    fake = gateway = nginx = naive = None
    try:
        fake = await start_fake(tokens=s.chunks, token_interval_s=0.0, num_parallel=UPSTREAM_SLOTS)
        say("start-up ...")
        startup = await measure_startup(fake.url, s, workdir)
        gateway, _ = await start_gateway(fake.url, parallel=UPSTREAM_SLOTS, workdir=workdir)
        targets = {"direct": fake.url}
        if nginx_bin is not None:
            nginx = await start_nginx(nginx_bin, fake.url, workdir)
            targets["nginx"] = nginx.url
        naive = await start_naive(fake.url, workdir)
        targets["naive"] = naive.url
        targets["gateway"] = gateway.url
        pids = {"direct": fake.pid, "naive": naive.pid, "gateway": gateway.pid}
        if nginx is not None:
            pids["nginx"] = nginx.pid
        streaming = await measure_streaming(targets, pids, s, say)
        light = await measure_streaming(
            targets, pids, s, say, concurrency=1, requests=max(20, s.stream_requests // 4)
        )
        small = await measure_small(targets, pids, s=s, wrk=wrk_bin, workdir=workdir, say=say)
        after_load = rss_bytes(gateway.pid)
    finally:
        await stop(naive)
        await stop(nginx)
        await stop(gateway)
        await stop(fake)
    memory = await measure_memory(s, workdir, say) | {"after_load_mb": after_load / results.MB}
    return {
        "baselines": [name for name in targets if name != "gateway"],
        "tools": {"nginx": nginx_bin, "wrk": wrk_bin},
        "settings": asdict(s) | {"small_tool": "wrk -t1" if wrk_bin else "aiohttp load generator"},
        "streaming": streaming,
        "streaming_light": light,
        "small": small,
        "memory": memory,
        "startup": {"runs_s": startup, "median_s": results.median(startup)},
    }
