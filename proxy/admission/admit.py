"""The admission step, as the handlers take it: the request rate first (cheap, before the
body is read), then, once the body says what the request will cost, its LLM tokens and a
gate slot held for as long as the upstream works on it.

    admit(...)                      # 429 when the client's or the global bucket is empty
    async with Gated(...):          # the token reservation, then a slot (or a fair wait)
        ...                         # the upstream request
"""

from __future__ import annotations

from proxy.admission.keys import Principal
from proxy.errors import RateLimitedError, ShuttingDownError
from proxy.exchange import Exchange
from proxy.gateway import Gateway


def admit(gateway: Gateway, exchange: Exchange, principal: Principal) -> None:
    """Take a request from the client's and the global bucket, or refuse with 429 (or 503
    while the gateway shuts down)."""
    if gateway.drain.stopping:
        raise ShuttingDownError
    decision = gateway.limiter.admit(principal.bucket, principal.limit)
    exchange.headers.update(decision.headers())
    if not decision.admitted:
        exchange.headers["Retry-After"] = str(decision.retry_after_s)
        raise RateLimitedError(
            f"rate limit exceeded ({decision.why}); retry in {decision.retry_after_s} s",
            retry_after_s=decision.retry_after_s,
        )


def reserve_tokens(
    gateway: Gateway, exchange: Exchange, principal: Principal, estimate: int
) -> None:
    if principal.limit.tokens_per_minute <= 0:
        return
    decision = gateway.limiter.reserve_tokens(principal.bucket, principal.limit, estimate)
    if not decision.admitted:
        exchange.headers["Retry-After"] = str(decision.retry_after_s)
        raise RateLimitedError(
            f"token rate limit exceeded ({int(principal.limit.tokens_per_minute)} tokens per "
            f"minute); retry in {decision.retry_after_s} s",
            retry_after_s=decision.retry_after_s,
        )


class Gated:
    """``async with Gated(...)``: reserve the client's LLM tokens, hold a gate slot for the
    body, settle the tokens. (A class: generator-based context managers cost more, and
    this one is entered on every inference request.)"""

    __slots__ = ("_exchange", "_gateway", "_principal", "_slot", "_token_estimate")

    def __init__(
        self, gateway: Gateway, exchange: Exchange, principal: Principal, token_estimate: int
    ) -> None:
        self._gateway = gateway
        self._exchange = exchange
        self._principal = principal
        self._token_estimate = token_estimate
        self._slot = gateway.gate.slot(principal.bucket)

    async def __aenter__(self) -> None:
        exchange = self._exchange
        reserve_tokens(self._gateway, exchange, self._principal, self._token_estimate)
        exchange.phase = "queued"
        try:
            exchange.queue_wait_s = await self._slot.__aenter__()
        except BaseException:
            self._refund()  # refused, timed out or left while queued: no work was done
            raise
        exchange.phase = "upstream"

    async def __aexit__(self, *exc_info: object) -> None:
        await self._slot.__aexit__(*exc_info)
        self._settle()

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
