"""The admission step, as the handlers take it: the request rate first (cheap, before the
body is read), then, once the body says what the request is for and what it will cost,
its LLM tokens and a slot on a backend that can serve it, held for as long as the upstream
works on it.

    admit(...)                          # 429 when the client's or the global bucket is empty
    async with Gated(...) as place:     # the token reservation, then a slot (or a fair wait)
        ...                             # the upstream request on place.backend
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import structlog
from aiohttp import web

from proxy.admission.keys import ANONYMOUS, Principal
from proxy.errors import InvalidRequestError, RateLimitedError, ShuttingDownError
from proxy.exchange import Exchange

if TYPE_CHECKING:
    from proxy.gateway import Gateway
    from proxy.upstream.backends import Backend

log = structlog.get_logger("proxy.admission")


async def admit(gateway: Gateway, exchange: Exchange, principal: Principal) -> None:
    """Take a request from the client's and the global bucket, or refuse with 429 (or 503
    while the gateway shuts down)."""
    if gateway.drain.stopping:
        raise ShuttingDownError
    decision = await gateway.limiter.admit(principal.bucket, principal.limit)
    exchange.headers.update(decision.headers())
    if not decision.admitted:
        exchange.headers["Retry-After"] = str(decision.retry_after_s)
        raise RateLimitedError(
            f"rate limit exceeded ({decision.why}); retry in {decision.retry_after_s} s",
            retry_after_s=decision.retry_after_s,
        )


async def reserve_tokens(
    gateway: Gateway, exchange: Exchange, principal: Principal, estimate: int
) -> None:
    if principal.limit.tokens_per_minute <= 0:
        return
    decision = await gateway.limiter.reserve_tokens(principal.bucket, principal.limit, estimate)
    if not decision.admitted:
        exchange.headers["Retry-After"] = str(decision.retry_after_s)
        raise RateLimitedError(
            f"token rate limit exceeded ({int(principal.limit.tokens_per_minute)} tokens per "
            f"minute); retry in {decision.retry_after_s} s",
            retry_after_s=decision.retry_after_s,
        )


def session_of(request: web.Request, principal: Principal) -> str | None:
    """What ties a conversation's turns together: X-Session-ID, else the client's key."""
    session = request.headers.get("X-Session-ID")
    if session:
        return session[:128]
    return principal.name if principal.name != ANONYMOUS else None


BACKEND_HEADER = "X-Backend"  # a request for one backend in particular (warmup, management)


def named_backend(request: web.Request, names: Iterable[str]) -> str | None:
    """The backend an ``X-Backend`` header names, if any; 400 for a name that is none."""
    name = request.headers.get(BACKEND_HEADER)
    if name is None:
        return None
    known = list(names)
    if name not in known:
        raise InvalidRequestError(
            f"no backend named '{name}' ({BACKEND_HEADER}: one of {', '.join(known)})"
        )
    return name


class Affinity:
    """Which backend served a session's previous turn, for the last ``size`` sessions: a
    backend with the conversation in its prompt cache answers the next turn faster."""

    def __init__(self, size: int = 10_000) -> None:
        self._size = size
        self._last: OrderedDict[str, str] = OrderedDict()

    def get(self, session: str | None) -> str | None:
        return self._last.get(session) if session else None

    def remember(self, session: str | None, backend: str) -> None:
        if not session:
            return
        self._last[session] = backend
        self._last.move_to_end(session)
        if len(self._last) > self._size:
            self._last.popitem(last=False)


class Gated:
    """``async with Gated(...) as place``: reserve the client's LLM tokens, hold a slot on a
    backend for the body (``place.backend``), settle the tokens. A request that has not
    reached an upstream yet may ``fail_over`` to another backend. (A class: a generator
    context manager costs more, and this one is entered on every inference request.)"""

    __slots__ = (
        "_exchange",
        "_gateway",
        "_model",
        "_native",
        "_only",
        "_principal",
        "_session",
        "_started",
        "_token_estimate",
        "_tried",
        "backend",
    )

    def __init__(
        self,
        gateway: Gateway,
        exchange: Exchange,
        principal: Principal,
        token_estimate: int,
        *,
        model: str | None,
        native: bool,
        session: str | None = None,
        only: str | None = None,
    ) -> None:
        self._gateway = gateway
        self._exchange = exchange
        self._principal = principal
        self._token_estimate = token_estimate
        self._model = model
        self._native = native
        self._session = session
        self._tried: frozenset[str] = frozenset()
        self._only = only  # X-Backend: this backend and no other
        self._started = 0.0
        self.backend: Backend | None = None

    async def __aenter__(self) -> Gated:
        exchange = self._exchange
        await reserve_tokens(self._gateway, exchange, self._principal, self._token_estimate)
        exchange.phase = "queued"
        try:
            exchange.queue_wait_s = await self._take(self._gateway.affinity.get(self._session))
        except BaseException:
            self._refund()  # refused, timed out or left while queued: no work was done
            raise
        exchange.phase = "upstream"
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        backend = self.backend
        if backend is not None:
            self.backend = None
            self._gateway.gate.release(backend, self._gateway.clock() - self._started)
            if self._exchange.error_type is None:
                self._gateway.affinity.remember(self._session, backend.name)
        self._settle()

    def can_move(self) -> bool:
        """Whether another backend could take the request now or soon."""
        tried = self._tried | {self.backend.name} if self.backend is not None else self._tried
        return bool(self._eligible(tried))

    async def fail_over(self, reason: str) -> Backend | None:
        """The current backend could not take the request (unreachable, or busy before any
        byte): give its slot back and take one on another backend that can serve it
        (waiting in the queue if need be); None when there is none."""
        left = self.backend
        if left is None:
            return None
        self._tried |= {left.name}
        self.backend = None
        self._gateway.gate.release(left, None)
        if not self._eligible(self._tried):
            return None
        await self._take(None)
        moved = cast("Backend", self.backend)
        metrics = self._gateway.metrics
        metrics.count(metrics.failovers, {"from_backend": left.name, "to_backend": moved.name})
        log.warning(
            "backend_failover", from_backend=left.name, to_backend=moved.name, reason=reason
        )
        return moved

    async def _take(self, prefer: str | None) -> float:
        gateway = self._gateway
        target, waited_s = await gateway.gate.acquire(
            self._principal.bucket, lambda: self._eligible(self._tried), self._model, prefer
        )
        self.backend = cast("Backend", target)
        self._exchange.backend = self.backend.name
        self._started = gateway.clock()
        return waited_s

    def _eligible(self, exclude: frozenset[str]) -> list[Backend]:
        found = self._gateway.backends.eligible(self._model, native=self._native, exclude=exclude)
        return found if self._only is None else [b for b in found if b.name == self._only]

    def _refund(self) -> None:
        principal = self._principal
        if principal.limit.tokens_per_minute > 0:
            self._gateway.limiter.settle_tokens(
                principal.bucket, principal.limit, self._token_estimate, 0
            )

    def _settle(self) -> None:
        # Settled only with real statistics: a request that ended without them (aborted,
        # cut, refused upstream) keeps its reservation, so aborting a stream earns no refund.
        principal, exchange = self._principal, self._exchange
        if principal.limit.tokens_per_minute > 0 and exchange.completion_tokens is not None:
            actual = (exchange.prompt_tokens or 0) + exchange.completion_tokens
            self._gateway.limiter.settle_tokens(
                principal.bucket, principal.limit, self._token_estimate, actual
            )
