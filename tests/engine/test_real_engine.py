"""The gateway in front of the real llama.cpp engine, checked with the official `openai` SDK."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import openai
import pytest

from proxy.cli.engine import ALIAS, Engine
from tests.conftest import RunningGateway, gate_until, metric
from tests.engine.conftest import PROMPT, EngineGateway

pytestmark = [
    pytest.mark.engine,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(60),
]


async def collect(stream: Any) -> tuple[list[Any], list[float]]:
    """All chunks of a stream, and when each content chunk arrived."""
    chunks, arrivals = [], []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
    return chunks, arrivals


def text_of(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


async def test_engine_sends_one_token_per_chunk_and_no_stream_usage(engine: Engine) -> None:
    """Straight to the engine: include_usage is ignored and each content chunk is one token."""
    direct = openai.AsyncOpenAI(base_url=engine.url + "/v1", api_key="x", max_retries=0)
    try:
        fixed = {"max_tokens": 12, "temperature": 0, "extra_body": {"min_tokens": 12}}
        stream = await direct.chat.completions.create(
            model=ALIAS,
            messages=PROMPT,
            stream=True,
            stream_options={"include_usage": True},
            **fixed,
        )
        chunks, arrivals = await collect(stream)
        answer = await direct.chat.completions.create(model=ALIAS, messages=PROMPT, **fixed)
    finally:
        await direct.close()
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)  # no usage-only chunk either
    assert chunks[-1].choices[0].finish_reason == "length"
    assert answer.usage is not None
    assert answer.usage.completion_tokens == 12
    assert len(arrivals) == answer.usage.completion_tokens


async def test_streamed_chat_arrives_over_time(
    gateway: RunningGateway, client: openai.AsyncOpenAI
) -> None:
    """A streamed completion comes chunk by chunk as the engine generates, with text in it;
    its completion count is the content-chunk count and its time to first token is recorded."""
    stream = await client.chat.completions.create(
        model=ALIAS, messages=PROMPT, stream=True, max_tokens=16, extra_body={"min_tokens": 8}
    )
    chunks, arrivals = await collect(stream)
    assert text_of(chunks).strip()
    assert len(arrivals) >= 8
    assert arrivals[-1] - arrivals[0] > 0.005  # spread over the generation, not one burst
    assert len({round(t, 4) for t in arrivals}) > len(arrivals) // 2
    assert all(chunk.usage is None for chunk in chunks)  # nothing the client did not ask for
    text = await gateway.metrics_text()
    assert metric(text, "ollama_completion_tokens_total", model=ALIAS) == len(arrivals)
    ttft = "ollama_time_to_first_token_seconds_count"
    assert metric(text, ttft, endpoint="/v1/chat/completions", model=ALIAS) == 1
    assert metric(text, "ollama_requests_total", model=ALIAS, status="success") == 1


async def test_non_streamed_usage_feeds_the_token_counters(
    gateway: RunningGateway, client: openai.AsyncOpenAI
) -> None:
    """A non-streamed completion carries usage, and /metrics counts exactly that usage."""
    answer = await client.chat.completions.create(model=ALIAS, messages=PROMPT, max_tokens=8)
    assert answer.choices[0].message.content
    assert answer.model == ALIAS
    usage = answer.usage
    assert usage is not None
    assert usage.prompt_tokens > 0
    assert 0 < usage.completion_tokens <= 8
    text = await gateway.metrics_text()
    assert metric(text, "ollama_prompt_tokens_total", model=ALIAS) == usage.prompt_tokens
    assert metric(text, "ollama_completion_tokens_total", model=ALIAS) == usage.completion_tokens


async def test_client_abort_frees_the_slot_and_stops_the_engine(
    gateway: RunningGateway, client: openai.AsyncOpenAI
) -> None:
    """A client that leaves mid-stream frees its slot and the engine stops generating: the
    next request starts at once instead of after the abandoned generation."""
    long = 1500
    stream = await client.chat.completions.create(
        model=ALIAS,
        messages=PROMPT,
        stream=True,
        max_tokens=long,
        temperature=0,
        extra_body={"min_tokens": long},  # no early end of sequence
    )
    arrivals: list[float] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic())
            if len(arrivals) == 10:
                break
    await stream.close()
    per_token_s = (arrivals[-1] - arrivals[0]) / (len(arrivals) - 1)
    abandoned_s = (long - len(arrivals)) * per_token_s  # what the engine had left to do

    gate = gateway.gateway.gate
    await gate_until(gateway, lambda: gate.active == 0)
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model=ALIAS, messages=PROMPT, stream=True, max_tokens=4
    )
    _, next_arrivals = await collect(stream)
    ttft_s = next_arrivals[0] - started
    assert ttft_s < abandoned_s / 10, (ttft_s, abandoned_s)

    text = await gateway.metrics_text()
    assert metric(text, "ollama_active_requests") == 0
    assert metric(text, "ollama_requests_total", status="cancelled") == 1
    assert metric(text, "ollama_client_disconnects_total", phase="streaming") == 1


async def test_gate_serialises_two_concurrent_requests(engine_gateway: EngineGateway) -> None:
    """With one slot, a second request waits in the gateway's queue until the first ends."""
    gateway = await engine_gateway(limits={"parallel": 1})
    gate = gateway.gateway.gate
    sdk = openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="x", max_retries=0)
    fixed: dict[str, Any] = {"max_tokens": 24, "extra_body": {"min_tokens": 24}}
    second: asyncio.Task[tuple[list[Any], list[float]]] | None = None
    try:
        first = await sdk.chat.completions.create(
            model=ALIAS, messages=PROMPT, stream=True, **fixed
        )
        rest = aiter(first)
        await anext(rest)  # the first request holds the slot and streams
        second = asyncio.create_task(open_and_collect(sdk, **fixed))
        await gate_until(gateway, lambda: gate.queued == 1)
        _, first_arrivals = await collect(rest)
        first_ended = time.monotonic()
        _, second_arrivals = await second
    finally:
        if second is not None and not second.done():
            second.cancel()
        await sdk.close()
    assert first_arrivals
    assert second_arrivals[0] > first_ended
    text = await gateway.metrics_text()
    assert metric(text, "ollama_queue_wait_seconds_count") == 2
    assert metric(text, "ollama_queue_wait_seconds_sum") > 0
    assert metric(text, "ollama_queued_requests") == 0


async def open_and_collect(
    sdk: openai.AsyncOpenAI, **options: Any
) -> tuple[list[Any], list[float]]:
    stream = await sdk.chat.completions.create(model=ALIAS, messages=PROMPT, stream=True, **options)
    return await collect(stream)
