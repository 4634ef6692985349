"""Fixtures: the fake Ollama and the real gateway, each on a socket bound to port 0."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.web_runner import BaseRunner

from loadtest.fake_ollama import FakeOllama, FakeOllamaConfig
from proxy.admission.gate import Gate
from proxy.app import create_app
from proxy.config import parse_config
from proxy.gateway import GATEWAY, Gateway
from proxy.listen import listening_sockets
from proxy.server import gateway_runner

# The corpus's checks live beside the tests that call them: pytest explains their asserts too.
pytest.register_assert_rewrite("tests.reference", "tests.functional.corpus")

MODEL = "llama3.2:latest"


class FakeClock:
    """A clock tests move by hand; the gateway reads it through ``create_app(clock=...)``."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningGateway:
    server: TestServer
    app: web.Application

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    async def metrics_text(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/metrics") as response,
        ):
            return await response.text()


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def gateway_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    """Generous limits (tests that exercise a limit set it), fast retries."""
    base = {
        "upstream": {
            "url": upstream_url,
            "default_model": MODEL,
            "retry_delay_s": 0.01,
            "retry_max_delay_s": 0.05,
            "max_retries": 2,
            # One probe at start-up (reset away below); none during a test.
            "probe_interval_s": 3600,
        },
        "limits": {
            "requests_per_minute": 1_000_000,
            "burst": 100_000,
            "client_requests_per_minute": 1_000_000,
            "client_burst": 100_000,
            "max_queue": 256,
            "max_queue_per_client": 256,
        },
        "logging": {"level": "warning", "format": "json"},
    }
    return merge(base, sections)


GatewayFactory = Callable[..., Awaitable[RunningGateway]]


class GatewayTestServer(TestServer):
    """aiohttp's test server, running the app as ``proxy serve`` does (its connections,
    head timeout and parser refusals included)."""

    async def _make_runner(self, **kwargs: Any) -> BaseRunner:
        return gateway_runner(self.app, **kwargs)


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    server = FakeOllama(FakeOllamaConfig())
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def second_fake() -> AsyncIterator[FakeOllama]:
    """Another fake Ollama, for a gateway's second backend."""
    server = FakeOllama(FakeOllamaConfig())
    await server.start()
    yield server
    await server.close()


@pytest.fixture
async def gateway_factory(fake: FakeOllama) -> AsyncIterator[GatewayFactory]:
    servers: list[TestServer] = []

    async def start(
        upstream_url: str | None = None,
        clock: Callable[[], float] = time.monotonic,
        **sections: Any,
    ) -> RunningGateway:
        config = parse_config(gateway_config(upstream_url or fake.url, **sections))
        app = create_app(config, clock=clock)

        def listen(host: str, port: int, _family: object) -> socket.socket:
            # The sockets `proxy serve` listens on, with their options.
            (sock,) = listening_sockets(host, port, send_timeout_s=config.server.send_timeout_s)
            return sock

        server = GatewayTestServer(app, port=0, socket_factory=listen)
        await server.start_server()
        servers.append(server)
        fake.reset()  # forget the start-up probe: tests count what clients caused
        return RunningGateway(server, app)

    yield start
    for server in servers:
        await server.close()


@pytest.fixture
async def gateway(gateway_factory: GatewayFactory) -> RunningGateway:
    return await gateway_factory()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def gate_changes(gate: Gate) -> asyncio.Event:
    """An event set whenever ``gate``'s counts may have changed: its methods that change
    them are wrapped, on this instance only, the first time a test asks."""
    found = getattr(gate, "_test_changed", None)
    if found is not None:
        return cast(asyncio.Event, found)
    changed = asyncio.Event()

    def notifying(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return method(*args, **kwargs)
            finally:
                changed.set()

        return call

    _acquire = gate.acquire

    async def acquire(*args: Any, **kwargs: Any) -> Any:
        try:
            return await _acquire(*args, **kwargs)
        finally:
            changed.set()

    for name in ("try_enter", "_enqueue", "leave", "release", "dispatch"):
        setattr(gate, name, notifying(getattr(gate, name)))
    gate.acquire = acquire  # type: ignore[method-assign]
    gate._test_changed = changed  # type: ignore[attr-defined]
    return changed


async def until_gate(gate: Gate, predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait until ``predicate`` holds, re-checking whenever ``gate`` changes."""
    changed = gate_changes(gate)
    async with asyncio.timeout(within_s):
        while not predicate():
            changed.clear()
            await changed.wait()


async def gate_until(
    running: RunningGateway, predicate: Callable[[], bool], within_s: float = 5.0
) -> None:
    """Wait until ``predicate`` holds, re-checking whenever the gateway's gate changes."""
    await until_gate(running.gateway.gate, predicate, within_s)


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    samples = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match and not line.startswith("#"):
            labels = dict(_LABEL.findall(match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of ``name`` over the samples whose labels include ``labels``."""
    return sum(
        value
        for sample, have, value in parse_metrics(text)
        if sample == name and all(have.get(k) == v for k, v in labels.items())
    )


@dataclass
class RedisServer:
    """A real redis-server of the test's own, on a Unix socket (no port to race for)."""

    socket_path: Path
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def start(self) -> None:
        """Start it (again) on the same socket; returns once it answers."""
        self.process = _redis_process(self.socket_path)

    def command(self, *words: str) -> str:
        """One command, its raw answer (RESP), read until the server stops sending."""
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(2)
            client.connect(str(self.socket_path))
            parts = [f"${len(w)}\r\n{w}\r\n" for w in words]
            client.sendall(f"*{len(words)}\r\n{''.join(parts)}".encode())
            answer = b""
            while not answer.endswith(b"\r\n") or answer.count(b"\r\n") < 2:
                chunk = client.recv(65536)
                if not chunk:
                    break
                answer += chunk
            return answer.decode()

    def scripts_run(self) -> int:
        """How many scripts the server ran (EVALSHA and EVAL), from its command stats."""
        stats = self.command("INFO", "commandstats")
        calls = re.findall(r"cmdstat_eval(?:sha)?:calls=(\d+)", stats)
        return sum(int(n) for n in calls)


def _redis_process(socket_path: Path) -> subprocess.Popen[bytes]:
    """Start redis-server and return once it says it accepts connections."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("needs redis-server (Debian: apt-get install redis-server)")
    process = subprocess.Popen(
        [binary, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
         "--save", "", "--appendonly", "no", "--loglevel", "notice"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    assert process.stdout is not None
    for line in process.stdout:  # bounded by the test's timeout
        if b"ready to accept connections" in line.lower():
            process.stdout.close()  # nothing more is read: it must not fill and block
            return process
    raise AssertionError(f"redis-server exited with {process.wait()} before it was ready")


@pytest.fixture
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    # A short path: a Unix socket's path may not exceed ~108 bytes.
    folder = Path(tempfile.mkdtemp(prefix="ogw-redis-"))
    socket_path = folder / "redis.sock"
    server = RedisServer(socket_path, _redis_process(socket_path))
    yield server
    server.stop()
    shutil.rmtree(folder, ignore_errors=True)


ROOT = Path(__file__).resolve().parents[1]


async def run_module(
    *argv: str,
    timeout_s: float,
    stdin: bytes | None = None,
    env: dict[str, str] | None = None,
) -> tuple[int, str, str]:
    """``python -m argv...`` from the project's root, to its end within ``timeout_s`` (killed
    otherwise); its exit status, stdout and stderr. ``env`` replaces the environment."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", *argv,
        cwd=ROOT, env={**(os.environ if env is None else env), "PYTHONPATH": str(ROOT)},
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(timeout_s):
            stdout, stderr = await proc.communicate(stdin)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()
