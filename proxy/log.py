"""The structlog processor chain: JSON lines by default, a console renderer on a TTY.

The id of the request being handled (``REQUEST_ID``, a context variable) is added to every
event a request logs, so an error logged where it is decided carries the id that ties it to the
request's one ``request_finished`` line.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from contextvars import ContextVar
from typing import IO, Any, TextIO

import orjson
import structlog
from structlog.typing import EventDict

# Set by the middleware for each request; one ContextVar.set is cheaper than structlog's
# bind_contextvars/clear_contextvars pair, which a request would pay on every request.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}
_LEVELS["error"] = logging.ERROR


def _add_request_id(_logger: Any, _name: str, event: EventDict) -> EventDict:
    # After the event's own keys, as structlog.contextvars.merge_contextvars places them.
    request_id = REQUEST_ID.get()
    if request_id is not None:
        event.setdefault("request_id", request_id)
    return event


def _dumps(event: Any, **_: Any) -> bytes:
    # orjson renders the request_finished line several times faster than json, and a line
    # is written for every request; values it does not know become their str().
    return orjson.dumps(event, default=str)


class _Lines:
    """Where JSON lines go: written at once, flushed once per event-loop turn, so that the
    lines of the requests finishing together leave in one system call, without delay."""

    def __init__(self, buffer: IO[bytes]) -> None:
        self.buffer = buffer
        self._flush_due = False

    def write(self, line: bytes) -> None:
        self.buffer.write(line)
        if self._flush_due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.buffer.flush()
            return
        self._flush_due = True
        loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_due = False
        self.buffer.flush()


class _Fast:
    """The request_finished line's own path (see ``request_finished``)."""

    def __init__(self) -> None:
        self.lines: _Lines | None = None
        self.threshold = logging.INFO
        self._second = 0
        self._second_text = ""

    def timestamp(self) -> str:
        """structlog's ``TimeStamper(fmt="iso", utc=True)`` text; the date and time of day
        are formatted once per second."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1e6):06d}Z"


_fast = _Fast()
_LEVEL_NAMES = {logging.INFO: "info", logging.WARNING: "warning"}


def request_finished(level: int, request_id: str, fields: dict[str, Any]) -> None:
    """Log the one line of a finished request (INFO or WARNING).

    A line per request is the busiest log path, so in JSON format it skips the structlog
    chain and writes what that chain would: the fields, then ``event``, the request
    id, ``level`` and ``timestamp``. The console format goes through structlog.
    """
    if level < _fast.threshold:
        return
    if _fast.lines is None:
        structlog.get_logger("proxy.access").log(level, "request_finished", **fields)
        return
    line = fields.copy()
    line["event"] = "request_finished"
    line["request_id"] = request_id
    line["level"] = _LEVEL_NAMES[level]
    line["timestamp"] = _fast.timestamp()
    _fast.lines.write(orjson.dumps(line, default=str, option=orjson.OPT_APPEND_NEWLINE))


class _LinesLogger:
    """structlog's logger for JSON: the same ``_Lines`` as the fast path, so order holds."""

    def __init__(self, lines: _Lines) -> None:
        self._lines = lines

    def msg(self, message: bytes) -> None:
        self._lines.write(message + b"\n")

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


def configure_logging(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    out = stream if stream is not None else sys.stderr
    use_console = fmt == "console" or (fmt == "auto" and out.isatty())
    renderer: structlog.typing.Processor
    factory: Any
    _fast.threshold = _LEVELS[level.lower()]
    if use_console:
        renderer = structlog.dev.ConsoleRenderer(colors=out.isatty())
        factory = structlog.PrintLoggerFactory(out)
        _fast.lines = None
    else:
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
        lines = _fast.lines = _Lines(out.buffer)
        factory = lambda *_: _LinesLogger(lines)  # noqa: E731
    structlog.configure(
        processors=[
            _add_request_id,
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
