"""The command line as people run it: `python -m proxy serve` and `check-config`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from loadtest.fake_ollama import FakeOllama
from tests.conftest import MODEL

pytestmark = pytest.mark.timeout(30)

CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}


def _free_port() -> int:
    # An external process needs a number; a collision fails its start loudly, not silently.
    return aiohttp.test_utils.unused_port()


async def _run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_check_config_accepts_the_shipped_file() -> None:
    """check-config validates config.yaml plus the environment and says what it means."""
    code, out, _ = await _run("check-config", env={"OLLAMA_NUM_PARALLEL": "2"})
    assert code == 0
    assert "2 slot(s)" in out
    assert "config ok" in out


async def test_check_config_names_the_bad_key(tmp_path: Path) -> None:
    """An unknown key or a bad environment value exits 2 with the key named."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("limits:\n  max_queu: 3\n")
    code, _, err = await _run("--config", str(bad), "check-config")
    assert code == 2
    assert "unknown key limits.max_queu" in err
    code, _, err = await _run("check-config", env={"PROXY_PORT": "eighty"})
    assert code == 2
    assert "PROXY_PORT" in err


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port on 127.0.0.1 that another socket is listening on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


async def test_a_port_in_use_is_said_in_one_line_and_exits_1(busy_port: int) -> None:
    """No traceback: the log line names the address and the reason."""
    env = {"PROXY_HOST": "127.0.0.1", "PROXY_PORT": str(busy_port), "LOG_FORMAT": "json"}
    code, _, err = await _run("serve", env=env)
    assert code == 1
    assert "Traceback" not in err
    line = json.loads(next(line for line in err.splitlines() if "cannot_listen" in line))
    assert (line["port"], line["error"]) == (busy_port, "Address already in use")


async def test_the_demo_checks_its_port_before_starting_the_engine(busy_port: int) -> None:
    """A busy port fails at once, before minutes of engine start-up, whatever is installed."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "demo", "--port", str(busy_port),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 20)
    assert process.returncode == 1
    assert f"cannot listen on 127.0.0.1:{busy_port} (Address already in use)" in err.decode()


@pytest.fixture
def drain_timeout_s() -> float:
    return 10.0


@pytest.fixture
async def served(
    fake: FakeOllama, drain_timeout_s: float
) -> AsyncIterator[tuple[asyncio.subprocess.Process, str]]:
    port = _free_port()
    env = {
        **os.environ,
        "OLLAMA_URL": fake.url,
        "OLLAMA_MODEL": MODEL,
        "PROXY_HOST": "127.0.0.1",
        "PROXY_PORT": str(port),
        "SHUTDOWN_DRAIN_TIMEOUT": str(drain_timeout_s),
        "LOG_FORMAT": "json",
        "PROBE_INTERVAL": "3600",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve",
        stderr=asyncio.subprocess.PIPE, env=env,
    )  # fmt: skip
    assert process.stderr is not None
    try:
        async with asyncio.timeout(10):
            while b"gateway_ready" not in await process.stderr.readline():
                pass
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def test_sigterm_lets_an_in_flight_stream_finish(
    served: tuple[asyncio.subprocess.Process, str], fake: FakeOllama
) -> None:
    """On SIGTERM the gateway stops accepting but drains a running stream to its end."""
    process, url = served
    fake.config.tokens = 30
    fake.config.token_interval_s = 0.02
    async with aiohttp.ClientSession() as http:
        async with http.post(
            url + "/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
        ) as r:
            first = await r.content.readline()
            process.send_signal(signal.SIGTERM)
            rest = await r.read()
        lines = [first, *rest.splitlines()]
        assert json.loads(lines[-1])["done"] is True
        assert len(lines) == 31
    assert await asyncio.wait_for(process.wait(), 10) == 0
    assert process.stderr is not None
    logs = (await process.stderr.read()).decode()
    finished = [json.loads(line) for line in logs.splitlines() if "request_finished" in line]
    assert finished[-1]["outcome"] == "success"
    assert "gateway_stopped" in logs


@pytest.mark.parametrize("drain_timeout_s", [1.0])
async def test_at_the_drain_deadline_open_streams_end_with_an_error_and_the_process_exits(
    served: tuple[asyncio.subprocess.Process, str], fake: FakeOllama
) -> None:
    """Streams still running at SHUTDOWN_DRAIN_TIMEOUT end with an in-dialect error saying
    the gateway is shutting down; a queued request gets 503 at once; the process exits
    within the drain timeout plus a second."""
    process, url = served
    fake.config.tokens = 10_000
    fake.config.token_interval_s = 0.02
    sse = {**CHAT, "stream": True}
    async with aiohttp.ClientSession() as http:
        native = await http.post(url + "/api/chat", json=CHAT)
        await native.content.readline()
        queued = asyncio.create_task(http.post(url + "/v1/chat/completions", json=sse))
        async with asyncio.timeout(5):  # until the gateway says it waits for the slot
            while True:
                async with http.get(url + "/health") as health:
                    if (await health.json())["queued"] == 1:
                        break
        loop = asyncio.get_running_loop()
        process.send_signal(signal.SIGTERM)
        signalled = loop.time()
        refused = await queued
        assert refused.status == 503
        assert (await refused.json())["error"]["code"] == "shutting_down"
        assert refused.headers["Retry-After"] == "1"
        lines = (await native.read()).splitlines()
        native.close()
    assert json.loads(lines[-1]) == {"error": "the gateway is shutting down"}
    assert json.loads(lines[-2])["done"] is False
    assert await asyncio.wait_for(process.wait(), 10) == 0
    assert loop.time() - signalled < 1.0 + 1.0
    generation = next(seen for seen in fake.seen if seen.path == "/api/chat")
    assert generation.disconnected  # the upstream stopped generating


async def test_request_finished_log_line_has_the_facts_and_no_prompt(
    served: tuple[asyncio.subprocess.Process, str],
) -> None:
    """One JSON request_finished line per request, with ids and sizes but never the prompt."""
    process, url = served
    secret = "my secret prompt text"
    async with aiohttp.ClientSession() as http:
        body = {"model": MODEL, "messages": [{"role": "user", "content": secret}], "stream": False}
        async with http.post(url + "/api/chat", json=body) as response:
            request_id = response.headers["X-Request-ID"]
            await response.read()
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), 10)
    assert process.stderr is not None
    logs = (await process.stderr.read()).decode()
    assert secret not in logs
    lines = [json.loads(line) for line in logs.splitlines() if "request_finished" in line]
    assert len(lines) == 1
    line = lines[0]
    assert line["request_id"] == request_id
    for key in ("endpoint", "model", "client", "status", "outcome", "duration_s", "queue_wait_s",
                "ttfb_s", "prompt_tokens", "completion_tokens", "tokens_per_second",
                "load_duration_s", "bytes_out"):  # fmt: skip
        assert key in line, key
    assert line["completion_tokens"] == 8
