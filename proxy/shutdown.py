"""Stopping with every client told what happened.

On SIGTERM or SIGINT the server stops accepting connections; then, as the app shuts down:

1. nothing new is admitted, and requests waiting for a slot get ``503 shutting_down`` with
   ``Retry-After`` (another replica, or this one restarted, can serve them);
2. running requests have ``server.drain_timeout_s`` to finish;
3. at that deadline every upstream exchange still open is interrupted: a stream ends with
   an error line or event in its dialect saying the gateway is shutting down (never a
   connection cut with a ``done: false`` last line), and the upstream stops generating.

The process then exits within about a second of the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

import structlog

from proxy.upstream.client import Interrupted

if TYPE_CHECKING:
    from proxy.gateway import Gateway

log = structlog.get_logger("proxy.shutdown")

# After the deadline: how long the interrupted handlers get to write their error frames.
FAREWELL_S = 0.3
SHUTTING_DOWN = "the gateway is shutting down"


class Drain:
    """The requests in flight, counted by the middleware, and whether the gateway stops."""

    __slots__ = ("_idle", "inflight", "stopping")

    def __init__(self) -> None:
        self.inflight = 0
        self.stopping = False
        self._idle: asyncio.Event | None = None

    def enter(self) -> None:
        self.inflight += 1

    def leave(self) -> None:
        self.inflight -= 1
        if self.inflight == 0 and self._idle is not None:
            self._idle.set()

    async def idle(self, within_s: float) -> bool:
        """Wait until no request is in flight; False if some still are after ``within_s``."""
        if self.inflight == 0:
            return True
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        return self.inflight == 0


async def drain(gateway: Gateway) -> None:
    """The three steps above (the app's ``on_shutdown``)."""
    drain_s = gateway.config.server.drain_timeout_s
    gateway.drain.stopping = True
    gateway.gate.close(SHUTTING_DOWN)
    log.info("gateway_draining", in_flight=gateway.drain.inflight, drain_timeout_s=drain_s)
    if await gateway.drain.idle(drain_s):
        return
    log.warning("drain_timed_out", still_in_flight=gateway.drain.inflight)
    for backend in gateway.backends.all:
        backend.upstream.interrupt(Interrupted(SHUTTING_DOWN))
    await gateway.drain.idle(FAREWELL_S)
