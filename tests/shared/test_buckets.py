"""Shared token buckets in a real Redis: replicas whose clocks disagree mint no tokens."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator

import pytest

from proxy.admission.ratelimit import Limit, RateLimiter
from proxy.config import SharedConfig
from proxy.metrics import Metrics
from proxy.shared.buckets import Limiter
from proxy.shared.state import SharedState
from tests.conftest import RedisServer

pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def states(redis_server: RedisServer) -> AsyncIterator[list[SharedState]]:
    made = []
    for name in ("r1", "r2"):
        config = SharedConfig(redis_url=redis_server.url, timeout_s=5, replica=name)
        made.append(SharedState(config, Metrics()))
        await made[-1].start()
    yield made
    for state in made:
        await state.close()


async def test_replicas_with_clocks_minutes_apart_share_one_bucket(
    states: list[SharedState],
) -> None:
    """Two replicas, one's clock 90 s ahead of the other's, take turns at one client's
    bucket: together they admit the burst and what the bucket refilled in the time that
    really passed, not a refill for every jump between their clocks."""
    client = Limit(per_minute=6, burst=5)  # a token every 10 s
    skews = (0.0, 90.0)
    replicas = [
        Limiter(
            RateLimiter(Limit(per_minute=1e6, burst=1000), 100, lambda s=skew: time.time() + s),
            state,
        )
        for state, skew in zip(states, skews, strict=True)
    ]
    started = time.monotonic()
    admitted = 0
    for turn in range(40):
        decision = await replicas[turn % 2].admit("alice", client)
        admitted += decision.wait_s == 0
    elapsed = time.monotonic() - started
    assert client.burst <= admitted <= client.burst + math.ceil(elapsed * client.rate)
