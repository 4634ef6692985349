"""The structlog processor chain: JSON lines by default, a console renderer on a TTY.

Context bound with ``structlog.contextvars`` (the request id) is merged into every event a
request logs, so an error logged where it is decided carries the id that ties it to the
request's one ``request_finished`` line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import orjson
import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def _dumps(event: Any, **_: Any) -> bytes:
    # orjson renders the request_finished line several times faster than json, and a line
    # is written for every request; values it does not know become their str().
    return orjson.dumps(event, default=str)


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor
    factory: Any
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        factory = structlog.PrintLoggerFactory(out)
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        factory = structlog.BytesLoggerFactory(out.buffer)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level.lower()]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # aiohttp's own loggers (access log off; errors only) go through the stdlib.
    logging.basicConfig(level=logging.WARNING, stream=out, format="%(name)s %(message)s")
