"""The request_finished line's fast path writes what the structlog chain writes."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
import structlog

from proxy.log import REQUEST_ID, configure_logging, request_finished

FIELDS = {"method": "POST", "endpoint": "/api/chat", "model": None, "status": 200, "ttft_s": 0.25}
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class Sink(io.TextIOWrapper):
    """A text stream over bytes, not a TTY, that counts flushes of its buffer."""

    def __init__(self) -> None:
        self.raw_bytes = io.BytesIO()
        super().__init__(io.BufferedWriter(self.raw_bytes))  # type: ignore[arg-type]

    def isatty(self) -> bool:
        return False

    def written(self) -> list[str]:
        return self.raw_bytes.getvalue().decode().splitlines()


@pytest.fixture
def sink() -> Iterator[Sink]:
    sink = Sink()
    configure_logging("info", "json", sink)
    yield sink
    configure_logging("info", "json")


def test_the_fast_line_is_the_structlog_line(sink: Sink) -> None:
    bound = REQUEST_ID.set("abc")
    try:
        structlog.get_logger("proxy.access").warning("request_finished", **FIELDS)
    finally:
        REQUEST_ID.reset(bound)
    request_finished(logging.WARNING, "abc", FIELDS)
    slow, fast = (json.loads(line) for line in sink.written())
    assert list(fast) == list(slow)  # same keys, same order
    assert TIMESTAMP.match(fast.pop("timestamp"))
    assert TIMESTAMP.match(slow.pop("timestamp"))
    assert fast == slow == {**FIELDS, "event": "request_finished", "request_id": "abc",
                            "level": "warning"}  # fmt: skip


def test_below_the_level_nothing_is_written() -> None:
    sink = Sink()
    configure_logging("warning", "json", sink)
    try:
        request_finished(logging.INFO, "abc", FIELDS)
        request_finished(logging.WARNING, "def", FIELDS)
    finally:
        configure_logging("info", "json")
    assert [json.loads(line)["request_id"] for line in sink.written()] == ["def"]


async def test_lines_of_one_loop_turn_leave_together_and_at_once(sink: Sink) -> None:
    for request_id in ("a", "b", "c"):
        request_finished(logging.INFO, request_id, FIELDS)
    structlog.get_logger("proxy.test").info("other_event")
    assert sink.written() == []  # still in the buffer during this turn
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done  # the next turn: the flush scheduled by the first line has run
    events = [json.loads(line).get("request_id", "other") for line in sink.written()]
    assert events == ["a", "b", "c", "other"]
