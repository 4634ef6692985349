"""The gate's bookkeeping, driven synchronously, and its async face."""

from __future__ import annotations

import asyncio

import pytest

from proxy.admission.gate import Gate
from proxy.errors import QueueFullError, QueueTimeoutError
from tests.conftest import FakeClock, until_gate


def _gate(clock: FakeClock, **kwargs: float) -> Gate:
    params: dict[str, float] = {
        "slots": 1,
        "max_queue": 4,
        "max_queue_per_client": 2,
        "queue_timeout_s": 60,
    }
    params.update(kwargs)
    return Gate(
        slots=int(params["slots"]),
        max_queue=int(params["max_queue"]),
        max_queue_per_client=int(params["max_queue_per_client"]),
        queue_timeout_s=params["queue_timeout_s"],
        clock=clock,
    )


@pytest.fixture
async def loop() -> asyncio.AbstractEventLoop:
    """The running loop, only to make futures: the calls under test are synchronous."""
    return asyncio.get_running_loop()


def test_free_slot_is_taken_then_waiters_queue(loop: asyncio.AbstractEventLoop) -> None:
    """With one slot, the first caller enters and the next ones wait in the queue."""
    gate = _gate(FakeClock())
    assert gate.try_enter("a", loop.create_future())
    assert not gate.try_enter("b", loop.create_future())
    assert (gate.active, gate.queued) == (1, 1)


def test_queue_full_and_per_client_cap(loop: asyncio.AbstractEventLoop) -> None:
    """A client may queue two; the queue holds four; beyond that, QueueFullError."""
    gate = _gate(FakeClock())
    gate.try_enter("a", loop.create_future())
    gate.try_enter("a", loop.create_future())
    gate.try_enter("a", loop.create_future())
    with pytest.raises(QueueFullError):
        gate.try_enter("a", loop.create_future())  # a has 2 queued
    gate.try_enter("b", loop.create_future())
    gate.try_enter("b", loop.create_future())
    with pytest.raises(QueueFullError):
        gate.try_enter("c", loop.create_future())  # 4 queued in all
    assert gate.queued == 4


def test_release_hands_the_slot_round_robin_between_clients(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """Waiters are served a1, b1, a2, b2 although a queued both first."""
    gate = _gate(FakeClock())
    gate.try_enter("holder", loop.create_future())
    waiters = {name: loop.create_future() for name in ("a1", "a2", "b1", "b2")}
    for name in ("a1", "a2", "b1", "b2"):
        gate.try_enter(name[0], waiters[name])
    order = []
    for _ in range(4):
        gate.release(1.0)
        order += [n for n, f in waiters.items() if f.done() and n not in order]
    assert order == ["a1", "b1", "a2", "b2"]
    assert (gate.active, gate.queued) == (1, 0)


def test_leave_removes_a_waiter_and_release_skips_cancelled(
    loop: asyncio.AbstractEventLoop,
) -> None:
    """A waiter that gave up never gets the slot; the next one does."""
    gate = _gate(FakeClock())
    gate.try_enter("holder", loop.create_future())
    gone, next_one = loop.create_future(), loop.create_future()
    gate.try_enter("a", gone)
    gate.try_enter("b", next_one)
    gate.leave("a", gone)
    assert gate.queued == 1
    gate.release(1.0)
    assert next_one.done()
    assert not gone.done()


def test_retry_after_follows_recent_service_times(loop: asyncio.AbstractEventLoop) -> None:
    """Retry-After is average service time x queue position / slots, capped at 60 s."""
    gate = _gate(FakeClock(), max_queue=200, max_queue_per_client=200)
    assert gate.retry_after_s() == 1  # nothing measured yet
    gate.try_enter("h", loop.create_future())
    gate.release(4.0)
    assert gate.retry_after_s() == 4
    gate.try_enter("h", loop.create_future())
    for i in range(3):
        gate.try_enter(f"c{i}", loop.create_future())
    assert gate.retry_after_s() == 16  # 4 s x (3 queued + 1)
    for i in range(100):
        gate.try_enter(f"d{i}", loop.create_future())
    assert gate.retry_after_s() == 60


async def test_slot_times_out_and_leaves_the_queue() -> None:
    """A waiter past queue_timeout gets QueueTimeoutError and is no longer counted."""
    gate = _gate(FakeClock(), queue_timeout_s=0.05)
    async with gate.slot("a"):
        with pytest.raises(QueueTimeoutError):
            async with gate.slot("b"):
                pytest.fail("must not enter")
        assert gate.queued == 0
    assert gate.active == 0


async def test_cancelled_waiter_leaves_and_slot_passes_on() -> None:
    """Cancelling a queued task removes it; the slot goes to the next waiter."""
    gate = _gate(FakeClock())
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold(name: str) -> None:
        async with gate.slot(name):
            entered.set()
            await release.wait()

    holder = asyncio.create_task(hold("h"))
    await entered.wait()
    entered.clear()
    doomed = asyncio.create_task(hold("x"))
    survivor = asyncio.create_task(hold("y"))
    await until_gate(gate, lambda: gate.queued == 2, within_s=2)
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert gate.queued == 1
    release.set()
    await asyncio.wait_for(asyncio.gather(holder, survivor), 2)
    assert (gate.active, gate.queued) == (0, 0)


async def test_slot_granted_while_cancelled_is_passed_on() -> None:
    """A waiter cancelled in the same turn it was handed a slot gives the slot back."""
    gate = _gate(FakeClock())
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    gate.try_enter("h", loop.create_future())
    gate.try_enter("a", waiter)
    gate.release(1.0)  # slot handed to waiter
    assert waiter.done()
    gate._give_up("a", waiter)
    assert (gate.active, gate.queued) == (0, 0)
