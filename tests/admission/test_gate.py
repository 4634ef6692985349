"""The gate's bookkeeping, driven synchronously (in a running loop only to make futures),
and its async face: backends' slots, one fair queue, and where a request goes among
several backends."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from proxy.admission.gate import Gate, Target, Waiter, best
from proxy.errors import QueueFullError, QueueTimeoutError
from tests.conftest import FakeClock, until_gate


@dataclass(eq=False)
class Box:
    """A backend as the gate sees it."""

    name: str
    slots: int = 1
    priority: int = 0
    active: int = 0
    loaded: set[str] = field(default_factory=set)

    def has_loaded(self, model: str | None) -> bool:
        return model in self.loaded


def _gate(clock: FakeClock, **kwargs: float) -> Gate:
    params: dict[str, float] = {"max_queue": 4, "max_queue_per_client": 2, "queue_timeout_s": 60}
    params.update(kwargs)
    return Gate(
        max_queue=int(params["max_queue"]),
        max_queue_per_client=int(params["max_queue_per_client"]),
        queue_timeout_s=params["queue_timeout_s"],
        clock=clock,
        slots=1,
    )


def on(*boxes: Box) -> list[Target]:
    return list(boxes)


def waiter(client: str, *boxes: Box, model: str | None = None) -> Waiter:
    candidates: Sequence[Target] = list(boxes)
    return Waiter(client, lambda: candidates, model)


async def test_free_slot_is_taken_then_waiters_queue() -> None:
    """With one slot, the first caller enters and the next ones wait in the queue."""
    gate, box = _gate(FakeClock()), Box("one")
    assert gate.try_enter(waiter("a", box)) is box
    assert gate.try_enter(waiter("b", box)) is None
    assert (gate.active, gate.queued, box.active) == (1, 1, 1)


async def test_queue_full_and_per_client_cap() -> None:
    """A client may queue two; the queue holds four; beyond that, QueueFullError."""
    gate, box = _gate(FakeClock()), Box("one")
    gate.try_enter(waiter("a", box))
    gate.try_enter(waiter("a", box))
    gate.try_enter(waiter("a", box))
    with pytest.raises(QueueFullError):
        gate.try_enter(waiter("a", box))  # a has 2 queued
    gate.try_enter(waiter("b", box))
    gate.try_enter(waiter("b", box))
    with pytest.raises(QueueFullError):
        gate.try_enter(waiter("c", box))  # 4 queued in all
    assert gate.queued == 4


async def test_release_hands_the_slot_round_robin_between_clients() -> None:
    """Waiters are served a1, b1, a2, b2 although a queued both first."""
    gate, box = _gate(FakeClock()), Box("one")
    gate.try_enter(waiter("holder", box))
    waiters = {name: waiter(name[0], box) for name in ("a1", "a2", "b1", "b2")}
    for name in ("a1", "a2", "b1", "b2"):
        gate.try_enter(waiters[name])
    order: list[str] = []
    for _ in range(4):
        gate.release(box, 1.0)
        order += [n for n, w in waiters.items() if w.future.done() and n not in order]
    assert order == ["a1", "b1", "a2", "b2"]
    assert (gate.active, gate.queued) == (1, 0)


async def test_leave_removes_a_waiter_and_release_skips_cancelled() -> None:
    """A waiter that gave up never gets the slot; the next one does."""
    gate, box = _gate(FakeClock()), Box("one")
    gate.try_enter(waiter("holder", box))
    gone, next_one = waiter("a", box), waiter("b", box)
    gate.try_enter(gone)
    gate.try_enter(next_one)
    gate.leave(gone)
    assert gate.queued == 1
    gate.release(box, 1.0)
    assert next_one.future.done()
    assert not gone.future.done()


async def test_retry_after_follows_recent_service_times() -> None:
    """Retry-After is average service time x queue position / slots, capped at 60 s."""
    gate, box = _gate(FakeClock(), max_queue=200, max_queue_per_client=200), Box("one")
    assert gate.retry_after_s() == 1  # nothing measured yet
    gate.try_enter(waiter("h", box))
    gate.release(box, 4.0)
    assert gate.retry_after_s() == 4
    gate.try_enter(waiter("h", box))
    for i in range(3):
        gate.try_enter(waiter(f"c{i}", box))
    assert gate.retry_after_s() == 16  # 4 s x (3 queued + 1)
    for i in range(100):
        gate.try_enter(waiter(f"d{i}", box))
    assert gate.retry_after_s() == 60


async def test_slot_times_out_and_leaves_the_queue() -> None:
    """A waiter past queue_timeout gets QueueTimeoutError and is no longer counted."""
    gate, box = _gate(FakeClock(), queue_timeout_s=0.05), Box("one")
    async with gate.slot("a", lambda: on(box)):
        with pytest.raises(QueueTimeoutError):
            async with gate.slot("b", lambda: on(box)):
                pytest.fail("must not enter")
        assert gate.queued == 0
    assert gate.active == box.active == 0


async def test_cancelled_waiter_leaves_and_slot_passes_on() -> None:
    """Cancelling a queued task removes it; the slot goes to the next waiter."""
    gate, box = _gate(FakeClock()), Box("one")
    entered = asyncio.Event()
    release = asyncio.Event()

    async def hold(name: str) -> None:
        async with gate.slot(name, lambda: on(box)):
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
    assert (gate.active, gate.queued, box.active) == (0, 0, 0)


async def test_slot_granted_while_cancelled_is_passed_on() -> None:
    """A waiter cancelled in the same turn it was handed a slot gives the slot back."""
    gate, box = _gate(FakeClock()), Box("one")
    gate.try_enter(waiter("h", box))
    late = waiter("a", box)
    gate.try_enter(late)
    gate.release(box, 1.0)  # slot handed to the waiter
    assert late.future.done()
    gate._give_up(late)
    assert (gate.active, gate.queued, box.active) == (0, 0, 0)


# --- several backends -------------------------------------------------------------------


def test_the_best_backend_is_the_lowest_tier_then_loaded_then_least_busy() -> None:
    """Priority first; within a tier, a loaded model beats a cold load; then the least busy;
    a session's previous backend wins when it is free; a full backend is never chosen."""
    gpu = Box("gpu", slots=2, priority=0)
    cpu = Box("cpu", slots=4, priority=1, loaded={"m"})
    assert best(on(cpu, gpu), "m", None) is gpu
    warm, cold = Box("warm", slots=2, loaded={"m"}, active=1), Box("cold", slots=2)
    assert best(on(cold, warm), "m", None) is warm
    busy, idle = Box("busy", slots=4, active=3), Box("idle", slots=4, active=1)
    assert best(on(busy, idle), None, None) is idle
    assert best(on(gpu, cpu), "m", "cpu") is cpu
    assert best(on(Box("full", active=1)), None, None) is None


async def test_a_freed_slot_goes_to_the_first_waiter_that_can_use_it() -> None:
    """No head-of-line blocking: when the box holding model B frees, the waiter for B gets
    it, although a waiter for model A (which that box lacks) queued first."""
    gate = _gate(FakeClock())
    box_a, box_b = Box("a-box"), Box("b-box")
    gate.try_enter(waiter("x", box_a, model="A"))
    gate.try_enter(waiter("y", box_b, model="B"))
    wants_a, wants_b = waiter("p", box_a, model="A"), waiter("q", box_b, model="B")
    assert gate.try_enter(wants_a) is None
    assert gate.try_enter(wants_b) is None
    gate.release(box_b, 1.0)
    assert wants_b.future.done()
    assert wants_b.future.result() is box_b
    assert not wants_a.future.done()


async def test_a_waiter_takes_whichever_of_its_backends_frees_first() -> None:
    """A waiter is not pinned to one backend's queue: it goes wherever a slot frees."""
    gate = _gate(FakeClock())
    one, two = Box("one"), Box("two")
    gate.try_enter(waiter("x", one))
    gate.try_enter(waiter("y", two))
    either = waiter("z", one, two)
    assert gate.try_enter(either) is None
    gate.release(two, 1.0)
    assert either.future.result() is two


async def test_a_backend_that_comes_back_serves_the_waiters() -> None:
    """dispatch() hands slots out when the set a waiter may use grows (a backend came back
    or learned a model), not only when a slot frees."""
    gate = _gate(FakeClock())
    back = Box("back")
    healthy: list[Target] = []
    late = Waiter("c", lambda: healthy, None)
    assert gate.try_enter(late) is None
    healthy.append(back)
    gate.dispatch()
    assert late.future.result() is back
