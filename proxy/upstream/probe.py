"""What the gateway knows about its backends: a light background probe, and readiness.

Each backend is asked, every ``probe_interval_s``, what it runs: its version, the models it
lists (``/api/tags``, or ``/v1/models`` for an OpenAI-compatible server) and the ones it has
loaded (``/api/ps``). That keeps routing (which backend holds which model, which answers),
``ollama_upstream_up``, the loaded-model gauges and the model label set (only listed models
become labels) current. Readiness asks every backend afresh each time it is called.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy.config import UpstreamConfig
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.upstream.backends import OTHER, Backend, Backends
from proxy.upstream.client import UpstreamError

log = structlog.get_logger("proxy.probe")


@dataclass(slots=True)
class Snapshot:
    """One look at a backend."""

    reachable: bool = False
    version: str | None = None
    models: list[str] = field(default_factory=list)
    loaded: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


async def look(backend: Backend, timeout_s: float) -> Snapshot:
    """Ask ``backend`` what it runs: version, listed models, loaded models."""
    snap = Snapshot()
    try:
        async with asyncio.timeout(timeout_s):
            if backend.kind == "ollama":
                snap.version = str((await _get(backend, "/api/version")).get("version"))
                snap.reachable = True
                tags = await _get(backend, "/api/tags")
                snap.models = [m["name"] for m in tags.get("models") or () if "name" in m]
                snap.loaded = list((await _get(backend, "/api/ps")).get("models") or ())
            else:
                listed = await _get(backend, "/v1/models")
                snap.reachable = True
                snap.models = [m["id"] for m in listed.get("data") or () if "id" in m]
    except TimeoutError:
        snap.error = f"no answer within {timeout_s:g} s"
    except (ProxyError, UpstreamError, ValueError, KeyError, TypeError) as exc:
        snap.error = str(exc) or type(exc).__name__
    return snap


async def _get(backend: Backend, path: str) -> dict[str, Any]:
    key = backend.upstream.api_key
    headers = [("Authorization", f"Bearer {key}")] if key else []
    response = await backend.upstream.get(path, headers)
    try:
        if response.status != 200:
            raise ValueError(f"GET {path} answered {response.status}")
        obj = json.loads(await response.read())
    finally:
        response.release()
    if not isinstance(obj, dict):
        raise TypeError(f"GET {path} did not answer a JSON object")
    return obj


class Probe:
    """Looks at every backend and records what it found."""

    def __init__(
        self,
        backends: Backends,
        timeouts: UpstreamConfig,
        metrics: Metrics,
        inference_endpoints: tuple[str, ...] = (),
    ) -> None:
        self._backends = backends
        self._timeouts = timeouts
        self._metrics = metrics
        self._inference_endpoints = inference_endpoints
        self._labelled: frozenset[str] = frozenset()
        self._learned_at = float("-inf")
        self._memory_series: dict[str, list[dict[str, str]]] = {}

    async def look_all(self, timeout_s: float) -> None:
        """Look at every backend at once, and record what each said."""
        backends = self._backends.all
        snaps = await asyncio.gather(*(look(backend, timeout_s) for backend in backends))
        for backend, snap in zip(backends, snaps, strict=True):
            self.record(backend, snap)

    def record(self, backend: Backend, snap: Snapshot) -> None:
        was_up, had = backend.up, backend.models
        if snap.reachable != backend.reachable:
            event = "upstream_up" if snap.reachable else "upstream_down"
            log.info(event, backend=backend.name, version=snap.version, error=snap.error)
        backend.reachable, backend.version, backend.error = snap.reachable, snap.version, snap.error
        backend.upstream.known_down = not snap.reachable
        m = self._metrics
        m.upstream_up.set({"backend": backend.name}, 1 if snap.reachable else 0)
        if snap.reachable:
            backend.models = frozenset(backend.canonical(name) for name in snap.models)
            backend.loaded = frozenset(backend.canonical(str(x.get("name"))) for x in snap.loaded)
            backend.loaded_details = snap.loaded
            self._record_models()
            self._record_loaded(backend)
        if backend.up != was_up or backend.models != had:
            self._backends.on_change()  # waiters may go where they could not

    def _record_models(self) -> None:
        known = self._backends.known_models
        if known == self._labelled:
            return
        self._labelled = known
        # Series for every model label an inference request can get, at zero, so the first
        # error of a model is seen by increase() and the error-ratio alert.
        models = sorted(known | {OTHER})
        names = [b.name for b in self._backends.all]
        self._metrics.initialise_requests(models, self._inference_endpoints, names)

    def _record_loaded(self, backend: Backend) -> None:
        m, name = self._metrics, backend.name
        m.loaded_models.set({"backend": name}, len(backend.loaded_details))
        for labels in self._memory_series.get(name, ()):
            m.model_memory.set(labels, 0)
        series = self._memory_series[name] = []
        for model in backend.loaded_details:
            label = self._backends.model_label(model.get("name"))
            size = int(model.get("size") or 0)
            vram = int(model.get("size_vram") or 0)
            for kind, value in (("ram", size - vram), ("vram", vram)):
                labels = {"model": label, "kind": kind, "backend": name}
                m.model_memory.set(labels, value)
                series.append(labels)

    async def learn(self, model: str | None) -> None:
        """A model no backend is known to hold: look again now (at most once a second), in
        case it was just pulled, before the request is refused as not found."""
        if model is None or not self._backends.several or self._backends.known(model):
            return
        now = asyncio.get_running_loop().time()
        if now - self._learned_at < 1.0:
            return
        self._learned_at = now
        await self.look_all(timeout_s=self._timeouts.connect_timeout_s)

    async def run(self) -> None:
        """Probe forever at the configured interval; cancelled at shutdown."""
        interval = self._timeouts.probe_interval_s
        while True:
            await asyncio.sleep(interval)
            await self.look_all(timeout_s=min(interval, 10.0))

    async def readiness(self, default_model: str) -> tuple[bool, dict[str, Any]]:
        """Ready when at least one backend answers and holds the default model."""
        await self.look_all(timeout_s=self._timeouts.connect_timeout_s + 5.0)
        reports = [self._report(backend, default_model) for backend in self._backends.all]
        ready = [r for r in reports if r["ready"]]
        # The fields of the backend that would serve the default model (else the first).
        body: dict[str, Any] = {k: v for k, v in (ready or reports)[0].items() if k != "ready"}
        body["backends"] = reports
        if ready:
            body.pop("reason", None)
        return bool(ready), body

    @staticmethod
    def _report(backend: Backend, model: str) -> dict[str, Any]:
        report: dict[str, Any] = {
            "backend": backend.name,
            "upstream": str(backend.upstream.base),
            "kind": backend.kind,
            "reachable": backend.reachable,
            "version": backend.version,
            "model": model,
            "slots": backend.slots,
            "active": backend.active,
        }
        if not backend.reachable:
            report["reason"] = f"upstream not reachable: {backend.error}"
            report["ready"] = False
            return report
        report["installed"] = backend.holds(model)
        if backend.kind == "ollama":
            report["loaded"] = backend.has_loaded(model)
        report["ready"] = report["installed"]
        if not report["installed"]:
            report["reason"] = f"model {model!r} is not installed upstream (try: just pull)"
        return report
