"""Rendering ``/api/pull`` progress: sizes, speeds, bars, a terminal and a log."""

from __future__ import annotations

import io
from typing import Any

from proxy.cli.progress import PullProgress, format_bytes, format_rate, progress_line, render_bar
from tests.conftest import FakeClock


def test_byte_and_rate_formatting() -> None:
    """Sizes use decimal units as Ollama's CLI does; rates are always MB/s."""
    assert format_bytes(0) == "0 B"
    assert format_bytes(999) == "999 B"
    assert format_bytes(241_970) == "242.0 KB"
    assert format_bytes(2_019_377_376) == "2.0 GB"
    assert format_bytes(4.5e12) == "4.5 TB"
    assert format_rate(None) == ""
    assert format_rate(12_345_678) == "12.3 MB/s"


def test_bar_and_progress_line() -> None:
    """The bar fills in proportion, never overflows, and the line rounds percent down."""
    assert render_bar(0, 100, width=10) == "[----------]"
    assert render_bar(55, 100, width=10) == "[#####-----]"
    assert render_bar(150, 100, width=10) == "[##########]"
    assert render_bar(5, 0, width=10) == "[----------]"
    assert progress_line("pulling dde5aa3fc5ff", 1_009_688_688, 2_019_377_376, 12.3e6) == (
        "pulling dde5aa3fc5ff  50% [##########----------] 1.0 GB/2.0 GB 12.3 MB/s"
    )
    assert progress_line("pulling dde5aa3fc5ff", 1_999, 2_000, None, bar=False) == (
        "pulling dde5aa3fc5ff  99% 2.0 KB/2.0 KB"
    )


def layer(completed: int | None, total: int = 1_000_000_000) -> dict[str, Any]:
    event: dict[str, Any] = {
        "status": "pulling 0123456789ab",
        "digest": "sha256:0123",
        "total": total,
    }
    if completed is not None:
        event["completed"] = completed
    return event


def test_progress_on_a_terminal_redraws_one_line_per_layer() -> None:
    """On a TTY a layer's bar is redrawn in place with its speed, and ends before a new status."""
    out, clock = io.StringIO(), FakeClock()
    progress = PullProgress(out, is_tty=True, clock=clock)
    progress.update({"status": "pulling manifest"})
    progress.update(layer(None))
    clock.advance(0.1)  # too short a window to state a speed
    progress.update(layer(100_000_000))
    clock.advance(1.9)
    progress.update(layer(500_000_000))
    progress.update({"status": "verifying sha256 digest"})
    assert out.getvalue() == (
        "pulling manifest\n"
        "\rpulling 0123456789ab   0% [--------------------] 0 B/1.0 GB\x1b[K"
        "\rpulling 0123456789ab  10% [##------------------] 100.0 MB/1.0 GB\x1b[K"
        "\rpulling 0123456789ab  50% [##########----------] 500.0 MB/1.0 GB 250.0 MB/s\x1b[K"
        "\nverifying sha256 digest\n"
    )


def test_progress_in_a_log_prints_a_line_per_ten_percent() -> None:
    """Without a TTY a layer prints once per 10 % step, so logs stay short."""
    out, clock = io.StringIO(), FakeClock()
    progress = PullProgress(out, is_tty=False, clock=clock)
    for completed in (None, 40_000_000, 100_000_000, 150_000_000, 990_000_000, 1_000_000_000):
        clock.advance(1.0)
        progress.update(layer(completed))
    progress.finish()
    assert out.getvalue().splitlines() == [
        "pulling 0123456789ab   0% 0 B/1.0 GB",
        "pulling 0123456789ab  10% 100.0 MB/1.0 GB 50.0 MB/s",
        "pulling 0123456789ab  99% 990.0 MB/1.0 GB 247.5 MB/s",
        "pulling 0123456789ab 100% 1.0 GB/1.0 GB 200.0 MB/s",
    ]
