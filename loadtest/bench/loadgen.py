"""``python -m loadtest.bench.loadgen``: the benchmark's aiohttp load generator, in its own process.

Lean on purpose: it counts SSE events with ``bytes.count`` and parses nothing, so that on a
small machine it takes as little CPU from the servers it measures as it can. Every mode
prints one JSON object on stdout.

- ``stream``: N streamed requests at concurrency C: events, wall time, TTFT of each;
- ``small``: closed loop at concurrency C for D seconds: requests/s and latency percentiles;
- ``hold``: open N streams, print ``{"started": N}``, keep them open until a line (or EOF)
  on stdin, then report how many had started streaming;
- ``serve``: one ``stream`` or ``small`` run per JSON line on stdin (``{"mode", "url",
  "body", "concurrency", "requests", "duration"}``), one JSON line back each, until EOF: a
  bench of many short runs does not pay a process start-up for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from typing import Any

import aiohttp

from loadtest.report import percentile


def _session(connections: int) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connections),
        timeout=aiohttp.ClientTimeout(total=None, sock_read=120),
        headers={"Content-Type": "application/json"},
    )


async def _stream_one(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[float, int]:
    """(seconds to the first body bytes, SSE events received); raises on a failure."""
    started = time.perf_counter()
    ttft_s = -1.0
    events = 0
    tail = b""
    async with http.post(url, data=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}")
        async for chunk in response.content.iter_any():
            if ttft_s < 0:
                ttft_s = time.perf_counter() - started
            # An event ends with a blank line; its "\n\n" may straddle two reads.
            events += chunk.count(b"\n\n") + (tail == b"\n" and chunk[:1] == b"\n")
            tail = chunk[-1:]
    return ttft_s, events


async def stream(url: str, body: bytes, concurrency: int, requests: int) -> dict[str, Any]:
    async with _session(concurrency) as http:
        # One untimed round opens the connections: the run measures the steady state.
        await asyncio.gather(*(_stream_one(http, url, body) for _ in range(concurrency)))
        pending = iter(range(requests))
        ttfts: list[float] = []
        events = errors = 0

        async def worker() -> None:
            nonlocal events, errors
            for _ in pending:
                try:
                    ttft_s, n = await _stream_one(http, url, body)
                except (aiohttp.ClientError, RuntimeError, TimeoutError):
                    errors += 1
                    continue
                ttfts.append(ttft_s)
                events += n

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return {"requests": len(ttfts), "errors": errors, "events": events, "wall_s": wall_s,
            "ttft_s": ttfts}  # fmt: skip


async def small(
    url: str, body: bytes | None, concurrency: int, duration_s: float
) -> dict[str, Any]:
    latencies: list[float] = []
    errors = 0
    method = "POST" if body is not None else "GET"
    async with _session(concurrency) as http:

        async def once() -> None:
            nonlocal errors
            started = time.perf_counter()
            try:
                async with http.request(method, url, data=body) as response:
                    await response.read()
                    ok = response.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

        await asyncio.gather(*(once() for _ in range(concurrency)))  # open the connections
        latencies.clear()
        deadline = time.perf_counter() + duration_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                await once()

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall_s = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "requests_per_s": len(latencies) / wall_s,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
    }


async def hold(url: str, body: bytes, streams: int) -> dict[str, Any]:
    """Open ``streams`` streams and keep reading them until told to stop on stdin."""
    streaming = errors = 0

    async def one(http: aiohttp.ClientSession) -> None:
        nonlocal streaming, errors
        try:
            async with http.post(url, data=body) as response:
                first = True
                async for _ in response.content.iter_any():
                    if first:
                        streaming += 1
                        first = False
        except (aiohttp.ClientError, TimeoutError):
            errors += 1

    async with _session(0) as http:
        tasks = [asyncio.create_task(one(http)) for _ in range(streams)]
        print(json.dumps({"started": streams}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        result = {"streams": streams, "streaming": streaming, "errors": errors}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m loadtest.bench.loadgen", description=__doc__)
    p.add_argument("mode", choices=["stream", "small", "hold", "serve"])
    p.add_argument("--url", default="", help="full URL, path included")
    p.add_argument("--body", help="JSON request body (POST); none: GET")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--duration", type=float, default=3.0)
    p.add_argument("--streams", type=int, default=500)
    return p.parse_args(argv)


async def serve() -> None:
    """Runs asked for on stdin, one JSON line each, answered on stdout."""
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        ask = json.loads(line)
        body = ask["body"].encode() if ask.get("body") is not None else None
        if ask["mode"] == "small":
            out = await small(ask["url"], body, ask["concurrency"], ask["duration"])
        elif body is not None:
            out = await stream(ask["url"], body, ask["concurrency"], ask["requests"])
        else:
            out = {"error": "a stream needs a body"}
        print(json.dumps(out), flush=True)


async def _main(args: argparse.Namespace) -> dict[str, Any]:
    if args.mode == "serve":
        await serve()
        return {"served": True}
    if not args.url:
        raise SystemExit("--url is required")
    body = args.body.encode() if args.body is not None else None
    if args.mode == "small":
        return await small(args.url, body, args.concurrency, args.duration)
    if body is None:
        raise SystemExit("--body is required for streams")
    if args.mode == "stream":
        return await stream(args.url, body, args.concurrency, args.requests)
    return await hold(args.url, body, args.streams)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(_main(args))), flush=True)


if __name__ == "__main__":
    main()
