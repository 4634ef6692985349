"""Backend slots shared by every replica: leases in Redis.

Each backend's slots are a sorted set of leases (member: replica and a counter; score: when
the lease expires). Taking a slot is one script: drop expired leases, count, add one if
there is room, on the best candidate backend. The replica renews its leases every third of
``lease_s`` while its requests run and removes one when a request ends, then says so on a
channel, so that every replica with a waiter that can use that backend tries at once (one
claim each, no polling). A replica that dies keeps its leases only until they expire: a
waiter finding every candidate full is woken when the soonest lease there expires.

A request admitted alone while Redis was out of reach (open policy) gets a lease name too,
and a renewal puts back every lease of a running request that Redis no longer has; the
first renewal runs as soon as Redis answers again. So after an outage the other replicas
see what each backend really runs within a round trip, instead of until those requests end.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

import structlog
from redis.exceptions import RedisError

from proxy.shared import KEY_PREFIX, Unavailable
from proxy.shared.scripts import CLAIM, RENEW
from proxy.shared.state import SharedState

log = structlog.get_logger("proxy.shared")
FREED = f"{KEY_PREFIX}slots:freed"


class Slotted(Protocol):
    """What a backend is to the shared slots."""

    name: str
    slots: int
    priority: int

    def has_loaded(self, model: str | None) -> bool: ...


def lease_key(backend: str) -> str:
    return f"{KEY_PREFIX}slots:{backend}"


class SharedSlots:
    """This replica's leases, and the wake-ups when a slot frees anywhere."""

    def __init__(self, state: SharedState, kick: Callable[[], None]) -> None:
        self.state = state
        self._kick = kick  # the gate's dispatch
        self._claim = state.redis.register_script(CLAIM)
        self._renew = state.redis.register_script(RENEW)
        self._ids = itertools.count()
        self.held: dict[str, list[str]] = {}  # backend -> this replica's lease members
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._renew_now = asyncio.Event()
        # A renewal puts back the leases it is given, so a release must not overtake it: a
        # lease removed while its renewal is on the way would come back, held by nobody.
        # Releases wait while one is on its way (they do not wait for each other).
        self._not_renewing = asyncio.Event()
        self._not_renewing.set()
        state.on_change.append(self._state_changed)

    async def start(self) -> None:
        self._background = [
            asyncio.create_task(self._renew_forever()),
            asyncio.create_task(self._listen_forever()),
        ]

    async def close(self) -> None:
        for task in self._background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._timer is not None:
            self._timer.cancel()

    async def claim(
        self, candidates: Sequence[Slotted], model: str | None, prefer: str | None
    ) -> Slotted | None:
        """A slot on the best candidate with room, leased to this replica; None when all
        are full (and a wake-up set for when the soonest lease among them expires).
        ``Unavailable`` when Redis does not answer."""
        if not candidates:
            return None
        ranked = sorted(candidates, key=lambda b: b.priority)
        member = f"{self.state.replica}:{next(self._ids)}"
        preferred = next((i + 1 for i, b in enumerate(ranked) if b.name == prefer), 0)
        args: list[str | int] = [round(self.state.config.lease_s * 1000), member, preferred]
        for backend in ranked:
            args += [backend.slots, backend.priority, int(backend.has_loaded(model))]
        keys = [lease_key(b.name) for b in ranked]
        try:
            chosen, soonest_ms = await self.state.call(self._claim(keys=keys, args=args))
        except BaseException:
            # No answer (the client left, or Redis was too slow): the script may still have
            # run and taken a slot that nobody would release before its lease expired.
            self._spawn(self._unclaim(ranked, member))
            raise
        if int(chosen) == 0:
            self._wake_in(int(soonest_ms))
            return None
        backend = ranked[int(chosen) - 1]
        self.held.setdefault(backend.name, []).append(member)
        return backend

    def hold_alone(self, backend: str) -> None:
        """A request took a slot on ``backend`` without Redis (it was out of reach): its
        lease is written by the first renewal once Redis answers."""
        self.held.setdefault(backend, []).append(f"{self.state.replica}:{next(self._ids)}")

    def release(self, backend: str) -> None:
        """A request on ``backend`` ended: drop one of this replica's leases there and tell
        the others (sent, not awaited; should it fail, the lease expires on its own)."""
        members = self.held.get(backend)
        if members:
            self._spawn(self._release(backend, members.pop()))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, backend: str, member: str) -> None:
        redis = self.state.redis
        with contextlib.suppress(Unavailable):
            await self._not_renewing.wait()
            async with redis.pipeline(transaction=False) as pipe:
                pipe.zrem(lease_key(backend), member)
                pipe.publish(FREED, backend)
                await self.state.call(pipe.execute())

    async def _unclaim(self, candidates: Sequence[Slotted], member: str) -> None:
        """Drop the lease a claim without an answer may have taken (members are unique:
        where it took none, nothing is removed), and say so where one was."""
        redis = self.state.redis
        with contextlib.suppress(Unavailable):
            async with redis.pipeline(transaction=False) as pipe:
                for backend in candidates:
                    pipe.zrem(lease_key(backend.name), member)
                removed = await self.state.call(pipe.execute())
            for backend, count in zip(candidates, removed, strict=True):
                if count:
                    await self.state.call(redis.publish(FREED, backend.name))

    def _wake_in(self, ms: int) -> None:
        """Dispatch again when a lease is due to expire (a dead replica's frees a slot
        without a word)."""
        if ms < 0:
            return
        loop = asyncio.get_running_loop()
        due = loop.time() + ms / 1000 + 0.005
        if self._timer is not None and self._timer.when() <= due:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer = loop.call_at(due, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._kick()

    def _state_changed(self, up: bool) -> None:
        if up:
            self._renew_now.set()  # write the leases Redis lost or never had, now

    async def _renew_forever(self) -> None:
        every_s = self.state.config.lease_s / 3
        lease_ms = round(self.state.config.lease_s * 1000)
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every_s):
                    await self._renew_now.wait()
            self._renew_now.clear()
            keys = [lease_key(b) for b, members in self.held.items() for _ in members]
            members = [m for ms in self.held.values() for m in ms]
            if not members or not self.state.up:
                continue
            self._not_renewing.clear()
            try:
                restored = await self.state.call(self._renew(keys=keys, args=[lease_ms, *members]))
            except Unavailable:
                continue
            finally:
                self._not_renewing.set()
            if int(restored):
                log.warning("slot_leases_restored", count=int(restored), replica=self.state.replica)

    async def _listen_forever(self) -> None:
        """Slots freed on other replicas: try the waiters here that can use them."""
        while True:
            try:
                pubsub = self.state.listener.pubsub()
                await pubsub.subscribe(FREED)
                self._kick()  # anything freed while not listening
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        self._kick()
            except (RedisError, OSError):
                pass
            await asyncio.sleep(1.0)  # Redis went away: subscribe again once it is back
