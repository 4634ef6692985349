"""What the gateway knows about its upstream: a light background probe, and readiness.

The probe keeps ``ollama_upstream_up``, the loaded-model gauges and the set of models the
upstream lists (the only model names allowed as metric labels) current. Readiness asks
the upstream afresh each time it is called.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

import structlog

from proxy.admission.body import with_tag
from proxy.config import Config
from proxy.errors import ProxyError
from proxy.metrics import Metrics
from proxy.upstream.client import UpstreamError
from proxy.upstream.forward import Upstream

log = structlog.get_logger("proxy.probe")
OTHER = "other"
NONE = "none"


@dataclass(slots=True)
class Snapshot:
    """One look at the upstream."""

    reachable: bool = False
    version: str | None = None
    models: list[str] = field(default_factory=list)
    loaded: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None


class UpstreamWatch:
    def __init__(
        self,
        config: Config,
        upstream: Upstream,
        metrics: Metrics,
        inference_endpoints: tuple[str, ...] = (),
    ) -> None:
        self._config = config
        self._upstream = upstream
        self._metrics = metrics
        self._inference_endpoints = inference_endpoints
        self._is_ollama = config.upstream.kind == "ollama"
        self._known: frozenset[str] = frozenset()
        self._memory_series: list[dict[str, str]] = []
        self.last = Snapshot()

    def model_label(self, model: str | None) -> str:
        """A bounded label: a model the upstream lists, else ``other`` (``none`` if absent)."""
        if not model:
            return NONE
        if model in self._known:
            return model
        if self._is_ollama:
            tagged = with_tag(model)
            if tagged in self._known:
                return tagged
        return OTHER

    async def look(self, timeout_s: float) -> Snapshot:
        """Ask the upstream what it runs: version, listed models, loaded models."""
        snap = Snapshot()
        try:
            async with asyncio.timeout(timeout_s):
                if self._is_ollama:
                    snap.version = str((await self._get("/api/version")).get("version"))
                    snap.reachable = True
                    tags = await self._get("/api/tags")
                    snap.models = [m["name"] for m in tags.get("models") or () if "name" in m]
                    snap.loaded = list((await self._get("/api/ps")).get("models") or ())
                else:
                    listed = await self._get("/v1/models")
                    snap.reachable = True
                    snap.models = [m["id"] for m in listed.get("data") or () if "id" in m]
        except TimeoutError:
            snap.error = f"no answer within {timeout_s:g} s"
        except (ProxyError, UpstreamError, ValueError, KeyError, TypeError) as exc:
            snap.error = str(exc) or type(exc).__name__
        return snap

    async def _get(self, path: str) -> dict[str, Any]:
        response = await self._upstream.get(path, self._auth_headers())
        try:
            if response.status != 200:
                raise ValueError(f"GET {path} answered {response.status}")
            obj = json.loads(await response.read())
        finally:
            response.release()
        if not isinstance(obj, dict):
            raise TypeError(f"GET {path} did not answer a JSON object")
        return obj

    def _auth_headers(self) -> list[tuple[str, str]]:
        key = self._config.upstream.api_key
        return [("Authorization", f"Bearer {key}")] if key else []

    def record(self, snap: Snapshot) -> None:
        if snap.reachable != self.last.reachable:
            event = "upstream_up" if snap.reachable else "upstream_down"
            log.info(event, version=snap.version, error=snap.error)
        self.last = snap
        self._upstream.known_down = not snap.reachable
        self._metrics.upstream_up.set({}, 1 if snap.reachable else 0)
        if not snap.reachable:
            return
        known = frozenset(snap.models)
        if known != self._known:
            self._known = known
            # Series for every model label an inference request can get, at zero, so the
            # first error of a model is seen by increase() and the error-ratio alert.
            models = sorted(known | {OTHER})
            self._metrics.initialise_requests(models, self._inference_endpoints)
        self._metrics.loaded_models.set({}, len(snap.loaded))
        for labels in self._memory_series:
            self._metrics.model_memory.set(labels, 0)
        self._memory_series = []
        for model in snap.loaded:
            name = self.model_label(model.get("name"))
            size = int(model.get("size") or 0)
            vram = int(model.get("size_vram") or 0)
            for kind, value in (("ram", size - vram), ("vram", vram)):
                labels = {"model": name, "kind": kind}
                self._metrics.model_memory.set(labels, value)
                self._memory_series.append(labels)

    async def run(self) -> None:
        """Probe forever at the configured interval; cancelled at shutdown."""
        interval = self._config.upstream.probe_interval_s
        while True:
            await asyncio.sleep(interval)
            self.record(await self.look(timeout_s=min(interval, 10.0)))

    async def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when the upstream answers and lists the default model."""
        snap = await self.look(timeout_s=self._config.upstream.connect_timeout_s + 5.0)
        self.record(snap)
        model = self._config.upstream.default_model
        body: dict[str, Any] = {
            "upstream": str(self._upstream.base),
            "kind": self._config.upstream.kind,
            "reachable": snap.reachable,
            "version": snap.version,
            "model": model,
        }
        if not snap.reachable:
            body["reason"] = f"upstream not reachable: {snap.error}"
            return False, body
        names = set(snap.models)
        installed = model in names or (self._is_ollama and with_tag(model) in names)
        body["installed"] = installed
        if self._is_ollama:
            body["loaded"] = any(m.get("name") in (model, with_tag(model)) for m in snap.loaded)
        if not installed:
            body["reason"] = f"model {model!r} is not installed upstream (try: just pull)"
            return False, body
        return True, body
