"""Token buckets: a pure core and a keyed limiter with an injected clock.

``take`` is a pure function of (bucket, now, rate, burst): it refills by elapsed time and
either takes ``cost`` tokens or says how long until it could. The limiter keeps one global
bucket, one per client in a bounded LRU table, and optionally a per-client bucket of LLM
tokens that is reserved at admission and settled with the real counts afterwards.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple


class Bucket(NamedTuple):
    tokens: float
    updated_s: float


def full(now: float, burst: float) -> Bucket:
    return Bucket(float(burst), now)


def take(
    bucket: Bucket, now: float, rate: float, burst: float, cost: float = 1.0
) -> tuple[Bucket, float]:
    """Refill at ``rate`` tokens/s up to ``burst``, then take ``cost``.

    Returns the new bucket and 0.0 when the tokens were taken, or the unchanged-but-refilled
    bucket and the seconds until ``cost`` tokens will be there.
    """
    elapsed = max(0.0, now - bucket.updated_s)
    tokens = min(float(burst), bucket.tokens + elapsed * rate)
    if tokens >= cost:
        return Bucket(tokens - cost, now), 0.0
    return Bucket(tokens, now), (cost - tokens) / rate


def settle(bucket: Bucket, delta: float, burst: float) -> Bucket:
    """Adjust a bucket after the fact; a negative balance is debt paid back by refill."""
    return Bucket(min(float(burst), bucket.tokens - delta), bucket.updated_s)


def seconds_until_full(bucket: Bucket, now: float, rate: float, burst: float) -> float:
    elapsed = max(0.0, now - bucket.updated_s)
    tokens = min(float(burst), bucket.tokens + elapsed * rate)
    return (burst - tokens) / rate


@dataclass(frozen=True, slots=True)
class Limit:
    """A client's limits: requests per minute with a burst, optional LLM tokens per minute."""

    per_minute: float
    burst: int
    tokens_per_minute: float = 0.0

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What admission decided, and the client's limit state for the response headers."""

    wait_s: float
    limit: int
    remaining: int
    reset_s: int
    scope: str = ""

    @property
    def admitted(self) -> bool:
        return self.wait_s == 0.0

    @property
    def retry_after_s(self) -> int:
        return max(1, math.ceil(self.wait_s))

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_s),
        }


class RateLimiter:
    """A global bucket plus bounded per-client buckets. Not thread-safe: one event loop."""

    def __init__(
        self,
        global_limit: Limit,
        max_clients: int,
        clock: Callable[[], float],
    ) -> None:
        self._global = global_limit
        self._clock = clock
        self._max_clients = max_clients
        self._global_bucket = full(clock(), global_limit.burst)
        self._requests: OrderedDict[str, Bucket] = OrderedDict()
        self._tokens: OrderedDict[str, Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._requests)

    def admit(self, client: str, limit: Limit) -> Decision:
        """Take a request from ``client``'s bucket and the global one, or say how long to wait."""
        now = self._clock()
        bucket = self._lookup(self._requests, client, now, limit.burst)
        new_client, client_wait = take(bucket, now, limit.rate, limit.burst)
        g = self._global
        new_global, global_wait = take(self._global_bucket, now, g.rate, g.burst)
        wait = max(client_wait, global_wait)
        if wait == 0.0:
            self._requests[client] = bucket = new_client
            self._global_bucket = new_global
        return Decision(
            wait_s=wait,
            limit=round(limit.per_minute),
            remaining=int(bucket.tokens) if wait == 0.0 else 0,
            reset_s=math.ceil(seconds_until_full(bucket, now, limit.rate, limit.burst)),
            scope="" if wait == 0.0 else "client" if client_wait >= global_wait else "global",
        )

    def reserve_tokens(self, client: str, limit: Limit, cost: float) -> Decision:
        """Reserve an estimate of LLM tokens; ``settle_tokens`` corrects it afterwards."""
        now = self._clock()
        capacity = limit.tokens_per_minute
        rate = capacity / 60.0
        bucket = self._lookup(self._tokens, client, now, capacity)
        # A request bigger than the whole bucket could never pass; it waits for a full one.
        new_bucket, wait = take(bucket, now, rate, capacity, min(cost, capacity))
        if wait == 0.0:
            self._tokens[client] = bucket = new_bucket
        return Decision(
            wait_s=wait,
            limit=round(capacity),
            remaining=max(0, int(bucket.tokens)),
            reset_s=math.ceil(seconds_until_full(bucket, now, rate, capacity)),
            scope="" if wait == 0.0 else "tokens",
        )

    def settle_tokens(self, client: str, limit: Limit, reserved: float, actual: float) -> None:
        """Replace the admission estimate with the real token count."""
        bucket = self._tokens.get(client)
        if bucket is None or limit.tokens_per_minute <= 0:
            return
        reserved = min(reserved, limit.tokens_per_minute)
        self._tokens[client] = settle(bucket, actual - reserved, limit.tokens_per_minute)

    def _lookup(
        self, table: OrderedDict[str, Bucket], client: str, now: float, burst: float
    ) -> Bucket:
        bucket = table.get(client)
        if bucket is None:
            bucket = full(now, burst)
            table[client] = bucket
            # The least recently used bucket goes first; an idle one has refilled anyway.
            while len(table) > self._max_clients:
                table.popitem(last=False)
        else:
            table.move_to_end(client)
        return bucket
