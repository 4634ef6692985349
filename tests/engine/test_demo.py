"""``python -m proxy demo`` as a person runs it: engine and gateway up, answers, clean stop."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from proxy.cli.engine import ALIAS, free_port
from tests.engine.conftest import engine_missing

pytestmark = [
    pytest.mark.engine,
    pytest.mark.timeout(90),
    pytest.mark.skipif(
        engine_missing() is not None, reason=f"real-engine tier: {engine_missing()}"
    ),
]

ROOT = Path(__file__).resolve().parents[2]
READY = "The gateway is ready on "


class Demo:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.output: list[str] = []

    async def read_until(self, marker: str) -> str:
        """Output lines up to the first that contains ``marker``; that line."""
        assert self.process.stdout is not None
        while line := (await self.process.stdout.readline()).decode():
            self.output.append(line)
            if marker in line:
                return line
        raise AssertionError(f"the demo ended before {marker!r}:\n{''.join(self.output)}")

    async def finish(self) -> int:
        assert self.process.stdout is not None
        self.output.append((await self.process.stdout.read()).decode())
        return await self.process.wait()


@pytest.fixture
async def demo() -> AsyncIterator[Demo]:
    port = free_port("127.0.0.1")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--port",
        str(port),
        cwd=ROOT,
        env={**os.environ, "LOG_LEVEL": "warning", "LOG_FORMAT": "json"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    running = Demo(process)
    yield running
    if process.returncode is None:  # the test failed half-way: stop it as a person would
        process.send_signal(signal.SIGINT)
        try:
            async with asyncio.timeout(20):
                await running.finish()
        except TimeoutError:
            process.kill()
            await process.wait()


@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_demo_serves_through_the_gateway_and_cleans_up(
    demo: Demo, stop_signal: signal.Signals
) -> None:
    """The demo prints what to try, answers /chat and /v1/models through the gateway, and on
    Ctrl-C or SIGTERM stops both the gateway and the engine, exiting 0."""
    async with asyncio.timeout(60):
        engine_line = await demo.read_until("engine listening on ")
        ready = await demo.read_until(READY)
        await demo.read_until("Ctrl-C stops")
    engine_url = re.search(r"(http://\S+)", engine_line)
    gateway_url = re.search(r"(http://\S+?),", ready)
    assert engine_url is not None
    assert gateway_url is not None
    printed = "".join(demo.output)
    assert f"just chat --url {gateway_url.group(1)} --model {ALIAS}" in printed
    assert f"--dialect openai --model {ALIAS}" in printed
    assert "/v1/chat/completions" in printed

    url = gateway_url.group(1)
    async with aiohttp.ClientSession() as http:
        async with http.get(url + "/v1/models") as response:
            assert response.status == 200
            assert [m["id"] for m in (await response.json())["data"]] == [ALIAS]
        body = {"prompt": "Hi", "options": {"num_predict": 4}}
        async with http.post(url + "/chat", json=body) as response:
            assert response.status == 200
            answer = await response.json()
        assert answer["response"]
        assert answer["model"] == ALIAS

        demo.process.send_signal(stop_signal)
        async with asyncio.timeout(20):
            code = await demo.finish()
        assert code == 0, "".join(demo.output)
        assert "stopped" in "".join(demo.output)
        for gone in (url, engine_url.group(1)):
            with pytest.raises(aiohttp.ClientConnectionError):
                async with http.get(gone + "/v1/models"):
                    pass
