"""Slot leases in a real Redis, at the edges a gateway process cannot easily be driven to."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog

from proxy.config import SharedConfig
from proxy.metrics import Metrics
from proxy.shared.slots import SharedSlots, lease_key
from proxy.shared.state import SharedState
from tests.conftest import RedisServer

pytestmark = pytest.mark.timeout(20)
T = TypeVar("T")


@dataclass
class Box:
    name: str
    slots: int = 1
    priority: int = 0

    def has_loaded(self, model: str | None) -> bool:
        return True


@pytest.fixture
async def state(redis_server: RedisServer) -> AsyncIterator[SharedState]:
    config = SharedConfig(redis_url=redis_server.url, timeout_s=5, lease_s=30, replica="r1")
    shared = SharedState(config, Metrics())
    await shared.start()
    yield shared
    await shared.close()


async def leases(state: SharedState, backend: str) -> int:
    return int(await state.redis.zcard(lease_key(backend)))


async def test_a_claim_that_gets_no_answer_gives_back_the_slot_it_took(
    state: SharedState, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The client leaves while the claim is in flight: the script ran in Redis, its answer
    is never read. The slot must not stay taken until the lease expires (30 s here)."""
    slots = SharedSlots(state, kick=lambda: None)
    ran = asyncio.Event()
    real_call = state.call

    async def answer_lost(operation: Awaitable[T]) -> T:
        if not ran.is_set():
            await real_call(operation)  # the script runs and takes the slot ...
            ran.set()
            await asyncio.Event().wait()  # ... and its answer never comes back
        return await real_call(operation)

    monkeypatch.setattr(state, "call", answer_lost)
    box = Box("b1")
    claim = asyncio.create_task(slots.claim([box], None, None))
    await ran.wait()
    assert await leases(state, "b1") == 1
    async with state.listener.pubsub() as pubsub:  # the freed slot is announced too
        await pubsub.subscribe("ogw:slots:freed")
        claim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await claim
        await asyncio.gather(*slots._tasks)
        message: Any = None
        async with asyncio.timeout(5):
            while message is None or message["type"] != "message":
                message = await pubsub.get_message(timeout=1)
    assert message["data"] == "b1"
    assert await leases(state, "b1") == 0
    assert await slots.claim([box], None, None) is box  # the one slot is free again


async def test_redis_down_at_start_up_is_said_once(tmp_path: Path) -> None:
    """One warning, with the reason, when there is no Redis to answer the first PING."""
    config = SharedConfig(redis_url=f"unix://{tmp_path}/none.sock", timeout_s=0.5)
    shared = SharedState(config, Metrics())
    with structlog.testing.capture_logs() as logs:
        await shared.start()
    await shared.close()
    down = [line for line in logs if line["event"] == "shared_state_down"]
    assert len(down) == 1
    assert "none.sock" in str(down[0]["error"])
    assert not shared.up
