"""Slot leases in a real Redis, at the edges a gateway process cannot easily be driven to."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import structlog

from proxy.admission.gate import Gate
from proxy.config import SharedConfig
from proxy.errors import SharedStateDownError
from proxy.metrics import Metrics
from proxy.shared import Unavailable
from proxy.shared.slots import SharedSlots, lease_key
from proxy.shared.state import SharedState
from tests.conftest import RedisServer, until_gate

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


@dataclass(eq=False)
class Backend(Box):
    active: int = 0


@pytest.mark.parametrize("wake", ["the slot frees", "the shared state goes down"])
async def test_closed_policy_refuses_every_waiter_when_redis_goes(
    redis_server: RedisServer, wake: str
) -> None:
    """Requests wait for the one slot; Redis stops. Under the closed policy each waiter gets
    its own 503 (SharedStateDownError), whichever wake-up finds Redis gone: the freed slot's
    dispatch, or the state going down (a gateway dispatches on every transition). None of
    them is served alone, as the open policy would."""
    config = SharedConfig(
        redis_url=redis_server.url, timeout_s=0.5, lease_s=30, replica="r1", on_failure="closed"
    )
    state = SharedState(config, Metrics())
    await state.start()
    gate = Gate(max_queue=4, max_queue_per_client=2, queue_timeout_s=15, clock=time.monotonic)
    slots = SharedSlots(state, kick=gate.dispatch)
    gate.share_with(slots, replicas=2)
    state.on_change.append(lambda _up: gate.dispatch())
    backend = Backend("b1")
    try:
        holder, _ = await gate.acquire("holder", lambda: [backend])
        waiting = [asyncio.create_task(gate.acquire(client, lambda: [backend])) for client in "abc"]
        await until_gate(gate, lambda: gate.queued == len(waiting))
        await asyncio.gather(*gate._tasks)  # each found the slot taken, and stopped
        redis_server.stop()
        if wake == "the slot frees":
            gate.release(holder, None)
        else:
            with contextlib.suppress(Unavailable):
                await state.call(state.redis.ping())  # finds Redis gone: marked down
        results = await asyncio.wait_for(
            asyncio.gather(*waiting, return_exceptions=True), timeout=5
        )
    finally:
        await slots.close()
        await state.close()
    assert all(isinstance(result, SharedStateDownError) for result in results), results
    assert len({id(result) for result in results}) == len(results)  # one error each
    assert (gate.queued, backend.active) == (0, 0 if wake == "the slot frees" else 1)
