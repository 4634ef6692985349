"""How ``proxy.cli.engine`` handles an engine that dies, hangs or will not stop.

Stand-in children play the failure (a small HTTP server in place of llama.cpp's), so these
run on every machine, with or without the real engine.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from proxy.cli import engine as engine_module
from proxy.cli.engine import REBUILD_HINT, EngineError, EngineSettings, running_engine

pytestmark = pytest.mark.timeout(20)

# A stand-in for llama.cpp's server: lists the alias, then behaves as argv[2] says.
STAND_IN = r"""
import json, os, resource, signal, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

port, behaviour = int(sys.argv[1]), sys.argv[2]
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file from the SIGILL
if behaviour == "exit":
    print("error: cannot load model", flush=True)
    sys.exit(3)
if behaviour == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)

class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if behaviour == "never_ready":
            self.send_error(503)
            return
        body = json.dumps({"data": [{"id": "smollm2:135m"}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        length = int(self.headers["Content-Length"])
        self.rfile.read(length)
        if behaviour == "sigill":
            print("ggml_compute_forward: about to run an AVX-512 kernel", flush=True)
            os.kill(os.getpid(), signal.SIGILL)
        body = b'{"choices": [{"message": {"content": "Hi"}}]}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> EngineSettings:
    """Settings whose engine command starts the stand-in; its behaviour is set per test."""

    def command(settings: EngineSettings, model: Path, port: int) -> list[str]:
        return [sys.executable, "-c", STAND_IN, str(port), str(settings.model_path)]

    monkeypatch.setattr(engine_module, "engine_command", command)
    return EngineSettings(startup_timeout_s=10.0, stop_timeout_s=2.0)


def behaving(settings: EngineSettings, behaviour: str, **changes: float) -> EngineSettings:
    # The behaviour travels in model_path: the stand-in ignores the model.
    return replace(settings, model_path=Path(behaviour), **changes)


async def test_sigill_on_first_generation_says_how_to_rebuild(stand_in: EngineSettings) -> None:
    """An engine that dies with SIGILL on its first token gets the rebuild command as advice."""
    with pytest.raises(EngineError) as raised:
        async with running_engine(behaving(stand_in, "sigill")):
            pytest.fail("the engine should not have been usable")
    message = str(raised.value)
    assert "SIGILL" in message
    assert "Illegal instruction" in message
    assert REBUILD_HINT in message
    assert "ENGINE_CMAKE_ARGS=-DGGML_NATIVE=OFF just engine" in message
    assert "AVX-512 kernel" in message  # the engine's last words are shown


async def test_exit_during_startup_fails_early_with_the_output(stand_in: EngineSettings) -> None:
    """A child that exits while loading fails at once, not at the start-up deadline."""
    started = time.monotonic()
    with pytest.raises(EngineError) as raised:
        async with running_engine(behaving(stand_in, "exit", startup_timeout_s=15.0)):
            pytest.fail("the engine should not have been usable")
    assert time.monotonic() - started < 10.0
    assert "status 3" in str(raised.value)
    assert "cannot load model" in str(raised.value)


async def test_startup_deadline_stops_the_child(stand_in: EngineSettings) -> None:
    """A child that never lists the model is reported after the deadline and terminated."""
    engine = engine_module.Engine(behaving(stand_in, "never_ready", startup_timeout_s=1.0))
    try:
        with pytest.raises(EngineError, match="did not answer"):
            await engine.start()
    finally:
        await engine.stop()
    assert engine.process is not None
    assert engine.process.returncode == -signal.SIGTERM


async def test_stop_kills_a_child_that_ignores_sigterm(stand_in: EngineSettings) -> None:
    """Stopping is bounded: terminate, wait stop_timeout_s, then kill."""
    settings = behaving(stand_in, "ignore_term", stop_timeout_s=0.5)
    async with running_engine(settings) as engine:
        assert engine.process is not None
        assert engine.process.returncode is None
    assert engine.process.returncode == -signal.SIGKILL


async def test_a_healthy_engine_reports_its_start(stand_in: EngineSettings) -> None:
    """The context manager yields an engine that answered; progress goes to ``report``."""
    said: list[str] = []
    async with running_engine(behaving(stand_in, "ok"), report=said.append) as engine:
        assert engine.url.startswith("http://127.0.0.1:")
    assert engine.process is not None
    assert engine.process.returncode == -signal.SIGTERM
    assert any("one-token generation took" in line for line in said)
