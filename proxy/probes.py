"""The gateway's own probes: ``/health`` (liveness), ``/health/ollama`` (readiness) and
``/metrics``. None of them is rate limited, gated or metered as traffic, and neither is
the documentation (``openapi.pages``).
"""

from __future__ import annotations

from aiohttp import web
from aioprometheus.renderer import render

from proxy import __version__
from proxy.exchange import EXCHANGE
from proxy.gateway import GATEWAY
from proxy.openapi.pages import DOCS_PATHS

UNMETERED = frozenset({"/health", "/health/ollama", "/metrics"}) | DOCS_PATHS


async def health(request: web.Request) -> web.Response:
    """Liveness: the process answers. Also the gate's state, for a person looking."""
    gateway = request.app[GATEWAY]
    backends = gateway.backends.all
    return web.json_response(
        {
            "status": "ok",
            "version": __version__,
            "upstream_up": any(backend.up for backend in backends),
            "default_model": gateway.config.upstream.default_model,
            "active": gateway.gate.active,
            "queued": gateway.gate.queued,
            "slots": gateway.gate.slots,
            "backends": {
                b.name: {"up": b.up, "active": b.active, "slots": b.slots} for b in backends
            },
        },
        headers=request[EXCHANGE].headers,
    )


async def health_upstream(request: web.Request) -> web.Response:
    """Readiness: a backend answers and has the default model; each backend's state."""
    gateway = request.app[GATEWAY]
    ready, body = await gateway.probe.readiness(gateway.config.upstream.default_model)
    body["status"] = "ok" if ready else "unavailable"
    return web.json_response(body, status=200 if ready else 503, headers=request[EXCHANGE].headers)


async def metrics(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    m = gateway.metrics
    # The gate's state as of this scrape: read here, not written on every request.
    for backend in gateway.backends.all:
        m.set(m.active, {"backend": backend.name}, backend.active)
    m.set(m.queued, {}, gateway.gate.queued)
    body, headers = render(m.registry, request.headers.getall("Accept", []))
    return web.Response(body=body, headers={**headers, **request[EXCHANGE].headers})
