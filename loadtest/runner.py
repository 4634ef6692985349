"""Sending the load: a closed loop (fixed concurrency) or an open loop (fixed arrival rate).

In a closed loop each of ``concurrency`` workers sends its next request when the previous
one is answered, so a slow server slows the arrivals down and hides part of its latency.
In an open loop requests start on a fixed schedule whatever happened to the earlier ones,
and latency is measured from the scheduled start, so time spent waiting anywhere counts
(the "coordinated omission" problem: https://www.scylladb.com/2021/04/22/on-coordinated-omission/).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp

from loadtest.dialects import PATHS, Reply, StreamParser, parse_document, request_body
from loadtest.progress import LiveProgress
from loadtest.report import Sample, classify

STREAM_TYPES = frozenset({"text/event-stream", "application/x-ndjson"})
_ERROR_TEXT_BYTES = 200

# Sends request number ``index``, due at ``start_s``, and records its sample.
Send = Callable[[int, float], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class RunConfig:
    url: str = "http://localhost:8000"
    api_key: str | None = None
    dialect: str = "chat"
    stream: bool = True
    model: str | None = None
    prompts: tuple[str, ...] = ("Why is the sky blue?",)
    max_tokens: int | None = None
    requests: int | None = 50  # None: until duration_s has passed
    duration_s: float | None = None
    concurrency: int = 5
    rate: float | None = None  # requests per second: an open loop
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        problems = [
            ("dialect", self.dialect not in PATHS, f"one of {', '.join(PATHS)}"),
            ("concurrency", self.rate is None and self.concurrency < 1, "at least 1"),
            ("rate", self.rate is not None and self.rate <= 0, "above 0"),
            ("requests", self.requests is not None and self.requests < 1, "at least 1"),
            ("duration", self.duration_s is not None and self.duration_s <= 0, "above 0"),
            ("requests or duration", self.requests is None and self.duration_s is None, "given"),
            ("prompts", not self.prompts, "not empty"),
        ]
        for name, wrong, expected in problems:
            if wrong:
                raise ValueError(f"{name} must be {expected}")

    @property
    def target(self) -> str:
        return self.url.rstrip("/") + PATHS[self.dialect]

    def describe(self) -> str:
        loop = (
            f"open loop at {self.rate:g} requests/s"
            if self.rate
            else f"closed loop at concurrency {self.concurrency}"
        )
        size = f"{self.requests} requests" if self.requests else f"{self.duration_s:g} s"
        mode = "streamed" if self.stream else "not streamed"
        return f"{size}, {loop}, POST {self.target} ({mode}), model {self.model or 'default'}"


@dataclass(frozen=True, slots=True)
class RunResult:
    samples: list[Sample]
    wall_s: float
    started_at: float  # Unix time, for the JSON file


class _Clock:
    """Seconds since the run started, on the monotonic high-resolution clock."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0


async def run_load(config: RunConfig, progress: LiveProgress | None = None) -> RunResult:
    """Send the configured load and return one sample per request, in start order."""
    open_loop = config.rate is not None
    connector = aiohttp.TCPConnector(limit=0 if open_loop else config.concurrency)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    timeout = aiohttp.ClientTimeout(total=config.timeout_s)
    samples: list[Sample] = []
    started_at = time.time()
    clock = _Clock()
    async with (
        aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as session,
        _ticking(progress),
    ):

        async def one(index: int, start_s: float) -> None:
            if progress is not None:
                progress.request_started()
            sample = await send(session, config, index, start_s, clock)
            samples.append(sample)
            if progress is not None:
                progress.request_finished(sample.outcome)

        if open_loop:
            await _open_loop(config, clock, one)
        else:
            await _closed_loop(config, clock, one)
        wall_s = clock()
    samples.sort(key=lambda s: s.index)
    return RunResult(samples, wall_s, started_at)


async def _closed_loop(config: RunConfig, clock: _Clock, one: Send) -> None:
    counter = itertools.count()

    async def worker() -> None:
        while True:
            index = next(counter)
            if config.requests is not None and index >= config.requests:
                return
            start_s = clock()
            if config.duration_s is not None and start_s >= config.duration_s:
                return
            await one(index, start_s)

    async with asyncio.TaskGroup() as group:
        for _ in range(config.concurrency):
            group.create_task(worker())


async def _open_loop(config: RunConfig, clock: _Clock, one: Send) -> None:
    assert config.rate is not None
    interval_s = 1.0 / config.rate
    async with asyncio.TaskGroup() as group:
        for index in itertools.count():
            if config.requests is not None and index >= config.requests:
                break
            due_s = index * interval_s
            if config.duration_s is not None and due_s >= config.duration_s:
                break
            delay_s = due_s - clock()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            # Latency counts from the scheduled start: a late start is the client's delay
            # as much as any other, and hiding it is what an open loop exists to avoid.
            group.create_task(one(index, due_s))


@contextlib.asynccontextmanager
async def _ticking(progress: LiveProgress | None) -> AsyncIterator[None]:
    """Redraw the progress line twice a second even when no request ends (long answers)."""
    if progress is None:
        yield
        return

    async def tick() -> None:
        while True:
            await asyncio.sleep(0.5)
            progress.draw()

    task = asyncio.create_task(tick())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        progress.finish()


async def send(
    session: aiohttp.ClientSession, config: RunConfig, index: int, start_s: float, clock: _Clock
) -> Sample:
    """One request, measured; never raises except on cancellation."""
    prompt = config.prompts[index % len(config.prompts)]
    body = request_body(
        config.dialect,
        prompt,
        model=config.model,
        stream=config.stream,
        max_tokens=config.max_tokens,
    )
    payload = json.dumps(body).encode()
    status = 0
    ttft_s: float | None = None
    streamed = False
    retry_after_s: float | None = None
    reply = Reply()
    try:
        async with session.post(
            config.target, data=payload, headers={"Content-Type": "application/json"}
        ) as response:
            status = response.status
            retry_after_s = _seconds(response.headers.get("Retry-After"))
            if status == 200 and response.content_type in STREAM_TYPES:
                streamed = True
                parser = StreamParser(config.dialect)
                async for chunk in response.content.iter_any():
                    if parser.feed(chunk) and ttft_s is None:
                        ttft_s = clock() - start_s
                parser.finish()
                reply = parser.reply
                if reply.completion_tokens is None and reply.complete:
                    # A server that ignores include_usage: one token per content chunk.
                    reply.completion_tokens = reply.content_chunks
            else:
                raw = await response.read()
                reply = parse_document(config.dialect, raw)
                if status != 200 and reply.error is None:
                    reply.error = raw[:_ERROR_TEXT_BYTES].decode(errors="replace") or None
    except (aiohttp.ClientError, TimeoutError) as exc:
        reply.error = f"{type(exc).__name__}: {exc}"[:_ERROR_TEXT_BYTES]
    if status == 200 and reply.error is None and not reply.complete:
        reply.error = "the stream ended before its end (no done / [DONE])"
    latency_s = clock() - start_s
    return Sample(
        index=index,
        start_s=start_s,
        latency_s=latency_s,
        outcome=classify(status, complete=reply.complete, error=reply.error),
        status=status,
        streamed=streamed,
        ttft_s=ttft_s,
        prompt_tokens=reply.prompt_tokens,
        completion_tokens=reply.completion_tokens,
        eval_tokens_per_s=reply.eval_tokens_per_s,
        retry_after_s=retry_after_s,
        error=_short_error(status, reply.error),
    )


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: the gateway never sends one


def _short_error(status: int, error: str | None) -> str | None:
    if error is None:
        return None
    return f"HTTP {status}: {error}" if status else error
