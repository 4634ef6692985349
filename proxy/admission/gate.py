"""The concurrency gate: ``slots`` requests at once, a bounded and fair wait queue.

Ollama with ``OLLAMA_NUM_PARALLEL=1`` serves one generation at a time and queues the rest
without bound. The gate holds the line in front of it: at most ``slots`` requests reach the
upstream, at most ``max_queue`` wait (``max_queue_per_client`` each), and none waits longer
than ``queue_timeout_s``. Waiters are served round-robin between clients, FIFO within a
client, so one client with many requests cannot starve the others.

The bookkeeping (``try_enter``, ``release``, ``leave``) is synchronous, so it is tested with
a fake clock; ``slot()`` is the async face the handlers use.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable

from proxy.errors import QueueFullError, QueueTimeoutError, ShuttingDownError

# Weight of the newest service time in the moving average behind Retry-After.
_EWMA_ALPHA = 0.2
RETRY_AFTER_CAP_S = 60  # the OpenAI SDK ignores a larger Retry-After


class Gate:
    def __init__(
        self,
        slots: int,
        max_queue: int,
        max_queue_per_client: int,
        queue_timeout_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.slots = slots
        self.max_queue = max_queue
        self.max_queue_per_client = max_queue_per_client
        self.queue_timeout_s = queue_timeout_s
        self._clock = clock
        self.active = 0
        self.queued = 0
        self._waiters: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._service_s = 0.0
        self.closed: str | None = None  # why the gate admits no one any more

    # -- synchronous core -------------------------------------------------------------

    def try_enter(self, client: str, waiter: asyncio.Future[None]) -> bool:
        """Take a free slot (True) or queue ``waiter`` (False); raise if the queue is full."""
        if self.active < self.slots and self.queued == 0:
            self.active += 1
            return True
        queue = self._waiters.get(client)
        if self.queued >= self.max_queue or (
            queue is not None and len(queue) >= self.max_queue_per_client
        ):
            raise QueueFullError(
                "the gateway's wait queue is full; retry later",
                retry_after_s=self.retry_after_s(),
            )
        if queue is None:
            queue = self._waiters[client] = deque()
        queue.append(waiter)
        self.queued += 1
        return False

    def leave(self, client: str, waiter: asyncio.Future[None]) -> None:
        """Take a waiter that gave up (timeout, disconnect) out of the queue."""
        queue = self._waiters.get(client)
        if queue is None or waiter not in queue:
            return
        queue.remove(waiter)
        if not queue:
            del self._waiters[client]
        self.queued -= 1

    def release(self, held_s: float | None) -> None:
        """A slot holder is done; hand the slot to the next waiter, round-robin by client.

        ``held_s`` feeds the service-time average behind Retry-After (None: not a service).
        """
        if held_s is not None:
            self._service_s = (
                held_s if self._service_s == 0.0 else
                _EWMA_ALPHA * held_s + (1 - _EWMA_ALPHA) * self._service_s
            )  # fmt: skip
        self.active -= 1
        while self._waiters and self.active < self.slots:
            client, queue = next(iter(self._waiters.items()))
            waiter = queue.popleft()
            self.queued -= 1
            if queue:
                self._waiters.move_to_end(client)
            else:
                del self._waiters[client]
            if not waiter.done():
                waiter.set_result(None)
                self.active += 1

    def close(self, reason: str) -> None:
        """Admit no one any more; every waiter is refused with 503 and ``reason``."""
        self.closed = reason
        for queue in self._waiters.values():
            for waiter in queue:
                if not waiter.done():
                    waiter.set_exception(ShuttingDownError(f"{reason}; retry later"))
        self._waiters.clear()
        self.queued = 0

    def retry_after_s(self) -> int:
        """Seconds until a new request could expect a slot, from recent service times."""
        if self._service_s == 0.0:
            return 1
        estimate = self._service_s * (self.queued + 1) / self.slots
        return max(1, min(RETRY_AFTER_CAP_S, math.ceil(estimate)))

    # -- async face -------------------------------------------------------------------

    def slot(self, client: str) -> Slot:
        """Hold a slot for the body of ``async with``, which gets the seconds spent queued."""
        return Slot(self, client)

    async def acquire(self, client: str) -> float:
        """Take a slot, queueing if need be; the seconds spent queued. ``release`` it."""
        if self.closed is not None:
            raise ShuttingDownError(f"{self.closed}; retry later")
        if self.active < self.slots and self.queued == 0:
            self.active += 1  # the common case, without a future: try_enter's first branch
            return 0.0
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        queued_at = self._clock()
        if not self.try_enter(client, waiter):
            try:
                async with asyncio.timeout(self.queue_timeout_s):
                    await waiter
            except TimeoutError:
                self._give_up(client, waiter)
                raise QueueTimeoutError(
                    f"no slot became free within {self.queue_timeout_s:g} s; retry later",
                    retry_after_s=self.retry_after_s(),
                ) from None
            except asyncio.CancelledError:
                self._give_up(client, waiter)
                raise
        return self._clock() - queued_at

    def _give_up(self, client: str, waiter: asyncio.Future[None]) -> None:
        if waiter.done() and not waiter.cancelled():
            # The slot was handed over in the same loop iteration we gave up: pass it on.
            self.release(None)
        else:
            waiter.cancel()
            self.leave(client, waiter)


class Slot:
    """``async with gate.slot(client) as waited_s``: a class, not a generator, because it
    is entered on every inference request."""

    __slots__ = ("_client", "_gate", "_started")

    def __init__(self, gate: Gate, client: str) -> None:
        self._gate = gate
        self._client = client
        self._started = 0.0

    async def __aenter__(self) -> float:
        waited_s = await self._gate.acquire(self._client)
        self._started = self._gate._clock()
        return waited_s

    async def __aexit__(self, *exc_info: object) -> None:
        self._gate.release(self._gate._clock() - self._started)
