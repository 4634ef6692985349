"""``create_app``: the routes, the middleware, and the lifetimes of the upstream pool and
probe. Wiring only: what a request goes through is in ``middleware``, ``routes``,
``chat`` and ``probes``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web
from aioprometheus.collectors import Registry

from proxy import probes
from proxy.chat import chat_route
from proxy.config import Config
from proxy.gateway import GATEWAY, Gateway
from proxy.metrics import Metrics
from proxy.middleware import exchange_middleware
from proxy.openapi.pages import add_docs_routes
from proxy.routes import INFERENCE, ROUTES, relay_route
from proxy.shutdown import drain


def create_app(
    config: Config,
    *,
    clock: Callable[[], float] = time.monotonic,
    registry: Registry | None = None,
) -> web.Application:
    """The gateway as an aiohttp application; run it with ``handler_cancellation=True``."""
    app = web.Application(
        middlewares=[exchange_middleware],
    )
    inference = (*(p for (_, p), spec in ROUTES.items() if spec.kind == INFERENCE), "/chat")
    gateway = Gateway.build(config, clock, Metrics(registry), inference)
    app[GATEWAY] = gateway
    # HEAD only where ROUTES says Ollama answers it: elsewhere the router's 405 with Allow.
    for method, path in ROUTES:
        app.router.add_route(method, path, relay_route)
    app.router.add_post("/chat", chat_route)
    app.router.add_get("/health", probes.health)
    app.router.add_get("/health/ollama", probes.health_upstream)
    app.router.add_get("/metrics", probes.metrics)
    if config.server.enable_docs:
        add_docs_routes(app)
    app.on_shutdown.append(_drain)
    app.cleanup_ctx.append(_upstream_lifetime)
    return app


async def _drain(app: web.Application) -> None:
    await drain(app[GATEWAY])


async def _upstream_lifetime(app: web.Application) -> AsyncIterator[None]:
    gateway = app[GATEWAY]
    if gateway.shared is not None and gateway.shared_slots is not None:
        await gateway.shared.start()
        await gateway.shared_slots.start()
    await gateway.backends.start()
    # The first look is awaited so that routing and metric labels are right from the first
    # request.
    await gateway.probe.look_all(timeout_s=2.0)
    probe = asyncio.create_task(gateway.probe.run())
    yield
    probe.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probe
    await gateway.backends.close()
    if gateway.shared is not None and gateway.shared_slots is not None:
        await gateway.shared_slots.close()
        await gateway.shared.close()
