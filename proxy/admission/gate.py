"""The concurrency gate: each backend's slots, and one bounded, fair wait queue before them.

Ollama with ``OLLAMA_NUM_PARALLEL=1`` serves one generation at a time and queues the rest
without bound. The gate holds the line in front of every backend: at most ``slots``
requests reach each, at most ``max_queue`` wait (``max_queue_per_client`` each), and none
waits longer than ``queue_timeout_s``.

Where a request may go is its own: the backends that hold its model and answer (a callable
the caller gives, asked again whenever a slot frees, so health and catalogues stay
current). Among those with a free slot it takes the best: the lowest priority tier, then one
with the model already loaded (no cold load), then the least busy; a backend the client's
previous turn used wins when it is free (its prompt cache). When none is free, it waits.
When a slot frees, the first waiter in fair order that can use it takes it: waiters are
taken round-robin between clients, FIFO within a client, skipping the ones that cannot
use that backend, so nobody waits behind a request for a model the free backend lacks.

The bookkeeping (``try_enter``, ``release``, ``leave``) is synchronous, so it is tested with
a fake clock; ``acquire`` and ``slot()`` are the async face the handlers use.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast

from proxy.errors import (
    QueueFullError,
    QueueTimeoutError,
    SharedStateDownError,
    ShuttingDownError,
)
from proxy.shared import Unavailable

if TYPE_CHECKING:
    from proxy.shared.slots import SharedSlots

# Weight of the newest service time in the moving average behind Retry-After.
_EWMA_ALPHA = 0.2
RETRY_AFTER_CAP_S = 60  # the OpenAI SDK ignores a larger Retry-After


class Target(Protocol):
    """What the gate needs of a backend."""

    name: str
    slots: int
    priority: int
    active: int

    def has_loaded(self, model: str | None) -> bool: ...


Eligible = Callable[[], Sequence[Target]]


def _new_future() -> asyncio.Future[Target]:
    return asyncio.get_running_loop().create_future()


@dataclass(eq=False, slots=True)
class Waiter:
    """One request waiting for a slot: where it may go, and the future that gets it."""

    client: str
    eligible: Eligible
    model: str | None = None
    prefer: str | None = None  # the backend of the client's previous turn
    future: asyncio.Future[Target] = field(default_factory=_new_future)


def best(
    candidates: Sequence[Target], model: str | None, prefer: str | None, share: int = 1
) -> Target | None:
    """The backend to take among ``candidates``, or None when none has a free slot.
    ``share``: this process has 1/share of each backend's slots (shared state down)."""
    chosen: Target | None = None
    chosen_key: tuple[int, bool, float] | None = None
    for target in candidates:
        slots = -(-target.slots // share)  # ceil: every replica may use at least one
        if target.active >= slots:
            continue
        if prefer is not None and target.name == prefer:
            return target
        key = (target.priority, not target.has_loaded(model), target.active / slots)
        if chosen_key is None or key < chosen_key:
            chosen, chosen_key = target, key
    return chosen


class Gate:
    def __init__(
        self,
        max_queue: int,
        max_queue_per_client: int,
        queue_timeout_s: float,
        clock: Callable[[], float],
        slots: int = 0,
    ) -> None:
        self.max_queue = max_queue
        self.max_queue_per_client = max_queue_per_client
        self.queue_timeout_s = queue_timeout_s
        self.slots = slots  # the backends' slots in all (for Retry-After and /health)
        self._clock = clock
        self.active = 0
        self.queued = 0
        self._waiters: OrderedDict[str, deque[Waiter]] = OrderedDict()
        self._service_s = 0.0
        self.closed: str | None = None  # why the gate admits no one any more
        # Slots shared with other replicas (Redis): leases there, waiters still here.
        self.shared: SharedSlots | None = None
        self._replicas = 1  # while the shared state is down (open policy): 1/replicas each
        self._dispatching = False
        self._again = False
        self._tasks: set[asyncio.Task[None]] = set()

    def share_with(self, shared: SharedSlots, replicas: int) -> None:
        """Take slots through ``shared`` leases; alone (Redis down) use 1/replicas of each."""
        self.shared = shared
        self._replicas = replicas

    @property
    def _shared_up(self) -> bool:
        return self.shared is not None and self.shared.state.up

    # -- synchronous core -------------------------------------------------------------

    def try_enter(self, waiter: Waiter) -> Target | None:
        """Take a free slot for ``waiter`` (the backend), or queue it (None); raise if the
        queue is full."""
        target = best(waiter.eligible(), waiter.model, waiter.prefer, self._alone_share())
        if target is not None:
            self._take_alone(target)
            return target
        self._enqueue(waiter)
        return None

    def _enqueue(self, waiter: Waiter) -> None:
        queue = self._waiters.get(waiter.client)
        if self.queued >= self.max_queue or (
            queue is not None and len(queue) >= self.max_queue_per_client
        ):
            raise QueueFullError(
                "the gateway's wait queue is full; retry later",
                retry_after_s=self.retry_after_s(),
            )
        if queue is None:
            queue = self._waiters[waiter.client] = deque()
        queue.append(waiter)
        self.queued += 1

    def leave(self, waiter: Waiter) -> None:
        """Take a waiter that gave up (timeout, disconnect) out of the queue."""
        queue = self._waiters.get(waiter.client)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self._waiters[waiter.client]
        self.queued -= 1

    def release(self, target: Target, held_s: float | None) -> None:
        """A slot holder on ``target`` is done; its slot goes to the first waiter in fair
        order that can use it. ``held_s`` feeds the service-time average behind
        Retry-After (None: not a service)."""
        if held_s is not None:
            self._service_s = (
                held_s if self._service_s == 0.0 else
                _EWMA_ALPHA * held_s + (1 - _EWMA_ALPHA) * self._service_s
            )  # fmt: skip
        target.active -= 1
        self.active -= 1
        if self.shared is not None:
            self.shared.release(target.name)
        self.dispatch()

    def dispatch(self) -> None:
        """Hand free slots to waiters that can use them, in fair order, until none can.
        Called when a slot frees, and when a backend comes back or learns a model (and,
        with shared slots, when one frees on another replica or a lease expires)."""
        if self._shared_up:
            if self._waiters:
                self._spawn(self._dispatch_shared())
            return
        if self.shared is not None and not self.shared.state.fails_open:
            # Redis is out of reach and the policy is closed: no slot is handed out alone,
            # and nobody waits for one that only Redis could give.
            self._fail_all(self.shared.state.refuse)
            return
        while self._waiters and self._serve_one():
            pass

    def _serve_one(self) -> bool:
        for client, queue in self._waiters.items():
            for waiter in queue:
                if waiter.future.done():
                    continue
                target = best(waiter.eligible(), waiter.model, waiter.prefer, self._alone_share())
                if target is None:
                    continue
                self._take_alone(target)
                self._hand(client, queue, waiter, target)
                return True
        return False

    def _take(self, target: Target) -> None:
        target.active += 1
        self.active += 1

    def _take_alone(self, target: Target) -> None:
        """Take a slot without Redis: none is configured, or it is out of reach."""
        self._take(target)
        if self.shared is not None:
            self.shared.hold_alone(target.name)

    def _alone_share(self) -> int:
        """1, or the number of replicas while shared slots are out of reach (open policy)."""
        return self._replicas if self.shared is not None and not self.shared.state.up else 1

    # -- shared slots (Redis) ----------------------------------------------------------

    async def _claim(self, waiter: Waiter) -> Target | None:
        """A lease for ``waiter`` in Redis, or None; alone or refused if Redis fails."""
        assert self.shared is not None
        try:
            claimed = await self.shared.claim(waiter.eligible(), waiter.model, waiter.prefer)
        except Unavailable:
            if not self.shared.state.fails_open:
                raise self.shared.state.refuse() from None
            alone = best(waiter.eligible(), waiter.model, waiter.prefer, self._alone_share())
            if alone is not None:  # the caller takes it: a lease name for the renewal
                self.shared.hold_alone(alone.name)
            return alone
        return cast(Target | None, claimed)

    async def _dispatch_shared(self) -> None:
        """Give the waiters here, in fair order, the slots Redis has free for them: one
        claim per waiter, and none for a waiter whose backends were all found full."""
        if self._dispatching:
            self._again = True
            return
        self._dispatching = True
        try:
            granted = True
            while granted and self._waiters:
                granted = False
                self._again = False
                full: set[str] = set()
                for client, queue in list(self._waiters.items()):
                    for waiter in list(queue):
                        if waiter.future.done() or {t.name for t in waiter.eligible()} <= full:
                            continue
                        try:
                            target = await self._claim(waiter)
                        except SharedStateDownError:  # Redis is down, the policy closed
                            assert self.shared is not None
                            self._fail_all(self.shared.state.refuse)
                            return
                        if target is None:
                            full |= {t.name for t in waiter.eligible()}
                            continue
                        self._grant(client, queue, waiter, target)
                        granted = True
                        break
                    if granted:
                        break
                granted = granted or self._again
        finally:
            self._dispatching = False

    def _grant(self, client: str, queue: deque[Waiter], waiter: Waiter, target: Target) -> None:
        self._take(target)
        if waiter.future.done():  # it gave up while the claim was in flight
            self.release(target, None)
            return
        self._hand(client, queue, waiter, target)

    def _hand(self, client: str, queue: deque[Waiter], waiter: Waiter, target: Target) -> None:
        """The waiter leaves the queue with ``target``, already taken; its client's turn
        moves to the back (round-robin between clients)."""
        queue.remove(waiter)
        self.queued -= 1
        if queue:
            self._waiters.move_to_end(client)
        else:
            del self._waiters[client]
        waiter.future.set_result(target)

    def _fail_all(self, error: Callable[[], BaseException]) -> None:
        """Every waiter gets ``error()`` and leaves the queue."""
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(error())
        self._waiters.clear()
        self.queued = 0

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def close(self, reason: str) -> None:
        """Admit no one any more; every waiter is refused with 503 and ``reason``."""
        self.closed = reason
        self._fail_all(lambda: ShuttingDownError(f"{reason}; retry later"))

    def retry_after_s(self) -> int:
        """Seconds until a new request could expect a slot, from recent service times."""
        if self._service_s == 0.0:
            return 1
        estimate = self._service_s * (self.queued + 1) / max(1, self.slots)
        return max(1, min(RETRY_AFTER_CAP_S, math.ceil(estimate)))

    # -- async face -------------------------------------------------------------------

    def slot(
        self,
        client: str,
        eligible: Eligible,
        model: str | None = None,
        prefer: str | None = None,
    ) -> Slot:
        """Hold a slot for the body of ``async with``, which gets the backend; the seconds
        spent queued are ``waited_s`` after it is entered."""
        return Slot(self, client, eligible, model, prefer)

    async def acquire(
        self,
        client: str,
        eligible: Eligible,
        model: str | None = None,
        prefer: str | None = None,
    ) -> tuple[Target, float]:
        """Take a slot, queueing if need be: the backend and the seconds spent queued.
        ``release`` it."""
        if self.closed is not None:
            raise ShuttingDownError(f"{self.closed}; retry later")
        waiter: Waiter | None = None
        if self._shared_up:
            # Leases in Redis. A free slot goes to this request only when nobody here waits
            # (fairness among this replica's clients); otherwise it queues and dispatches.
            if not self._waiters:
                waiter = Waiter(client, eligible, model, prefer)
                target = await self._claim(waiter)
                if target is not None:
                    self._take(target)
                    return target, 0.0
        else:
            # A free slot this request may use is one no waiter can (dispatch gives waiters
            # every slot they can use as it frees): take it, without a future. The common case.
            if self.shared is not None and not self.shared.state.fails_open:
                raise self.shared.state.refuse()
            target = best(eligible(), model, prefer, self._alone_share())
            if target is not None:
                self._take_alone(target)
                return target, 0.0
        waiter = waiter or Waiter(client, eligible, model, prefer)
        queued_at = self._clock()
        self._enqueue(waiter)
        if self._shared_up:
            self.dispatch()
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                target = await waiter.future
        except TimeoutError:
            self._give_up(waiter)
            raise QueueTimeoutError(
                f"no slot became free within {self.queue_timeout_s:g} s; retry later",
                retry_after_s=self.retry_after_s(),
            ) from None
        except asyncio.CancelledError:
            self._give_up(waiter)
            raise
        return target, self._clock() - queued_at

    def _give_up(self, waiter: Waiter) -> None:
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            # The slot was handed over in the same loop iteration we gave up: pass it on.
            self.release(future.result(), None)
        else:
            future.cancel()
            self.leave(waiter)


class Slot:
    """``async with gate.slot(...) as backend``: a class, not a generator, because it is
    entered on every inference request."""

    __slots__ = (
        "_client",
        "_eligible",
        "_gate",
        "_model",
        "_prefer",
        "_started",
        "target",
        "waited_s",
    )

    def __init__(
        self,
        gate: Gate,
        client: str,
        eligible: Eligible,
        model: str | None,
        prefer: str | None,
    ) -> None:
        self._gate = gate
        self._client = client
        self._eligible = eligible
        self._model = model
        self._prefer = prefer
        self._started = 0.0
        self.target: Target | None = None
        self.waited_s = 0.0

    async def __aenter__(self) -> Target:
        self.target, self.waited_s = await self._gate.acquire(
            self._client, self._eligible, self._model, self._prefer
        )
        self._started = self._gate._clock()
        return self.target

    async def __aexit__(self, *exc_info: object) -> None:
        if self.target is not None:
            self._gate.release(self.target, self._gate._clock() - self._started)
            self.target = None
