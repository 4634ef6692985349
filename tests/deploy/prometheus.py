"""A real Prometheus server for tests: Debian's ``prometheus`` binary scraping one target, or
several (gateway replicas) under one job.

    async with PrometheusServer("127.0.0.1:8123") as prom:
        await prom.wait_until_up()
        result = await prom.query("sum(ollama_requests_total)")

It listens on loopback in a temporary directory (config and TSDB), scrapes its target every
second, and is stopped with SIGTERM, then SIGKILL if it does not exit in time. Readiness and
data are awaited by polling the HTTP API against a deadline, never by sleeping a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
import yaml

_POLL_S = 0.1  # between two looks at the HTTP API while waiting for a condition
_BIND_ATTEMPTS = 5


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error."""


def _free_port() -> int:
    # An external binary needs a port number, not a socket: bind port 0, read the number,
    # release it. Another process may take it in between; start() retries on that collision.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PrometheusServer:
    """One Prometheus process scraping ``target`` (``host:port``, or a sequence of them) under
    ``job``."""

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        job: str = "ollama-gateway",
        scrape_interval: str = "1s",
        binary: str | None = None,
        start_timeout_s: float = 30.0,
        stop_timeout_s: float = 10.0,
    ) -> None:
        found = binary or shutil.which("prometheus")
        if found is None:
            raise PrometheusError("the prometheus binary is not installed (Debian: prometheus)")
        self.binary = found
        self.targets = [target] if isinstance(target, str) else list(target)
        self.job = job
        self.scrape_interval = scrape_interval
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.url = ""
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> PrometheusServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def log_path(self) -> Path:
        assert self._dir is not None, "start() first"
        return Path(self._dir.name) / "prometheus.log"

    def log_tail(self, lines: int = 20) -> str:
        """The end of Prometheus's own log, for failure messages."""
        if self._dir is None:
            return ""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def start(self) -> None:
        """Write the config, start the process and wait until it reports ready."""
        self._dir = tempfile.TemporaryDirectory(prefix="prometheus-test-")
        root = Path(self._dir.name)
        config = {
            "global": {
                "scrape_interval": self.scrape_interval,
                "scrape_timeout": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "scrape_configs": [
                {"job_name": self.job, "static_configs": [{"targets": self.targets}]}
            ],
        }
        (root / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            await self._launch(root)
        except BaseException:
            await self.stop()
            raise

    async def _launch(self, root: Path) -> None:
        for _ in range(_BIND_ATTEMPTS):
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            with self.log_path.open("wb") as log:
                self._proc = await asyncio.create_subprocess_exec(
                    self.binary,
                    f"--config.file={root / 'prometheus.yml'}",
                    f"--storage.tsdb.path={root / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=info",
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            if await self._wait_ready():
                return
            if "address already in use" not in self.log_tail(200):
                break
        raise PrometheusError(f"prometheus exited before it was ready:\n{self.log_tail()}")

    async def _wait_ready(self) -> bool:
        """True once /-/ready answers 200; False if the process exited first."""
        assert self._proc is not None
        assert self._session is not None
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.returncode is not None:
                return False
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with self._session.get(self.url + "/-/ready") as response:
                    if response.status == 200:
                        return True
            await asyncio.sleep(_POLL_S)
        raise PrometheusError(
            f"prometheus not ready within {self.start_timeout_s:g} s:\n{self.log_tail()}"
        )

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """Evaluate ``promql`` now; the result vector (or matrix) as a list of series."""
        assert self._session is not None, "start() first"
        async with self._session.get(
            self.url + "/api/v1/query", params={"query": promql}
        ) as response:
            body = await response.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{body.get('errorType')}: {body.get('error')} (query: {promql})")
        data = body["data"]
        if data["resultType"] in {"scalar", "string"}:
            return [{"metric": {}, "value": data["result"]}]
        result: list[dict[str, Any]] = data["result"]
        return result

    async def wait_until_up(self, timeout_s: float = 30.0) -> None:
        """Wait until every target's last scrape succeeded (``up == 1``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            result = await self.query(f'up{{job="{self.job}"}}')
            if len(result) == len(self.targets) and all(s["value"][1] == "1" for s in result):
                return
            await asyncio.sleep(_POLL_S)
        raise PrometheusError(f"targets {self.targets} not up within {timeout_s:g} s")

    async def wait_for_scrapes(self, count: int = 2, timeout_s: float = 30.0) -> None:
        """Wait until ``count`` more scrapes of every target have been stored."""
        query = f'min(count_over_time(up{{job="{self.job}"}}[1h]))'
        start = await self._scrape_count(query)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if await self._scrape_count(query) >= start + count:
                return
            await asyncio.sleep(_POLL_S)
        raise PrometheusError(f"fewer than {count} scrapes within {timeout_s:g} s")

    async def _scrape_count(self, query: str) -> int:
        result = await self.query(query)
        return int(float(result[0]["value"][1])) if result else 0

    async def stop(self) -> None:
        """Terminate the process (kill it if it does not exit in time) and clean up."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), self.stop_timeout_s)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None
