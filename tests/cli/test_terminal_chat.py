"""`python -m proxy chat` driven through a pipe, against the gateway and the fake Ollama."""

from __future__ import annotations

import asyncio
import os
import re
import socket

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from loadtest.fake_ollama.native import text_of
from proxy.cli.conversation import refusal, stats_line
from tests.conftest import MODEL, GatewayFactory, RunningGateway, run_module

pytestmark = pytest.mark.timeout(30)

STATS = re.compile(r"^ttft (\d+ ms|\d+\.\d\d s), (\d+) tokens(, [\d.]+ tokens/s)?$", re.MULTILINE)


async def chat(
    url: str, *lines: str, args: tuple[str, ...] = (), model: str | None = MODEL
) -> tuple[int, str, str]:
    """Run the chat with ``lines`` on its stdin; return its exit status, stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k != "OLLAMA_MODEL"}
    return await run_module(
        "proxy", "chat", "--url", url, *(("--model", model) if model else ()), *args,
        timeout_s=20, stdin="".join(f"{x}\n" for x in lines).encode(), env=env,
    )  # fmt: skip


async def test_answers_stream_with_stats_and_history_model_and_reset_apply(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    """Answers print with a stats line; history grows, /model switches, /reset empties it."""
    fake.config.tokens = 5
    status, out, err = await chat(
        gateway.url, "hello", "/model qwen2.5:0.5b", "and then?", "/reset", "fresh start", "/exit"
    )
    assert status == 0, err
    assert out.count(text_of(5)) == 3
    assert [int(m.group(2)) for m in STATS.finditer(out)] == [5, 5, 5]
    assert "model: qwen2.5:0.5b" in out
    assert "history cleared" in out
    assert "\x1b[" not in out  # no ANSI codes when the output is not a terminal
    bodies = [seen.json for seen in fake.seen]
    assert [seen.path for seen in fake.seen] == ["/v1/chat/completions"] * 3
    assert [b["model"] for b in bodies] == [MODEL, "qwen2.5:0.5b", "qwen2.5:0.5b"]
    assert [m["role"] for m in bodies[1]["messages"]] == ["user", "assistant", "user"]
    assert bodies[1]["messages"][1]["content"] == text_of(5)
    assert bodies[2]["messages"] == [{"role": "user", "content": "fresh start"}]
    assert all(b["stream"] is True for b in bodies)


async def test_without_a_model_the_gateways_default_is_used(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    """With no --model and no $OLLAMA_MODEL, the chat asks the gateway for its default model."""
    status, _, err = await chat(gateway.url, "hello", "/exit", model=None)
    assert status == 0, err
    assert fake.seen[-1].json["model"] == MODEL


async def test_system_prompt_leads_every_request_and_end_of_input_exits(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    """--system and /system put a system message first; EOF ends the chat cleanly."""
    status, _, err = await chat(
        gateway.url, "one", "/system be terse", "two", args=("--system", "x")
    )
    assert status == 0, err
    first, second = (seen.json["messages"] for seen in fake.seen)
    assert first[0] == {"role": "system", "content": "x"}
    assert second[0] == {"role": "system", "content": "be terse"}
    assert [m["role"] for m in second[1:]] == ["user", "assistant", "user"]


async def test_rate_limit_prints_429_with_retry_after_and_drops_the_question(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """The second question hits a burst of 1: the chat says 429 and when to retry, and goes on."""
    gateway = await gateway_factory(limits={"client_requests_per_minute": 1, "client_burst": 1})
    status, out, err = await chat(gateway.url, "first", "second", "/model x", "/exit")
    assert status == 1
    assert re.search(r"rate limited \(HTTP 429\): .*; retry after \d+ s", err)
    assert "model: x" in out  # the session continued after the refusal
    assert len(fake.seen) == 1


async def test_a_full_queue_prints_503_with_retry_after(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """With the only slot taken and no queue, the chat reports the gateway busy and the wait."""
    gateway = await gateway_factory(limits={"parallel": 1, "max_queue": 0})
    async with aiohttp.ClientSession() as http:
        holder = asyncio.create_task(
            http.post(
                gateway.url + "/api/chat",
                json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]},
                headers={"X-Fake-Mode": "hang"},
            )
        )
        try:
            await fake.wait_for(lambda: len(fake.seen) == 1)
            status, _, err = await chat(gateway.url, "hello")
        finally:
            holder.cancel()
    assert status == 1
    assert re.search(r"the gateway is busy \(HTTP 503\): .*; retry after \d+ s", err)


async def test_missing_key_prints_401_with_a_hint_and_a_key_works(
    gateway_factory: GatewayFactory, fake: FakeOllama
) -> None:
    """Without the key the chat explains the 401; with --api-key the same question is answered."""
    gateway = await gateway_factory(auth={"api_keys": [{"name": "ann", "key": "secret-key-1"}]})
    status, _, err = await chat(gateway.url, "hello")
    assert status == 1
    assert "HTTP 401" in err
    assert "--api-key" in err
    status, out, err = await chat(gateway.url, "hello", args=("--api-key", "secret-key-1"))
    assert status == 0, err
    assert STATS.search(out)


async def test_midstream_error_event_is_printed_as_an_error(
    gateway: RunningGateway, fake: FakeOllama
) -> None:
    """A stream that fails after some tokens shows the tokens, then the error, and no stats:
    cut off (the gateway's error event), or ended without [DONE] (Ollama swallows a /v1
    error that way)."""
    fake.config.mode = "drop"
    status, out, err = await chat(gateway.url, "hello")
    assert status == 1
    assert "error: the answer was cut short" in err
    assert not STATS.search(out)
    fake.config.mode = "midstream_error"
    status, out, err = await chat(gateway.url, "hello")
    assert status == 1
    assert "error: the answer ended early (the stream closed without [DONE])" in err
    assert not STATS.search(out)


async def test_unreachable_gateway_is_explained() -> None:
    """A gateway that refuses connections gets a message naming the URL, not a traceback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        status, _, err = await chat(url, "hello")
    assert status == 1
    assert f"cannot reach the gateway at {url}" in err
    assert "Traceback" not in err


def test_stats_line_and_refusals_read_well() -> None:
    """The stats line marks chunk counts as estimates; refusals name the status and the wait."""
    assert stats_line(0.25, 42, 2.0, estimated=False) == "ttft 250 ms, 42 tokens, 21.0 tokens/s"
    assert stats_line(0.25, 1, 0.0, estimated=True) == "ttft 250 ms, ~1 tokens"
    assert stats_line(0.0031, 2, 1.0, estimated=False) == "ttft 3 ms, 2 tokens, 2.0 tokens/s"
    assert stats_line(0.9996, 2, None, estimated=False) == "ttft 1.00 s, 2 tokens"
    assert stats_line(12.5, 2, None, estimated=False) == "ttft 12.50 s, 2 tokens"
    assert stats_line(None, 0, None, estimated=True) == "no tokens, ~0 tokens"
    assert refusal(429, "slow down", "7") == "rate limited (HTTP 429): slow down; retry after 7 s"
    assert refusal(503, "full", None) == "the gateway is busy (HTTP 503): full"
    assert "--api-key" in refusal(403, "no", None)
    assert refusal(500, "boom", None) == "the gateway answered HTTP 500: boom"
