"""Rate limits shared by every replica: the global, per-client, per-key and token buckets
decided in Redis, one script per decision, with the in-process buckets' semantics (the same
behavioural tests run against both). While Redis is down: the in-process buckets at this
replica's share (open), or 503 (closed).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from proxy.admission.ratelimit import Decision, Limit, RateLimiter, refusal
from proxy.shared import KEY_PREFIX, Unavailable
from proxy.shared.scripts import ADMIT, RESERVE, SETTLE

if TYPE_CHECKING:
    from proxy.shared.state import SharedState


class Limiter:
    """What the handlers call: each decision in-process, or in Redis when it is shared."""

    def __init__(
        self,
        local: RateLimiter,
        shared: SharedState | None = None,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.local = local
        self.shared = shared
        # A test's clock, passed to the scripts; None: Redis's own time.
        self._clock = clock
        self._fallback: RateLimiter | None = None
        self._settling: dict[str, asyncio.Task[None]] = {}  # a client's settlement in flight
        if shared is not None:
            self._admit = shared.redis.register_script(ADMIT)
            self._reserve = shared.redis.register_script(RESERVE)
            self._settle = shared.redis.register_script(SETTLE)

    def __len__(self) -> int:
        return len(self.local)

    async def admit(self, client: str, limit: Limit) -> Decision:
        """Take a request from ``client``'s bucket and the global one, or say how long to wait."""
        shared = self.shared
        if shared is None:
            return self.local.admit(client, limit)
        g = self.local.global_limit
        try:
            g_wait, c_wait, tokens, full_s = await shared.call(
                self._admit(
                    keys=[f"{KEY_PREFIX}rate:global", f"{KEY_PREFIX}rate:client:{client}"],
                    args=[g.rate, g.burst, limit.rate, limit.burst, self._now()],
                )
            )
        except Unavailable:
            return self._alone().admit(client, self._share(limit))
        wait = max(float(g_wait), float(c_wait))
        per_minute = round(limit.per_minute)
        scope = why = ""
        if wait > 0:
            if float(c_wait) < float(g_wait):
                scope, why = "global", f"{round(g.per_minute)} requests per minute for all clients"
            else:
                scope, why = "client", f"{per_minute} requests per minute per client"
        return Decision(
            wait_s=wait,
            limit=per_minute,
            remaining=int(float(tokens)) if wait == 0 else 0,
            reset_s=math.ceil(float(full_s)),
            scope=scope,
            why=why,
        )

    async def reserve_tokens(self, client: str, limit: Limit, cost: float) -> Decision:
        """Reserve an estimate of LLM tokens; ``settle_tokens`` corrects it afterwards."""
        shared = self.shared
        if shared is None:
            return self.local.reserve_tokens(client, limit, cost)
        capacity = limit.tokens_per_minute
        settling = self._settling.get(client)
        if settling is not None:  # this replica's last settlement for the client lands first
            await asyncio.wait({settling}, timeout=shared.config.timeout_s)
        try:
            wait, tokens, full_s = await shared.call(
                self._reserve(
                    keys=[f"{KEY_PREFIX}tokens:{client}"],
                    args=[capacity / 60.0, capacity, cost, self._now()],
                )
            )
        except Unavailable:
            return self._alone().reserve_tokens(client, self._share(limit), cost)
        return refusal(float(wait), capacity, float(tokens), float(full_s))

    def settle_tokens(self, client: str, limit: Limit, reserved: float, actual: float) -> None:
        """Replace the admission estimate with the real count (in Redis: sent, not awaited;
        a request's end never waits on the network)."""
        shared = self.shared
        if shared is None or not shared.up:
            self._alone_or_local().settle_tokens(client, limit, reserved, actual)
            return
        capacity = limit.tokens_per_minute
        delta = actual - min(reserved, capacity)
        keys = [f"{KEY_PREFIX}tokens:{client}"]
        call = self._settle(keys=keys, args=[capacity / 60.0, capacity, delta, self._now()])
        task = asyncio.ensure_future(self._quietly(shared.call(call)))
        self._settling[client] = task
        task.add_done_callback(lambda done: self._forget(client, done))

    # internals
    def _alone(self) -> RateLimiter:
        """The in-process buckets this replica uses while Redis is down (open), at its
        share of the fleet's limits; or the 503 (closed)."""
        shared = self.shared
        assert shared is not None
        if not shared.fails_open:
            raise shared.refuse()
        if self._fallback is None:
            local = self.local
            self._fallback = RateLimiter(
                self._share(local.global_limit), max_clients=local.max_clients, clock=local.clock
            )
        return self._fallback

    def _alone_or_local(self) -> RateLimiter:
        return self.local if self.shared is None else (self._fallback or self.local)

    def _share(self, limit: Limit) -> Limit:
        replicas = self.shared.config.replicas if self.shared is not None else 1
        return replace(
            limit,
            per_minute=limit.per_minute / replicas,
            burst=max(1, math.ceil(limit.burst / replicas)),
            tokens_per_minute=limit.tokens_per_minute / replicas,
        )

    def _forget(self, client: str, task: asyncio.Task[None]) -> None:
        if self._settling.get(client) is task:
            del self._settling[client]

    def _now(self) -> str:
        return "" if self._clock is None else repr(self._clock())

    @staticmethod
    async def _quietly(call: Awaitable[object]) -> None:
        with contextlib.suppress(Unavailable):  # lost: the estimate stands
            await call
