"""``pull`` and ``warmup`` through the real gateway in front of the fake Ollama (or two, as
backends ``main`` and ``second``), and their arguments."""

from __future__ import annotations

import argparse
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
from loadtest.fake_ollama.recorder import SeenRequest
from proxy import routes
from proxy.__main__ import main
from proxy.cli import ops
from tests.conftest import FakeClock, GatewayFactory, RunningGateway

ADMIN_KEY = "admin-key-123"


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ops.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


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


# --- several backends: --backend, sent as X-Backend -------------------------------------------


@pytest.fixture
async def two_backends(
    gateway_factory: GatewayFactory, fake: FakeOllama, second_fake: FakeOllama
) -> RunningGateway:
    """The gateway, with the admin key, in front of two fake Ollamas: main and second."""
    return await gateway_factory(
        backends=[{"name": "main", "url": fake.url}, {"name": "second", "url": second_fake.url}],
        auth={"admin_key": ADMIN_KEY},
    )


def pulls(server: FakeOllama) -> list[SeenRequest]:
    return [seen for seen in server.seen if seen.path == "/api/pull"]


@pytest.mark.parametrize("target", ["second", "main"])
async def test_pull_with_a_backend_downloads_onto_that_backend_only(
    two_backends: RunningGateway,
    fake: FakeOllama,
    second_fake: FakeOllama,
    console: Console,
    target: str,
) -> None:
    """`pull --backend NAME` streams to success on the named backend; the other never sees it."""
    fakes = {"main": fake, "second": second_fake}
    (other,) = set(fakes) - {target}
    code = await ops.pull(
        two_backends.url, "tinyllama:1.1b", ADMIN_KEY, console.out, backend=target, err=console.err
    )
    assert code == 0, console.err.getvalue()
    assert console.out.getvalue().splitlines()[-1] == f"tinyllama:1.1b is ready on {target}"
    assert [seen.json for seen in pulls(fakes[target])] == [
        {"model": "tinyllama:1.1b", "stream": True}
    ]
    assert fakes[target].find_model("tinyllama:1.1b") is not None
    assert pulls(fakes[other]) == []
    assert fakes[other].find_model("tinyllama:1.1b") is None


async def test_pull_without_a_backend_is_refused_naming_the_backends(
    two_backends: RunningGateway, fake: FakeOllama, second_fake: FakeOllama, console: Console
) -> None:
    """With several backends and none named, the gateway's 400 is printed with a hint that
    lists the backends and how to name one; nothing is pulled."""
    code = await ops.pull(
        two_backends.url, "tinyllama:1.1b", ADMIN_KEY, console.out, err=console.err
    )
    assert code == 1
    err = console.err.getvalue()
    assert "pull failed: HTTP 400: this gateway has several backends" in err
    assert (
        "hint: this gateway has several backends (main, second): name the one to act on "
        "with --backend NAME or OLLAMA_BACKEND\n"
    ) in err
    assert console.out.getvalue() == ""
    assert pulls(fake) == pulls(second_fake) == []


async def test_pull_to_an_unknown_backend_lists_the_gateways_backends(
    two_backends: RunningGateway, fake: FakeOllama, second_fake: FakeOllama, console: Console
) -> None:
    """A backend name the gateway does not have gets its 400 and a hint with the real names."""
    code = await ops.pull(
        two_backends.url, "tinyllama:1.1b", ADMIN_KEY, console.out, backend="gpu", err=console.err
    )
    assert code == 1
    err = console.err.getvalue()
    assert "pull failed: HTTP 400: no backend named 'gpu'" in err
    assert "hint: the gateway has no backend 'gpu'; its backends: main, second" in err
    assert pulls(fake) == pulls(second_fake) == []


@pytest.fixture
async def stand_in() -> AsyncIterator[Callable[..., Any]]:
    """A stand-in gateway that answers each (method, path) with a fixed status and JSON body,
    and records the headers of every request."""
    servers: list[TestServer] = []

    async def start(answers: dict[tuple[str, str], tuple[int, Any]]) -> tuple[str, list[Any]]:
        seen: list[Any] = []

        async def answer(request: web.Request) -> web.Response:
            seen.append(request.headers.copy())
            status, body = answers[request.method, request.path]
            return web.json_response(body, status=status)

        app = web.Application()
        for method, path in answers:
            app.router.add_route(method, path, answer)
        server = TestServer(app, host="127.0.0.1", port=0)
        await server.start_server()
        servers.append(server)
        return f"http://127.0.0.1:{server.port}", seen

    yield start
    for server in servers:
        await server.close()


async def test_warmup_sends_its_backend_as_x_backend(stand_in: Any, console: Console) -> None:
    """warmup sends --backend in the gateway's X-Backend header, and no such header without."""
    url, seen = await stand_in({("POST", "/api/generate"): (200, {"response": "", "done": True})})
    assert await ops.warmup(url, "m", None, console.out, backend="second", err=console.err) == 0
    assert await ops.warmup(url, "m", None, console.out, err=console.err) == 0
    assert [headers.get(routes.BACKEND_HEADER) for headers in seen] == ["second", None]


async def test_a_400_not_about_backends_gets_no_backend_hint(
    stand_in: Any, console: Console
) -> None:
    """A 400 from a gateway whose /health lists one backend or none is printed as it is."""
    url, _ = await stand_in(
        {
            ("POST", "/api/pull"): (400, {"error": "invalid model name"}),
            ("GET", "/health"): (200, {"status": "ok", "backends": {"default": {"up": True}}}),
        }
    )
    assert await ops.pull(url, "Bad Name", ADMIN_KEY, console.out, err=console.err) == 1
    assert console.err.getvalue() == "pull failed: HTTP 400: invalid model name\n"


def test_the_backend_comes_from_the_flag_or_ollama_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """--backend wins over $OLLAMA_BACKEND; with neither, no backend is named."""
    monkeypatch.setenv("OLLAMA_BACKEND", "second")
    assert ops.backend_of(parse(["pull"])) == "second"
    assert ops.backend_of(parse(["warmup", "--backend", "main"])) == "main"
    monkeypatch.delenv("OLLAMA_BACKEND")
    assert ops.backend_of(parse(["setup-model", "m"])) is None
    assert ops.BACKEND_HEADER == routes.BACKEND_HEADER


# --- pure formatting --------------------------------------------------------------------------
