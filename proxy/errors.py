"""The gateway's own errors: each type carries its status, code and metric labels.

Errors are classified by type, never by message text, and rendered in one place
(``middleware.exchange_middleware``) in the dialect of the route. A failure after the
response started is not an exception: the relay ends the stream with an error frame
(``Exchange.fail``).
"""

from __future__ import annotations

# Bounded label sets for ``ollama_errors_total{error_type}`` and
# ``ollama_rejected_total{reason}``: metrics pre-create every value at zero.
ERROR_TYPES = (
    "ConnectError",
    "TimeoutError",
    "UpstreamStatus",
    "StreamInterrupted",
    "BadResponse",
    "InvalidRequest",
    "InternalError",
)
REJECT_REASONS = (
    "queue_full",
    "queue_timeout",
    "unauthorized",
    "forbidden",
    "too_large",
    "invalid",
    "slow_client",
    "too_many_connections",
    "shutting_down",
    "shared_state_down",
)


class ProxyError(Exception):
    """Base class: rendered as ``status`` with ``code`` in the route's dialect."""

    status = 500
    code = "internal_error"
    error_type: str | None = "InternalError"
    reject_reason: str | None = None

    def __init__(self, message: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidRequestError(ProxyError):
    status = 400
    code = "invalid_request"
    error_type = "InvalidRequest"
    reject_reason = "invalid"


class BodyTooLargeError(ProxyError):
    status = 413
    code = "request_too_large"
    error_type = None
    reject_reason = "too_large"


class ClientTimeoutError(ProxyError):
    """The client sent its request body too slowly (``server.body_timeout_s``)."""

    status = 408
    code = "request_timeout"
    error_type = None
    reject_reason = "slow_client"


class UnauthorizedError(ProxyError):
    status = 401
    code = "invalid_api_key"
    error_type = None
    reject_reason = "unauthorized"


class ForbiddenError(ProxyError):
    status = 403
    code = "forbidden"
    error_type = None
    reject_reason = "forbidden"


class RouteNotFoundError(ProxyError):
    status = 404
    code = "not_found"
    error_type = None


class ModelNotFoundError(ProxyError):
    """No backend holds the model asked for (with several backends)."""

    status = 404
    code = "model_not_found"
    error_type = None


class NoBackendError(ProxyError):
    """The backends that hold the model do not answer now."""

    status = 503
    code = "no_backend"
    error_type = "ConnectError"


class UnsupportedByBackendError(ProxyError):
    """An Ollama-native route was called while the upstream speaks only the OpenAI API."""

    status = 501
    code = "unsupported_by_backend"
    error_type = None


class RateLimitedError(ProxyError):
    status = 429
    code = "rate_limit_exceeded"
    error_type = None


class QueueFullError(ProxyError):
    status = 503
    code = "queue_full"
    error_type = None
    reject_reason = "queue_full"


class QueueTimeoutError(ProxyError):
    status = 503
    code = "queue_timeout"
    error_type = None
    reject_reason = "queue_timeout"


class ShuttingDownError(ProxyError):
    """The gateway is stopping: the request is refused before any work, to be retried."""

    status = 503
    code = "shutting_down"
    error_type = None
    reject_reason = "shutting_down"

    def __init__(self, message: str = "the gateway is shutting down; retry later") -> None:
        super().__init__(message, retry_after_s=1)


class SharedStateDownError(ProxyError):
    """Redis does not answer and the failure policy is closed: nothing is admitted."""

    status = 503
    code = "shared_state_unavailable"
    error_type = None
    reject_reason = "shared_state_down"


class UpstreamConnectError(ProxyError):
    status = 502
    code = "upstream_unavailable"
    error_type = "ConnectError"


class UpstreamUnreachableError(UpstreamConnectError):
    """No connection could be made: the upstream never saw the request, so it may go to
    another backend."""


class UpstreamTimeoutError(ProxyError):
    status = 504
    code = "upstream_timeout"
    error_type = "TimeoutError"


class UpstreamResponseError(ProxyError):
    """The upstream answered, but with a body the gateway cannot read (not JSON, broken,
    or in a content coding it does not decode)."""

    status = 502
    code = "bad_upstream_response"
    error_type = "BadResponse"
