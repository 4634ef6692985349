"""Rendering ``/api/pull`` progress: a redrawn bar per layer on a terminal, plain lines in logs.

The formatting functions are pure; ``PullProgress`` only decides when to draw what they return.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

# Keeps a full line (label, bar, sizes, speed) under 80 columns, so `\r` redraws never wrap.
BAR_WIDTH = 20
# A speed measured over less than this is noise (the first bytes arrive in a burst).
MIN_RATE_WINDOW_S = 0.5
# Without a terminal a line per 10 % keeps a CI or `just deploy` log readable for a 4 GB layer.
LOG_STEPS = 10
_CLEAR_TO_EOL = "\x1b[K"


def format_bytes(n: float) -> str:
    """Decimal units, as Ollama's own CLI shows model sizes: ``1.9 GB``."""
    if n < 1000:
        return f"{int(n)} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1000
        if n < 1000:
            return f"{n:.1f} {unit}"
    return f"{n / 1000:.1f} TB"


def format_rate(bytes_per_s: float | None) -> str:
    """Always in MB/s so successive lines compare at a glance; empty while unknown."""
    if bytes_per_s is None:
        return ""
    return f"{bytes_per_s / 1e6:.1f} MB/s"


def percent(completed: int, total: int) -> int:
    """Rounded down, so 100 % means finished rather than nearly finished."""
    if total <= 0:
        return 0
    return max(0, min(100, completed * 100 // total))


def render_bar(completed: int, total: int, width: int = BAR_WIDTH) -> str:
    filled = 0 if total <= 0 else max(0, min(width, completed * width // total))
    return "[" + "#" * filled + "-" * (width - filled) + "]"


def progress_line(
    label: str, completed: int, total: int, rate_bps: float | None, *, bar: bool = True
) -> str:
    """One layer's progress: label, percent, optional bar, bytes done/total, and speed."""
    parts = [label, f"{percent(completed, total):3d}%"]
    if bar:
        parts.append(render_bar(completed, total))
    parts.append(f"{format_bytes(completed)}/{format_bytes(total)}")
    rate = format_rate(rate_bps)
    if rate:
        parts.append(rate)
    return " ".join(parts)


@dataclass
class _Layer:
    started_s: float
    base: int  # bytes already done when first seen, so a resumed pull does not inflate the rate
    logged_step: int = -1


class PullProgress:
    """Turns pull progress objects into output: status lines as they come, bars for layers."""

    def __init__(
        self, out: TextIO, *, is_tty: bool, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._out = out
        self._is_tty = is_tty
        self._clock = clock
        self._layers: dict[str, _Layer] = {}
        self._drawing: str | None = None  # the layer whose bar is on the current line

    def update(self, event: Mapping[str, Any]) -> None:
        status = str(event.get("status", ""))
        total = event.get("total")
        if not isinstance(total, int) or total <= 0:
            self.finish()
            self._out.write(status + "\n")
            self._out.flush()
            return
        # Ollama omits `completed` until it is non-zero.
        completed = event.get("completed")
        done = completed if isinstance(completed, int) else 0
        now = self._clock()
        layer = self._layers.setdefault(status, _Layer(started_s=now, base=done))
        elapsed_s = now - layer.started_s
        measured = elapsed_s >= MIN_RATE_WINDOW_S and done > layer.base
        rate = (done - layer.base) / elapsed_s if measured else None
        if self._is_tty:
            if self._drawing not in (None, status):
                self.finish()
            line = progress_line(status, done, total, rate)
            self._out.write("\r" + line + _CLEAR_TO_EOL)
            self._drawing = status
        else:
            step = percent(done, total) * LOG_STEPS // 100
            if step <= layer.logged_step:
                return
            layer.logged_step = step
            self._out.write(progress_line(status, done, total, rate, bar=False) + "\n")
        self._out.flush()

    def finish(self) -> None:
        """End a bar that is still being redrawn, so the next output starts on its own line."""
        if self._drawing is not None:
            self._out.write("\n")
            self._out.flush()
            self._drawing = None
