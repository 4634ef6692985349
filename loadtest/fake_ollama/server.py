"""FakeOllama: the state tests inspect (recorder, slots, loaded models, totals) and the server."""

from __future__ import annotations

import asyncio
import itertools
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable

import orjson
from aiohttp import web

from . import native, openai_compat, wire
from .config import FakeModel, FakeOllamaConfig
from .recorder import Exchange, HeaderDict, SeenRequest

EXCHANGE = web.RequestKey("fake_ollama_exchange", Exchange)
_DEFAULT_KEEP_ALIVE_S = 300.0
# Fixed "modified" times keep /api/tags, /api/show and /v1/models byte-for-byte deterministic.
_BASE_MODIFIED_NS = 1_754_006_400_123_456_789  # 2025-08-01T00:00:00.123456789Z
_FOREVER_S = 292 * 365 * 86400.0  # Go's time.Duration maximum, for a negative keep_alive

Handler = Callable[["FakeOllama", Exchange], Awaitable[web.StreamResponse]]


def _plain(status: int, body: bytes) -> web.Response:
    """gin's own 404/405 replies: text/plain without a charset."""
    return web.Response(status=status, body=body, headers={"Content-Type": "text/plain"})


class FakeOllama:
    """A fake Ollama server for tests and benchmarks; see the package docstring."""

    def __init__(self, config: FakeOllamaConfig | None = None) -> None:
        self.config = config if config is not None else FakeOllamaConfig()
        self.seen: list[SeenRequest] = []
        self.active = 0
        self.max_active = 0
        self.waiting = 0
        self.totals: dict[str, int] = {"prompt_eval_count": 0, "eval_count": 0}
        # canonical model name -> wall-clock expiry (seconds), as /api/ps reports it
        self.loaded: dict[str, float] = {}
        self.url = ""
        self._watchers: list[asyncio.Future[None]] = []
        self._slot_queue: deque[asyncio.Future[None]] = deque()
        self._loading: dict[str, asyncio.Task[None]] = {}
        self._modified_ns: dict[str, int] = {}
        self._blobs: set[str] = set()
        self._ids = itertools.count()
        self._runner: web.AppRunner | None = None

    # ---- observation -------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake every wait_for(); called on each state change, so it must stay cheap."""
        if self._watchers:
            watchers, self._watchers = self._watchers, []
            for fut in watchers:
                if not fut.done():
                    fut.set_result(None)

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109 -- the agreed API; asyncio.timeout enforces it
    ) -> None:
        """Return once predicate() holds, re-checking on every state change; else TimeoutError."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    fut: asyncio.Future[None] = loop.create_future()
                    self._watchers.append(fut)
                    await fut
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout} s") from None

    def reset(self) -> None:
        """Forget recorded requests, totals and high-water marks (not models or slots)."""
        self.seen.clear()
        self.totals = {"prompt_eval_count": 0, "eval_count": 0}
        self.max_active = self.active
        self._notify()

    def add_totals(self, prompt_eval_count: int, eval_count: int) -> None:
        self.totals["prompt_eval_count"] += prompt_eval_count
        self.totals["eval_count"] += eval_count
        self._notify()

    def next_id(self) -> int:
        # Ollama draws ids from 0..998 and does not promise uniqueness; a counter is deterministic.
        return next(self._ids) % 999

    # ---- the parallel-slot gate (OLLAMA_NUM_PARALLEL): unbounded FIFO wait ----------------

    async def acquire_slot(self) -> None:
        if self._slot_queue:
            self._grant()
        if self.active < self.config.num_parallel and not self._slot_queue:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self._notify()
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._slot_queue.append(fut)
        self.waiting += 1
        self._notify()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release_slot()  # granted just as we were cancelled: pass it on
            else:
                self.waiting -= 1
                if fut in self._slot_queue:
                    self._slot_queue.remove(fut)
                self._notify()
            raise

    def release_slot(self) -> None:
        self.active -= 1
        self._grant()
        self._notify()

    def _grant(self) -> None:
        while self._slot_queue and self.active < self.config.num_parallel:
            fut = self._slot_queue.popleft()
            if fut.done():
                continue
            fut.set_result(None)
            self.waiting -= 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)

    # ---- models --------------------------------------------------------------------------

    def find_model(self, name: object) -> FakeModel | None:
        if not isinstance(name, str) or not name:
            return None
        key = wire.canonical_name(name)
        for model in self.config.models:
            if wire.canonical_name(model.name) == key:
                return model
        return None

    def install(self, model: FakeModel) -> None:
        self.remove(model.name)
        self.config.models.append(model)
        self._modified_ns[wire.canonical_name(model.name)] = time.time_ns()

    def remove(self, name: str) -> None:
        key = wire.canonical_name(name)
        self.config.models[:] = [
            m for m in self.config.models if wire.canonical_name(m.name) != key
        ]
        self.loaded.pop(key, None)

    def modified_ns(self, model: FakeModel) -> int:
        key = wire.canonical_name(model.name)
        if key not in self._modified_ns:
            index = next((i for i, m in enumerate(self.config.models) if m is model), 0)
            return _BASE_MODIFIED_NS - index * 1_000_000_000
        return self._modified_ns[key]

    def has_blob(self, digest: str) -> bool:
        return digest in self._blobs

    def add_blob(self, digest: str) -> None:
        self._blobs.add(digest)

    async def ensure_loaded(self, model: FakeModel) -> None:
        """Pay `load_s` once per model; concurrent requests share one load, as Ollama's do."""
        key = wire.canonical_name(model.name)
        if key in self.loaded:
            return
        if self.config.load_s <= 0:
            self.touch(model, None)
            return
        task = self._loading.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(model))
            self._loading[key] = task
        # A client that gives up does not abort the load for the others (nor in Ollama).
        await asyncio.shield(task)

    async def _load(self, model: FakeModel) -> None:
        try:
            await asyncio.sleep(self.config.load_s)
            self.touch(model, None)
        finally:
            self._loading.pop(wire.canonical_name(model.name), None)

    def touch(self, model: FakeModel, keep_alive: object) -> None:
        """Mark a model used: keep it loaded for keep_alive (default 5m); 0 unloads it."""
        seconds = wire.keep_alive_s(keep_alive)
        key = wire.canonical_name(model.name)
        if seconds == 0:
            self.loaded.pop(key, None)
        else:
            seconds = _DEFAULT_KEEP_ALIVE_S if seconds is None else seconds
            self.loaded[key] = time.time() + (seconds if seconds > 0 else _FOREVER_S)
        self._notify()

    # ---- HTTP ----------------------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """Record every request, apply the Host check, map aiohttp's 404/405 to gin's."""
        t0_ns = time.monotonic_ns()
        body = await request.read()
        parsed = None
        if body:
            try:
                parsed = orjson.loads(body)
            except orjson.JSONDecodeError:
                parsed = None
        seen = SeenRequest(
            request.method,
            request.path,
            HeaderDict(request.headers.items()),
            body,
            parsed,
            t0_ns / 1e9,
        )
        self.seen.append(seen)
        limit = self.config.max_seen
        if limit is not None and len(self.seen) > limit + limit // 8 + 1:
            del self.seen[: len(self.seen) - limit]
        self._notify()
        ex = Exchange(request, seen, t0_ns, self._notify)
        request[EXCHANGE] = ex
        try:
            if self.config.check_host:
                verdict = wire.host_verdict(request.headers.get("Host", ""))
                if verdict == "deny":
                    return web.Response(status=403)  # Ollama's DNS-rebinding guard: empty body
                if verdict == "name" and request.method == "OPTIONS":
                    return web.Response(status=204)
            try:
                return await handler(request)
            except web.HTTPNotFound:
                return _plain(404, b"404 page not found")
            except web.HTTPMethodNotAllowed:
                return _plain(405, b"405 method not allowed")
        except asyncio.CancelledError:
            seen.disconnected = True
            raise
        except ConnectionResetError:
            seen.disconnected = True
            return ex.response if ex.response is not None else web.Response()
        finally:
            seen.finished = time.monotonic()
            seen.closed.set()
            self._notify()

    def _bind(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def route(request: web.Request) -> web.StreamResponse:
            return await handler(self, request[EXCHANGE])

        return route

    def app(self) -> web.Application:
        """A fresh Application. Run it with handler_cancellation=True (start() does), or a
        disconnecting client does not cancel its generation."""
        app = web.Application(middlewares=[self._middleware], client_max_size=1 << 30)
        r = app.router
        b = self._bind
        for path, get in (
            ("/", native.root),
            ("/api/version", native.version),
            ("/api/tags", native.tags),
        ):
            r.add_get(path, b(get), allow_head=True)
        r.add_get("/api/status", b(native.status), allow_head=False)
        r.add_get("/api/ps", b(native.ps), allow_head=False)
        r.add_post("/api/generate", b(native.generate))
        r.add_post("/api/chat", b(native.chat))
        r.add_post("/api/embed", b(native.embed))
        r.add_post("/api/embeddings", b(native.embeddings))
        r.add_post("/api/show", b(native.show))
        r.add_post("/api/pull", b(native.pull))
        r.add_post("/api/copy", b(native.copy))
        r.add_delete("/api/delete", b(native.delete))
        r.add_head("/api/blobs/{digest}", b(native.blob_head))
        r.add_post("/api/blobs/{digest}", b(native.blob_post))
        r.add_post("/v1/chat/completions", b(openai_compat.chat_completions))
        r.add_post("/v1/completions", b(openai_compat.completions))
        r.add_post("/v1/embeddings", b(openai_compat.embeddings))
        r.add_get("/v1/models", b(openai_compat.models), allow_head=False)
        r.add_get("/v1/models/{model:.+}", b(openai_compat.model), allow_head=False)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Bind (port 0 = ephemeral, read back from the socket), serve, return the base URL."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        # A short shutdown timeout: hanging and stalled handlers are the point of this server.
        runner = web.AppRunner(
            self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=0.2
        )
        await runner.setup()
        await web.SockSite(runner, sock).start()
        self._runner = runner
        bound_port = sock.getsockname()[1]
        self.url = (
            f"http://[{host}]:{bound_port}"
            if family == socket.AF_INET6
            else (f"http://{host}:{bound_port}")
        )
        return self.url

    async def close(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
