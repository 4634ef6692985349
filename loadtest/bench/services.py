"""The processes a benchmark measures: the fake Ollama, the gateway, nginx, the naive
relay and redis-server, started and stopped as subprocesses, with their readiness,
start-up time and resident memory.

Each runs in its own process (as in production), so the load generator, the upstream and
the proxy under test do not share an event loop or a GIL.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from redis import asyncio as aioredis
from redis.exceptions import RedisError

MODEL = "llama3.2:latest"
_READY_TIMEOUT_S = 20.0
_POLL_S = 0.005  # start-up is measured by polling: 5 ms is its resolution


@dataclass
class Service:
    name: str
    proc: asyncio.subprocess.Process
    url: str

    @property
    def pid(self) -> int:
        return self.proc.pid


def rss_bytes(pid: int) -> int:
    """Resident set size from ``/proc/PID/status`` (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def _own_cpu_seconds(pid: int) -> float | None:
    """The process's CPU clock (``clock_getcpuclockid``): nanoseconds, where ``/proc``
    counts 10 ms ticks, too coarse for a run of a few dozen requests; None if unreadable."""
    clock = ctypes.c_int()
    if _libc.clock_getcpuclockid(pid, ctypes.byref(clock)) != 0:
        return None
    try:
        return time.clock_gettime(clock.value)
    except OSError:
        return None  # it has just exited


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process and its living descendants have used (Linux's
    ``/proc``): nginx's work is done in its worker, a child of the process started here."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return 0.0  # a descendant that has just exited
    own = _own_cpu_seconds(pid)
    if own is None:
        own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = Path(f"/proc/{pid}/task/{pid}/children")
    kids = children.read_text().split() if children.exists() else []
    return own + sum(cpu_seconds(int(kid)) for kid in kids)


def _tail(log: Path | None) -> str:
    """The end of a service's log, for the error that says why it did not start."""
    if log is None or not log.exists():
        return ""
    return log.read_text(errors="replace")[-2000:]


def free_port() -> int:
    """A port free right now. nginx and ``proxy serve`` take a number, not a socket, so this
    races with other processes; start() retries on a bind failure."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def stop(service: Service | None) -> None:
    """SIGTERM, then SIGKILL after 5 s; never raises."""
    if service is None or service.proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        service.proc.terminate()
    try:
        async with asyncio.timeout(5):
            await service.proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            service.proc.kill()
        await service.proc.wait()


async def wait_ready(service: Service, path: str, *, log: Path | None = None) -> float:
    """Poll ``path`` until it answers 200; return seconds since ``wait_ready`` was called."""
    started = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.perf_counter() - started < _READY_TIMEOUT_S:
            if service.proc.returncode is not None:
                raise RuntimeError(
                    f"{service.name} exited with {service.proc.returncode}\n{_tail(log)}"
                )
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with http.get(service.url + path) as response:
                    if response.status == 200:
                        return time.perf_counter() - started
            await asyncio.sleep(_POLL_S)
    raise RuntimeError(f"{service.name} was not ready within {_READY_TIMEOUT_S:g} s")


async def start_fake(
    *, tokens: int, token_interval_s: float, num_parallel: int, ttft_s: float = 0.0
) -> Service:
    """``python -m loadtest.fake_ollama`` on an ephemeral port (it prints its URL)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "loadtest.fake_ollama", "--port", "0",
        "--tokens", str(tokens), "--token-interval", str(token_interval_s),
        "--ttft", str(ttft_s), "--num-parallel", str(num_parallel), "--models", MODEL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    service = Service("fake-ollama", proc, "")
    try:
        assert proc.stdout is not None
        async with asyncio.timeout(_READY_TIMEOUT_S):
            service.url = (await proc.stdout.readline()).decode().strip()
    except BaseException:
        await stop(service)
        raise
    if not service.url.startswith("http://"):
        await stop(service)
        raise RuntimeError("the fake Ollama did not start")
    return service


# Settings of the bench's own environment a gateway does not inherit: each would change
# what is measured (another upstream, shared state, a token limit) behind the bench's back.
_NOT_INHERITED = frozenset(
    {"BACKENDS", "REDIS_URL", "SLOT_LEASE", "REDIS_TIMEOUT", "SHARED_STATE_ON_FAILURE",
     "GATEWAY_REPLICAS", "REPLICA_ID", "CLIENT_TOKENS_PER_MINUTE"}
)  # fmt: skip


def gateway_env(
    upstream_url: str,
    port: int,
    parallel: int,
    config_path: Path,
    backends: str = "",
    *,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Every feature on (admission, metrics, usage parsing, the JSON log line of each
    request, written to a file), limits too high to refuse. ``backends``: the gateway's
    ``BACKENDS`` list; empty, the one upstream ``upstream_url``. ``extra``: more settings
    (``REDIS_URL``...); those of the bench's own environment are not passed on."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    if backends:
        env["BACKENDS"] = backends
    return {
        **env,
        "PROXY_CONFIG": str(config_path),  # an empty file: no ./config.yaml sneaks in
        "OLLAMA_URL": upstream_url,
        "OLLAMA_MODEL": MODEL,
        "PROXY_HOST": "127.0.0.1",
        "PROXY_PORT": str(port),
        "MAX_REQUESTS_PER_MINUTE": "1e9",
        "RATE_LIMIT_BURST": "1000000000",
        "CLIENT_REQUESTS_PER_MINUTE": "1e9",
        "CLIENT_RATE_LIMIT_BURST": "1000000000",
        "OLLAMA_NUM_PARALLEL": str(parallel),
        "MAX_QUEUE": "100000",
        "MAX_QUEUE_PER_CLIENT": "100000",
        "PROBE_INTERVAL": "3600",
        "LOG_LEVEL": "info",
        "LOG_FORMAT": "json",
        **(extra or {}),
    }


async def _start_on_free_port(
    name: str,
    argv: Callable[[int], list[str]],
    *,
    ready_path: str,
    log: Path,
    env: Callable[[int], dict[str, str]] | None = None,
) -> tuple[Service, float]:
    """Start ``argv(port)`` on a free port, retrying when another process took the port
    first; returns the service and its start-up time to a ready ``ready_path``."""
    for _attempt in range(3):
        port = free_port()
        with log.open("ab") as sink:
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(
                *argv(port), env=env(port) if env else None,
                stdout=sink, stderr=sink, stdin=asyncio.subprocess.DEVNULL,
            )  # fmt: skip
        service = Service(name, proc, f"http://127.0.0.1:{port}")
        try:
            await wait_ready(service, ready_path, log=log)
        except RuntimeError:
            await stop(service)
            if "address already in use" in _tail(log).lower():
                continue  # lost the port race: try another
            raise
        except BaseException:
            await stop(service)
            raise
        return service, time.perf_counter() - started
    raise RuntimeError(f"could not find a free port for {name}")


async def start_gateway(
    upstream_url: str,
    *,
    parallel: int,
    workdir: Path,
    backends: Sequence[str] = (),
    name: str = "gateway",
    env: Mapping[str, str] | None = None,
) -> tuple[Service, float]:
    """``python -m proxy serve``; returns it and its start-up time to a ready ``/health``.
    With ``backends`` (URLs), the gateway has those upstreams, ``parallel`` slots each,
    named ``b1``, ``b2``, ...; without, the one ``upstream_url``. ``env``: settings on top
    of the bench's (``gateway_env``). Its log is ``name.log``."""
    config_path = workdir / "empty-config.yaml"
    config_path.touch()
    listed = ",".join(f"b{i}={url};slots={parallel}" for i, url in enumerate(backends, 1))
    return await _start_on_free_port(
        name,
        lambda port: [sys.executable, "-m", "proxy", "serve"],
        ready_path="/health",
        log=workdir / f"{name}.log",
        env=lambda port: gateway_env(upstream_url, port, parallel, config_path, listed, extra=env),
    )


async def start_naive(
    upstream_url: str, workdir: Path, *, ready_path: str = "/api/version"
) -> Service:
    """The naive aiohttp relay (read, write, nothing else) the gateway must beat;
    ``ready_path`` is a GET the upstream answers."""
    service, _ = await _start_on_free_port(
        "naive relay",
        lambda port: [
            sys.executable,
            "-m",
            "loadtest.bench.naive_relay",
            "--port",
            str(port),
            "--upstream",
            upstream_url,
        ],
        ready_path=ready_path,
        log=workdir / "naive-relay.log",
    )
    return service


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def nginx_conf(port: int, upstream_url: str, workdir: Path) -> str:
    """One worker, buffering off, HTTP/1.1 keep-alive to the upstream: a fair C baseline."""
    upstream = upstream_url.removeprefix("http://").rstrip("/")
    return f"""
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/client_body;
    proxy_temp_path {workdir}/proxy_temp;
    fastcgi_temp_path {workdir}/fastcgi_temp;
    uwsgi_temp_path {workdir}/uwsgi_temp;
    scgi_temp_path {workdir}/scgi_temp;
    upstream fake {{ server {upstream}; keepalive 256; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://fake;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host {upstream};
            proxy_buffering off;
            proxy_request_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


async def start_nginx(
    binary: str, upstream_url: str, workdir: Path, *, ready_path: str = "/api/version"
) -> Service:
    conf = workdir / "nginx.conf"
    log = workdir / "nginx-error.log"

    def argv(port: int) -> list[str]:
        conf.write_text(nginx_conf(port, upstream_url, workdir))
        return [binary, "-p", str(workdir), "-c", str(conf), "-e", str(log)]

    service, _ = await _start_on_free_port("nginx", argv, ready_path=ready_path, log=log)
    return service


def find_redis_server() -> str | None:
    return shutil.which("redis-server") or next(
        (
            p
            for p in ("/usr/bin/redis-server", "/usr/local/bin/redis-server")
            if os.access(p, os.X_OK)
        ),
        None,
    )


async def start_redis(binary: str, workdir: Path, name: str = "redis") -> Service:
    """redis-server on a Unix socket in ``workdir`` (no port to race for), nothing saved to
    disk, its log in ``name.log``; returns once it answers a PING. Its URL is
    ``unix://PATH``, as the gateway's ``REDIS_URL`` takes it."""
    socket_path = workdir / f"{name}.sock"
    if len(str(socket_path)) > 100:  # sun_path holds 108 bytes
        raise RuntimeError(f"the socket path {socket_path} is too long: set a shorter TMPDIR")
    log = workdir / f"{name}.log"
    proc = await asyncio.create_subprocess_exec(
        binary, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700",
        "--save", "", "--appendonly", "no", "--dir", str(workdir), "--logfile", str(log),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    service = Service(name, proc, f"unix://{socket_path}")
    try:
        await _until_redis_answers(service, socket_path, log)
    except BaseException:
        await stop(service)
        raise
    return service


async def _until_redis_answers(service: Service, socket_path: Path, log: Path) -> None:
    client = aioredis.Redis(unix_socket_path=str(socket_path), socket_timeout=2)
    started = time.perf_counter()
    try:
        while time.perf_counter() - started < _READY_TIMEOUT_S:
            if service.proc.returncode is not None:
                raise RuntimeError(
                    f"{service.name} exited with {service.proc.returncode}\n{_tail(log)}"
                )
            with contextlib.suppress(RedisError, OSError):
                if await client.ping():
                    return
            await asyncio.sleep(_POLL_S)
    finally:
        await client.aclose()
    raise RuntimeError(f"{service.name} was not ready within {_READY_TIMEOUT_S:g} s")
