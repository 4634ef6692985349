"""The connection to Redis (or Valkey) and what happens when it fails.

Every call is bounded by ``shared.timeout_s``: no request waits on an unreachable Redis
longer. A failed call marks the shared state down (a log line and
``ollama_shared_state_up 0``); while it is down nothing waits on Redis at all, a background
ping looks for it every second, and the first answer brings the shared state back (a log
line, the gauge at 1). What requests get meanwhile is the policy's: ``open``, each replica
goes on alone with its share of the limits and slots; ``closed``, a 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis import asyncio as aioredis
from redis.exceptions import RedisError

from proxy.config import SharedConfig
from proxy.errors import SharedStateDownError
from proxy.metrics import Metrics
from proxy.shared import Unavailable, replica_name

log = structlog.get_logger("proxy.shared")
T = TypeVar("T")
PING_EVERY_S = 1.0


class SharedState:
    """The Redis client, whether it answers, and the failure policy."""

    def __init__(self, config: SharedConfig, metrics: Metrics) -> None:
        self.config = config
        self.replica = replica_name(config.replica)
        self.metrics = metrics
        metrics.set(metrics.replicas, {}, config.replicas)
        self.redis: aioredis.Redis = aioredis.Redis.from_url(
            config.redis_url,
            socket_connect_timeout=config.timeout_s,
            socket_timeout=config.timeout_s,
            decode_responses=True,
        )
        # The channel's own connection: it waits for messages, so no read timeout.
        self.listener: aioredis.Redis = aioredis.Redis.from_url(
            config.redis_url,
            socket_connect_timeout=config.timeout_s,
            health_check_interval=30,
            decode_responses=True,
        )
        self.up = False
        self.on_change: list[Callable[[bool], None]] = []
        self._watch: asyncio.Task[None] | None = None

    @property
    def fails_open(self) -> bool:
        return self.config.on_failure == "open"

    async def start(self) -> None:
        """Connect (a first PING), then watch the connection for as long as the app runs."""
        try:
            await self.call(self.redis.ping())
        except Unavailable:
            pass  # marked down, and said why, by call()
        else:
            self._mark(up=True)
        self._watch = asyncio.create_task(self._watch_forever())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self.redis.aclose()
        await self.listener.aclose()

    async def call(self, operation: Awaitable[T]) -> T:
        """Await a Redis operation within the timeout; ``Unavailable`` if it fails (and the
        shared state is marked down). Never waits while the state is known down."""
        if not self.up and self._watch is not None:
            if asyncio.iscoroutine(operation):
                operation.close()
            raise Unavailable("the shared state is down")
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await operation
        except (TimeoutError, RedisError, OSError) as exc:
            self._mark(up=False, error=f"{type(exc).__name__}: {exc}"[:200])
            raise Unavailable(str(exc)) from exc

    def refuse(self) -> SharedStateDownError:
        """The error a request gets while the state is down and the policy is closed."""
        return SharedStateDownError(
            "the gateway's shared state (Redis) does not answer; retry later", retry_after_s=1
        )

    def _mark(self, *, up: bool, error: str | None = None) -> None:
        if up == self.up and self._watch is not None:
            return
        self.up = up
        self.metrics.set(self.metrics.shared_up, {}, 1 if up else 0)
        if up:
            log.info("shared_state_up", redis=self._where(), replica=self.replica)
        else:
            policy = "each replica alone on its share" if self.fails_open else "503"
            log.warning("shared_state_down", error=error, policy=policy, replica=self.replica)
        for callback in self.on_change:
            callback(up)

    async def _watch_forever(self) -> None:
        while True:
            await asyncio.sleep(PING_EVERY_S)
            if self.up:
                continue
            try:
                async with asyncio.timeout(self.config.timeout_s):
                    await self.redis.ping()
            except (TimeoutError, RedisError, OSError):
                continue
            self._mark(up=True)

    def _where(self) -> str:
        kwargs: dict[str, Any] = self.redis.connection_pool.connection_kwargs
        return f"{kwargs.get('host', kwargs.get('path', '?'))}:{kwargs.get('port', '')}"
