"""``status`` against a fake Docker Engine API, and the pure functions behind its table."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from proxy.__main__ import main
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

MIB = 1024 * 1024
HOST_MEMORY = 8 * 1024 * MIB
PROJECT = "ollama-gateway"


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
