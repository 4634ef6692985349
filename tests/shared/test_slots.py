"""Slot leases in a real Redis, at the edges a gateway process cannot easily be driven to."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
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


def shared_gate(state: SharedState, replicas: int) -> tuple[Gate, SharedSlots]:
    """A gate taking its slots as leases through ``state``, as a gateway's does."""
    gate = Gate(max_queue=4, max_queue_per_client=2, queue_timeout_s=15, clock=time.monotonic)
    slots = SharedSlots(state, kick=gate.dispatch)
    gate.share_with(slots, replicas)
    return gate, slots


@dataclass
class Renewals:
    """The renewals of a ``SharedSlots``, watched: ``started`` as one is about to go to
    Redis, which it does once ``proceed`` is set; ``done`` once its answer is back."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    proceed: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)


def watch_renewals(slots: SharedSlots, *, proceed: bool = True) -> Renewals:
    watched = Renewals()
    if proceed:
        watched.proceed.set()
    real_renew = slots._renew

    def renew(**kwargs: Any) -> Awaitable[Any]:
        async def run() -> Any:
            watched.started.set()
            await watched.proceed.wait()
            try:
                return await real_renew(**kwargs)
            finally:
                watched.done.set()

        return run()

    slots._renew = renew  # type: ignore[assignment]
    return watched


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
    gate, slots = shared_gate(state, replicas=2)
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


@pytest.mark.parametrize("how", ["admitted alone", "lease lost with Redis"])
async def test_when_redis_returns_the_running_requests_hold_their_slots_again(
    redis_server: RedisServer, how: str
) -> None:
    """A request runs on the one slot without a lease in Redis: it was admitted alone while
    Redis was out of reach (open policy), or Redis restarted empty under it. When Redis
    answers again its lease is written at once, so another replica finds the slot taken
    until the request ends, and free after."""
    config = SharedConfig(redis_url=redis_server.url, timeout_s=0.5, lease_s=30, replica="r1")
    state = SharedState(config, Metrics())
    await state.start()
    gate, slots = shared_gate(state, replicas=1)
    await slots.start()
    renewals = watch_renewals(slots)
    back = asyncio.Event()
    state.on_change.append(lambda up: back.set() if up else None)
    backend = Backend("b1")
    other = SharedState(replace(config, replica="r2"), Metrics())
    try:
        if how == "lease lost with Redis":
            running, _ = await gate.acquire("a", lambda: [backend])
        redis_server.stop()
        with contextlib.suppress(Unavailable):
            await state.call(state.redis.ping())  # finds Redis gone: marked down
        if how == "admitted alone":
            running, _ = await gate.acquire("a", lambda: [backend])
        redis_server.start()  # empty: --save ""
        with structlog.testing.capture_logs() as logs:
            async with asyncio.timeout(5):
                await back.wait()  # the state's own ping found Redis again
                await renewals.done.wait()
        assert [line["count"] for line in logs if line["event"] == "slot_leases_restored"] == [1]
        assert await leases(state, "b1") == 1
        await other.start()
        other_slots = SharedSlots(other, kick=lambda: None)
        assert await other_slots.claim([backend], None, None) is None
        gate.release(running, None)
        await asyncio.gather(*slots._tasks)
        assert await leases(state, "b1") == 0
        assert await other_slots.claim([backend], None, None) is backend
    finally:
        await other.close()
        await slots.close()
        await state.close()


async def test_a_release_never_overtakes_a_renewal_on_its_way(state: SharedState) -> None:
    """A request ends while a renewal that includes its lease is on its way to Redis. The
    renewal puts back leases it does not find, so were the release's removal to reach
    Redis first, the lease would come back held by nobody, blocking the slot for a lease."""
    gate, slots = shared_gate(state, replicas=1)
    await slots.start()
    renewals = watch_renewals(slots, proceed=False)
    backend = Backend("b1")
    try:
        running, _ = await gate.acquire("a", lambda: [backend])
        slots._renew_now.set()
        async with asyncio.timeout(5):
            await renewals.started.wait()
            gate.release(running, None)  # its removal is sent while the renewal waits
            renewals.proceed.set()
            await renewals.done.wait()
            await asyncio.gather(*slots._tasks)
        assert await leases(state, "b1") == 0
    finally:
        await slots.close()
