"""The upstream servers behind the gateway, and where a request may go among them.

Each ``Backend`` is one Ollama (or OpenAI-compatible server): its connection pool, its
slots (its ``OLLAMA_NUM_PARALLEL``), its priority tier, and what the last look at it found:
whether it answers, the models it holds and the ones it has loaded. ``Backends`` answers
the routing questions: which backends may serve this model now (healthy and holding it;
``qwen2.5`` is ``qwen2.5:latest``), and, when none may, whether that is a 404 (no backend
holds it) or a 503 (only unhealthy ones do). With one backend nothing is second-guessed:
every request goes to it, and it answers for its own models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import structlog

from proxy.admission.body import with_tag
from proxy.config import BackendConfig, UpstreamConfig
from proxy.errors import ModelNotFoundError, NoBackendError
from proxy.upstream.forward import Upstream

log = structlog.get_logger("proxy.backends")
OTHER = "other"
NONE = "none"


class Backend:
    """One upstream server."""

    def __init__(
        self,
        config: BackendConfig,
        timeouts: UpstreamConfig,
        on_retry: Callable[[str], None],
    ) -> None:
        self.config = config
        self.name = config.name
        self.kind = config.kind
        self.priority = config.priority
        self.slots = config.slots
        self.active = 0
        self.upstream = Upstream(timeouts, config, on_retry=lambda: on_retry(config.name))
        self.reachable = False
        self.version: str | None = None
        self.error: str | None = None
        self.models: frozenset[str] = frozenset()  # canonical names
        self.loaded: frozenset[str] = frozenset()
        self.loaded_details: list[dict[str, Any]] = []

    @property
    def up(self) -> bool:
        """Answering, as far as the gateway knows (the last probe, or a failed connection)."""
        return self.reachable and not self.upstream.known_down

    def canonical(self, model: str) -> str:
        """Ollama's implicit tag: ``llama3.2`` is ``llama3.2:latest``."""
        return with_tag(model) if self.kind == "ollama" else model

    def holds(self, model: str | None) -> bool:
        return model is None or self.canonical(model) in self.models

    def has_loaded(self, model: str | None) -> bool:
        return model is not None and self.canonical(model) in self.loaded

    def speaks(self, *, native: bool) -> bool:
        """Whether it serves Ollama's native API (an OpenAI-compatible server does not)."""
        return self.kind == "ollama" or not native


class Backends:
    """Every backend, in preference order (priority tier, then as configured)."""

    def __init__(self, backends: Iterable[Backend]) -> None:
        self.all = tuple(sorted(backends, key=lambda b: b.priority))
        self.by_name = {backend.name: backend for backend in self.all}
        self.several = len(self.all) > 1
        self.slots = sum(backend.slots for backend in self.all)
        self.on_change: Callable[[], None] = lambda: None  # the gate's dispatch

    @classmethod
    def build(
        cls,
        configs: Iterable[BackendConfig],
        timeouts: UpstreamConfig,
        on_retry: Callable[[str], None],
    ) -> Backends:
        return cls(Backend(config, timeouts, on_retry) for config in configs)

    def eligible(
        self, model: str | None, *, native: bool, exclude: frozenset[str] = frozenset()
    ) -> list[Backend]:
        """The backends that may serve ``model`` now. One backend: always it."""
        if not self.several:
            return [b for b in self.all if b.name not in exclude]
        return [
            b
            for b in self.all
            if b.up and b.holds(model) and b.speaks(native=native) and b.name not in exclude
        ]

    def check_route(
        self, model: str | None, *, native: bool, retry_after_s: int, only: str | None = None
    ) -> None:
        """Refuse before any queueing a request no backend can serve: 404 when none holds
        its model, 503 with ``Retry-After`` when only unhealthy ones do. ``only``: the one
        backend the request names (``X-Backend``)."""
        candidates = [b for b in self.all if only is None or b.name == only]
        if not self.several or any(b in candidates for b in self.eligible(model, native=native)):
            return
        holders = [b for b in candidates if b.holds(model) and b.speaks(native=native)]
        if not holders:
            where = f"backend '{only}'" if only else "any backend"
            raise ModelNotFoundError(f"model '{model}' not found on {where}")
        down = ", ".join(b.name for b in holders)
        raise NoBackendError(
            f"model '{model}' is held only by backends that do not answer now ({down}); "
            "retry later",
            retry_after_s=retry_after_s,
        )

    def first_up(self, *, native: bool) -> Backend:
        """Where a request for no model in particular goes: the preferred answering one."""
        for backend in self.all:
            if backend.up and backend.speaks(native=native):
                return backend
        return next((b for b in self.all if b.speaks(native=native)), self.all[0])

    def holder(self, model: str | None, *, native: bool) -> Backend:
        """The preferred answering backend that holds ``model`` (else ``first_up``)."""
        for backend in self.eligible(model, native=native):
            return backend
        return self.first_up(native=native)

    def named(self, name: str | None) -> Backend | None:
        return self.by_name.get(name) if name else None

    def model_label(self, model: str | None) -> str:
        """A bounded label: a model some backend lists, else ``other`` (``none`` if absent)."""
        if not model:
            return NONE
        for backend in self.all:
            name = backend.canonical(model)
            if name in backend.models:
                return name
        return OTHER

    def known(self, model: str) -> bool:
        """Whether some backend lists ``model``, answering or not."""
        return any(backend.holds(model) for backend in self.all)

    @property
    def known_models(self) -> frozenset[str]:
        models: frozenset[str] = frozenset()
        for backend in self.all:
            models |= backend.models
        return models

    def mark_down(self, backend: Backend, reason: str) -> None:
        """A connection to ``backend`` failed: out of rotation until it answers again."""
        if backend.up:
            log.warning("backend_down", backend=backend.name, error=reason)
        backend.upstream.known_down = True

    async def start(self) -> None:
        for backend in self.all:
            await backend.upstream.start()

    async def close(self) -> None:
        for backend in self.all:
            await backend.upstream.close()
