"""The real engine, end to end (issue 18): what a user on a small box pays for the gateway.

llama.cpp's server (``just engine``: SmolLM2-135M on ``threads`` engine threads) runs as
a child process; the gateway runs in front of it with every feature on (a client key, a
token bucket, metrics, the JSON log line), as ``upstream.kind: openai``. Streams of
``/v1/chat/completions`` with a fixed seed, temperature 0 and a fixed length go one at a
time (one slot, as on the original design's box), alternating direct and through the
gateway, in rounds. For each stream: the time to its first token, and its decode speed
(tokens after the first over the time from the first to the last). Per round: the median
speed through the gateway over the median direct (the ratio users feel), the time to first
token it adds at p50 and p99, and the gateway's CPU per generated token. The engine and
the gateway share the machine's cores, as on the small box.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from loadtest.bench.services import (
    Service,
    cpu_seconds,
    find_nginx,
    start_gateway,
    start_nginx,
    stop,
)

KEY = "bench-engine-key-0123456789"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def one_stream(
    http: aiohttp.ClientSession, url: str, body: bytes, headers: dict[str, str]
) -> dict[str, float]:
    """One streamed answer: seconds to the first token, tokens, seconds first to last."""
    started = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with http.post(url + "/v1/chat/completions", data=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
        async for line in response.content:
            if not line.startswith(b"data: {") or b'"content":' not in line:
                continue
            delta = json.loads(line[6:])["choices"][0].get("delta") or {}
            if not delta.get("content"):
                continue
            now = time.perf_counter()
            first = first or now
            last = now
            tokens += 1
    if tokens < 2:
        raise RuntimeError(f"{url} streamed {tokens} token(s): too few to time a decode")
    return {"ttft_s": first - started, "tokens": tokens, "decode_s": last - first}


def request_body(tokens: int) -> bytes:
    return json.dumps(
        {
            "model": "smollm2:135m",
            "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse."}],
            "stream": True,
            "max_tokens": tokens,
            "temperature": 0,
            "seed": 42,
        }
    ).encode()


async def measure_engine(
    *,
    rounds: int,
    streams_per_round: int,
    tokens: int,
    threads: int,
    workdir: Path,
    say: Callable[[str], None],
    use_nginx: bool = True,
) -> dict[str, Any]:
    """Direct against through the gateway (and through nginx, the floor any relay pays,
    when it is installed), in turns, ``rounds`` times; a block for the JSON (``skipped``
    with the reason when the engine is not built here)."""
    from proxy.cli.engine import EngineSettings, EngineUnavailableError, find_model, running_engine

    try:
        find_model()
    except EngineUnavailableError as exc:
        return {"skipped": f"{exc}"}
    say(f"the real engine ({threads} engine thread(s) on {os.cpu_count()} CPU(s)) ...")
    body = request_body(tokens)
    relays: dict[str, Service] = {}
    async with running_engine(EngineSettings(n_threads=threads)) as engine:
        try:
            relays["gateway"], _ = await start_gateway(
                engine.url, parallel=1, workdir=workdir, name="gateway-engine",
                env={"UPSTREAM_KIND": "openai", "OLLAMA_MODEL": "smollm2:135m",
                     "PROXY_API_KEYS": f"bench:{KEY}", "CLIENT_TOKENS_PER_MINUTE": "1e9"},
            )  # fmt: skip
            nginx = find_nginx() if use_nginx else None
            if nginx is not None:
                relays["nginx"] = await start_nginx(
                    nginx, engine.url, workdir, ready_path="/v1/models"
                )
            runs = await _take_turns(
                engine.url, relays, body, rounds=rounds, streams=streams_per_round, say=say
            )
        finally:
            for relay in relays.values():
                await stop(relay)
    return summarise(runs, threads=threads, cpus=os.cpu_count() or 0, tokens=tokens)


async def _take_turns(
    direct_url: str,
    relays: dict[str, Service],
    body: bytes,
    *,
    rounds: int,
    streams: int,
    say: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Each round: ``streams`` streams per side, one at a time, the sides in turn; the side
    that goes first moves on each round, so drift hits every side alike."""
    plain = {"Content-Type": "application/json"}
    sides = [("direct", direct_url, plain)] + [
        (name, relay.url, {**plain, "Authorization": f"Bearer {KEY}"})
        for name, relay in relays.items()
    ]
    runs: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        for _, url, headers in sides:
            await one_stream(http, url, body, headers)  # warm every path
        for r in range(rounds):
            run: dict[str, Any] = {name: [] for name, _, _ in sides}
            cpu_before = {name: _cpu(relay) for name, relay in relays.items()}
            for i in range(streams * len(sides)):
                name, url, headers = sides[(i + r) % len(sides)]
                run[name].append(await one_stream(http, url, body, headers))
            run["cpu_s"] = {name: _cpu(relay) - cpu_before[name] for name, relay in relays.items()}
            runs.append(run)
            say(f"  round {r + 1}/{rounds} done")
    return runs


def _cpu(service: Service) -> float:
    assert service.proc.pid is not None
    return cpu_seconds(service.proc.pid)


def speed(stream: dict[str, float]) -> float:
    """Tokens per second of one stream's decode (the first token is the TTFT's)."""
    return (stream["tokens"] - 1) / stream["decode_s"]


def summarise_round(run: dict[str, Any]) -> dict[str, float]:
    """Per relay (``gateway``, ``nginx``): its decode speed over direct's, the time to first
    token it adds at p50 and p99, its CPU per generated token."""
    direct = run["direct"]
    direct_speed = statistics.median(speed(s) for s in direct)
    figures = {"direct_tokens_per_s": direct_speed}
    for name, cpu_s in run["cpu_s"].items():
        through = run[name]
        figures[f"{name}_tokens_per_s"] = statistics.median(speed(s) for s in through)
        figures[f"{name}_ratio"] = figures[f"{name}_tokens_per_s"] / direct_speed
        for label, q in (("p50", 0.5), ("p99", 0.99)):
            figures[f"{name}_ttft_{label}_added_ms"] = 1000 * (
                percentile([s["ttft_s"] for s in through], q)
                - percentile([s["ttft_s"] for s in direct], q)
            )
        figures[f"{name}_cpu_us_per_token"] = 1e6 * cpu_s / sum(s["tokens"] for s in through)
    return figures


def summarise(
    runs: list[dict[str, Any]], *, threads: int, cpus: int, tokens: int
) -> dict[str, Any]:
    """Medians over rounds, and each figure's range over rounds."""
    per_round = [summarise_round(run) for run in runs]
    block: dict[str, Any] = {"threads": threads, "cpus": cpus, "tokens": tokens}
    block["streams_per_round"] = len(runs[0]["direct"]) if runs else 0
    block["relays"] = list(runs[0]["cpu_s"]) if runs else []
    block["rounds"] = per_round
    for key in per_round[0] if per_round else ():
        values = [r[key] for r in per_round]
        block[key] = statistics.median(values)
        block[f"{key}_range"] = [min(values), max(values)]
    return block


TARGET = ("engine tokens/s via gateway >= 0.99 x", "x direct")


def target(block: dict[str, Any]) -> dict[str, Any]:
    ratio = block.get("gateway_ratio")
    return {
        "target": TARGET[0],
        "unit": TARGET[1],
        "measured": ratio,
        "passed": None if ratio is None else ratio >= 0.99,
        "note": "" if ratio is not None else block.get("skipped", ""),
    }


_ROWS = (
    ("decode tokens/s", "tokens_per_s", 1),
    ("  / direct", "ratio", 3),
    ("TTFT added p50 (ms)", "ttft_p50_added_ms", 2),
    ("TTFT added p99 (ms)", "ttft_p99_added_ms", 2),
    ("CPU us per token", "cpu_us_per_token", 1),
)


def lines(block: dict[str, Any]) -> list[str]:
    """The section's table: a row per figure, a column per side (medians over rounds,
    with their range)."""
    if "skipped" in block:
        return ["", f"real engine: skipped ({block['skipped']})"]
    relays = block["relays"]
    out = [
        "",
        f"real engine: SmolLM2-135M on llama.cpp, {block['threads']} engine thread(s) on "
        f"{block['cpus']} CPU(s); streamed /v1/chat/completions, {block['tokens']} tokens, "
        f"seed 42, one at a time, {block['streams_per_round']} per side per round, in turns",
        f"  {'':22}{'direct':>10}" + "".join(f"{name:>28}" for name in relays),
    ]
    for label, key, digits in _ROWS:
        direct = f"{block[f'direct_{key}']:10.{digits}f}" if key == "tokens_per_s" else " " * 10
        cells = []
        for name in relays:
            value, (low, high) = block[f"{name}_{key}"], block[f"{name}_{key}_range"]
            cells.append(f"{value:10.{digits}f} ({low:.{digits}f} to {high:.{digits}f})".rjust(28))
        out.append(f"  {label:22}{direct}" + "".join(cells))
    return out
