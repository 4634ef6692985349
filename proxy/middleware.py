"""The one middleware: what every request gets, whatever its route.

It gives the request its id and an ``Exchange`` to fill in, renders any error in the
route's dialect, and at the end records the exchange once: the metrics and one
``request_finished`` log line, from the same facts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from proxy.dialects import dialect_for
from proxy.errors import ProxyError, RateLimitedError, RouteNotFoundError
from proxy.exchange import EXCHANGE, Exchange
from proxy.gateway import GATEWAY, Gateway
from proxy.log import REQUEST_ID, request_finished
from proxy.probes import UNMETERED

log = structlog.get_logger("proxy.access")

_REQUEST_ID = re.compile(r"^[\w.:@/+=-]{1,128}$")


def _request_id(request: web.Request) -> str:
    given = request.headers.get("X-Request-ID")
    if given and _REQUEST_ID.match(given):
        return given
    # An id to find a request by, not a secret: the PRNG, without os.urandom's system call.
    return f"{random.getrandbits(128):032x}"


@web.middleware
async def exchange_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    gateway = request.app[GATEWAY]
    resource = request.match_info.route.resource
    exchange = Exchange(
        request_id=_request_id(request),
        method=request.method,
        endpoint=resource.canonical if resource is not None else "other",
        dialect=dialect_for(request.path),
        started=time.monotonic(),
    )
    exchange.headers["X-Request-ID"] = exchange.request_id
    request[EXCHANGE] = exchange
    bound = REQUEST_ID.set(exchange.request_id)
    outcome = "error"
    gateway.drain.enter()
    try:
        try:
            response = await handler(request)
        except ConnectionResetError:
            # The client left while the gateway wrote to it (the final write, often): a
            # cancellation like any other. What was written is the answer aiohttp finishes.
            outcome = "cancelled"
            return exchange.response if exchange.response is not None else _gone()
        except ProxyError as err:
            response = error_response(exchange, err)
            outcome = _outcome_of(err)
        except web.HTTPException as exc:
            if "Allow" in exc.headers:  # a 405 says which methods the route takes
                exchange.headers["Allow"] = exc.headers["Allow"]
            response = error_response(exchange, _from_http(exc))
        except Exception:
            log.exception("request_failed")
            response = error_response(exchange, ProxyError("internal gateway error"))
        else:
            if not response.prepared:
                response.headers.update(exchange.headers)
            exchange.status = exchange.status or response.status
            outcome = "error" if exchange.error_type or exchange.status >= 400 else "success"
    except (asyncio.CancelledError, ConnectionResetError):
        # The client went away (handler_cancellation) or a write to it failed.
        outcome = "cancelled"
        raise
    finally:
        gateway.drain.leave()
        finish(gateway, exchange, outcome)
        REQUEST_ID.reset(bound)
    return response


def _gone() -> web.StreamResponse:
    """An answer for a client that is gone: aiohttp's write of it fails quietly."""
    response = web.Response(status=499)
    response.force_close()
    return response


def _outcome_of(err: ProxyError) -> str:
    if isinstance(err, RateLimitedError):
        return "rate_limited"
    if err.reject_reason is not None:
        return "rejected"
    return "error"


def _from_http(exc: web.HTTPException) -> ProxyError:
    """The router's own 404 and 405, to be rendered in the route's dialect."""
    if exc.status == 404:
        return RouteNotFoundError("no such route")
    err = RouteNotFoundError(f"{exc.reason.lower()}: see the README for the routes")
    err.status, err.code = exc.status, "method_not_allowed"
    return err


def error_response(exchange: Exchange, err: ProxyError) -> web.Response:
    exchange.status = err.status
    if err.error_type is not None:
        exchange.error_type = err.error_type
    exchange.error = err.message
    exchange.reject_reason = err.reject_reason
    headers = dict(exchange.headers)
    if err.retry_after_s is not None:
        headers["Retry-After"] = str(err.retry_after_s)
    response = web.Response(
        status=err.status,
        body=exchange.dialect.error_body(err.status, err.message, err.code),
        content_type="application/json",
        headers=headers,
    )
    if err.status in (408, 413):
        response.force_close()  # the rest of the body was not read: no next request on it
    return response


def finish(gateway: Gateway, ex: Exchange, outcome: str) -> None:
    """Record one finished exchange as metrics and one log line. Never awaits."""
    duration_s = time.monotonic() - ex.started
    if ex.endpoint in UNMETERED:  # probes: neither traffic nor worth an info line
        log.debug("request_finished", endpoint=ex.endpoint, status=ex.status)
        return
    m = gateway.metrics
    model = gateway.backends.model_label(ex.model)
    series = {"endpoint": ex.endpoint, "model": model}
    on_backend = {**series, "backend": ex.backend}
    m.count(m.requests, {"method": ex.method, **on_backend, "status": outcome})
    m.observe(m.duration, series, duration_s)
    if ex.error_type is not None and outcome in ("error", "rejected"):
        m.count(m.errors, {"error_type": ex.error_type})
    ttft_s = None
    if ex.streamed and ex.first_chunk_at is not None:
        ttft_s = ex.first_chunk_at - ex.started
        m.observe(m.ttft, on_backend, ttft_s)
    if ex.queue_wait_s is not None:
        m.observe(m.queue_wait, {}, ex.queue_wait_s)
    per_model = {"model": model}
    if ex.prompt_tokens:
        m.count(m.prompt_tokens, per_model, ex.prompt_tokens)
    if ex.completion_tokens:
        m.count(m.completion_tokens, per_model, ex.completion_tokens)
    if ex.tokens_per_second is not None:
        m.observe(m.tokens_per_second, per_model, ex.tokens_per_second)
    if ex.load_duration_s is not None:
        m.observe(m.load_duration, per_model, ex.load_duration_s)
    if outcome == "rate_limited":
        m.count(m.rate_limited, {"client": ex.client})
    elif outcome == "rejected" and ex.reject_reason is not None:
        m.count(m.rejected, {"reason": ex.reject_reason})
    elif outcome == "cancelled":
        phase = "streaming" if ex.phase in {"upstream", "streaming"} else "queued"
        m.count(m.disconnects, {"phase": phase})
    fields = {
        "method": ex.method,
        "endpoint": ex.endpoint,
        "model": ex.model,
        "backend": ex.backend,
        "client": ex.client,
        "status": ex.status,
        "outcome": outcome,
        "error_type": ex.error_type,
        "error": ex.error,
        "duration_s": round(duration_s, 6),
        "queue_wait_s": _round(ex.queue_wait_s),
        "ttfb_s": _round(ex.first_byte_at - ex.started if ex.first_byte_at else None),
        "ttft_s": _round(ttft_s),
        "prompt_tokens": ex.prompt_tokens,
        "completion_tokens": ex.completion_tokens,
        "tokens_per_second": _round(ex.tokens_per_second),
        "load_duration_s": _round(ex.load_duration_s),
        "bytes_out": ex.bytes_out,
        "retries": ex.retries,
    }
    request_finished(logging.WARNING if outcome == "error" else logging.INFO, ex.request_id, fields)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 6)
