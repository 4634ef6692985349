"""Token buckets: a pure core and a keyed limiter with an injected clock.

``take`` is a pure function of (bucket, now, rate, burst): it refills by elapsed time and
either takes ``cost`` tokens or says how long until it could. The limiter keeps one global
bucket, one per client in a bounded table (``Buckets``), and optionally a per-client bucket
of LLM tokens that is reserved at admission and settled with the real counts afterwards.
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


class Decision(NamedTuple):
    """What admission decided, and the client's limit state for the response headers.

    (A NamedTuple: made on every inference request, and a frozen dataclass costs four times
    as much to build.)
    """

    wait_s: float
    limit: int
    remaining: int
    reset_s: int
    scope: str = ""  # which bucket refused: "client", "overflow", "global" or "tokens"
    why: str = ""  # that bucket's limit, for the refusal's message

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


def refusal(wait_s: float, capacity: float, tokens: float, full_s: float) -> Decision:
    """A token-bucket decision: taken (``wait_s`` 0) or refused, and the bucket's state."""
    return Decision(
        wait_s=wait_s,
        limit=round(capacity),
        remaining=max(0, int(tokens)),
        reset_s=math.ceil(full_s),
        scope="" if wait_s == 0.0 else "tokens",
    )


class Buckets:
    """Per-client buckets, at most ``size``, the least recently seen first.

    Only a full bucket is dropped to make room: it holds nothing a fresh one would not. While
    the oldest is still refilling (or in debt), clients new to the table share one overflow
    bucket, so a flood of new addresses cannot push a busy client's bucket out and have it
    come back full.
    """

    OVERFLOW = "\x00overflow"  # the shared bucket's key: never a client id

    def __init__(self, size: int) -> None:
        self.size = size
        # client -> (bucket, rate, burst): the limit it refills at, to know when it is full
        self._table: OrderedDict[str, tuple[Bucket, float, float]] = OrderedDict()
        self._overflow: Bucket | None = None

    def __len__(self) -> int:
        return len(self._table)

    def lookup(self, client: str, now: float, rate: float, burst: float) -> tuple[str, Bucket]:
        """The key to ``store`` under (the client's, or ``OVERFLOW``) and its bucket."""
        entry = self._table.get(client)
        if entry is not None:
            self._table.move_to_end(client)
            return client, entry[0]
        if len(self._table) < self.size or self._drop_oldest(now):
            bucket = full(now, burst)
            self._table[client] = (bucket, rate, burst)
            return client, bucket
        if self._overflow is None:
            self._overflow = full(now, burst)
        return self.OVERFLOW, self._overflow

    def get(self, client: str) -> tuple[str, Bucket] | None:
        """The client's bucket, or the overflow it shares; None if it has neither."""
        entry = self._table.get(client)
        if entry is not None:
            return client, entry[0]
        return None if self._overflow is None else (self.OVERFLOW, self._overflow)

    def store(self, key: str, bucket: Bucket, rate: float, burst: float) -> None:
        if key == self.OVERFLOW:
            self._overflow = bucket
        else:
            self._table[key] = (bucket, rate, burst)

    def _drop_oldest(self, now: float) -> bool:
        client, (bucket, rate, burst) = next(iter(self._table.items()))
        if seconds_until_full(bucket, now, rate, burst) > 0:
            return False
        del self._table[client]
        return True


class RateLimiter:
    """A global bucket plus bounded per-client buckets. Not thread-safe: one event loop."""

    def __init__(
        self,
        global_limit: Limit,
        max_clients: int,
        clock: Callable[[], float],
    ) -> None:
        self.global_limit = self._global = global_limit
        self.max_clients = max_clients
        self.clock = self._clock = clock
        self._global_bucket = full(clock(), global_limit.burst)
        self._requests = Buckets(max_clients)
        self._tokens = Buckets(max_clients)

    def __len__(self) -> int:
        return len(self._requests)

    def admit(self, client: str, limit: Limit) -> Decision:
        """Take a request from ``client``'s bucket and the global one, or say how long to wait."""
        now = self._clock()
        key, bucket = self._requests.lookup(client, now, limit.rate, limit.burst)
        new_client, client_wait = take(bucket, now, limit.rate, limit.burst)
        g = self._global
        new_global, global_wait = take(self._global_bucket, now, g.rate, g.burst)
        wait = max(client_wait, global_wait)
        per_minute = round(limit.per_minute)
        scope = why = ""
        if wait == 0.0:
            bucket = new_client
            self._requests.store(key, bucket, limit.rate, limit.burst)
            self._global_bucket = new_global
        elif client_wait < global_wait:
            scope, why = "global", f"{round(g.per_minute)} requests per minute for all clients"
        elif key == Buckets.OVERFLOW:
            scope = "overflow"
            why = (
                f"{per_minute} requests per minute shared by new clients while "
                f"{self._requests.size} others are remembered"
            )
        else:
            scope, why = "client", f"{per_minute} requests per minute per client"
        return Decision(
            wait_s=wait,
            limit=per_minute,
            remaining=int(bucket.tokens) if wait == 0.0 else 0,
            reset_s=math.ceil(seconds_until_full(bucket, now, limit.rate, limit.burst)),
            scope=scope,
            why=why,
        )

    def reserve_tokens(self, client: str, limit: Limit, cost: float) -> Decision:
        """Reserve an estimate of LLM tokens; ``settle_tokens`` corrects it afterwards."""
        now = self._clock()
        capacity = limit.tokens_per_minute
        rate = capacity / 60.0
        key, bucket = self._tokens.lookup(client, now, rate, capacity)
        # A request bigger than the whole bucket could never pass; it waits for a full one.
        new_bucket, wait = take(bucket, now, rate, capacity, min(cost, capacity))
        if wait == 0.0:
            bucket = new_bucket
            self._tokens.store(key, bucket, rate, capacity)
        return refusal(
            wait, capacity, bucket.tokens, seconds_until_full(bucket, now, rate, capacity)
        )

    def settle_tokens(self, client: str, limit: Limit, reserved: float, actual: float) -> None:
        """Replace the admission estimate with the real token count."""
        capacity = limit.tokens_per_minute
        found = self._tokens.get(client)
        if found is None or capacity <= 0:
            return
        key, bucket = found
        settled = settle(bucket, actual - min(reserved, capacity), capacity)
        self._tokens.store(key, settled, capacity / 60.0, capacity)
