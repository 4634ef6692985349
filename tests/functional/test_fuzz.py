"""Schemathesis against the running gateway, from its own /openapi.json, with the fake Ollama
behind it: every response must be one the description documents, and nothing may break.

The gateway and the fake run as `python -m proxy serve` and `python -m loadtest.fake_ollama`
subprocesses: Schemathesis calls with a blocking HTTP client, and the gateway's log is read
whole from its stderr.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import schemathesis
import yaml
from aiohttp.test_utils import unused_port
from schemathesis.engine import events
from schemathesis.engine import from_schema as engine_for

from proxy.config import ENV_OVERRIDES
from tests.conftest import gateway_config

KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
# Per operation and phase: each field the gateway reads gets several values, and the ~40
# operations take about 20 s (about 1,800 requests) on a two-core machine.
MAX_EXAMPLES = 30
START_TIMEOUT_S = 20.0


@dataclass
class Process:
    popen: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def read(self, stream: str, marker: str) -> None:
        """Keep every line of ``stream``; set ``ready`` at the first that holds ``marker``."""
        pipe = getattr(self.popen, stream)

        def run() -> None:
            for line in pipe:
                self.lines.append(line)
                if marker in line:
                    self.ready.set()
            self.ready.set()  # the process ended: whoever waits must look

        self.reader = threading.Thread(target=run, daemon=True)
        self.reader.start()

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
        self.popen.wait(timeout=15)
        if self.reader is not None:
            self.reader.join(timeout=5)
        for pipe in (self.popen.stdout, self.popen.stderr):
            if pipe is not None:
                pipe.close()


def _start(args: list[str], stream: str, marker: str, env: dict[str, str]) -> Process:
    popen = subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
        stderr=subprocess.PIPE if stream == "stderr" else None,
        text=True,
        env=env,
    )
    process = Process(popen)
    process.read(stream, marker)
    if not process.ready.wait(START_TIMEOUT_S) or popen.poll() is not None:
        process.stop()
        pytest.fail(f"{args[1]} did not start:\n{''.join(process.lines)}")
    return process


@pytest.fixture
def gateway_log(tmp_path: Path) -> Iterator[tuple[str, list[str]]]:
    """The gateway (keys on, no admin key) in front of the fake: its URL and its log lines."""
    # The environment overrides the config file: none of the caller's may leak in.
    env = {k: v for k, v in os.environ.items() if k not in ENV_OVERRIDES and k != "PROXY_CONFIG"}
    fake = _start(["-m", "loadtest.fake_ollama", "--port", "0"], "stdout", "http://", env)
    fake_url = fake.lines[0].strip()
    # `serve` binds a port number; a collision fails its start loudly, not silently.
    port = unused_port()
    config = gateway_config(
        fake_url,
        server={"host": "127.0.0.1", "port": port},
        auth={"api_keys": [{"name": "fuzz", "key": KEY}]},
        logging={"level": "info", "format": "json"},
    )
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config))
    try:
        gateway = _start(
            ["-m", "proxy", "--config", str(path), "serve"], "stderr", "gateway_ready", env
        )
        try:
            yield f"http://127.0.0.1:{port}", gateway.lines
        finally:
            gateway.stop()
    finally:
        fake.stop()
    # Kept beside the test's other files, to read when something fails.
    (tmp_path / "gateway.log").write_text("".join(gateway.lines))
    problems = [line for line in gateway.lines if _is_problem(line)]
    assert not problems, "the gateway logged errors:\n" + "".join(problems)


def _is_problem(line: str) -> bool:
    if "Traceback" in line:
        return True
    try:
        event = json.loads(line)
    except ValueError:
        return True  # aiohttp's own errors are plain text through the stdlib logger
    return isinstance(event, dict) and event.get("level") in ("error", "critical")


def _config() -> schemathesis.Config:
    return schemathesis.Config.from_dict(
        {
            "headers": AUTH,
            "generation": {"max-examples": MAX_EXAMPLES, "mode": "all"},
            "phases": {"stateful": {"enabled": False}},
            "request-timeout": 10,
            "checks": {
                # 5xx only where the description documents them (the upstream's failures and
                # the queue); the response checks hold their bodies to the description.
                "not_a_server_error": {
                    "expected-statuses": ["2xx", "3xx", "4xx", "502", "503", "504"]
                },
                # The gateway checks a few fields and leaves the rest open; the upstream
                # validates those itself (an unknown model: 404, a bad option: 400), and its
                # refusal passes through as documented.
                "positive_data_acceptance": {
                    "expected-statuses": ["2xx", "400", "401", "403", "404", "429"]
                },
            },
        }
    )


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_gateway_answers_as_its_description_says(gateway_log: tuple[str, list[str]]) -> None:
    """Generated requests to every documented operation get documented answers, no 5xx."""
    url, log = gateway_log
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json", config=_config())
    failures: dict[tuple[str, str], str] = {}
    scenarios = 0
    for event in engine_for(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            scenarios += 1
            recorder = event.recorder
            for case_id, checks in recorder.checks.items():
                for info in (c.failure_info for c in checks if c.failure_info is not None):
                    interaction = recorder.interactions.get(case_id)
                    response = interaction.response if interaction is not None else None
                    status = response.status_code if response is not None else None
                    text = f"{info.failure.message}\n-> {status}\n{info.code_sample}"
                    failures.setdefault((event.label or "", info.failure.title), text)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            failures.setdefault(("engine", type(event).__name__), repr(event))
    report = "\n\n".join(f"{label}: {title}\n{text}" for (label, title), text in failures.items())
    assert not failures, report
    assert scenarios > 0
    # The description's examples lead the way to real answers, streams included.
    answered = {(e["endpoint"], e["status"]) for e in _finished(log)}
    for endpoint in ("/api/chat", "/api/generate", "/v1/chat/completions", "/chat"):
        assert (endpoint, 200) in answered, endpoint


def _finished(lines: list[str]) -> Iterator[dict[str, object]]:
    for line in lines:
        if line.startswith("{"):
            event = json.loads(line)
            if event.get("event") == "request_finished":
                yield event
