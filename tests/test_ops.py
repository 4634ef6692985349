"""The operator commands: ``status`` against a fake Docker Engine, ``pull`` and ``warmup``
through the real gateway in front of the fake Ollama, and their pure formatting."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from loadtest.fake_ollama import FakeOllama
from proxy.__main__ import main
from proxy.cli import ops
from proxy.cli.progress import PullProgress, format_bytes, format_rate, progress_line, render_bar
from proxy.cli.stack import (
    OLLAMA_MEMORY_ADVICE,
    PROJECT_LABEL,
    ServiceState,
    format_memory,
    hints,
    memory_in_use,
    memory_limit,
    render_table,
)
from proxy.dialects import error_message
from tests.conftest import FakeClock, GatewayFactory, RunningGateway

MIB = 1024 * 1024
HOST_MEMORY = 8 * 1024 * MIB
PROJECT = "ollama-gateway"
ADMIN_KEY = "admin-key-123"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ops.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


# --- a fake Docker Engine API: the endpoints the Docker SDK calls for `status` ----------------


def stats_v2(usage: int, inactive_file: int, limit: int) -> dict[str, Any]:
    """A one-shot stats answer as a cgroup v2 engine writes it (memory part in full)."""
    return {
        "read": "2025-06-01T10:00:00.123456789Z",
        "preread": "0001-01-01T00:00:00Z",
        "pids_stats": {"current": 14, "limit": 18446744073709551615},
        "cpu_stats": {"cpu_usage": {"total_usage": 8_123_456_000}, "online_cpus": 2},
        "precpu_stats": {"cpu_usage": {"total_usage": 0}},
        "memory_stats": {
            "usage": usage,
            "stats": {
                "anon": usage - inactive_file,
                "file": inactive_file,
                "inactive_file": inactive_file,
            },
            "limit": limit,
        },
    }


def stats_v1(usage: int, total_inactive_file: int, limit: int) -> dict[str, Any]:
    """The same on a cgroup v1 host, where the page cache is reported as total_inactive_file."""
    return {
        "read": "2025-06-01T10:00:00.123456789Z",
        "memory_stats": {
            "usage": usage,
            "max_usage": usage + 10 * MIB,
            "stats": {"inactive_file": 1024, "total_inactive_file": total_inactive_file},
            "limit": limit,
        },
    }


def is_true(value: str) -> bool:
    """How the engine reads a boolean query parameter (moby's httputils.BoolValue)."""
    return value.strip().lower() not in ("", "0", "no", "false", "none")


@dataclass
class FakeContainer:
    id: str
    service: str
    image: str
    status: str = "running"
    project: str = PROJECT
    exit_code: int = 0
    oom_killed: bool = False
    restarts: int = 0
    health: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> dict[str, str]:
        return {
            "com.docker.compose.project": self.project,
            "com.docker.compose.service": self.service,
            "com.docker.compose.container-number": "1",
            "com.docker.compose.oneoff": "False",
        }

    @property
    def name(self) -> str:
        return f"/{self.project}-{self.service}-1"

    def summary(self) -> dict[str, Any]:
        return {
            "Id": self.id,
            "Names": [self.name],
            "Image": self.image,
            "Labels": self.labels,
            "State": self.status,
            "Status": "Up 2 hours" if self.status == "running" else f"Exited ({self.exit_code})",
        }

    def inspect(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "Status": self.status,
            "Running": self.status == "running",
            "Paused": False,
            "Restarting": False,
            "OOMKilled": self.oom_killed,
            "Dead": False,
            "Pid": 4242 if self.status == "running" else 0,
            "ExitCode": self.exit_code,
            "Error": "",
            "StartedAt": "2025-06-01T08:00:00.5Z",
            "FinishedAt": "0001-01-01T00:00:00Z",
        }
        if self.health is not None:
            state["Health"] = {"Status": self.health, "FailingStreak": 0, "Log": []}
        return {
            "Id": self.id,
            "Name": self.name,
            "RestartCount": self.restarts,
            "State": state,
            "Config": {"Image": self.image, "Labels": self.labels},
            "HostConfig": {"Memory": 512 * MIB},
        }


class FakeDockerEngine:
    """Serves /version, /info, /containers/json, /containers/{id}/json and /{id}/stats."""

    def __init__(self, containers: list[FakeContainer], api_version: str = "1.43") -> None:
        self.containers = {c.id: c for c in containers}
        self.api_version = api_version
        self.seen: list[tuple[str, dict[str, str]]] = []  # (path, query) of every request
        self.app = web.Application(middlewares=[self._record])
        prefix = "/v{version}"
        self.app.router.add_get("/version", self.version)
        self.app.router.add_get(prefix + "/info", self.info)
        self.app.router.add_get(prefix + "/containers/json", self.list_containers)
        self.app.router.add_get(prefix + "/containers/{id}/json", self.inspect)
        self.app.router.add_get(prefix + "/containers/{id}/stats", self.stats)

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.seen.append((request.path, dict(request.query)))
        return await handler(request)  # type: ignore[no-any-return]

    async def version(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"Version": "24.0.7", "ApiVersion": self.api_version, "MinAPIVersion": "1.12"}
        )

    async def info(self, request: web.Request) -> web.Response:
        return web.json_response({"MemTotal": HOST_MEMORY, "NCPU": 2, "OSType": "linux"})

    async def list_containers(self, request: web.Request) -> web.Response:
        filters = json.loads(request.query.get("filters", "{}"))
        wanted = [label.split("=", 1) for label in filters.get("label", [])]
        show_all = is_true(request.query.get("all", ""))
        found = [
            c.summary()
            for c in self.containers.values()
            if all(c.labels.get(k) == v for k, v in wanted) and (show_all or c.status == "running")
        ]
        return web.json_response(found)

    def _container(self, request: web.Request) -> FakeContainer:
        container = self.containers.get(request.match_info["id"])
        if container is None:
            raise web.HTTPNotFound(
                text=json.dumps({"message": "No such container"}), content_type="application/json"
            )
        return container

    async def inspect(self, request: web.Request) -> web.Response:
        return web.json_response(self._container(request).inspect())

    async def stats(self, request: web.Request) -> web.Response:
        container = self._container(request)
        if is_true(request.query.get("stream", "1")):
            raise web.HTTPBadRequest(text="this fake serves only non-streamed stats")
        # A stopped container answers with zeroed stats and an empty memory_stats.
        return web.json_response(
            container.stats or {"read": "0001-01-01T00:00:00Z", "memory_stats": {}}
        )


def small_box_stack() -> list[FakeContainer]:
    """A healthy gateway, an OOM-killed Ollama, a Prometheus at 95 %, an unlimited Grafana."""
    return [
        FakeContainer(
            "a1" * 32,
            "proxy",
            "ollama-gateway-proxy:latest",
            health="healthy",
            stats=stats_v2(usage=72 * MIB, inactive_file=10 * MIB, limit=512 * MIB),
        ),
        FakeContainer(
            "b2" * 32,
            "ollama",
            "ollama/ollama:0.9.0",
            status="exited",
            exit_code=137,
            oom_killed=True,
            restarts=2,
            health="unhealthy",
        ),
        FakeContainer(
            "c3" * 32,
            "prometheus",
            "prom/prometheus:v3.4.1",
            stats=stats_v1(usage=500 * MIB, total_inactive_file=13 * MIB + 614400, limit=512 * MIB),
        ),
        FakeContainer(
            "d4" * 32,
            "grafana",
            "grafana/grafana:12.0.1",
            stats=stats_v2(usage=80 * MIB, inactive_file=0, limit=HOST_MEMORY),
        ),
        FakeContainer("e5" * 32, "web", "nginx:1.27", project="another-project"),
    ]


@pytest.fixture
async def docker_engine() -> AsyncIterator[Callable[[list[FakeContainer]], Any]]:
    servers: list[TestServer] = []

    async def start(containers: list[FakeContainer]) -> tuple[FakeDockerEngine, str]:
        engine = FakeDockerEngine(containers)
        server = TestServer(engine.app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return engine, f"tcp://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.close()


async def run_status(argv: list[str]) -> int:
    # The Docker SDK blocks; in a thread it leaves this loop free to serve the fake engine.
    return await asyncio.to_thread(main, ["status", *argv])


async def test_status_shows_the_oom_kill_and_the_memory_pressure(
    docker_engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """The table shows every service of the project; the OOM kill and 95 % get hints; exit 1."""
    engine, host = await docker_engine(small_box_stack())
    code = await run_status(["--docker-host", host, "--project", PROJECT])
    out = capsys.readouterr().out
    assert code == 1
    assert out.splitlines() == [
        "  SERVICE     STATE         HEALTH     MEMORY                       RESTARTS  OOM-KILLED",
        "  grafana     running       -          80.0 MiB (no limit)          0         no",
        "! ollama      exited (137)  unhealthy  -                            2         YES",
        "! prometheus  running       -          486.4 MiB / 512.0 MiB (95%)  0         no",
        "  proxy       running       healthy    62.0 MiB / 512.0 MiB (12%)   0         no",
        "",
        "hint: ollama was killed for running out of memory: use a smaller model "
        "(OLLAMA_MODEL=qwen2.5:0.5b), the 4 GB profile, or raise OLLAMA_MEMORY_LIMIT in .env, "
        "then restart the stack",
        "hint: prometheus uses 95% of its memory limit: raise its memory limit",
        "",
        "1 of 4 services not running",
    ]
    paths = [path for path, _ in engine.seen]
    assert paths[:2] == ["/version", "/v1.43/containers/json"]
    assert json.loads(engine.seen[1][1]["filters"]) == {"label": [f"{PROJECT_LABEL}={PROJECT}"]}
    stats_queries = [query for path, query in engine.seen if path.endswith("/stats")]
    # One-shot, non-streamed stats for the three running containers; none for the exited one.
    assert len(stats_queries) == 3
    assert all(is_true(q["one-shot"]) and not is_true(q["stream"]) for q in stats_queries)


async def test_status_exits_0_when_every_service_runs(
    docker_engine: Any, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A running, healthy stack exits 0; the project comes from COMPOSE_PROJECT_NAME."""
    stack = [c for c in small_box_stack() if c.service in ("proxy", "grafana")]
    for c in stack:
        c.project = "small-box"
    _, host = await docker_engine(stack)
    monkeypatch.setenv("COMPOSE_PROJECT_NAME", "small-box")
    assert await run_status(["--docker-host", host]) == 0
    out = capsys.readouterr().out
    assert "hint:" not in out
    assert out.endswith("all services running\n")


async def test_status_without_containers_says_the_stack_is_not_up(
    docker_engine: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A project with no containers exits 1 and says how to start or name it."""
    _, host = await docker_engine(small_box_stack())
    assert await run_status(["--docker-host", host, "--project", "nothing-here"]) == 1
    assert "no containers of compose project 'nothing-here'" in capsys.readouterr().out


def test_status_without_a_docker_engine_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """An engine that refuses the connection gives exit 2 and says what to check."""
    # A bound socket that does not listen refuses connections, and no other process can take it.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        assert main(["status", "--docker-host", f"tcp://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert f"cannot reach the Docker Engine at tcp://127.0.0.1:{port}" in err
    assert "Is the Docker engine running, and is DOCKER_HOST (or --docker-host) right?" in err


# --- pull and warmup through the real gateway and the fake Ollama -----------------------------


@dataclass
class Console:
    """What a command wrote: the gateway logs to the real stdout in tests, so not capsys."""

    out: io.StringIO = field(default_factory=io.StringIO)
    err: io.StringIO = field(default_factory=io.StringIO)


@pytest.fixture
def console() -> Console:
    return Console()


async def test_pull_with_the_admin_key_streams_progress_until_success(
    gateway_factory: GatewayFactory, fake: FakeOllama, console: Console
) -> None:
    """With the admin key the pull streams every step, ends in success and installs the model."""
    gw = await gateway_factory(auth={"admin_key": ADMIN_KEY})
    assert fake.find_model("tinyllama:1.1b") is None
    code = await ops.pull(gw.url, "tinyllama:1.1b", ADMIN_KEY, console.out, err=console.err)
    out = console.out.getvalue()
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "pulling manifest"
    assert re.fullmatch(r"pulling [0-9a-f]{12} +0% 0 B/2\.0 GB", lines[1]), lines[1]
    assert re.fullmatch(r"pulling [0-9a-f]{12} +50% 1\.0 GB/2\.0 GB( [\d.]+ MB/s)?", lines[2])
    assert re.fullmatch(r"pulling [0-9a-f]{12} 100% 2\.0 GB/2\.0 GB( [\d.]+ MB/s)?", lines[3])
    assert lines[4:] == [
        "verifying sha256 digest",
        "writing manifest",
        "success",
        "tinyllama:1.1b is ready",
    ]
    assert fake.find_model("tinyllama:1.1b") is not None
    assert fake.seen[-1].json == {"model": "tinyllama:1.1b", "stream": True}


async def test_pull_without_the_admin_key_is_refused_with_a_hint(
    gateway_factory: GatewayFactory, fake: FakeOllama, console: Console
) -> None:
    """Without the admin key the gateway answers 403; the command prints its message and a hint."""
    gw = await gateway_factory(auth={"admin_key": ADMIN_KEY})
    code = await ops.pull(gw.url, "tinyllama:1.1b", None, console.out, err=console.err)
    assert code == 1
    assert (
        "pull failed: HTTP 403: this route requires the gateway's admin key"
        in console.err.getvalue()
    )
    assert "set PROXY_ADMIN_KEY (or pass --admin-key)" in console.err.getvalue()
    assert console.out.getvalue() == ""
    assert not any(s.path == "/api/pull" for s in fake.seen)


async def test_warmup_loads_the_model_and_reports_the_load_time(
    gateway_factory: GatewayFactory, fake: FakeOllama, console: Console
) -> None:
    """Warmup sends Ollama's empty-prompt load with the client key and prints the load time."""
    gw = await gateway_factory(auth={"api_keys": [{"name": "ops", "key": "client-key-1"}]})
    fake.config.load_s = 0.2  # a cold load the reported time must include
    code = await ops.warmup(gw.url, "qwen2.5:0.5b", "client-key-1", console.out, err=console.err)
    out = console.out.getvalue()
    assert code == 0
    match = re.search(r"^qwen2\.5:0\.5b loaded in (\d+\.\d) s$", out, re.MULTILINE)
    assert match, out
    assert float(match.group(1)) >= 0.2
    assert fake.seen[-1].json == {"model": "qwen2.5:0.5b", "prompt": "", "stream": False}


async def test_warmup_without_the_client_key_hints_at_proxy_api_key(
    gateway_factory: GatewayFactory, console: Console
) -> None:
    """A gateway that requires client keys answers 401; the command says which variable to set."""
    gw = await gateway_factory(auth={"api_keys": [{"name": "ops", "key": "client-key-1"}]})
    assert await ops.warmup(gw.url, "qwen2.5:0.5b", None, console.out, err=console.err) == 1
    err = console.err.getvalue()
    assert "warmup failed: HTTP 401: missing API key" in err
    assert "set PROXY_API_KEY (or pass --api-key)" in err


async def test_warmup_of_an_unknown_model_fails_with_ollamas_404(
    gateway: RunningGateway, console: Console
) -> None:
    """An unknown model gives Ollama's 404 message, passed through, and a hint to pull it."""
    assert await ops.warmup(gateway.url, "nope:7b", None, console.out, err=console.err) == 1
    err = console.err.getvalue()
    assert "warmup failed: HTTP 404: model 'nope:7b' not found" in err
    assert "hint: pull it first: python -m proxy pull nope:7b" in err


async def test_warmup_when_rate_limited_prints_retry_after(
    gateway_factory: GatewayFactory, console: Console
) -> None:
    """A 429 from the gateway's rate limiter is reported with its Retry-After."""
    gw = await gateway_factory(
        clock=FakeClock(), limits={"client_requests_per_minute": 1, "client_burst": 1}
    )
    assert await ops.warmup(gw.url, "qwen2.5:0.5b", None, console.out, err=console.err) == 0
    assert await ops.warmup(gw.url, "qwen2.5:0.5b", None, console.out, err=console.err) == 1
    err = console.err.getvalue()
    assert "warmup failed: HTTP 429:" in err
    assert "rate limited: retry after 60 s" in err


@pytest.fixture
async def scripted_pull() -> AsyncIterator[Callable[..., Any]]:
    """An Ollama stand-in whose /api/pull answers 200 with the given NDJSON lines, then ends
    the chunked body properly or, with ``drop``, closes the connection in the middle of it."""
    servers: list[TestServer] = []

    async def start(lines: list[bytes], *, drop: bool = False) -> str:
        async def pull(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await resp.prepare(request)
            for line in lines:
                await resp.write(line)
            if drop and request.transport is not None:
                request.transport.close()
            else:
                await resp.write_eof()
            return resp

        app = web.Application()
        app.router.add_post("/api/pull", pull)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}"

    yield start
    for server in servers:
        await server.close()


async def test_pull_stops_at_an_error_line(scripted_pull: Any, console: Console) -> None:
    """An in-stream error line (Ollama's unknown-model answer, HTTP 200) is printed; exit 1."""
    url = await scripted_pull(
        [
            b'{"status":"pulling manifest"}\n',
            b'{"error":"pull model manifest: file does not exist"}\n',
        ]
    )
    assert await ops.pull(url, "nope:1b", None, console.out, err=console.err) == 1
    assert console.out.getvalue() == "pulling manifest\n"
    assert console.err.getvalue() == "pull failed: pull model manifest: file does not exist\n"


async def test_pull_that_ends_without_success_fails(scripted_pull: Any, console: Console) -> None:
    """A stream that closes before `success` (an interrupted download) is a failure, not done."""
    digest = "sha256:" + "ab" * 32
    layer = {"status": "pulling abababababab", "digest": digest, "total": 2000, "completed": 1000}
    url = await scripted_pull([b'{"status":"pulling manifest"}\n', json.dumps(layer).encode()])
    assert await ops.pull(url, "m", None, console.out, err=console.err) == 1
    assert "pulling abababababab  50% 1.0 KB/2.0 KB" in console.out.getvalue()
    assert "the stream ended before Ollama reported success" in console.err.getvalue()


async def test_pull_cut_off_mid_stream_fails(scripted_pull: Any, console: Console) -> None:
    """A connection that breaks inside the chunked body is reported as broken, exit 1."""
    url = await scripted_pull([b'{"status":"pulling manifest"}\n'], drop=True)
    assert await ops.pull(url, "m", None, console.out, err=console.err) == 1
    assert "pull failed: the connection to the gateway broke" in console.err.getvalue()


def test_error_messages_are_read_from_either_dialect() -> None:
    """Ollama's flat error, OpenAI's nested one, and a non-JSON body all yield a message."""
    assert error_message('{"error": "model \'x\' not found"}', "Not Found") == "model 'x' not found"
    nested = '{"error": {"message": "queue full", "type": "queue_full", "code": null}}'
    assert error_message(nested, "Service Unavailable") == "queue full"
    assert error_message("<html>Bad Gateway</html>\n", "Bad Gateway") == "<html>Bad Gateway</html>"
    assert error_message("", "Bad Gateway") == "Bad Gateway"
    assert error_message("[1, 2]", "Teapot") == "[1, 2]"


def test_pull_and_warmup_report_an_unreachable_gateway(capsys: pytest.CaptureFixture[str]) -> None:
    """On the command line a refused connection exits 2 and points at the stack and GATEWAY_URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        assert main(["pull", "m", "--url", url, "--admin-key", "x"]) == 2
        assert main(["warmup", "m", "--url", url]) == 2
    err = capsys.readouterr().err
    assert err.count(f"cannot reach the gateway at {url}") == 2


def test_arguments_fall_back_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Model, URL and keys come from the environment unless given; setup-model aliases pull."""
    monkeypatch.setenv("OLLAMA_MODEL", "qwen2.5:0.5b")
    monkeypatch.setenv("GATEWAY_URL", "http://gw.example:8000/")
    args = parse(["setup-model"])
    assert args.run is ops.run_pull
    assert (ops.model_of(args), ops.url_of(args)) == ("qwen2.5:0.5b", "http://gw.example:8000")
    monkeypatch.delenv("OLLAMA_MODEL")
    monkeypatch.delenv("GATEWAY_URL")
    args = parse(["warmup"])
    assert (ops.model_of(args), ops.url_of(args)) == (ops.DEFAULT_MODEL, "http://localhost:8000")
    assert parse(["warmup", "m", "--url", "http://x:1"]).url == "http://x:1"


# --- pure formatting --------------------------------------------------------------------------


def test_byte_and_rate_formatting() -> None:
    """Sizes use decimal units as Ollama's CLI does; rates are always MB/s."""
    assert format_bytes(0) == "0 B"
    assert format_bytes(999) == "999 B"
    assert format_bytes(241_970) == "242.0 KB"
    assert format_bytes(2_019_377_376) == "2.0 GB"
    assert format_bytes(4.5e12) == "4.5 TB"
    assert format_rate(None) == ""
    assert format_rate(12_345_678) == "12.3 MB/s"


def test_bar_and_progress_line() -> None:
    """The bar fills in proportion, never overflows, and the line rounds percent down."""
    assert render_bar(0, 100, width=10) == "[----------]"
    assert render_bar(55, 100, width=10) == "[#####-----]"
    assert render_bar(150, 100, width=10) == "[##########]"
    assert render_bar(5, 0, width=10) == "[----------]"
    assert progress_line("pulling dde5aa3fc5ff", 1_009_688_688, 2_019_377_376, 12.3e6) == (
        "pulling dde5aa3fc5ff  50% [##########----------] 1.0 GB/2.0 GB 12.3 MB/s"
    )
    assert progress_line("pulling dde5aa3fc5ff", 1_999, 2_000, None, bar=False) == (
        "pulling dde5aa3fc5ff  99% 2.0 KB/2.0 KB"
    )


def layer(completed: int | None, total: int = 1_000_000_000) -> dict[str, Any]:
    event: dict[str, Any] = {
        "status": "pulling 0123456789ab",
        "digest": "sha256:0123",
        "total": total,
    }
    if completed is not None:
        event["completed"] = completed
    return event


def test_progress_on_a_terminal_redraws_one_line_per_layer() -> None:
    """On a TTY a layer's bar is redrawn in place with its speed, and ends before a new status."""
    out, clock = io.StringIO(), FakeClock()
    progress = PullProgress(out, is_tty=True, clock=clock)
    progress.update({"status": "pulling manifest"})
    progress.update(layer(None))
    clock.advance(0.1)  # too short a window to state a speed
    progress.update(layer(100_000_000))
    clock.advance(1.9)
    progress.update(layer(500_000_000))
    progress.update({"status": "verifying sha256 digest"})
    assert out.getvalue() == (
        "pulling manifest\n"
        "\rpulling 0123456789ab   0% [--------------------] 0 B/1.0 GB\x1b[K"
        "\rpulling 0123456789ab  10% [##------------------] 100.0 MB/1.0 GB\x1b[K"
        "\rpulling 0123456789ab  50% [##########----------] 500.0 MB/1.0 GB 250.0 MB/s\x1b[K"
        "\nverifying sha256 digest\n"
    )


def test_progress_in_a_log_prints_a_line_per_ten_percent() -> None:
    """Without a TTY a layer prints once per 10 % step, so logs stay short."""
    out, clock = io.StringIO(), FakeClock()
    progress = PullProgress(out, is_tty=False, clock=clock)
    for completed in (None, 40_000_000, 100_000_000, 150_000_000, 990_000_000, 1_000_000_000):
        clock.advance(1.0)
        progress.update(layer(completed))
    progress.finish()
    assert out.getvalue().splitlines() == [
        "pulling 0123456789ab   0% 0 B/1.0 GB",
        "pulling 0123456789ab  10% 100.0 MB/1.0 GB 50.0 MB/s",
        "pulling 0123456789ab  99% 990.0 MB/1.0 GB 247.5 MB/s",
        "pulling 0123456789ab 100% 1.0 GB/1.0 GB 200.0 MB/s",
    ]


def test_memory_in_use_subtracts_the_inactive_page_cache() -> None:
    """cgroup v2's inactive_file and v1's total_inactive_file are not counted, as docker stats."""
    assert memory_in_use(stats_v2(72 * MIB, 10 * MIB, 0)["memory_stats"]) == 62 * MIB
    assert memory_in_use(stats_v1(100 * MIB, 30 * MIB, 0)["memory_stats"]) == 70 * MIB
    assert memory_in_use({"usage": 5, "stats": {"inactive_file": 9}}) == 5
    assert memory_in_use({}) is None


def test_memory_limit_and_its_formatting() -> None:
    """A limit at host memory or absent means no limit; usage shows in MiB with a percentage."""
    assert memory_limit({"limit": 512 * MIB}, HOST_MEMORY) == 512 * MIB
    assert memory_limit({"limit": HOST_MEMORY}, HOST_MEMORY) is None
    assert memory_limit({"limit": 0}, HOST_MEMORY) is None
    assert memory_limit({}, HOST_MEMORY) is None
    assert format_memory(None, None) == "-"
    assert format_memory(80 * MIB, None) == "80.0 MiB (no limit)"
    assert format_memory(5734 * MIB, 6144 * MIB) == "5734.0 MiB / 6144.0 MiB (93%)"


def test_table_and_hints_flag_what_needs_attention() -> None:
    """Only rows that are down, OOM-killed or above 90 % are flagged; colour only on request."""
    rows = [
        ServiceState("ollama", "running", usage_bytes=95, limit_bytes=100, is_ollama=True),
        ServiceState("proxy", "running", health="starting"),
        ServiceState("cadvisor", "running", usage_bytes=90, limit_bytes=100),
    ]
    table = render_table(rows, color=True)
    assert table[1].startswith("\x1b[31m! ollama")
    assert table[2].startswith("\x1b[31m! proxy")
    assert table[3].startswith("  cadvisor")
    assert hints(rows, "p") == [
        "hint: ollama uses 95% of its memory limit: " + OLLAMA_MEMORY_ADVICE,
        "hint: proxy is running, health starting: see `docker compose -p p logs proxy`",
    ]
    restarted = ServiceState("ollama", "running", restarts=3, is_ollama=True)
    assert hints([restarted], "p") == [
        "hint: ollama restarted 3 times, often an OOM kill: see `docker compose -p p logs ollama`"
    ]
