"""The live progress line of a load test: redrawn in place on a terminal, plain lines in logs.

The bar itself is ``proxy.cli.progress.render_bar``, the one ``pull`` draws. The line is a pure
function of the counts, so what a person sees is tested without a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TextIO

from loadtest.report import OUTCOMES
from proxy.cli.progress import render_bar

_CLEAR_TO_EOL = "\x1b[K"
_REDRAW_EVERY_S = 0.1
LOG_STEPS = 10  # without a terminal: a line per 10 % of the run


def progress_line(
    counts: Mapping[str, int],
    *,
    in_flight: int,
    elapsed_s: float,
    total: int | None,
    duration_s: float | None,
    bar: bool,
) -> str:
    """``[#####-----]  23/50  success 20  error 1  429 2 ...  5 in flight  4.1 req/s  5.6 s``."""
    done = sum(counts.values())
    if total:
        fraction_done, of = done / total, f"{done:>4}/{total}"
    else:
        fraction_done, of = (min(1.0, elapsed_s / duration_s) if duration_s else 0.0), f"{done:>4}"
    parts = [render_bar(int(fraction_done * 1000), 1000)] if bar else []
    parts.append(of)
    parts += [
        f"{name} {counts.get(name, 0)}"
        for name in OUTCOMES
        if counts.get(name) or name in ("success", "error")
    ]
    parts.append(f"{in_flight} in flight")
    if elapsed_s > 0:
        parts.append(f"{done / elapsed_s:.1f} req/s")
    parts.append(f"{elapsed_s:.1f} s" + (f"/{duration_s:g} s" if duration_s else ""))
    return "  ".join(parts)


class LiveProgress:
    """Told about every request that starts and ends; draws at most ten times a second."""

    def __init__(
        self,
        out: TextIO,
        *,
        is_tty: bool,
        total: int | None,
        duration_s: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._is_tty = is_tty
        self._total = total
        self._duration_s = duration_s
        self._clock = clock
        self._started = clock()
        self._drawn_at = -1.0
        self._logged_step = 0
        self.counts: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        self.in_flight = 0

    def request_started(self) -> None:
        self.in_flight += 1

    def request_finished(self, outcome: str) -> None:
        self.in_flight -= 1
        self.counts[outcome] = self.counts.get(outcome, 0) + 1
        self.draw()

    def draw(self, *, force: bool = False) -> None:
        now = self._clock()
        elapsed_s = now - self._started
        if self._is_tty:
            if not force and now - self._drawn_at < _REDRAW_EVERY_S:
                return
            self._drawn_at = now
            self._out.write("\r" + self._line(elapsed_s, bar=True) + _CLEAR_TO_EOL)
        else:
            step = int(self._fraction(elapsed_s) * LOG_STEPS)
            if step <= self._logged_step and not force:
                return
            self._logged_step = step
            self._out.write(self._line(elapsed_s, bar=False) + "\n")
        self._out.flush()

    def finish(self) -> None:
        """Draw the final state and end the line."""
        if self._is_tty:
            self.draw(force=True)
            self._out.write("\n")
            self._out.flush()
        elif self._logged_step < LOG_STEPS:
            self.draw(force=True)

    def _fraction(self, elapsed_s: float) -> float:
        if self._total:
            return sum(self.counts.values()) / self._total
        if self._duration_s:
            return min(1.0, elapsed_s / self._duration_s)
        return 0.0

    def _line(self, elapsed_s: float, *, bar: bool) -> str:
        return progress_line(
            self.counts,
            in_flight=self.in_flight,
            elapsed_s=elapsed_s,
            total=self._total,
            duration_s=self._duration_s,
            bar=bar,
        )
