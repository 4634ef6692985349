"""The facts of one request/response exchange, filled in as the request flows.

The middleware creates it, the handler and the relay fill it in, and at the end the same
facts become the ``request_finished`` log line and the metrics: the two always agree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from aiohttp import web

from proxy.dialects import Dialect, Usage


@dataclass(slots=True)
class Exchange:
    request_id: str
    method: str
    endpoint: str
    dialect: Dialect
    started: float
    client: str = "anonymous"
    model: str | None = None
    backend: str = "none"  # the backend that served it (none: refused before one was chosen)
    phase: str = "admission"  # admission -> queued -> upstream -> streaming
    status: int = 0
    error_type: str | None = None
    error: str | None = None
    reject_reason: str | None = None
    streamed: bool = False
    queue_wait_s: float | None = None
    first_chunk_at: float | None = None
    first_byte_at: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_per_second: float | None = None
    load_duration_s: float | None = None
    bytes_out: int = 0
    retries: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    response: web.StreamResponse | None = None  # once prepared: what the client is getting

    def record_usage(self, usage: Usage) -> None:
        """The answer's token statistics, as the upstream reported them."""
        self.prompt_tokens = usage.prompt_tokens
        self.completion_tokens = usage.completion_tokens
        self.tokens_per_second = usage.tokens_per_second
        self.load_duration_s = usage.load_duration_s

    def fail(self, error_type: str, message: str) -> None:
        """The upstream failed after the response started (the status is already sent)."""
        if self.error_type is None:
            self.error_type = error_type
            self.error = message


EXCHANGE = web.RequestKey("exchange", Exchange)
